"""An Ollama Modelfile for a GGUF file: its chat template in Ollama's Go template language, and its stop tokens.

Ollama runs a GGUF through llama.cpp but does not run the Jinja chat template the file carries: a Modelfile
gives it a TEMPLATE in Go's text/template, which sees the conversation as .Messages (each with .Role and
.Content). unsloth's save_pretrained_gguf writes one the same way, from a table of model families.

A Jinja template is a program, and no general translation to Go exists. So minilora knows the families it
trains, and for each one holds three things written by hand: the Go template, a Python function that
renders the same text, and the stop tokens:
- ChatML (SmolLM2, Qwen2.5): <|im_start|>role\\ncontent<|im_end|>\\n ... <|im_start|>assistant\\n
- Llama 3: <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ... (Llama 3.1's dated system
  block is not this format, and is refused)
- DeepSeek-R1 (R1-Distill-Qwen and -Llama): system, then <｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>,
  the answer opened with <｜Assistant｜><think>\\n (or <｜Assistant｜> in the first release of the template)
- the alpaca and r1 prompts of data.py, which an adapter trained on such records keeps as its chat template:
  each user turn the whole prompt, each answer followed by EOS, no system message
The model's own Jinja template is rendered (tokenizer.py, as transformers does) on four probe conversations
and compared with each family's Python rendering; a family is chosen only if all four match exactly.
Anything else gets no Modelfile and a message saying why: a guessed template would make a model that
answers badly without any error.

Two things Ollama does around the template decide what must match:
- BOS. Ollama, like llama.cpp, tokenizes the rendered prompt with the GGUF's add_bos_token; a template that
  writes {{bos_token}} itself (R1-Distill, Llama 3) is matched with that BOS taken off, or it would be doubled.
  (node-llama-cpp's ChatML wrapper has the opposite trap: it adds a BOS SmolLM2's template never writes.)
- A default system prompt (SmolLM2's "You are a helpful AI assistant named SmolLM...", Qwen's "You are
  Qwen...") becomes SYSTEM: Ollama puts it first when a conversation has no system message
  (server/routes.go), which is what those templates do.
Known differences, outside the probes: Llama 3's template strips white space around each message, Go cannot;
R1's drops everything up to </think> from earlier answers, which Ollama does itself for thinking models; Ollama
joins consecutive messages of one role with a blank line before the template sees them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jinja2

from ..tokenizer import compile_chat_template


@dataclass(frozen=True)
class Family:
    name: str
    go_template: str                      # Ollama's TEMPLATE; {{ "\n" }} spells a final newline unambiguously
    render: Callable[[list[dict]], str]   # the text that template gives, conversation -> prompt
    stop: tuple[str, ...]                 # PARAMETER stop: the end-of-turn markers


def _chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def _llama3(messages):
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages) \
        + "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _deepseek_r1(opening: str):
    def render(messages):
        system = "".join(m["content"] for m in messages if m["role"] == "system")  # the system prompt goes first
        turns = "".join(f"<｜User｜>{m['content']}" if m["role"] == "user" else
                        f"<｜Assistant｜>{m['content']}<｜end▁of▁sentence｜>" for m in messages
                        if m["role"] in ("user", "assistant"))
        return system + turns + opening
    return render


_R1_GO = ('{{- range .Messages }}{{ if eq .Role "system" }}{{ .Content }}{{ end }}{{ end }}'
          '{{- range .Messages }}{{ if eq .Role "user" }}<｜User｜>{{ .Content }}'
          '{{ else if eq .Role "assistant" }}<｜Assistant｜>{{ .Content }}<｜end▁of▁sentence｜>{{ end }}{{ end }}')

FAMILIES = (
    Family("ChatML", '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                     '<|im_start|>assistant{{ "\\n" }}', _chatml, ("<|im_start|>", "<|im_end|>")),
    Family("Llama 3", '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n'
                      '{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>{{ "\\n\\n" }}',
           _llama3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")),
    Family("DeepSeek-R1", _R1_GO + '<｜Assistant｜><think>{{ "\\n" }}', _deepseek_r1("<｜Assistant｜><think>\n"),
           ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")),
    Family("DeepSeek-R1 (without <think>)", _R1_GO + "<｜Assistant｜>", _deepseek_r1("<｜Assistant｜>"),
           ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>")),
)

# The probes: every turn order a chat has, with text that no template would change (no surrounding spaces).
_S, _U1, _A, _U2 = "You are terse.", "Hello,\nwho are you?", "I am a model.", "What is 2+2?"
PROBES = ([{"role": "user", "content": _U1}],
          [{"role": "system", "content": _S}, {"role": "user", "content": _U1}],
          [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A}, {"role": "user", "content": _U2}],
          [{"role": "system", "content": _S}, {"role": "user", "content": _U1}, {"role": "assistant", "content": _A},
           {"role": "user", "content": _U2}])


# what a template that raises on a conversation (a system message, say) renders here; not "\0", which
# match_family writes where a family puts a system message
REFUSED = "\x02refused"


def prompt_families(eos_token: str | None) -> tuple[Family, ...]:
    """The single-turn prompt formats an adapter trained on alpaca or r1 records keeps as its chat template
    (data.prompt_template): each user turn the whole prompt, each answer followed by EOS; a system message is
    refused by the Jinja template and left out by the Go one."""
    from ..data import ALPACA_PROMPT, R1_PROMPT

    eos = eos_token or ""
    families = []
    for name, user in (("Alpaca prompt", ALPACA_PROMPT.format(ctx="", instruction="\1", input="")),
                       ("R1 prompt", R1_PROMPT.format(question="\1"))):
        def render(messages, user=user):
            if any(m["role"] not in ("user", "assistant") for m in messages):
                return REFUSED
            return "".join(user.replace("\1", m["content"]) if m["role"] == "user" else m["content"] + eos
                           for m in messages)
        go = ('{{- range .Messages }}{{ if eq .Role "user" }}' + user.replace("\1", "{{ .Content }}") +
              '{{ else if eq .Role "assistant" }}{{ .Content }}' + eos + "{{ end }}{{ end }}")
        families.append(Family(name, go, render, (eos,) if eos else ()))
    return tuple(families)


class UnknownTemplate(ValueError):
    pass


def match_family(template: str, bos_token: str | None, eos_token: str | None, add_bos: bool,
                 source: str = "the chat template") -> tuple[Family, str | None]:
    """(the family whose format `template` renders, its default system prompt or None). Raises
    UnknownTemplate, naming what was tried, when no family renders all probes the same."""
    jinja = compile_chat_template(template)
    bos = bos_token if add_bos and bos_token else ""  # Ollama adds this one itself

    def rendered(messages):
        try:
            text = jinja.render(messages=messages, add_generation_prompt=True, bos_token=bos_token, eos_token=eos_token)
        except jinja2.TemplateError:  # the template's raise_exception
            return REFUSED
        if not bos or text == REFUSED:
            return text
        return text[len(bos):] if text.startswith(bos) else None  # None: the template's BOS is missing

    texts = [rendered(p) for p in PROBES]
    if None in texts:
        raise UnknownTemplate(
            f"{source} does not begin with the BOS token {bos_token!r}, but the GGUF says add_bos_token, so Ollama "
            "would put one in front that the model never saw in training. No Modelfile was written.")
    families = FAMILIES + prompt_families(eos_token)
    for family in families:
        # a default system prompt: what the template writes for [user] where the family puts a system message
        before, _, after = family.render([{"role": "system", "content": "\0"}] + PROBES[0]).partition("\0")
        first = texts[0] or ""
        system = None
        if first != family.render(PROBES[0]) and first.startswith(before) and first.endswith(after) \
                and len(first) > len(before) + len(after):
            system = first[len(before):len(first) - len(after)]
        with_system = [p if p[0]["role"] == "system" or system is None else [{"role": "system", "content": system}] + p
                       for p in PROBES]
        if all(t == family.render(p) for t, p in zip(texts, with_system)):
            return family, system
    raise UnknownTemplate(
        f"{source} is none of the chat formats minilora can write for Ollama ({', '.join(f.name for f in families)}): "
        f"rendered on a test conversation it gives {(texts[2] or '')[:160]!r}. No Modelfile was written; write its "
        "TEMPLATE by hand (https://github.com/ollama/ollama/blob/main/docs/template.md).")


def _quoted(text: str) -> str:
    if '"""' in text:
        raise UnknownTemplate(f'{text[:60]!r}... contains """, which a Modelfile cannot quote.')
    return f'"""{text}"""'


def modelfile_text(gguf_path: str | Path) -> str:
    """The Modelfile for one GGUF file, from the metadata it carries (template, BOS/EOS, add_bos_token)."""
    import gguf

    gguf_path = Path(gguf_path)
    fields = gguf.GGUFReader(str(gguf_path)).fields
    value = lambda key: fields[key].contents() if key in fields else None  # noqa: E731
    template = value("tokenizer.chat_template")
    if not template:
        raise UnknownTemplate(f"{gguf_path.name} carries no chat template (tokenizer.chat_template); no Modelfile.")
    tokens = value("tokenizer.ggml.tokens")
    token = lambda key: None if value(key) is None else tokens[int(value(key))]  # noqa: E731
    family, system = match_family(template, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"),
                                  bool(value("tokenizer.ggml.add_bos_token")), source=f"{gguf_path.name}'s chat template")
    lines = [f"# Ollama Modelfile for {gguf_path.name}, written by minilora. Chat format: {family.name}, matched",
             "# against the model's own chat template on four conversations. Run it with",
             f"#   ollama create {gguf_path.stem} -f Modelfile && ollama run {gguf_path.stem}",
             f"FROM ./{gguf_path.name}",
             f"TEMPLATE {_quoted(family.go_template)}"]
    if system is not None:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in family.stop]
    return "\n".join(lines) + "\n"


def write_modelfile(gguf_path: str | Path) -> Path:
    """Write `Modelfile` beside the GGUF file; raises UnknownTemplate (and writes nothing) for an unknown template."""
    gguf_path = Path(gguf_path)
    text = modelfile_text(gguf_path)
    out = gguf_path.parent / "Modelfile"
    out.write_text(text, encoding="utf-8")
    return out
