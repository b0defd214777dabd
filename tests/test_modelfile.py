"""The Ollama Modelfile (minilora/export/modelfile.py) against the model's own chat template.

The reference for the Jinja side is transformers' apply_chat_template; for the Go side, tests/gotemplate.py,
a renderer of the part of Go's text/template the Modelfiles use, with Ollama's handling of SYSTEM and of
consecutive messages (checked by hand against the expected outputs in Ollama's own template tests).
A Modelfile is right when, for conversations other than the probes modelfile.py matched on,
    Jinja(conversation) == BOS (if the GGUF adds one) + Go(TEMPLATE, conversation, SYSTEM)
which is what makes Ollama's tokens equal transformers'.
"""
import re

import pytest

from gotemplate import ollama_render
from minilora.export.modelfile import UnknownTemplate, match_family, modelfile_text

# The chat templates as their tokenizer_config.json files ship them (JSON-decoded).
# DeepSeek-R1-Distill-Qwen-1.5B/-7B/-14B/-32B and -Llama-8B/-70B share this one (the release of 2025-02,
# which opens the answer with <think>); the first release ended with {{'<｜Assistant｜>'}}.
R1_DISTILL = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    "{%- for message in messages %}{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}"
    "{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜>"
    "<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + "
    "tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}"
    "{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' "
    "+ '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}"
    "{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}"
    "{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}"
    "{%- else %}{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}"
    "{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    "{%- set ns.is_output_first = false %}{%- else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + "
    "'<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    "{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}{% endif %}")
R1_DISTILL_FIRST = R1_DISTILL.replace("{{'<｜Assistant｜><think>\\n'}}", "{{'<｜Assistant｜>'}}")
# Meta-Llama-3-8B-Instruct
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' "
          "+ message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
          "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Qwen2.5-Instruct, its part without tools
QWEN25 = ("{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + "
          "'<|im_end|>\\n' }}{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
          "helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- for message in messages %}{%- if (message.role == \"user\")"
          " or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\") %}"
          "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}{%- endif %}"
          "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

R1_TOKENS = dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", add_bos=True)
CASES = {  # template, special tokens, the family and default system prompt modelfile.py must find
    "r1-distill": (R1_DISTILL, R1_TOKENS, "DeepSeek-R1", None),
    "r1-distill-first": (R1_DISTILL_FIRST, R1_TOKENS, "DeepSeek-R1 (without <think>)", None),
    "llama3": (LLAMA3, dict(bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True), "Llama 3", None),
    "qwen2.5": (QWEN25, dict(bos=None, eos="<|im_end|>", add_bos=False), "ChatML",
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
}
# Conversations the probes did not use: more turns, Unicode, code, blank lines inside a message.
CONVERSATIONS = [
    [{"role": "user", "content": "Écris un haïku sur la mer. 🌊"}],
    [{"role": "system", "content": "Answer in JSON.\n\nBe brief."}, {"role": "user", "content": "def f(x):\n    return x"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
]


def transformers_render(template, tokens, messages):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                  bos_token=tokens["bos"], eos_token=tokens["eos"])
    tok.chat_template = template
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("case", CASES)
def test_go_template_renders_what_the_jinja_template_renders(case):
    template, tokens, family_name, default_system = CASES[case]
    family, system = match_family(template, tokens["bos"], tokens["eos"], tokens["add_bos"])
    assert (family.name, system) == (family_name, default_system)
    bos = tokens["bos"] if tokens["add_bos"] else ""
    for messages in CONVERSATIONS:
        want = transformers_render(template, tokens, messages)
        assert want == bos + ollama_render(family.go_template, messages, system), messages


def test_smollm2_modelfile(smollm2, tmp_path):
    """The real model: the Modelfile from its GGUF; SmolLM2's default system prompt becomes SYSTEM."""
    from transformers import AutoTokenizer

    from minilora.export.gguf import write_gguf

    path = write_gguf(smollm2, tmp_path / "smol-f16.gguf", "f16", progress=False)
    text = modelfile_text(path)
    assert "FROM ./smol-f16.gguf\n" in text and 'PARAMETER stop "<|im_end|>"' in text
    template = re.search(r'TEMPLATE """(.*?)"""', text, re.S).group(1)
    system = re.search(r'SYSTEM """(.*?)"""', text, re.S).group(1)
    assert system == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    tok = AutoTokenizer.from_pretrained(smollm2)
    for messages in CONVERSATIONS:  # SmolLM2 adds no BOS (add_bos_token false), so the texts are equal
        assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            ollama_render(template, messages, system)


# Llama 3.1-Instruct's template without its tool parts: a dated system block in every prompt, the user's
# system prompt inside it.
LLAMA31 = ("{{- bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
           "Today Date: 26 Jul 2024\n\n{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] | trim }}"
           "{%- set messages = messages[1:] %}{%- endif %}<|eot_id|>{%- for message in messages %}"
           "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
           "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}")


@pytest.mark.parametrize("template,add_bos", [
    (LLAMA31, True),  # no Go template here writes the date block, or puts the system prompt after it
    ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}", False),  # no roles at all
])
def test_unknown_templates_are_refused(template, add_bos):
    with pytest.raises(UnknownTemplate, match=r"none of the chat formats .*ChatML, Llama 3, DeepSeek-R1.*"
                                              r"No Modelfile was written"):
        match_family(template, "<|begin_of_text|>", "<|eot_id|>", add_bos=add_bos)


def test_template_without_the_bos_the_gguf_adds_is_refused():
    with pytest.raises(UnknownTemplate, match="does not begin with the BOS token"):
        match_family(QWEN25, "<|endoftext|>", "<|im_end|>", add_bos=True)


def test_merge_writes_no_modelfile_for_an_unknown_template_and_says_so(tmp_path):
    from test_merge import make_adapter

    from minilora.export.merge import merge

    base, adapter, _ = make_adapter(tmp_path)  # the tiny tokenizer: a template with no roles
    with pytest.warns(UserWarning, match="none of the chat formats minilora can write for Ollama"):
        out = merge(base, adapter, tmp_path / "merged", gguf="q8_0", progress=False)
    assert (out / "merged-q8_0.gguf").is_file() and not (out / "Modelfile").exists()


@pytest.mark.parametrize("fmt,family_name", [("alpaca", "Alpaca prompt"), ("r1", "R1 prompt")])
def test_the_prompt_formats_of_alpaca_and_r1_adapters(fmt, family_name, deepseek_r1):
    """An adapter trained on alpaca or r1 records keeps that prompt as its chat template (data.prompt_template), with
    DeepSeek-R1-Distill's BOS: Ollama's TEMPLATE renders what transformers renders from it, for every conversation
    without a system message (which the Jinja template refuses, and the Go one leaves out)."""
    from minilora.data import prompt_template
    from minilora.tokenizer import Tokenizer

    template = prompt_template(fmt, Tokenizer(deepseek_r1))
    family, system = match_family(template, R1_TOKENS["bos"], R1_TOKENS["eos"], R1_TOKENS["add_bos"])
    assert (family.name, system) == (family_name, None) and family.stop == (R1_TOKENS["eos"],)
    for messages in [c for c in CONVERSATIONS if all(m["role"] != "system" for m in c)]:
        want = transformers_render(template, R1_TOKENS, messages)
        assert want == R1_TOKENS["bos"] + ollama_render(family.go_template, messages, None), messages
