"""Data: read records, render them with a template, tokenize with a prompt mask, batch.

Templates (picked from the columns unless --template says):
- alpaca: instruction (+ input) -> output, the "Below is an instruction..." prompt of the seeds;
- r1:     Question -> <think>Complex_CoT</think> Response, the medical chain-of-thought seed;
- chat:   the tokenizer's own chat template (or --chat-template FILE) over a `messages` list (or
          prompt/chosen pairs): every assistant turn is trained; chat.py holds that whole idea;
- text:   a raw `text` column, trained on whole.

Prompt masking (alpaca, r1). The loss covers the response only (its <think> part included)
plus EOS; prompt positions get label -100, which cross-entropy ignores. We
render the prompt alone, tokenize it, and check it is a token prefix of the
tokenized full text. Searching the ids for a marker string instead breaks when
BPE merges the marker with its neighbours. If the prompt is not a prefix
(a merge across the boundary), the example is built as prompt ids + response ids,
so the mask is still exact.

EOS and padding. EOS is appended to every example (unless the template's
response already contains it), so the model learns to stop. Padding goes on
the right and is never EOS: a pad position is masked by position, and a pad
id equal to EOS would teach nothing but could be confused for it downstream.
"""
from __future__ import annotations

import codecs
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from .chat import ChatError, ChatFormat, chat_example, chat_format
from .loss import IGNORE
from .tokenizer import Tokenizer

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input}### Response:\n"
)
R1_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. Before answering, think carefully about "
    "the question and create a step-by-step chain of thoughts to ensure a logical and accurate response.\n\n"
    "### Instruction:\nYou are an expert with advanced reasoning skills. Please answer the following question.\n\n"
    "### Question:\n{question}\n\n### Response:\n"
)

# template -> the columns that select it, in the order auto-detection tries them
TEMPLATE_COLUMNS = {
    "r1": ("Question", "Complex_CoT", "Response"),
    "chat": ("messages",),
    "chat-pairs": ("prompt", "chosen"),
    "alpaca": ("instruction", "output"),
    "text": ("text",),
}
TEMPLATES = ("alpaca", "r1", "chat", "text")


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


# ----------------------------------------------------------------------------- reading

def read_records(path: str | Path, bad_rows: str = "error") -> tuple[list[dict], list[str]]:
    """Records from a .jsonl (one object per line) or .json (a list of objects) file.

    A .jsonl file is read one line at a time, as bytes: each line is decoded and parsed on
    its own, so one bad line (not UTF-8, not JSON, not an object) is one problem with its
    file and line, and the rest still load. Splitting on b"\n" only (not str.splitlines)
    keeps a U+2028 inside a JSON string from being taken as a line break.
    Every problem is collected, so one run reports them all.
    bad_rows="skip" drops the bad rows (returning the problems as warnings); "error" raises.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a folder; --data takes one .json or .jsonl file (or a hub data set id).")
    if not path.is_file():
        raise DataError(f"{path}: no such data file.")
    problems: list[str] = []
    with open(path, "rb") as f:  # a list, whatever the file's name says (a .jsonl saved as one array, say)
        is_list = f.read(4096).lstrip(codecs.BOM_UTF8 + b" \t\r\n").startswith(b"[")
    numbered = _json_list(path) if is_list else _jsonl_rows(path, problems)
    records: list[dict] = []
    for n, row in numbered:
        if not isinstance(row, dict):
            where = f"item {n}" if is_list else f"line {n}"
            problems.append(f"{path}:{where}: expected a JSON object, got {type(row).__name__}.")
        else:
            row["_where"] = f"{path}:item {n}" if is_list else f"{path}:{n}"
            records.append(row)
    if problems and not records:  # not a file of records at all (a CSV, say): one line, not one per row
        raise DataError(f"{path}: none of its {len(problems)} row(s) is a JSON record (the first: {problems[0]}); "
                        "--data takes a .json list of records or a .jsonl file of one JSON object per line.")
    if problems and bad_rows == "error":
        raise DataError(problem_report(problems, path) + SKIP_HINT)
    return records, problems


def _jsonl_rows(path: Path, problems: list[str]):
    """(line number, parsed value) for every non-blank line; bad lines go to `problems`."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # Windows editors write one; json.loads refuses it
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line); "
                                "re-save the file as UTF-8.")
                continue
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: malformed JSON line: {e.msg} (column {e.pos + 1}).")
            except RecursionError:
                problems.append(f"{path}:{lineno}: JSON nested too deeply to read.")


def _json_list(path: Path) -> list[tuple[int, object]]:
    """(item number, value) from a .json list. One bad byte spoils the whole list, so errors raise."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}); re-save the file as UTF-8.") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}).") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read.") from None
    return [(i + 1, r) for i, r in enumerate(rows)]


SKIP_HINT = "\n(pass --bad-rows skip to drop them)"


def problem_report(problems: list[str], source, limit: int = 20) -> str:
    """`N bad row(s) in SOURCE:` and the first `limit` problems, one per line."""
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return f"{len(problems)} bad row(s) in {source}:\n  " + "\n  ".join(problems[:limit]) + more


# ----------------------------------------------------------------------------- templates

def common_columns(records: list[dict]) -> set[str]:
    """The columns at least half the records have: one odd row neither picks nor spoils the template."""
    counts: dict[str, int] = {}
    for rec in records:
        for k in rec:
            if k != "_where":
                counts[k] = counts.get(k, 0) + 1
    return {k for k, n in counts.items() if 2 * n >= len(records)}


def detect_template(columns: set[str]) -> str:
    for name, cols in TEMPLATE_COLUMNS.items():
        if set(cols) <= columns:
            return "chat" if name == "chat-pairs" else name
    fits = "; ".join(f"{'chat' if t == 'chat-pairs' else t}: {', '.join(c)}" for t, c in TEMPLATE_COLUMNS.items())
    raise DataError(f"columns {sorted(columns)} fit no template. Templates and the columns they need: {fits}.")


def _need(rec: dict, *cols: str):
    missing = [c for c in cols if not isinstance(rec.get(c), str)]
    if missing:
        found = sorted(k for k in rec if k != "_where")
        raise DataError(f"{rec.get('_where', '?')}: column(s) {missing} missing or not text; found {found}.")
    return [rec[c] for c in cols]


def render(rec: dict, template: str, tok: Tokenizer) -> tuple[str, str]:
    """(prompt, full text) for alpaca, r1 and text. The response is full[len(prompt):]."""
    if template == "alpaca":
        instruction, output = _need(rec, "instruction", "output")
        inp = rec.get("input") or ""
        if not isinstance(inp, str):
            raise DataError(f"{rec.get('_where', '?')}: column 'input' must be text (or absent), "
                            f"got {type(inp).__name__}.")
        prompt = ALPACA_PROMPT.format(ctx=", paired with an input that provides further context" if inp else "",
                                      instruction=instruction, input=f"### Input:\n{inp}\n\n" if inp else "")
        return prompt, prompt + output
    if template == "r1":
        q, cot, resp = _need(rec, "Question", "Complex_CoT", "Response")
        prompt = R1_PROMPT.format(question=q)
        return prompt, prompt + f"<think>\n{cot}\n</think>\n{resp}"
    if template == "text":
        (text,) = _need(rec, "text")
        return "", text
    if template == "chat":
        raise DataError("chat records have a label span per assistant turn; chat.chat_example renders them.")
    raise DataError(f"unknown template {template!r}; choose from {', '.join(TEMPLATES)}.")


def prompt_template(template: str, tok: Tokenizer) -> str | None:
    """The alpaca and r1 formats as a Jinja chat template, saved with the adapter as chat data's template is: so
    `generate --adapter` prompts the model as it trained, and `merge` writes it into the merged model's tokenizer
    files and GGUF. A user turn is the prompt the training rendered, an assistant turn the answer and EOS; where
    the tokenizer adds a BOS to what it encodes (DeepSeek-R1-Distill's does), the template writes it, since
    generation encodes the rendered text without special tokens. A system message is refused: these formats have
    none. None for text (no prompt) and chat (its own template)."""
    if template not in ("alpaca", "r1"):
        return None
    content = "{{ message['content'] }}"
    user = (ALPACA_PROMPT.format(ctx="", instruction=content, input="") if template == "alpaca"
            else R1_PROMPT.format(question=content))
    adds_bos = tok.bos_id is not None and tok.encode("") == [tok.bos_id]
    return (("{{ bos_token }}" if adds_bos else "") + "{% for message in messages %}"  # no {%-: the prompt ends in \n
            "{% if message['role'] == 'user' %}" + user +
            "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{{ eos_token }}"
            "{% else %}{{ raise_exception('the " + template + " prompt format (this adapter trained with it) has "
            "no ' + message['role'] + ' message') }}{% endif %}{% endfor %}")


# ----------------------------------------------------------------------------- tokenizing

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on prompt positions


def pad_id_for(tok: Tokenizer) -> int:
    """The tokenizer's pad token, unless it is EOS; then unk, else id 0 (masked anyway)."""
    for cand in (tok.pad_id, tok.token_id(tok.unk_token), 0):
        if cand is not None and cand != tok.eos_id:
            return cand
    return 0


def tokenize(prompt: str, full: str, tok: Tokenizer) -> Example:
    """alpaca, r1 and text records (chat ones are chat.py's): the tokenizer adds its BOS, the prompt is masked."""
    prompt_ids = tok.encode(prompt) if prompt else []
    full_ids = tok.encode(full)
    if full_ids[: len(prompt_ids)] != prompt_ids:  # BPE merged across the boundary
        full_ids = prompt_ids + tok.encode(full[len(prompt):], add_special_tokens=False)
    if not prompt and full_ids and full_ids[0] == tok.bos_id:
        prompt_ids = full_ids[:1]  # never "predict" BOS
    if tok.eos_id is not None and tok.eos_id not in full_ids[len(prompt_ids):]:
        full_ids = full_ids + [tok.eos_id]
    labels = [IGNORE] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return Example(full_ids, labels)


def build_examples(records: list[dict], template: str, tok: Tokenizer, max_seq_len: int,
                   truncation: str = "truncate", bad_rows: str = "error",
                   chat: ChatFormat | None = None) -> tuple[list[Example], dict]:
    """Tokenized examples and counts (kept, truncated, dropped, no_label, bad).

    A row that cannot be rendered (a column missing or of the wrong type, a chat the template
    rejects, text the tokenizer cannot take) is a problem named by its file and line. All rows
    are tried, so every problem is found in one pass: bad_rows="error" raises them together,
    "skip" drops those rows and lists them in stats["problems"].
    `chat`: how chat records are trained (chat.chat_format); by default the tokenizer's template, every turn.
    For chat, stats also counts `history_reasoning_dropped`: earlier turns whose reasoning the template's
    history rule left out (their answers are still trained).
    """
    out, problems = [], []
    stats = {"kept": 0, "truncated": 0, "dropped": 0, "no_label": 0, "bad": 0}
    if template == "chat":
        chat = chat or chat_format(tok)
        stats["history_reasoning_dropped"] = 0
    for rec in records:
        try:
            if template == "chat":
                ids, trained, history = chat_example(rec, chat)
                ex = Example(ids, [i if t else IGNORE for i, t in zip(ids, trained)])
                stats["history_reasoning_dropped"] += history
            else:
                prompt, full = render(rec, template, tok)
                full.encode("utf-8")  # a lone surrogate is not a character: the tokenizer would refuse it obscurely
                ex = tokenize(prompt, full, tok)
        except (DataError, ChatError) as e:
            problems.append(str(e))
            continue
        except UnicodeEncodeError as e:
            problems.append(f"{rec.get('_where', '?')}: the text holds {e.object[e.start:e.end]!r}, half of a UTF-16 "
                            "surrogate pair (a \\ud800-style escape in the JSON), which is not a character.")
            continue
        except Exception as e:  # jinja or the tokenizer choking on this row's content (e.g. a lone surrogate)
            problems.append(f"{rec.get('_where', '?')}: cannot render or tokenize this row "
                            f"({type(e).__name__}: {str(e)[:200]}).")
            continue
        if len(ex.input_ids) > max_seq_len:
            if truncation == "drop":
                stats["dropped"] += 1
                continue
            ex = Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])
            stats["truncated"] += 1
        if all(lab == IGNORE for lab in ex.labels[1:]):
            stats["no_label"] += 1  # the prompt alone fills max_seq_len: nothing to learn
            continue
        out.append(ex)
        stats["kept"] += 1
    stats["bad"] = len(problems)
    if problems and bad_rows == "error":
        raise DataError(problem_report(problems, "the data") + SKIP_HINT)
    if problems:
        stats["problems"] = problems
    return out, stats


def show_example(ex: Example, tok: Tokenizer) -> str:
    """The example's text with each masked run (the prompt; in a chat, everything but the assistant
    turns' spans) in [brackets], as printed at start-up."""
    out, i = [], 0
    while i < len(ex.labels):
        j, masked = i, ex.labels[i] == IGNORE
        while j < len(ex.labels) and (ex.labels[j] == IGNORE) == masked:
            j += 1
        text = tok.decode(ex.input_ids[i:j])
        out.append(f"[{text}]" if masked else text)
        i = j
    return "".join(out)


def load_data(cfg, tok: Tokenizer, demo: tuple[list[dict], list[dict]] | None = None):
    """(train examples, eval examples, template name) for a run's config (config.py's TrainConfig): --data and
    --eval-data, or without --data the `demo` records (train, eval).

    This runs before the model loads: every row of every file is read, rendered and tokenized
    here, and all the problems are reported together (file:line each), so bad data costs
    seconds, not a GPU's start-up, and one fix-and-rerun, not one per bad row.
    """
    problems = []
    if not cfg.data:
        train_recs, eval_recs = demo
    else:
        local = Path(cfg.data).exists() or cfg.data.endswith((".json", ".jsonl"))
        train_recs, problems = [], []
        if local:
            paths = [Path(cfg.data)]
        else:  # a hub data set, its split maybe in shards (hub_data.py imports this module's DataError)
            from .hub_data import fetch_hub_dataset

            paths = fetch_hub_dataset(cfg.data)
        for path in paths:
            records, more = read_records(path, "skip")
            train_recs, problems = train_recs + records, problems + more
        eval_recs = None
        if cfg.eval_data:
            eval_recs, more = read_records(cfg.eval_data, "skip")
            problems += more
    train, evals, stats, template, columns, chat = [], None, {}, cfg.template, set(), None
    if train_recs:
        columns = common_columns(train_recs)  # the columns most rows have: one odd row cannot mislead
        template = detect_template(columns) if cfg.template == "auto" else cfg.template
        if template == "chat":  # the template, and what of each turn is trained (chat.py)
            chat = chat_format(tok, cfg.chat_template, cfg.empty_think, cfg.last_turn_only)
        train, stats = build_examples(train_recs, template, tok, cfg.max_seq_len, cfg.truncation, "skip", chat)
        problems += stats.pop("problems", [])
        if eval_recs is not None:
            evals, estats = build_examples(eval_recs, template, tok, cfg.max_seq_len, cfg.truncation, "skip", chat)
            problems += estats.pop("problems", [])
    if train_recs and not train and stats.get("bad") == len(train_recs) and cfg.template != "auto":
        try:
            hint = f"; --template auto would take {detect_template(columns)}"
        except DataError:
            hint = ""
        raise DataError(f"--template {cfg.template} fits none of {cfg.data or 'demo'}'s rows, whose columns are "
                        f"{sorted(columns)}{hint}.")
    if problems:
        report = problem_report(problems, " and ".join(filter(None, (cfg.data, cfg.eval_data))))
        if cfg.bad_rows == "error":
            raise DataError(report + SKIP_HINT)
        print(f"skipped {report}")
    if not train_recs:
        raise DataError(f"{cfg.data or 'demo'}: no training records"
                        + (f" left after skipping {len(problems)} bad row(s)." if problems else "."))
    print(f"template: {template} (columns {sorted(columns)}); examples: {stats}")
    if chat is not None:
        print(chat.describe())
    if not train:
        cut = stats.get("no_label", 0) + stats.get("dropped", 0)
        raise DataError(f"{cfg.data or 'demo'}: no training examples left after filtering ({stats})" + (
            f": --max-seq-len {cfg.max_seq_len} left {cut} of them no answer to train on; raise it." if cut else "."))
    if evals is None:
        kept = len(train)
        train, evals = split_eval(train, cfg.eval_fraction, cfg.seed)
        if not train:
            raise DataError(f"--eval-fraction {cfg.eval_fraction} holds out all {kept} example(s) of "
                            f"{cfg.data or 'demo'} for eval, leaving none to train on; lower it, or add data.")
    print("example (the [bracketed] text is masked out of the loss):\n" + show_example(train[0], tok))
    return train, evals, template


# ----------------------------------------------------------------------------- batching

def collate(examples: list[Example], pad_id: int, pad_to=None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example, or to `pad_to(longest)` (a few fixed shapes, for CUDA
    graphs). With right padding and causal attention, real tokens never see pads, so no
    attention mask is needed; pad labels are IGNORE."""
    T = max(len(e.input_ids) for e in examples)
    T = pad_to(T) if pad_to else T
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "labels": labels}


def label_count(examples: list[Example]) -> int:
    """The tokens that carry a loss in these examples, however they are batched (collate's padded rows or
    padding-free rows): each example's labels after its first (the shift drops it) that are not IGNORE.
    Counted on the host, from the lists, so that the trainer learns a step's N without waiting for the GPU."""
    return sum(sum(1 for t in e.labels[1:] if t != IGNORE) for e in examples)


GROUP_WINDOW = 50  # --group-by-length sorts windows of this many micro-batches, as transformers' sampler does


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, batch: int = 1) -> list[int]:
    """A fixed shuffle per (seed, epoch): resuming at (epoch, position) replays the same data.

    With `lengths` (--group-by-length), examples of like length share a micro-batch of `batch`, so it pads less:
    the shuffle is cut into windows of GROUP_WINDOW micro-batches, each window sorted by length and dealt out
    in micro-batches, and those micro-batches shuffled again, so that the steps still mix short and long
    examples (transformers' group_by_length sorts the same windows, longest first, without that last shuffle).
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(n))
    rng.shuffle(order)
    if lengths is None:
        return order
    window = GROUP_WINDOW * batch
    grouped = []
    for w in range(0, n, window):
        ranked = sorted(order[w: w + window], key=lambda i: lengths[i])
        batches = [ranked[b: b + batch] for b in range(0, len(ranked), batch)]
        rng.shuffle(batches)
        grouped += [i for mb in batches for i in mb]
    return grouped


def check_vocab(examples: list[Example], tok: Tokenizer, vocab_size: int | None, source: str) -> None:
    """Every token id must index the model's embedding table. A tokenizer from another model gives ids past it,
    which would stop the run at its first step with an index error (on a GPU, a device-side assert). The data is
    scanned only where the tokenizer has more tokens than the model, which the models' own never do."""
    if vocab_size is None or tok.vocab_size <= vocab_size:
        return
    top = max((max(e.input_ids) for e in examples if e.input_ids), default=-1)
    if top >= vocab_size:
        raise DataError(f"the tokenizer in {tok.folder} gives token id {top}, past {source}'s vocab_size "
                        f"{vocab_size}: it is not this model's tokenizer. Put the model's own tokenizer.json and "
                        "tokenizer_config.json beside its config.json.")


def split_eval(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    order = epoch_order(len(examples), seed, -1)
    n_eval = int(round(len(examples) * fraction))
    if fraction > 0 and n_eval == 0 and len(examples) > 1:
        n_eval = 1
    ev = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in ev], [examples[i] for i in order[:n_eval]]

