"""Chat records -> token ids with a label span for each assistant turn.

The target. A label span is what the model writes at inference: after the conversation so far and
the template's generation prompt, up to and including the end-of-turn token. For a template whose
generation prompt opens a thought (DeepSeek-R1-Distill's ends with '<think>\\n'), the model writes
"reasoning</think>answer<eos>", so every assistant turn is first written in that shape:
- with reasoning, '<think>\\nREASONING</think>ANSWER': trained on REASONING</think>ANSWER<eos>, once
  (the generation prompt already wrote the '<think>\\n'; a missing opening tag is added);
- without reasoning, as most human-like chat data is: DeepSeek's empty thought goes in front,
  '<think>\\n\\n</think>\\n\\n' + ANSWER, and the target is '\\n</think>\\n\\n' ANSWER<eos>; with
  --empty-think mask the empty thought stays in the input but only the answer is trained.
Every assistant turn is a label span (--last-turn-only keeps the last); an earlier turn is rendered
as the template renders history (DeepSeek's drops its reasoning, as it does when the model chats).

The spans. A template with `{% generation %}` blocks marks them itself (trl's training templates,
ours). For one without, turn i's span is the difference of two renderings: the conversation up to
turn i with the generation prompt (what the model sees) and the conversation through turn i (what
it should have written), which needs a template that renders a turn the same whether or not more
turns follow. Either way a span starts no earlier than its generation prompt ends.

The check. Each span must start with its message's target (ends trimmed of whitespace; for an
earlier turn, the answer after '</think>' will do, the history rule). A template that drops or
rewrites content fails it, and the row is refused with what the template did and the way out:
never train on less than the data says without saying so. DeepSeek-R1-Distill's own template drops
the reasoning of every turn, so it is recognised by its text and swapped for the training variant
in templates/deepseek_r1_distill.jinja, whose header says what differs and why (trl does the same
with deepseek_r1_distill_training.jinja, huggingface/trl PR 6766).

Tokens. The text is tokenized piece by piece: each masked run, each span, and an empty thought we
added, on its own. The first piece is then exactly the prompt as generation tokenizes it; tokenizing
the whole text at once would let BPE merge across a boundary ('<think>\\n' + '\\n</think>' gives one
'\\n\\n' token that the model never sees after a prompt ending in '\\n').
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from .tokenizer import Tokenizer, compile_chat_template

THINK, END_THINK = "<think>", "</think>"


class ChatError(ValueError):
    """A chat record or template that cannot be trained on as it is; the message names the file and row
    (or the template file) and the way out. data.build_examples reports it like any bad row."""


TEMPLATES_DIR = Path(__file__).parent / "templates"

# sha256 of the DeepSeek-R1-Distill chat template's text (stripped), every version known to us. The
# Qwen and Llama distills ship the same text. Each is swapped for templates/deepseek_r1_distill.jinja.
DEEPSEEK_R1_DISTILL = {
    # in the models' GGUF files (tokenizer.chat_template); the generation prompt is '<｜Assistant｜>'
    "b6835114b7303ddd78919a82e4d9f7d8c26ed0d7dfc36beeb12d524f6144eab1": "the GGUF version",
    # on the hub since 2025-02-09 (e.g. DeepSeek-R1-Distill-Qwen-1.5B commit 530ca3e): '<｜Assistant｜><think>\n'
    "56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f": "the hub version",
}
VARIANT = "deepseek_r1_distill.jinja"

FIX = ("pass --chat-template FILE with a template that renders each message's content as it is (minilora/templates/"
       f"{VARIANT} shows how a template is changed for training, with {{% generation %}} marks), or change the data")


@dataclass
class ChatFormat:
    """How chat records become examples; chat_format() builds it and prints nothing."""
    tok: Tokenizer  # its chat template is the one below
    where: str  # where the template came from, for messages: a file, or the tokenizer's folder
    think_open: str  # the end of the generation prompt that opens a thought ("<think>\n"), or ""
    empty_think: str = "train"  # turns without reasoning: "train" the empty thought, or "mask" it
    last_turn_only: bool = False
    why: str = ""  # why this template and not the tokenizer's, if it is not

    def describe(self) -> str:
        """The lines train.py prints above the example."""
        gen = generation_prompt(self.tok)
        lines = [f"chat template: {self.where}" + (f" ({self.why})" if self.why else ""),
                 f"  generation prompt: {gen!r}"]
        if self.think_open:
            empty = self.think_open + "\n" + END_THINK + "\n\n"
            lines += ["  target: what the model writes after it, 'reasoning</think>answer' and the end-of-turn "
                      "token; a turn's <think> reasoning is trained",
                      f"  turns without reasoning get DeepSeek's empty thought {empty!r}: "
                      + ("trained with the answer (--empty-think mask: the answer alone)" if self.empty_think == "train"
                         else "in the input but masked; the answer alone is trained (--empty-think mask)")]
        lines.append("  trained: the last assistant turn only (--last-turn-only)" if self.last_turn_only else
                     "  trained: every assistant turn (--last-turn-only: the last alone); an earlier turn as the "
                     "template renders it as history (history_reasoning_dropped counts those it cut the reasoning "
                     "from; their answers are trained)")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the template

def chat_format(tok: Tokenizer, template_file: str = "", empty_think: str = "train",
                last_turn_only: bool = False) -> ChatFormat:
    """Pick the chat template (--chat-template FILE, else the tokenizer's, with DeepSeek-R1-Distill's swapped
    for the training variant), set it on `tok` so that everything after renders with it, and find out whether
    its generation prompt opens a thought. A file that is missing or does not parse is a ChatError."""
    why = ""
    if template_file:
        source, where = read_template(template_file), template_file
    elif tok.chat_template is None:
        raise ChatError(f"{tok.folder}: the tokenizer has no chat template; give one with --chat-template FILE, "
                        "or pick a plain-text --template (alpaca, r1, text).")
    else:
        source, where = tok.chat_template, f"the chat template of {tok.folder}"
        known = DEEPSEEK_R1_DISTILL.get(hashlib.sha256(source.strip().encode()).hexdigest())
        if known:
            source = (TEMPLATES_DIR / VARIANT).read_text(encoding="utf-8")
            where = f"minilora/templates/{VARIANT}"
            why = (f"{tok.folder} ships DeepSeek-R1-Distill's template, {known}; this training variant of it keeps "
                   "the reasoning of the turn being trained")
    try:
        tok.set_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"{where}:{e.lineno}: the chat template does not parse: {e.message}.") from None
    try:
        gen = generation_prompt(tok)
    except Exception as e:  # noqa: BLE001 - a template that cannot render one user turn
        raise ChatError(f"{where}: the chat template cannot render a one-message conversation "
                        f"({type(e).__name__}: {e}).") from None
    tail = gen[gen.rfind(THINK):] if THINK in gen else ""
    think_open = tail if tail and not tail[len(THINK):].strip() else ""  # "<think>" and whitespace, at the end
    return ChatFormat(tok, where, think_open, empty_think, last_turn_only, why)


def read_template(path: str) -> str:
    """The text of a --chat-template file, which must exist and parse (a ChatError names the file and line)."""
    try:
        source = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"{path}: cannot read the chat template ({type(e).__name__}: {e}).") from None
    try:
        compile_chat_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"{path}:{e.lineno}: the chat template does not parse: {e.message}.") from None
    return source


def for_inference(source: str) -> str | None:
    """The chat template a merged model should carry, given the one its adapter trained with; None: the base's.

    The training variant of DeepSeek-R1-Distill's template (templates/) is None: for chatting it renders what
    the base's own renders (it differs in the turn being trained), and the base's is the one llama.cpp and
    Ollama know. Any other template is kept, its `{% generation %}` marks made plain `{% if true %}` blocks:
    they only mark what to train, and not every Jinja engine knows the tag (whitespace control kept)."""
    if source.strip() == (TEMPLATES_DIR / VARIANT).read_text(encoding="utf-8").strip():
        return None
    source = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", source)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", source)


def generation_prompt(tok: Tokenizer) -> str:
    """The text the template adds for add_generation_prompt=True (e.g. '<｜Assistant｜><think>\\n')."""
    probe = [{"role": "user", "content": "x"}]
    without, with_ = tok.apply_chat_template(probe), tok.apply_chat_template(probe, add_generation_prompt=True)
    return with_[len(without):] if with_.startswith(without) else with_


# ----------------------------------------------------------------------------- one record

def messages_of(rec: dict) -> list[dict]:
    """A record's conversation: `messages`, or a prompt/chosen pair (`rejected` is not used)."""
    where = rec.get("_where", "?")
    messages = rec.get("messages")
    if messages is None:
        p, c = rec.get("prompt"), rec.get("chosen")
        if not isinstance(p, str) or not isinstance(c, str):
            found = sorted(k for k in rec if k != "_where")
            raise ChatError(f"{where}: column(s) ['prompt', 'chosen'] or ['messages'] missing or not text; "
                            f"found {found}.")
        messages = [{"role": "user", "content": p}, {"role": "assistant", "content": c}]
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)
            or messages[-1].get("role") != "assistant"):
        raise ChatError(f"{where}: `messages` must be a list of {{role, content}} objects with text values, "
                        "ending with an assistant turn.")
    for m in messages:  # a lone surrogate (a \ud800-style escape) is not a character; data.py names it
        m["content"].encode("utf-8")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def target(content: str, think_open: str, where: str, turn: int) -> str:
    """An assistant message as the model writes it after a generation prompt that opened a thought."""
    if not think_open:
        return content
    if END_THINK not in content:
        if THINK in content:
            raise ChatError(f"{where}: assistant turn {turn} opens {THINK} but never closes it with {END_THINK}.")
        return think_open + "\n" + END_THINK + "\n\n" + content  # DeepSeek's empty thought
    if content.startswith(THINK):  # '<think>' + the generation prompt's whitespace, once
        content = content[len(THINK):].removeprefix(think_open[len(THINK):])
    return think_open + content


def chat_example(rec: dict, fmt: ChatFormat) -> tuple[list[int], list[bool], int]:
    """(token ids, which of them are trained, how many earlier turns the history rule cut the reasoning from)."""
    where, tok = rec.get("_where", "?"), fmt.tok
    msgs = messages_of(rec)
    assistant = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    thoughtless = {i for i in assistant if END_THINK not in msgs[i]["content"]}  # get the empty thought
    for i in assistant:
        msgs[i]["content"] = target(msgs[i]["content"], fmt.think_open, where, assistant.index(i) + 1)
    trained = assistant[-1:] if fmt.last_turn_only else assistant

    def render(upto: int, gen: bool):
        try:
            return tok.render_chat(msgs[:upto], add_generation_prompt=gen)
        except jinja2.TemplateError as e:  # raise_exception(...): a role or an order the template refuses
            raise ChatError(f"{where}: the chat template ({fmt.where}) rejects this conversation: {e}.") from None
        except Exception as e:  # noqa: BLE001 - jinja choking on this row
            raise ChatError(f"{where}: the chat template ({fmt.where}) cannot render this conversation "
                            f"({type(e).__name__}: {str(e)[:200]}).") from None

    full, marked = render(len(msgs), False)
    if marked and len(marked) != len(assistant):
        raise ChatError(f"{where}: the chat template ({fmt.where}) marks {len(marked)} {{% generation %}} span(s) "
                        f"for {len(assistant)} assistant turn(s); cannot tell which is which.")
    spans, dropped = [], 0  # spans: (start, end, length of the empty thought we added that it starts with)
    for n, i in enumerate(assistant):
        if i not in trained:
            continue
        prompt = render(i, True)[0]  # what the model sees before it writes turn i
        if marked:
            start, end = marked[n]
        else:
            through = render(i + 1, False)[0]
            if not full.startswith(through):
                raise ChatError(
                    f"{where}: the chat template ({fmt.where}) renders assistant turn {n + 1} differently once later "
                    "turns follow it (as templates that cut the reasoning of earlier turns do), so its span cannot be "
                    "cut out of the conversation. Train on the last turn only (--last-turn-only), or " + FIX + ".")
            if not through.startswith(prompt):
                c = _common(prompt, through)
                raise ChatError(
                    f"{where}: the chat template ({fmt.where}) ends its generation prompt with {_tail(prompt)!r} but "
                    f"renders assistant turn {n + 1} as {_head(through[c:])!r} after {_tail(through[:c])!r}, so what "
                    "the model writes after the prompt cannot be cut out (DeepSeek-R1-Distill's hub template, for one, "
                    "opens <think> in its generation prompt and drops the reasoning from the turn). "
                    + FIX[0].upper() + FIX[1:] + ".")
            start, end = len(prompt), len(through)
        if full.startswith(prompt):
            start = max(start, len(prompt))  # the generation prompt is not the model's to write
        cut = _check(full, start, end, msgs[i]["content"], fmt.think_open, i == assistant[-1], where, n + 1, fmt.where)
        dropped += cut and i not in thoughtless  # (cutting the empty thought we added loses nothing)
        spans.append((start, end, _empty_thought_at(full[start:end], fmt.think_open) if i in thoughtless else 0))
    for j, m in enumerate(msgs):  # a message the template leaves out is data not trained on either
        if m["role"] != "assistant" and m["content"].strip() and m["content"].strip() not in full:
            raise ChatError(f"{where}: the chat template ({fmt.where}) leaves out message {j + 1} (role "
                            f"{m['role']!r}) of this conversation; merge it into another message, or " + FIX + ".")
    return (*_tokenize(full, spans, tok, fmt.empty_think == "train"), dropped)


def _check(full: str, start: int, end: int, content: str, think_open: str, last: bool, where: str, turn: int,
           source: str) -> int:
    """Does the span [start, end) of `full` start with `content` (less the '<think>\n' that the generation prompt
    wrote, and ends trimmed of whitespace)? 0 if so; 1 if only its answer is there (the history rule, allowed
    for an earlier turn); else a ChatError that says what the template did."""
    opened = bool(think_open) and content.startswith(think_open) and full[:start].endswith(think_open)
    want = content[len(think_open) if opened else 0:].strip()
    span = full[start:end].lstrip()
    if span.startswith(want):
        return 0
    answer = content.split(END_THINK)[-1].strip()
    if not last and END_THINK in content and span.startswith(answer):
        return 1
    if END_THINK in content and span.startswith(answer):
        what = "drops the <think> reasoning (everything up to </think>) from the turn"
    elif want and span.find(want) > 0:
        what = f"writes {_head(span[:span.find(want)])!r} before the content (the model would learn to write it)"
    else:
        what = "rewrites or leaves out the content"
    raise ChatError(f"{where}: the chat template ({source}) {what}: assistant turn {turn} should train on "
                    f"{_head(want)!r} but its span is {_head(span)!r}. To train on it whole, " + FIX + ".")


def _empty_thought_at(span: str, think_open: str) -> int:
    """How much of the span's start is DeepSeek's empty thought (the longest end of it that starts the span:
    '\n</think>\n\n' after the generation prompt, '\n\n' in a history turn whose thought the template cut)."""
    if not think_open:
        return 0
    empty = think_open + "\n" + END_THINK + "\n\n"
    return next((len(empty) - k for k in range(len(empty)) if span.startswith(empty[k:])), 0)


def _tokenize(text: str, spans: list[tuple[int, int, int]], tok: Tokenizer,
              train_empty: bool) -> tuple[list[int], list[bool]]:
    """(ids, trained): each masked run and each span tokenized on its own (the module docstring says why). An
    empty thought we added is a piece of its own, trained or not (--empty-think), so both settings give the same
    ids. EOS is appended, trained, if no span holds it. Special tokens are the template's to write."""
    pieces, at = [], 0  # (start, end, trained)
    for start, end, empty in spans:
        pieces += [(at, start, False), (start, start + empty, train_empty), (start + empty, end, True)]
        at = end
    pieces.append((at, len(text), False))
    ids, trained = [], []
    for a, b, in_span in pieces:
        if b > a:
            piece = tok.encode(text[a:b], add_special_tokens=False)
            ids += piece
            trained += [in_span] * len(piece)
    if tok.eos_id is not None and tok.eos_id not in [i for i, t in zip(ids, trained) if t]:
        ids.append(tok.eos_id)
        trained.append(True)
    return ids, trained


def _common(a: str, b: str) -> int:
    """Length of the common prefix of a and b."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _head(s: str, n: int = 80) -> str:
    return s if len(s) <= n else s[:n] + "…"


def _tail(s: str, n: int = 40) -> str:
    return s if len(s) <= n else "…" + s[-n:]
