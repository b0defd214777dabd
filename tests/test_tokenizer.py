"""The tokenizer and chat template against transformers' AutoTokenizer on the real SmolLM2 files."""
import json
import shutil

import pytest

from minilora.tokenizer import Tokenizer

TEXTS = ["What is the capital of France?", "  leading spaces, digits 12345 and ümlauts\n\ttabs",
         "<|im_start|>user\nhi<|im_end|>", "", "A" * 500]
CHATS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "Think first."}, {"role": "assistant", "content": "<think>\nok\n</think>\nDone."}],
]


@pytest.fixture(scope="module")
def both(smollm2):
    from transformers import AutoTokenizer

    return Tokenizer(smollm2), AutoTokenizer.from_pretrained(smollm2)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match(both, text):
    ours, ref = both
    assert ours.encode(text) == ref(text)["input_ids"]
    assert ours.decode(ours.encode(text)) == ref.decode(ref(text)["input_ids"])


@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_matches(both, chat, gen):
    ours, ref = both
    text = ours.apply_chat_template(chat, add_generation_prompt=gen)
    assert text == ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
    ref_ids = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
    ref_ids = ref_ids["input_ids"] if isinstance(ref_ids, dict) or hasattr(ref_ids, "keys") else ref_ids
    assert ours.encode(text, add_special_tokens=False) == list(ref_ids)


def test_special_tokens(both):
    ours, ref = both
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id, ref.pad_token_id)


def test_template_with_bos_variable_and_dict_tokens(tmp_path, smollm2):
    """DeepSeek's template writes {{ bos_token }} and its config stores tokens as AddedToken dicts."""
    from transformers import AutoTokenizer

    shutil.copy(smollm2 / "tokenizer.json", tmp_path)
    cfg = json.loads((smollm2 / "tokenizer_config.json").read_text())
    cfg["bos_token"] = {"content": "<|im_start|>", "lstrip": False, "normalized": False, "rstrip": False,
                        "single_word": False, "__type": "AddedToken"}
    cfg["chat_template"] = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<U>{{ m['content'] }}"
                            "{% elif m['role'] == 'assistant' %}<A>{{ m['content'] }}{{ eos_token }}"
                            "{% else %}{{ raise_exception('bad role') }}{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}<A><think>\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = Tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    for chat in CHATS[:1] + CHATS[2:]:
        for gen in (False, True):
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == ref.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False)


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer(tmp_path)
