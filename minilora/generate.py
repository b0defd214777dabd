"""Text generation: batched, KV-cached decoding, and the `python -m minilora.generate` command.

    prompts (left-padded) --prefill--> KV cache + first token
    repeat: last token --one decode step--> next token, until every row has said EOS

Left padding puts every prompt's last token in the same column, so one
forward pass over the padded block fills the cache and yields each row's next
token, and every later step feeds one column. Three things keep the padding
invisible, as in transformers' `generate` (our reference, checked by
tests/test_generate.py):

- an attention mask: keys at pad positions are never attended to;
- position ids counted from each row's first real token, so RoPE sees the
  same positions as for that prompt alone;
- each pad query attends to itself, so no softmax row is empty (an all-masked
  row is NaN in SDPA, and a NaN value times weight 0 is still NaN).

Decoding: greedy (argmax) when temperature == 0; otherwise softmax(logits / T)
after keeping the top_k logits and then the smallest set of tokens whose
probability sums to top_p (nucleus sampling, Holtzman et al., 2019), in that
order, as transformers applies them.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import jinja2
import torch

from . import run_command
from .adapter import CHAT_TEMPLATE, base_model_of, load_adapter, read_adapter_config
from .chat import ChatError, chat_format
from .checkpoint import load_model, pick_device, resolve_model
from .config import HelpFormatter, Parser, UsageError
from .tokenizer import Tokenizer

# ----------------------------------------------------------------------------- EOS ids


def _as_list(x) -> list[int]:
    if x is None:
        return []
    return [int(i) for i in x] if isinstance(x, (list, tuple)) else [int(x)]


def model_eos_ids(folder, tokenizer: Tokenizer | None = None) -> list[int]:
    """Every id that ends an answer: the tokenizer's eos, config.json's and generation_config.json's
    `eos_token_id` (an int or a list). Chat models often end a turn with a token other than the
    tokenizer's eos (SmolLM2: <|im_end|> and <|endoftext|>; Llama 3: <|eot_id|> and <|end_of_text|>),
    and stopping on only one of them lets the model ramble on into a made-up next turn."""
    folder = Path(folder)
    ids = _as_list(tokenizer.eos_id if tokenizer is not None else None)
    for name in ("config.json", "generation_config.json"):
        path = folder / name
        if path.is_file():
            try:
                ids += _as_list(json.loads(path.read_text()).get("eos_token_id"))
            except (json.JSONDecodeError, TypeError, ValueError) as e:
                raise ValueError(f"{path}: cannot read eos_token_id ({e}).") from None
    return list(dict.fromkeys(ids))  # unique, first-seen order


# ----------------------------------------------------------------------------- choosing the next token


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits / temperature, with tokens outside the top_k / top_p set at -inf. (B, V) fp32 -> (B, V)."""
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass;
        # the most likely token has nothing above it, so it always stays.
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax at temperature 0, else one draw per row."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- batched generation


def compute_context(model):
    """bf16/fp16 autocast on CUDA, so the fp32 LoRA factors run in the compute dtype as in training;
    nothing on the CPU, where the model computes in one dtype already."""
    p = model.lm_head.weight  # (the embedding table may live on the host: speed/offload.py)
    if p.device.type == "cuda" and p.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=p.dtype)
    return contextlib.nullcontext()


def generate(model, prompts: list[list[int]], max_new_tokens: int, *, eos_ids, pad_id: int | None = None,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             on_token=None) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Returns the new tokens of each row, ending with its first EOS id if it produced one.
    `on_token(row, token_id)` is called for every new token as soon as it exists (for streaming).
    `pad_id` fills the left padding (default 0); any id in the vocabulary will do, as padded positions
    are masked out. An EOS id that is not in the vocabulary (say -1) is allowed: it never stops a row.
    The model is put in eval mode for the call and given back in the mode it came in.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS or a chat-template header will do).")
    if max_new_tokens < 0 or temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 0 and 0 < top_p <= 1; got "
                         f"{max_new_tokens}, {temperature}, {top_k}, {top_p}.")
    eos = set(_as_list(eos_ids))
    if not eos:
        raise ValueError("eos_ids is empty: generation would never stop early; see model_eos_ids().")
    pad = 0 if pad_id is None else pad_id
    vocab = model.config.vocab_size
    for i, p in enumerate([*prompts, [pad]]):
        if not 0 <= min(p) <= max(p) < vocab:  # on CUDA an out-of-range id is an opaque device-side assert
            what = f"prompt {i}" if i < len(prompts) else "pad_id"
            raise ValueError(f"{what} holds token ids outside the model's vocabulary [0, {vocab}); "
                             "was it encoded with this model's tokenizer?")
    B, L = len(prompts), max(len(p) for p in prompts)
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    device = model.lm_head.weight.device
    total = L + max_new_tokens  # cache columns: the padded prompt, then one per new token

    # Left padding: row b's prompt occupies columns L - n_b .. L-1.
    lengths = torch.tensor([len(p) for p in prompts], device=device)  # (B,)
    ids = torch.tensor([[pad] * (L - len(p)) + list(p) for p in prompts], device=device)  # (B, L)
    real = torch.ones(B, total, dtype=torch.bool, device=device)  # (B, total): True = a real token
    real[:, :L] = torch.arange(L, device=device) >= (L - lengths)[:, None]
    # RoPE positions count real tokens only: 0 at each row's first real token (pads get 0; unused).
    positions = (real[:, :L].long().cumsum(-1) - 1).clamp(min=0)  # (B, L)
    # Prefill mask (B, 1, L, L): causal, keys must be real, and every query may see itself.
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    mask = causal & (real[:, None, :L] | torch.eye(L, dtype=torch.bool, device=device))
    mask = mask[:, None]

    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    was_training = model.training
    model.eval()
    model.setup_cache(B, total)
    done = [False] * B
    try:
        with torch.inference_mode(), compute_context(model):
            # Only the last column's logits are needed: (B, vocab), not (B, L, vocab).
            hidden = model.model(ids, positions, mask, cache_pos=0)
            logits = model.lm_head(hidden[:, -1])
            for step in range(max_new_tokens):
                toks = next_tokens(logits, temperature, top_k, top_p, generator).tolist()  # (B,): one sync per
                for b, t in enumerate(toks):  # step, as in transformers, to stream and to see every EOS
                    if done[b]:
                        continue
                    out[b].append(t)
                    done[b] = t in eos
                    if on_token is not None:
                        on_token(b, t)
                if all(done) or step == max_new_tokens - 1:
                    break
                # One decode step: the new token sits at cache column L + step and at position n_b + step.
                col = L + step
                inp = torch.tensor([[pad if d else t] for d, t in zip(done, toks)], device=device)  # (B, 1)
                pos = (lengths + step)[:, None]  # (B, 1)
                step_mask = real[:, None, None, : col + 1]  # (B, 1, 1, col+1): every real key so far
                hidden = model.model(inp, pos, step_mask, cache_pos=col)
                logits = model.lm_head(hidden[:, -1])
    finally:
        model.clear_cache()
        model.train(was_training)
    return out


# ----------------------------------------------------------------------------- printing a stream

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
THINK_MARKER = "[thinking…]"


def _partial_tag_len(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` ("<th" for "<think>")."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def visible_text(text: str, *, hide_think: bool, in_think: bool = False, opened: str = "", final: bool = False) -> str:
    """What to show of the answer decoded so far.

    `opened` is the end of the prompt from its last <think> ("<think>\n": DeepSeek-R1's template opens the
    reasoning itself), or `in_think` says the prompt ended with a bare <think>. That opening is shown in
    front of the answer, so the reasoning is marked at both ends as the model sees it. With hide_think, each
    <think>...</think> section becomes THINK_MARKER (followed by a newline once it closes, and without the
    blank lines that follow it). Until `final`, a trailing half tag ("<thi") and a trailing half
    character (U+FFFD, from a multi-byte character split across tokens) are held back, so that what is
    shown only ever grows.
    """
    text = (opened or (THINK_OPEN if in_think else "")) + text
    if hide_think:
        parts, i = [], 0
        while True:
            j = text.find(THINK_OPEN, i)
            if j < 0:
                rest = text[i:]
                if not final:
                    rest = rest[: len(rest) - _partial_tag_len(rest, THINK_OPEN)]
                parts.append(rest)
                break
            parts += [text[i:j], THINK_MARKER]
            k = text.find(THINK_CLOSE, j)
            if k < 0:
                break  # still thinking
            i = k + len(THINK_CLOSE)
            while i < len(text) and text[i].isspace():
                i += 1
            parts.append("\n")
        text = "".join(parts)
    if not final:
        text = text.rstrip("\ufffd")
    return text


DIM, RESET = "\x1b[2m", "\x1b[0m"  # ANSI faint and back to normal: the reasoning, on a terminal


def reasoning_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each <think>...</think> section of `text` (the last may still be open: end = len)."""
    spans, i = [], 0
    while (j := text.find(THINK_OPEN, i)) >= 0:
        k = text.find(THINK_CLOSE, j)
        i = len(text) if k < 0 else k + len(THINK_CLOSE)
        spans.append((j, i))
    return spans


def styled(text: str, start: int) -> str:
    """text[start:], its reasoning between DIM and RESET (each piece closed, so a stop leaves the terminal plain)."""
    out, at = [], start
    for a, b in reasoning_spans(text):
        if b <= at:
            continue
        a = max(a, at)
        out += [text[at:a], DIM, text[a:b], RESET]
        at = b
    return "".join(out) + text[at:]


class Streamer:
    """Decodes all new ids after each token and prints the new end of the visible text.

    Decoding the whole answer each time (not token by token) is what makes multi-byte
    characters and tokenizers that drop a leading space come out right. The reasoning is told
    apart from the answer by its <think> tags (the one the prompt opened is shown too) and,
    with `color` (a terminal), by being printed faint.
    """

    def __init__(self, tokenizer: Tokenizer, *, hide_think: bool, in_think: bool = False, opened: str = "",
                 color: bool = False, out=sys.stdout):
        self.tok, self.hide_think, self.in_think, self.opened, self.out = tokenizer, hide_think, in_think, opened, out
        self.color = color and not hide_think
        self.ids: list[int] = []
        self.shown = 0

    def text(self) -> str:
        """The answer as the model wrote it (without the prompt's opening <think>): what the chat history keeps."""
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def _show(self, final: bool):
        v = visible_text(self.text(), hide_think=self.hide_think, in_think=self.in_think, opened=self.opened,
                         final=final)
        if len(v) > self.shown:
            self.out.write(styled(v, self.shown) if self.color else v[self.shown:])
        self.out.flush()
        self.shown = max(self.shown, len(v))

    def __call__(self, row: int, token: int):
        self.ids.append(token)
        self._show(final=False)

    def finish(self):
        self._show(final=True)
        self.out.write("\n")
        self.out.flush()


# ----------------------------------------------------------------------------- the command


class UserError(Exception):
    """Something the person running the command can fix; printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="minilora.generate",
        description="Generate text with a Llama / Qwen2 model (e.g. DeepSeek-R1-Distill), optionally with a "
                    "LoRA adapter, streaming tokens as they come.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", default=None, help="Hugging Face checkpoint folder or hub id (org/name); left out, the "
                   "base model the --adapter names (its adapter_config.json's base_model_name_or_path)")
    p.add_argument("--adapter", default=None, help="LoRA adapter folder (PEFT format, e.g. from minilora.train)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    what.add_argument("--chat", action="store_true",
                      help="interactive multi-turn chat on stdin; end with EOF (Ctrl-D) or /exit")
    p.add_argument("--raw", action="store_true",
                   help="feed --prompt as plain text instead of through the model's chat template")
    p.add_argument("--system", default=None, help="system message put first in the chat template")
    p.add_argument("--chat-template", default="", metavar="FILE",
                   help="a Jinja chat template file instead of the tokenizer's: the one the adapter was trained with "
                        f"(train --chat-template). Default: the --adapter folder's {CHAT_TEMPLATE}, which "
                        "minilora.train writes there after training on chat data; else the tokenizer's, where a "
                        "DeepSeek-R1-Distill template is swapped for "
                        "minilora/templates/deepseek_r1_distill.jinja, as training swaps it, so the generation prompt "
                        "is the one the training used")
    p.add_argument("--hide-think", action="store_true",
                   help=f"print {THINK_MARKER} instead of the text between <think> and </think> (otherwise the "
                        "reasoning is shown between its tags, faint on a terminal)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate per answer")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy (argmax)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens holding this much "
                   "probability (1 = all)")
    p.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-4bit", action="store_true",
                   help="keep the weights in 16 bits (fp32 on the CPU) instead of quantizing them to NF4")
    return p


def check_args(args) -> None:
    if args.raw and args.chat:
        raise UserError("--raw applies to --prompt only; --chat always uses the chat template.")
    if args.raw and args.chat_template:
        raise UserError("--chat-template applies to the chat template, which --raw skips; drop one of the two.")
    if args.raw and args.system is not None:
        raise UserError("--system needs the chat template; drop --raw or put the system text in --prompt.")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}.")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {args.top_p}.")
    if args.top_k < 0:
        raise UserError(f"--top-k must be >= 0 (0 = off), got {args.top_k}.")


def load(args, device):
    """The model (NF4 unless --no-4bit), its adapter, tokenizer and EOS ids; loading errors become UserError."""
    if args.adapter:  # check the adapter's files before spending minutes loading an 8B model
        try:
            read_adapter_config(args.adapter)
            args.model = args.model or base_model_of(args.adapter)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--adapter {args.adapter}: {e.args[0] if e.args else e}") from None
    elif not args.model:
        raise UserError("give --model, or an --adapter whose base model it is.")
    try:
        folder = resolve_model(args.model)
        tok = Tokenizer(folder)
        saved = Path(args.adapter) / CHAT_TEMPLATE if args.adapter else None  # what a chat adapter trained with
        template = args.chat_template or (str(saved) if saved and saved.is_file() else "")
        if not args.raw and (template or tok.chat_template):
            chat_format(tok, template)  # the template training used (chat.py): set on tok
        eos = model_eos_ids(folder, tok)
        model = load_model(folder, device=device, quantize=None if args.no_4bit else "nf4",
                           progress=sys.stderr.isatty())
    except ChatError as e:
        raise UserError(str(e)) from None
    except (FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        raise UserError(f"--model {args.model}: {e.args[0] if e.args else e}") from None
    if not eos:
        raise UserError(f"--model {args.model}: no EOS token in tokenizer_config.json, config.json or "
                        "generation_config.json, so answers could not stop; add eos_token_id to config.json.")
    if args.adapter:
        try:
            load_adapter(model, args.adapter)
        except (FileNotFoundError, ValueError, KeyError) as e:
            raise UserError(f"--adapter {args.adapter}: {e.args[0] if e.args else e}") from None
    return model, tok, eos


def render(tok: Tokenizer, messages: list[dict]) -> str:
    try:
        return tok.apply_chat_template(messages, add_generation_prompt=True)
    except (ValueError, jinja2.TemplateError) as e:  # the template's own raise_exception: e.g. no system message
        raise UserError(f"{e.args[0]} (or pass --raw to feed the prompt as plain text).") from None


def answer(model, tok: Tokenizer, eos: list[int], text: str, ids: list[int], args) -> str:
    """Generate, streaming to stdout; the speed goes to stderr. Returns the answer's text."""
    opened = text[text.rfind(THINK_OPEN):] if THINK_OPEN in text else ""  # the prompt opened the reasoning?
    stream = Streamer(tok, hide_think=args.hide_think, opened=opened if not opened[len(THINK_OPEN):].strip() else "",
                      color=sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    stamps = []

    def on_token(row, token):
        stamps.append(time.perf_counter())
        stream(row, token)

    start = time.perf_counter()
    out = generate(model, [ids], args.max_new_tokens, eos_ids=eos, pad_id=tok.pad_id,
                   temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                   on_token=on_token)[0]
    stream.finish()
    # The first token costs the prefill (the whole prompt); decoding speed counts the rest.
    n = len(out)
    first = stamps[0] - start if stamps else 0.0
    rate = f"; decoding {(n - 1) / (stamps[-1] - stamps[0]):.1f} tokens/s" if n > 1 and stamps[-1] > stamps[0] else ""
    empty = " (the model ended at once: an empty answer)" if n and not stream.text() else ""
    print(f"[{n} tokens; prompt {len(ids)} tokens in {first:.2f} s{rate}]{empty}", file=sys.stderr, flush=True)
    return stream.text()


def chat_loop(model, tok, eos, args):
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: type a message; /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if line == "/exit":
            break
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        text = render(tok, messages)
        try:
            reply = answer(model, tok, eos, text, tok.encode(text, add_special_tokens=False), args)
        except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
            print("\n[interrupted]", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply})


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        check_args(args)
        try:
            device = pick_device(args.device)
        except ValueError as e:
            raise UserError(str(e)) from None
        model, tok, eos = load(args, device)
        if device.type == "cpu" and not args.no_4bit:
            print("minilora.generate: note: NF4 on the CPU dequantizes every weight for every token and is ~20x "
                  "slower than --no-4bit (fp32), which small models can afford.", file=sys.stderr)
        if args.chat:
            chat_loop(model, tok, eos, args)
        elif args.raw:
            answer(model, tok, eos, args.prompt, tok.encode(args.prompt), args)
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": args.prompt}]
            text = render(tok, messages)
            answer(model, tok, eos, text, tok.encode(text, add_special_tokens=False), args)
    except (UserError, UsageError) as e:
        print(f"minilora.generate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    run_command(main)
