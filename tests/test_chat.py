"""chat.py with the real tokenizer and chat templates of DeepSeek-R1-Distill-Qwen-7B.

The tokenizer comes from the header of the model's GGUF (conftest.deepseek_r1), with the template that GGUF
carries (generation prompt '<｜Assistant｜>'); the hub's version (since 2025-02-09: '<｜Assistant｜><think>\\n')
is that text with the generation prompt changed, written out here. Both must train the same way.

References, never minilora itself:
- llama.cpp's tokenizer (node-llama-cpp 3.22.1, loading the GGUF's vocabulary): the ids of every text here,
  recorded in golden/deepseek_r1_distill_llamacpp.json (golden/make_llamacpp_ids.py writes it again);
- a tokenizer built here with the `tokenizers` library from the GGUF's own lists, for random texts;
- transformers' apply_chat_template rendering DeepSeek's own (hub) template: the prompt the model sees at
  inference. The text of each label span is written out literally, as what the model writes.
"""
import functools
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import deepseek_r1_gguf, tiny_hf_model
from minilora import chat as C
from minilora import data as D
from minilora.tokenizer import Tokenizer

EOS, BOS = "<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>"
GGUF_GEN, HUB_GEN = "{{'<｜Assistant｜>'}}{% endif %}", "{{'<｜Assistant｜><think>\\n'}}{% endif %}"
EMPTY = "\n</think>\n\n"  # what the model writes of DeepSeek's empty thought '<think>\n\n</think>\n\n'
GOLDEN = Path(__file__).parent / "golden" / "deepseek_r1_distill_llamacpp.json"


def U(c):
    return {"role": "user", "content": c}


def A(c):
    return {"role": "assistant", "content": c}


# name: (record, its assistant turns as the model writes them (what `generate --chat` keeps as history) where
# they differ, the pieces of the earlier turns (found in the prompt, as history), the pieces of the last turn).
# A piece is (text, kind): "span" is trained, "empty" (the empty thought) is trained unless --empty-think mask.
CASES = {
    "reasoning": (
        {"messages": [U("What is 2+2?"), A("<think>\nTwo and two make four.\n</think>\n\n4")]}, None,
        [], [("Two and two make four.\n</think>\n\n4" + EOS, "span")]),
    "no reasoning": (
        {"messages": [U("Hi! How are you today?"), A("I'm doing great, thanks for asking. And you?")]}, None,
        [], [(EMPTY, "empty"), ("I'm doing great, thanks for asking. And you?" + EOS, "span")]),
    "prompt/chosen": (
        {"prompt": "Tell me about your weekend.", "chosen": "It was lovely: a long walk and a good book. Yours?",
         "rejected": "I am an AI and do not have weekends."}, None,
        [], [(EMPTY, "empty"), ("It was lovely: a long walk and a good book. Yours?" + EOS, "span")]),
    "multi-turn": (  # the first turn as history: DeepSeek's rule cuts its reasoning; its answer is still trained
        {"messages": [{"role": "system", "content": "You are terse."}, U("What is 2+2?"),
                      A("<think>\nAdd them.\n</think>\n\n4"), U("And times 3?"),
                      A("<think>\n4 times 3 is 12.\n</think>\n\n12")]}, None,
        [("\n\n4" + EOS, "span")], [("4 times 3 is 12.\n</think>\n\n12" + EOS, "span")]),
    "multi-turn, no reasoning": (
        {"messages": [U("Hello!"), A("Hi there."), U("How are you?"), A("Fine, thanks.")]},
        ["<think>\n\n</think>\n\nHi there."],
        [("\n\n", "empty"), ("Hi there." + EOS, "span")], [(EMPTY, "empty"), ("Fine, thanks." + EOS, "span")]),
}


def conversation(rec):
    return rec.get("messages") or [U(rec["prompt"]), A(rec["chosen"])]


@pytest.fixture(scope="module")
def gguf_template(deepseek_r1):
    return json.loads((deepseek_r1 / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]


def hub_version(gguf_template):
    assert gguf_template.count(GGUF_GEN) == 1
    return gguf_template.replace(GGUF_GEN, HUB_GEN)


@pytest.fixture(scope="module")
def hub_folder(deepseek_r1, gguf_template, tmp_path_factory):
    """The same tokenizer with the template the hub repos ship today."""
    folder = tmp_path_factory.mktemp("hub")
    shutil.copy(deepseek_r1 / "tokenizer.json", folder)
    cfg = json.loads((deepseek_r1 / "tokenizer_config.json").read_text(encoding="utf-8"))
    cfg["chat_template"] = hub_version(gguf_template)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=["gguf", "hub"])
def folder(request, deepseek_r1, hub_folder):
    return deepseek_r1 if request.param == "gguf" else hub_folder


@functools.lru_cache
def transformers_tokenizer(folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def transformers_render(folder, messages, template, gen):
    """The reference renderer: transformers' apply_chat_template."""
    return transformers_tokenizer(folder).apply_chat_template(messages, chat_template=template,
                                                              add_generation_prompt=gen, tokenize=False)


def reference_pieces(folder, gguf_template, name):
    """[(text, kind)]: the last turn's prompt as DeepSeek's hub template renders it for inference (transformers),
    cut at the earlier turns' pieces (which it holds, as history), then the last turn's pieces."""
    rec, written, history, last = CASES[name]
    msgs = [dict(m) for m in conversation(rec)]
    for m, w in zip([m for m in msgs if m["role"] == "assistant"], written or []):
        m["content"] = w
    prompt = transformers_render(folder, msgs[:-1], hub_version(gguf_template), gen=True)
    out, at = [], 0
    for text, kind in history:
        i = prompt.index(text, at)
        out += [(prompt[at:i], "prompt")] if i > at else []
        out.append((text, kind))
        at = i + len(text)
    return out + [(prompt[at:], "prompt")] + last


@functools.lru_cache
def golden():
    return json.loads(GOLDEN.read_text(encoding="utf-8"))["ids"]


def llama_cpp(text):
    """The ids llama.cpp gives `text` (special tokens parsed, no BOS added), from the golden file."""
    table = golden()
    assert text in table, f"{text!r} is not in {GOLDEN.name}: run tests/golden/make_llamacpp_ids.py"
    return table[text]


PLAIN_TEXTS = [
    "Hello world", "What is 2+2?", "Digits 12345, 3.14159 and 2024-01-01; 1000000 items.",
    "  leading spaces\n\n\ttabs   and trailing  ", "naïve café, 東京, emoji 🙂, ½ ٣ ２０２４ x²",
    "I'll've don't WE'RE it's", "def f(x):\n    return x * 2\n\n\n", "a\r\nb\rc",
    "<｜User｜>hi<｜Assistant｜><think>\nok</think>\n\nyes<｜end▁of▁sentence｜>", "<tool_call>{}</tool_call> <|im_start|>",
    "<think>\n\n</think>\n\n", "\n</think>\n\n", "<｜Assistant｜><think>\n", "x" * 300,
]
REASONING = "Two and two make four, so the answer is 4."  # the training run's data
R1_RECORD = {"Question": "Is 7 a prime number?", "Complex_CoT": "7 has no divisors but 1 and itself.",
             "Response": "Yes, 7 is prime."}


def golden_texts(deepseek_r1, gguf_template) -> list[str]:
    """Every text the tests look up in the golden file (make_llamacpp_ids.py asks llama.cpp for these)."""
    texts = list(PLAIN_TEXTS)
    for name in CASES:
        texts += [t for t, _ in reference_pieces(deepseek_r1, gguf_template, name)]
    texts += [f"{REASONING}\n</think>\n\n4{EOS}", f"\n\n4{EOS}", D.R1_PROMPT.format(question=R1_RECORD["Question"]),
              f"<think>\n{R1_RECORD['Complex_CoT']}\n</think>\n{R1_RECORD['Response']}"]
    return list(dict.fromkeys(texts))


# ----------------------------------------------------------------------------- the tokenizer


def test_golden_file_covers_every_text(deepseek_r1, gguf_template):
    missing = [t for t in golden_texts(deepseek_r1, gguf_template) if t not in golden()]
    assert not missing, f"not in {GOLDEN.name}: {missing[:3]}; run tests/golden/make_llamacpp_ids.py"


def test_tokenizer_matches_llama_cpp(deepseek_r1, gguf_template):
    """Every recorded text: our ids (tokenizer.json from gguf_tokenizer_to_hf) are llama.cpp's, and decode back."""
    tok = Tokenizer(deepseek_r1)
    for text, ids in golden().items():
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == text, text
    # (transformers' own GGUF conversion cuts the full-width special tokens into pieces; they are one id each)
    ids = llama_cpp("<｜User｜>hi<｜Assistant｜><think>\nok</think>\n\nyes<｜end▁of▁sentence｜>")
    assert [ids[0], ids[2], ids[-1]] == [tok.token_id("<｜User｜>"), tok.token_id("<｜Assistant｜>"), tok.eos_id]


@pytest.fixture(scope="module")
def gguf_fields():
    """The GGUF header's tokenizer fields, read with gguf's own reader (about 20 s: 152k tokens, 151k merges)."""
    import gguf

    class Header(gguf.GGUFReader):  # the file is cut short: read the metadata only
        def _build_tensors(self, start_offs, fields):
            self.tensors = []

    f = Header(str(deepseek_r1_gguf())).fields
    return {k: f[k].contents() for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                                         "tokenizer.ggml.merges", "tokenizer.ggml.add_bos_token")}


def test_add_bos_token_is_honoured(deepseek_r1, gguf_fields):
    """The GGUF says tokenizer.ggml.add_bos_token = True: encode(text) puts BOS in front, as llama.cpp does."""
    assert gguf_fields["tokenizer.ggml.add_bos_token"] is True
    tok = Tokenizer(deepseek_r1)
    assert tok.config["add_bos_token"] is True and tok.bos_token == BOS
    assert tok.encode("Hello world") == [tok.bos_id] + llama_cpp("Hello world")


def test_tokenizer_matches_one_built_from_the_gguf_lists(deepseek_r1, gguf_fields):
    """Random texts against a tokenizer built here with the `tokenizers` API from the GGUF's tokens, types and
    merges, with the Qwen2 split of DeepSeek-R1-Distill-Qwen's tokenizer.json on the hub (llama.cpp's
    'deepseek-r1-qwen'). The golden file above checks this reference on its texts; this one covers many more."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Fast

    tokens, types = gguf_fields["tokenizer.ggml.tokens"], gguf_fields["tokenizer.ggml.token_type"]
    merges = [tuple(m.split(" ", 1)) for m in gguf_fields["tokenizer.ggml.merges"]]
    ref = Fast(models.BPE({t: i for i, t in enumerate(tokens) if types[i] != 5}, merges))
    split = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
             r"|\s+(?!\S)|\s+")
    ref.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    ref.decoder = decoders.ByteLevel()
    ref.add_special_tokens([AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == 3])
    ref.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == 4])
    for text in golden():
        assert ref.encode(text, add_special_tokens=False).ids == llama_cpp(text), text

    tok = Tokenizer(deepseek_r1)
    rng = random.Random(0)
    pool = list("abcXYZ019 \n\t.,!?'-_()[]{}<>/|ßéü東京🙂½²") + [" the", "'ll", "<think>", "</think>", EOS, "<｜User｜>",
                                                             "  ", "\n\n", "123"]
    for _ in range(300):
        text = "".join(rng.choice(pool) for _ in range(rng.randrange(1, 40)))
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text


# ----------------------------------------------------------------------------- the templates


def test_both_template_versions_are_swapped_for_the_variant(folder):
    tok = Tokenizer(folder)
    fmt = C.chat_format(tok)
    assert fmt.where == "minilora/templates/deepseek_r1_distill.jinja"
    version = "the GGUF version" if folder.name == "DeepSeek-R1-Distill-Qwen-7B-tokenizer" else "the hub version"
    assert version in fmt.why
    assert fmt.think_open == "<think>\n" and C.generation_prompt(tok) == "<｜Assistant｜><think>\n"
    assert tok.chat_template == (C.TEMPLATES_DIR / C.VARIANT).read_text(encoding="utf-8")


CONVERSATIONS = [  # ending with a user turn: what generation renders
    [U("Hi")],
    [{"role": "system", "content": "Be brief."}, U("2+2?"), A("<think>\nsum\n</think>\n\n4"), U("And 3+3?")],
    [U("a"), A("no reasoning here"), U("b"), A("x</think>y"), U("c")],
    [U("q"), A("<think>r</think>answer"), {"role": "tool", "content": "out1"}, {"role": "tool", "content": "out2"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_variant_renders_prompts_as_the_hub_template(deepseek_r1, gguf_template, messages):
    """Rendering for generation (history, system, tools), the variant is DeepSeek's hub template, as transformers
    renders it; the GGUF version differs only by the '<think>\\n' that ends the generation prompt."""
    tok = Tokenizer(deepseek_r1)
    C.chat_format(tok)
    ours = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ours == transformers_render(deepseek_r1, messages, hub_version(gguf_template), gen=True)
    opened = "<think>\n" if messages[-1]["role"] != "tool" else ""  # (after tool output neither adds a prompt)
    assert ours == transformers_render(deepseek_r1, messages, gguf_template, gen=True) + opened


# ----------------------------------------------------------------------------- label spans


def labelled(ex, tok):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != D.IGNORE])


@pytest.mark.parametrize("empty_think", ["train", "mask"])
@pytest.mark.parametrize("name", list(CASES))
def test_label_spans_match_llama_cpp(folder, gguf_template, name, empty_think):
    """ids: llama.cpp's for the inference prompt and each piece; labels: the spans (and the empty thought unless
    --empty-think mask). With either template version."""
    tok = Tokenizer(folder)
    fmt = C.chat_format(tok, empty_think=empty_think)
    rec = dict(CASES[name][0], _where="d.jsonl:1")
    examples, stats = D.build_examples([rec], "chat", tok, 4096, chat=fmt)
    ex = examples[0]
    pieces = reference_pieces(folder, gguf_template, name)
    trained = {"span"} | ({"empty"} if empty_think == "train" else set())
    want_ids, want_labels = [], []
    for text, kind in pieces:
        ids = llama_cpp(text)
        want_ids += ids
        want_labels += ids if kind in trained else [D.IGNORE] * len(ids)
    assert ex.input_ids == want_ids
    assert ex.labels == want_labels
    if name == "no reasoning":  # tokenized whole, '<think>\n' + '\n</think>' would merge into one '\n\n' token
        assert tok.encode("".join(t for t, _ in pieces), add_special_tokens=False) != want_ids
    assert labelled(ex, tok) == "".join(t for t, kind in pieces if kind in trained)
    history = sum(1 for m in conversation(CASES[name][0])[:-1]
                  if m["role"] == "assistant" and "</think>" in m["content"])
    assert stats["history_reasoning_dropped"] == history


def test_training_prompt_is_the_generation_prompt(folder):
    """What the last turn is trained after is what `generate --chat` feeds the model for that conversation."""
    from minilora.generate import render

    rec = CASES["multi-turn"][0]
    tok = Tokenizer(folder)
    ex = D.build_examples([rec], "chat", tok, 4096, chat=C.chat_format(tok))[0][0]
    gen_tok = Tokenizer(folder)
    C.chat_format(gen_tok)  # as generate.load() does
    prompt = gen_tok.encode(render(gen_tok, rec["messages"][:-1]), add_special_tokens=False)
    assert ex.input_ids[: len(prompt)] == prompt and ex.labels[len(prompt) - 1] == D.IGNORE
    assert ex.labels[len(prompt)] != D.IGNORE and prompt[-3:] == llama_cpp("<｜Assistant｜><think>\n")


def test_last_turn_only(deepseek_r1, gguf_template):
    tok = Tokenizer(deepseek_r1)
    rec = CASES["multi-turn"][0]
    every = D.build_examples([rec], "chat", tok, 4096, chat=C.chat_format(tok))[0][0]
    last = D.build_examples([rec], "chat", tok, 4096, chat=C.chat_format(tok, last_turn_only=True))[0][0]
    assert last.input_ids == every.input_ids
    assert labelled(every, tok) == "\n\n4" + EOS + "4 times 3 is 12.\n</think>\n\n12" + EOS
    assert labelled(last, tok) == "4 times 3 is 12.\n</think>\n\n12" + EOS


def test_r1_template_trains_the_reasoning(deepseek_r1):
    """Question / Complex_CoT / Response: BOS (add_bos_token) and the prompt masked; <think>COT</think>RESP + EOS."""
    tok = Tokenizer(deepseek_r1)
    ex = D.build_examples([R1_RECORD], "r1", tok, 4096)[0][0]
    prompt = llama_cpp(D.R1_PROMPT.format(question=R1_RECORD["Question"]))
    target = llama_cpp(f"<think>\n{R1_RECORD['Complex_CoT']}\n</think>\n{R1_RECORD['Response']}") + [tok.eos_id]
    assert ex.input_ids == [tok.bos_id] + prompt + target
    assert ex.labels == [D.IGNORE] * (1 + len(prompt)) + target


def test_show_example_brackets_every_masked_run(deepseek_r1):
    tok = Tokenizer(deepseek_r1)
    ex = D.build_examples([CASES["multi-turn"][0]], "chat", tok, 4096, chat=C.chat_format(tok))[0][0]
    assert D.show_example(ex, tok) == (f"[{BOS}You are terse.<｜User｜>What is 2+2?<｜Assistant｜>]\n\n4{EOS}"
                                       f"[<｜User｜>And times 3?<｜Assistant｜><think>\n]4 times 3 is 12.\n</think>\n\n12{EOS}")


# ----------------------------------------------------------------------------- templates that lose content


def rows_with(template_text, tmp_path, rec, **kw):
    path = tmp_path / "t.jinja"
    path.write_text(template_text, encoding="utf-8")
    return lambda tok: C.chat_example(dict(rec, _where="d.jsonl:7"), C.chat_format(tok, str(path), **kw))


def test_deepseek_templates_given_as_files_are_refused_with_the_reason(deepseek_r1, gguf_template, tmp_path):
    """The originals, given by --chat-template (used as they are): each drops the reasoning, and says so."""
    rec = CASES["reasoning"][0]
    tok = Tokenizer(deepseek_r1)
    with pytest.raises(C.ChatError, match=r"d.jsonl:7: the chat template \(.*t.jinja\) drops the <think> reasoning "
                                          r"\(everything up to </think>\).*--chat-template FILE"):
        rows_with(gguf_template, tmp_path, rec)(tok)
    with pytest.raises(C.ChatError, match=r"d.jsonl:7: .*ends its generation prompt with .*<think>\\n' but renders "
                                          r"assistant turn 1 as '\\n\\n4<｜end▁of▁sentence｜>'.*--chat-template FILE"):
        rows_with(hub_version(gguf_template), tmp_path, rec)(tok)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ CONTENT }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.mark.parametrize("content,message", [
    ("m['content'].split('</think>')[-1]", r"drops the <think> reasoning"),
    ("m['content'][:12]", r"rewrites or leaves out the content"),
    ("('Sure! ' if m['role'] == 'assistant' else '') + m['content']", r"writes 'Sure! ' before the content"),
])
def test_a_template_that_loses_content_is_refused(deepseek_r1, tmp_path, content, message):
    rec = CASES["reasoning"][0]
    with pytest.raises(C.ChatError, match=message):
        rows_with(CHATML.replace("CONTENT", content), tmp_path, rec)(Tokenizer(deepseek_r1))
    ok = rows_with(CHATML.replace("CONTENT", "m['content']"), tmp_path, rec)(Tokenizer(deepseek_r1))
    assert Tokenizer(deepseek_r1).decode([i for i, t in zip(ok[0], ok[1]) if t]) == \
        "<think>\nTwo and two make four.\n</think>\n\n4<|im_end|>\n" + EOS  # (no EOS in the span: appended)


def test_history_rule_without_marks_needs_last_turn_only(deepseek_r1, tmp_path):
    """A template without {% generation %} that cuts earlier turns' reasoning (Qwen3's way) cannot have spans for
    them; it says so and points at --last-turn-only, which then works."""
    cut = ("(m['content'].split('</think>')[-1] if m['role'] == 'assistant' and not loop.last else m['content'])")
    rec = CASES["multi-turn"][0]
    with pytest.raises(C.ChatError, match=r"renders assistant turn 1 differently once later turns follow it.*"
                                          r"--last-turn-only"):
        rows_with(CHATML.replace("CONTENT", cut), tmp_path, rec)(Tokenizer(deepseek_r1))
    rows = rows_with(CHATML.replace("CONTENT", cut), tmp_path, rec, last_turn_only=True)
    ids, trained, _ = rows(Tokenizer(deepseek_r1))
    assert Tokenizer(deepseek_r1).decode([i for i, t in zip(ids, trained) if t]) == \
        "<think>\n4 times 3 is 12.\n</think>\n\n12<|im_end|>\n" + EOS


def test_a_template_with_generation_marks_is_cut_after_its_generation_prompt(deepseek_r1, gguf_template, tmp_path):
    """A trl-style training template marks the whole assistant turn, '<｜Assistant｜>' header included; the span
    starts where the generation prompt ends, so the header and its '<think>\\n' are not trained."""
    marked = hub_version(gguf_template).replace(
        "{% set content = message['content'] %}{% if '</think>' in content %}{% set content = "
        "content.split('</think>')[-1] %}{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}",
        "{% generation %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{% endgeneration %}")
    assert marked != hub_version(gguf_template)
    ids, trained, _ = rows_with(marked, tmp_path, CASES["reasoning"][0])(Tokenizer(deepseek_r1))
    assert Tokenizer(deepseek_r1).decode([i for i, t in zip(ids, trained) if t]) == CASES["reasoning"][3][0][0]


def test_rows_the_template_rejects_are_named(deepseek_r1):
    tok = Tokenizer(deepseek_r1)
    fmt = C.chat_format(tok)
    bad = [{"messages": [{"role": "bot", "content": "x"}, A("y")], "_where": "d.jsonl:3"},
           {"messages": [{"role": "system", "content": "one"}, {"role": "system", "content": "two"}, U("u"), A("a")],
            "_where": "d.jsonl:4"},
           {"messages": [U("u"), A("<think>\nnever closed")], "_where": "d.jsonl:5"},
           {"messages": [U("u")], "_where": "d.jsonl:6"}]
    with pytest.raises(D.DataError) as e:
        D.build_examples(bad, "chat", tok, 4096, chat=fmt)
    msg = str(e.value)
    assert "4 bad row(s)" in msg
    assert "d.jsonl:3: the chat template (minilora/templates/deepseek_r1_distill.jinja) rejects this conversation: " \
           "the DeepSeek-R1-Distill template knows the roles system, user, assistant and tool, not 'bot'" in msg
    assert "d.jsonl:4: the chat template (minilora/templates/deepseek_r1_distill.jinja) leaves out message 1 " \
           "(role 'system')" in msg
    assert "d.jsonl:5: assistant turn 1 opens <think> but never closes it with </think>" in msg
    assert "d.jsonl:6: `messages` must be a list of {role, content} objects" in msg


def test_template_file_that_does_not_parse(tmp_path):
    path = tmp_path / "bad.jinja"
    path.write_text("{% for m in messages %}\n{{ m['content'] }\n{% endfor %}", encoding="utf-8")
    with pytest.raises(C.ChatError, match=rf"{path}:2: the chat template does not parse: unexpected '}}'"):
        C.read_template(str(path))
    with pytest.raises(C.ChatError, match=rf"{tmp_path / 'nope.jinja'}: cannot read the chat template"):
        C.read_template(str(tmp_path / "nope.jinja"))


# ----------------------------------------------------------------------------- the commands

@pytest.fixture(scope="module")
def tiny_r1(deepseek_r1, tmp_path_factory):
    """A tiny random Qwen2 with DeepSeek-R1-Distill's tokenizer (vocabulary 152064, as the GGUF's embedding)."""
    folder = tmp_path_factory.mktemp("tiny-r1")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(deepseek_r1 / f, folder)
    tiny_hf_model(folder, "qwen2", vocab_size=152064, bos_token_id=151646, eos_token_id=151643,
                  tie_word_embeddings=True, hidden_size=32, intermediate_size=48, num_attention_heads=2,
                  num_key_value_heads=1)
    return folder


def run(module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=900)


def train_args(folder, data, out, *extra):
    return [*["--model", folder, "--data", data, "--output-dir", out, "--batch-size", 1, "--grad-accum", 1,
              "--max-steps", 2, "--lr", "1e-3", "--warmup-steps", 0, "--r", 2, "--no-4bit", "--optim", "adamw",
              "--device", "cpu", "--eval-fraction", 0, "--no-gradient-checkpointing"], *extra]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_train_cli_trains_on_the_reasoning(tiny_r1, tmp_path):
    """python -m minilora.train on a tiny Qwen2 with this tokenizer: exit 0, and each step's label_tokens is
    llama.cpp's count for 'REASONING</think>\\n\\n4' + EOS (one example a step, every row the same)."""
    folder = tiny_r1
    rec = {"messages": [U("What is 2+2?"), A(f"<think>\n{REASONING}\n</think>\n\n4")]}
    data = write_jsonl(tmp_path / "d.jsonl", [rec] * 4)
    r = run("minilora.train", *train_args(folder, data, tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "minilora/templates/deepseek_r1_distill.jinja" in r.stdout and "<think>\\n" in r.stdout
    assert f"<｜Assistant｜><think>\n]{REASONING}\n</think>\n\n4{EOS}" in r.stdout  # the printed example
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if row["split"] == "train"]
    assert len(steps) == 2
    want = len(llama_cpp(f"{REASONING}\n</think>\n\n4{EOS}"))
    assert all(row["label_tokens"] == want for row in steps), (steps, want)
    assert want > len(llama_cpp(f"\n\n4{EOS}")) + 5  # the reasoning is most of it
    # the adapter keeps the template it was trained with: the variant, not the tokenizer's
    variant = (C.TEMPLATES_DIR / C.VARIANT).read_text(encoding="utf-8")
    assert (tmp_path / "o" / "adapter" / "chat_template.jinja").read_text(encoding="utf-8") == variant
    ck = tmp_path / "o" / "checkpoints" / "step-000002" / "adapter" / "chat_template.jinja"  # a checkpoint's too
    assert ck.read_text(encoding="utf-8") == variant
    # and generate --adapter renders with that file: a broken copy of it is named in generate's error
    (tmp_path / "o" / "adapter" / "chat_template.jinja").write_text("{% if %}", encoding="utf-8")
    r = run("minilora.generate", "--model", folder, "--adapter", tmp_path / "o" / "adapter", "--prompt", "2+2?",
            "--max-new-tokens", 1, "--no-4bit", "--device", "cpu")
    assert r.returncode == 2 and "chat_template.jinja:1: the chat template does not parse" in r.stderr, r.stderr


def test_train_cli_bad_input_exits_2_and_writes_nothing(tiny_r1, tmp_path, gguf_template):
    folder = tiny_r1
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": [U("q"), A("a")]},
                                              {"messages": [{"role": "bot", "content": "q"}, A("a")]}])
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if %}", encoding="utf-8")
    hub = tmp_path / "hub.jinja"
    hub.write_text(hub_version(gguf_template), encoding="utf-8")
    for n, (extra, message) in enumerate([
            (["--chat-template", bad], f"{bad}:1: the chat template does not parse"),
            (["--chat-template", hub], f"{data}:1: the chat template ({hub}) ends its generation prompt with"),
            ([], f"{data}:2: the chat template (minilora/templates/deepseek_r1_distill.jinja) rejects this "
                 "conversation: the DeepSeek-R1-Distill template knows the roles system, user, assistant and tool, "
                 "not 'bot'")]):
        out = tmp_path / f"o{n}"
        r = run("minilora.train", *train_args(folder, data, out, *extra))
        assert r.returncode == 2 and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
        assert not out.exists() or not any(out.iterdir()), list(out.iterdir())
        assert "trainable params" not in r.stdout  # stopped before the model loaded


def test_generate_cli_opens_the_thought_as_training_did(tiny_r1, tmp_path):
    """generate --chat renders with the variant's generation prompt and shows the <think> it opened; a bad
    --chat-template is one line, exit 2."""
    folder = tiny_r1
    r = run("minilora.generate", "--model", folder, "--prompt", "What is 2+2?", "--max-new-tokens", 3, "--no-4bit",
            "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("<think>\n")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ }", encoding="utf-8")
    r = run("minilora.generate", "--model", folder, "--chat", "--chat-template", bad, "--no-4bit", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.startswith(f"minilora.generate: error: {bad}:1: the chat template does not "
                                                     "parse"), r.stderr


def test_resume_needs_the_same_chat_settings(tmp_path):
    """The chat flags decide what is trained, so --resume refuses a change; a checkpoint from before they existed
    had their defaults."""
    from dataclasses import asdict

    from minilora import train as T
    from minilora.run.resume import ResumeError, check_resume

    saved = asdict(T.TrainConfig(model="m", data="d.jsonl"))
    for k in ("chat_template", "empty_think", "last_turn_only"):
        del saved[k]
    check_resume(saved, T.TrainConfig(model="m", data="d.jsonl"), tmp_path)
    with pytest.raises(ResumeError, match="empty_think: checkpoint 'train', now 'mask'"):
        check_resume(saved, T.TrainConfig(model="m", data="d.jsonl", empty_think="mask"), tmp_path)


def test_streamer_tells_reasoning_from_answer(deepseek_r1):
    """The prompt opened the thought: the shown text starts with it, and on a terminal the reasoning is faint."""
    import io

    from minilora.generate import DIM, RESET, Streamer

    tok = Tokenizer(deepseek_r1)
    answer = "Let me add: 2+2 is 4.\n</think>\n\nThe answer is 4."
    for color in (False, True):
        out = io.StringIO()
        s = Streamer(tok, hide_think=False, opened="<think>\n", color=color, out=out)
        for t in tok.encode(answer + EOS, add_special_tokens=False):
            s(0, t)
        s.finish()
        shown = out.getvalue()
        assert shown.replace(DIM, "").replace(RESET, "") == "<think>\n" + answer + "\n"
        if color:  # every faint piece is reasoning, and all of the reasoning is faint
            faint = "".join(p.split(RESET)[0] for p in shown.split(DIM)[1:])
            assert faint == "<think>\nLet me add: 2+2 is 4.\n</think>"
        assert s.text() == answer  # the history keeps what the model wrote
