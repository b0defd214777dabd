"""`python -m minilora.train`: QLoRA supervised fine-tuning, one loop written out by hand.

With no arguments it runs the offline demo: SmolLM2-135M-Instruct learns to
count days and months forward with <think> reasoning (see demo.py), and prints
eval loss, exact-match accuracy and a sample answer before and after.

The loop, per optimizer step:
1. take `grad_accum` micro-batches and count their label tokens N (all of them);
2. for each micro-batch: loss_sum = sum of its token losses; backward(loss_sum / N);
3. clip the gradient norm (fp16: after unscaling), skip the step if the loss or the norm
   is not finite, step AdamW, set the lr.

Step 2 is the gradient-accumulation fix the peers made in late 2024: dividing
each micro-batch by its own token count and averaging the means weights a
token in a short micro-batch more than one in a long one, so batch 8 x accum 1
and batch 2 x accum 4 would train differently. Dividing every micro-batch by
the step's total N makes the accumulated gradient exactly the gradient of the
mean over all N tokens (tests/test_train.py checks it).

Faults (docs-faults.md; tests/test_fault_*.py). Each checkpoint is one folder,
written atomically, holding everything a resume needs. A kill loses only the
steps after the newest one, and --resume redoes them exactly. Ctrl-C and SIGTERM
save first (exit 130). A non-finite step is skipped and logged; --max-bad-steps
in a row stop the run (exit 1). Out of memory ends with advice (exit 3). A failed
checkpoint warns and training goes on. Bad data is all reported before the model loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import data as D
from . import distributed as dp
from . import packing
from .atomic import atomic_dir, clean_leftovers
from .checkpoint import (adapter_config, default_dtype, load_model, resolve_model, save_adapter,
                         unpickling_error)
from .lora import ALL_TARGETS, apply_lora, describe_trainable, lora_state_dict
from .loss import causal_lm_loss
from .tokenizer import Tokenizer


def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model and data
    model: str = _f("", "model folder or hub id (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B); empty: the demo model")
    trust_pickle_files: bool = _f(False, "read pytorch_model.bin (pickle) weights when the model has no safetensors; "
                                         "only for files you trust")
    data: str = _f("", ".json/.jsonl file, or hub data set id org/name[:config][@split]; empty: the demo task")
    template: str = _f("auto", "how records become text; auto picks from the columns", ("auto",) + D.TEMPLATES)
    max_seq_len: int = _f(2048, "longest example in tokens")
    truncation: str = _f("truncate", "what to do with longer examples", ("truncate", "drop"))
    bad_rows: str = _f("error", "malformed data rows: stop with every problem listed, or skip them", ("error", "skip"))
    # batching and schedule
    batch_size: int = _f(2, "examples per micro-batch")
    padding_free: bool = _f(False, "put each micro-batch's examples end to end in one row instead of padding them to "
                                   "the longest (trl's padding_free): no compute on pad tokens, the same loss")
    grad_accum: int = _f(4, "micro-batches per optimizer step (effective batch = batch_size * grad_accum)")
    max_steps: int = _f(0, "optimizer steps; 0: run --epochs")
    epochs: float = _f(1.0, "passes over the training data, used when --max-steps is 0")
    lr: float = _f(2e-4, "peak learning rate")
    warmup_steps: int = _f(5, "steps of linear warmup from 0 to --lr")
    scheduler: str = _f("linear", "lr decay after warmup, to 0 at the last step", ("linear", "cosine", "constant"))
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay (applied to LoRA matrices, never to biases/norms)")
    max_grad_norm: float = _f(1.0, "clip the global gradient norm to this; 0: no clipping")
    # LoRA
    r: int = _f(16, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha; the update is scaled by alpha/r (alpha/sqrt(r) with --rslora)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    targets: str = _f(",".join(ALL_TARGETS), "comma-separated module names to adapt")
    rslora: bool = _f(False, "rank-stabilised LoRA scale alpha/sqrt(r)")
    no_4bit: bool = _f(False, "keep the base in 16-bit (plain LoRA) instead of NF4 (QLoRA)")
    quant_type: str = _f("nf4", "4-bit data type of the base weights", ("nf4", "fp4"))
    # optimizer and memory
    optim: str = _f("adamw8bit", "optimizer (bitsandbytes 8-bit AdamW, or torch's)", ("adamw8bit", "adamw", "paged_adamw8bit"))
    gradient_checkpointing: bool = _f(True, "recompute each decoder layer in backward: less memory, ~1/3 more compute")
    offload: bool = _f(False, "lean mode: keep checkpointed layer inputs and the embedding table in host memory")
    fsdp: bool = _f(False, "under torchrun: shard the frozen 4-bit base across the ranks with FSDP2, for models "
                           "too large for one GPU (LoRA stays replicated)")
    compile: str = _f("auto", "torch.compile each decoder layer (fuses norms, RoPE, SwiGLU); auto: on CUDA only",
                      ("auto", "on", "off"))
    # eval, saving and run control
    eval_fraction: float = _f(0.05, "fraction of the data held out for eval (ignored with --eval-data)")
    eval_data: str = _f("", "separate eval .json/.jsonl file")
    eval_every: int = _f(0, "eval every N steps; 0: at the start and end only")
    save_every: int = _f(0, "checkpoint every N steps; 0: only at the end (and on Ctrl-C)")
    log_every: int = _f(1, "write a metrics.jsonl row every N steps")
    output_dir: str = _f("runs/minilora", "where metrics, checkpoints and the adapter go")
    resume: bool = _f(False, "continue from the newest checkpoint in --output-dir")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    seed: int = _f(3407, "seed for data order, LoRA init and dropout")
    device: str = _f("auto", "cuda, cuda:N, cpu, or auto")
    push_to_hub: str = _f("", "upload the final adapter to this hub repo (token from HF_TOKEN)")
    config: str = _f("", "JSON file of these same keys; flags given on the command line win")


DEMO = dict(batch_size=8, padding_free=True, grad_accum=1, max_steps=24, lr=2e-3, warmup_steps=3, r=16, alpha=32,
            max_seq_len=256, eval_every=0, gradient_checkpointing=False, output_dir="runs/demo")


# peft's LoraConfig names, as second spellings. `--lora-r` is also the one torchrun accepts: its own parser
# reads `--r` as an ambiguous abbreviation of its --rdzv-*/--role/--run-path options, even after `-m module`.
PEFT_NAMES = {"r": ["--lora-r"], "alpha": ["--lora-alpha"], "dropout": ["--lora-dropout"]}


class UsageError(ValueError):
    """A bad flag or value: printed as one line, exit code 2."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the last good checkpoint is kept. Exit code 1."""
    exit_code = 1


class OutOfMemory(TrainingStopped):
    """The GPU ran out of memory during training; the message says what would fit. Exit code 3."""
    exit_code = 3


# ----------------------------------------------------------------------------- config

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minilora.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + PEFT_NAMES.get(f.name, [])
        meta = f.metadata
        if f.type == "bool" or isinstance(f.default, bool):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(*flags, dest=f.name, action=action, default=argparse.SUPPRESS, help=meta["help"])
        else:
            p.add_argument(*flags, dest=f.name, type=type(f.default), default=argparse.SUPPRESS,
                           choices=meta["choices"], help=meta["help"] + f" (default: {f.default!r})",
                           metavar=f.name.upper())
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def config_from_json(path: str) -> dict:
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file.") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"--config {path}:{e.lineno}: malformed JSON ({e.msg}).") from None
    if not isinstance(raw, dict):
        raise UsageError(f"--config {path}: expected a JSON object of flag names to values.")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for k, v in raw.items():
        name = k.replace("-", "_").lstrip("_")
        if name not in known or name == "config":
            raise UsageError(f"--config {path}: unknown key {k!r}.{D.closest(name, known)}")
        want = type(known[name].default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise UsageError(f"--config {path}: {k} must be {want.__name__}, got {json.dumps(v)}.")
        out[name] = v
    try:  # ranges too, naming the file: {"lr": -1} is as wrong here as on the command line
        validate(TrainConfig(**out))
    except UsageError as e:
        raise UsageError(f"--config {path}: {e}") from None
    return out


# The names trl / transformers / peft users type, mapped to ours for the "did you mean" hint.
PEER_FLAGS = {"--learning-rate": "--lr", "--lora-r": "--r", "--lora-alpha": "--alpha", "--lora-dropout": "--dropout",
              "--per-device-train-batch-size": "--batch-size", "--gradient-accumulation-steps": "--grad-accum",
              "--num-train-epochs": "--epochs", "--target-modules": "--targets", "--max-seq-length": "--max-seq-len",
              "--lr-scheduler-type": "--scheduler", "--use-rslora": "--rslora", "--load-in-4bit": "(the default)",
              "--dataset": "--data", "--model-name": "--model", "--model-name-or-path": "--model"}


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        flags = [a.split("=")[0] for a in unknown if a.startswith("-")] or unknown
        options = [o for a in p._actions for o in a.option_strings]
        flag = flags[0].replace("_", "-")
        hint = f" Did you mean {PEER_FLAGS[flag]!r}?" if flag in PEER_FLAGS else D.closest(flag, options)
        raise UsageError(f"unknown argument {flags[0]!r}.{hint}")
    given = vars(args)
    values = config_from_json(given["config"]) if given.get("config") else {}
    values.update(given)
    if not values.get("model") and not values.get("data"):
        values = {**DEMO, **values}  # the demo's defaults, under anything the user set
    cfg = TrainConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: TrainConfig):
    def need(ok, msg):
        if not ok:
            raise UsageError(msg)
    for f in fields(cfg):  # NaN and inf pass every comparison below the wrong way, or none
        v = getattr(cfg, f.name)
        need(not isinstance(v, float) or math.isfinite(v), f"--{f.name.replace('_', '-')} must be finite, got {v}.")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a positive number, got {cfg.lr}.")
    need(cfg.r > 0, f"--r must be a positive integer, got {cfg.r}.")
    need(cfg.alpha > 0, f"--alpha must be positive, got {cfg.alpha}.")
    need(cfg.batch_size > 0, f"--batch-size must be >= 1, got {cfg.batch_size}.")
    need(cfg.grad_accum > 0, f"--grad-accum must be >= 1, got {cfg.grad_accum}.")
    need(cfg.max_steps >= 0, f"--max-steps must be >= 0, got {cfg.max_steps}.")
    need(cfg.max_steps > 0 or cfg.epochs > 0, f"--epochs must be > 0 when --max-steps is 0, got {cfg.epochs}.")
    need(cfg.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {cfg.warmup_steps}.")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}.")
    need(cfg.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {cfg.max_grad_norm}.")
    need(0 <= cfg.dropout < 1, f"--dropout must be in [0, 1), got {cfg.dropout}.")
    need(0 <= cfg.eval_fraction < 1, f"--eval-fraction must be in [0, 1), got {cfg.eval_fraction}.")
    need(cfg.max_seq_len >= 8, f"--max-seq-len must be >= 8, got {cfg.max_seq_len}.")
    need(min(cfg.eval_every, cfg.save_every) >= 0 and cfg.log_every >= 1, "--eval-every/--save-every must be >= 0, --log-every >= 1.")
    need(cfg.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}.")
    need(cfg.template in ("auto",) + D.TEMPLATES, f"--template must be one of auto, {', '.join(D.TEMPLATES)}.")
    for name in ("truncation", "bad_rows", "scheduler", "optim", "quant_type", "compile"):
        choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
        need(getattr(cfg, name) in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}.")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; pick one.")
    need(not cfg.fsdp or dp.world() > 1, "--fsdp shards the model across processes, but this is a single process. "
         "Launch with torchrun --nproc_per_node N -m minilora.train ... (N >= 2), or drop --fsdp.")
    need(not (cfg.fsdp and cfg.no_4bit), "--fsdp shards the 4-bit base weights; it does not work with --no-4bit.")
    need(not (cfg.fsdp and cfg.compile == "on"), "--fsdp and --compile on: per-layer compile cannot trace FSDP2's "
         "gather/free hooks inside each layer here; use --compile off (or auto, which is off under --fsdp).")


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, cfg: TrainConfig, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then linear or cosine decay to 0 at `total_steps`.

    `step` counts optimizer steps from 0. The curve is transformers' `get_*_schedule_with_warmup`
    (so the first warmup step has lr 0, as there), which trl users already tune for.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


def make_optimizer(params, cfg: TrainConfig):
    # LoRA A/B matrices get weight decay; 1-D tensors (biases, norms) would not, if any were trained.
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.optim == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999))
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(groups, lr=cfg.lr, betas=(0.9, 0.999))


# ----------------------------------------------------------------------------- one step

def setup_for_training(model, *, gradient_checkpointing: bool, compile: str, device, offload: bool = False) -> None:
    """Memory and speed switches, in one place: per-layer recompute, host offload, regional torch.compile.

    Compiling each decoder layer (not the whole model) keeps compile time to one layer's
    graph, reused 28-32 times; it fuses the elementwise work between the matmuls.
    """
    from .offload import HostEmbedding, HostOffloader

    model.model.gradient_checkpointing = gradient_checkpointing or offload
    if offload:
        model.model.offloader = HostOffloader(device)
        if not model.config.tie_word_embeddings:  # a tied table is also lm_head, which the GPU needs
            model.model.embed_tokens = HostEmbedding(model.model.embed_tokens.weight, device)
    if compile == "on" or (compile == "auto" and torch.device(device).type == "cuda"):
        for layer in model.model.layers:
            layer.compile()
    model.train()


def micro_batches(examples, order, start: int, count: int, batch_size: int):
    """`count` micro-batches of `batch_size` from position `start` of `order` (cyclic)."""
    out = []
    for b in range(count):
        idx = [order[(start + b * batch_size + i) % len(order)] for i in range(batch_size)]
        out.append([examples[i] for i in idx])
    return out


def rank_slice(mbs: list[list], rank: int, world: int) -> list[list]:
    """This rank's part of each micro-batch: rank r takes the r-th of `world` equal pieces.

    The step's micro-batches are drawn at batch_size x world, the same on every rank, so the
    ranks' pieces together are exactly what one process with batch world x batch_size would take.
    """
    return [mb[rank * len(mb) // world: (rank + 1) * len(mb) // world] for mb in mbs]


def label_tokens(batches: list[dict]) -> int:
    """Tokens that carry a loss: labels after the shift that are not IGNORE (prompt or padding)."""
    return sum(int((b["labels"][:, 1:] != D.IGNORE).sum()) for b in batches)


def train_step(model, batches: list[dict], autocast, scaler=None, n_total: int | None = None) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (loss sum / N, N).

    Every micro-batch's loss sum is divided by the SAME token count N of the whole step
    (with several ranks, `n_total` is N over all of them: then the ranks' returned losses and
    gradients sum to the global mean and its gradient).
    With fp16, `scaler` multiplies the loss by its scale S before backward, so gradients
    too small for fp16 do not flush to zero; they are S times too large until `scaler.unscale_`.
    """
    n_total = label_tokens(batches) if n_total is None else n_total
    loss_total = 0.0
    for b in batches:
        with autocast:
            hidden = hidden_states(model, b)
            loss_sum, _ = causal_lm_loss(hidden, model.lm_head.weight, b["labels"])
        loss = loss_sum / max(n_total, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += loss_sum.item()
    return loss_total / max(n_total, 1), n_total


def make_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only: fp16's smallest normal is 6e-5, so small gradients underflow;
    bf16 and fp32 share fp32's exponent range and need none. A disabled scaler passes everything
    through (scale() returns the loss, step() is optimizer.step(), unscale_/update do nothing)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


@torch.no_grad()
def make_batch(examples, pad_id: int, device, padding_free: bool = False) -> dict:
    """One micro-batch on `device`: padded to its longest example, or end to end in one row (packing.py)."""
    b = packing.collate(examples) if padding_free else D.collate(examples, pad_id)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def hidden_states(model, b: dict) -> torch.Tensor:
    """The decoder's output for a batch; a padding-free one brings its own positions and example bounds."""
    return model.model(b["input_ids"], b.get("positions"), b.get("documents"))


def evaluate(model, examples, batch_size, pad_id, device, autocast, padding_free=False) -> float:
    """Mean token loss over the eval examples."""
    was_training = model.training
    model.eval()
    loss, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = make_batch(examples[i: i + batch_size], pad_id, device, padding_free)
        with autocast:
            s, c = causal_lm_loss(hidden_states(model, b), model.lm_head.weight, b["labels"])
        loss, n = loss + s.item(), n + c
    model.train(was_training)
    return loss / max(n, 1)


# ----------------------------------------------------------------------------- checkpoints

def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, cfg, acfg, position: int, metrics_state: dict,
                    scaler=None, rng: dict | None = None):
    """checkpoints/step-N/: adapter + optimizer + loss scaler + rng + data position, in one folder, written atomically.

    `rng` is the generators' state at the start of step N + 1 (default: now).
    """
    with atomic_dir(out / "checkpoints" / f"step-{step:06d}") as tmp:
        save_adapter(model, tmp / "adapter", acfg)
        state = {"step": step, "position": position, "optimizer": optimizer.state_dict(), "rng": rng or rng_state(),
                 "config": asdict(cfg), "metrics": metrics_state, "scaler": scaler.state_dict() if scaler else {},
                 "world_size": dp.world()}  # the data position assumes this many ranks: resume needs as many
        torch.save(state, tmp / "trainer_state.pt")
    return out / "checkpoints" / f"step-{step:06d}"


def newest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step.

    An unfinished save is `.step-N.tmp-*` (atomic_dir), which the pattern never matches;
    a folder without its two files (copied or deleted by hand) is passed over too.
    """
    folder = out / "checkpoints"
    found = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name)
             and (p / "trainer_state.pt").is_file() and (p / "adapter" / "adapter_model.safetensors").is_file()
             ] if folder.is_dir() else []
    return max(found, key=lambda p: int(p.name[5:]), default=None)


def read_trainer_state(ck: Path) -> dict:
    """trainer_state.pt, through torch's weights-only unpickler: tensors and plain containers, nothing
    that can run code, so a tampered file is refused. A torn or foreign file is an error naming it."""
    try:
        return torch.load(ck / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"cannot resume from {ck}: its trainer_state.pt is unreadable ({unpickling_error(e)}). "
                         "Move that folder away to resume from the checkpoint before it.") from None


def restore(state: dict, ck: Path, model, optimizer, scaler):
    """Put a checkpoint's LoRA weights, optimizer, loss scale and rng back."""
    own = lora_state_dict(model)
    for k, v in load_file(ck / "adapter" / "adapter_model.safetensors").items():
        own[k.removeprefix("base_model.model.")].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler") and scaler.is_enabled():  # {} when saved without fp16
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


RESUME_MUST_MATCH = ("model", "data", "template", "r", "alpha", "targets", "rslora", "no_4bit", "quant_type",
                     "seed", "max_seq_len")


def check_resume(saved: dict, cfg: TrainConfig, where: Path):
    diffs = [f"{k}: checkpoint {saved.get(k)!r}, now {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
             if saved.get(k) != getattr(cfg, k)]
    # The data position counts examples, so another split of the same effective batch (say 1 x 8 after
    # running out of memory at 2 x 4) resumes at the same place; the losses then match only in expectation.
    if saved.get("batch_size", 0) * saved.get("grad_accum", 0) != cfg.batch_size * cfg.grad_accum:
        diffs.append(f"effective batch (batch_size x grad_accum): checkpoint {saved.get('batch_size')} x "
                     f"{saved.get('grad_accum')}, now {cfg.batch_size} x {cfg.grad_accum}")
    if diffs:
        raise UsageError(f"cannot resume from {where}: the run's settings differ ({'; '.join(diffs)}).")


def rewind_metrics(path: Path, step: int, rows: int | None) -> int:
    """Cut metrics.jsonl back to what it held when the checkpoint at `step` was saved; returns its row count.

    A run killed after its last checkpoint logged steps that the resumed run does again: kept,
    they would be two rows per step. `rows` is the count the checkpoint recorded (older
    checkpoints lack it; then rows of later steps go). A line torn by the kill goes too.
    """
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if (rows is not None and len(kept) >= rows) or row.get("step", 0) > step:
            break
        kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


# A full disk or a read-only folder surfaces as OSError from Python's writes, RuntimeError from
# torch.save ("file write failed") and SafetensorError from safetensors' Rust writer.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


def why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def prepare_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    finished = (out / "adapter" / "adapter_config.json").is_file()
    started = newest_checkpoint(out) is not None or (out / "metrics.jsonl").exists()
    if cfg.overwrite and out.exists():
        if dp.is_main():  # the other ranks wait at run()'s barrier until the folder is clean
            shutil.rmtree(out)
    elif cfg.resume and not started:
        raise UsageError(f"--resume: {out} has no checkpoint to resume from.")
    elif not cfg.resume and finished:
        raise UsageError(f"{out} already holds a finished run; pass --overwrite to replace it or choose another --output-dir.")
    elif not cfg.resume and started:
        raise UsageError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over.")
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------- data

def load_data(cfg: TrainConfig, tok: Tokenizer):
    """(train examples, eval examples, template name, raw eval records or None).

    This runs before the model loads: every row of every file is read, rendered and tokenized
    here, and all the problems are reported together (file:line each), so bad data costs
    seconds, not a GPU's start-up, and one fix-and-rerun, not one per bad row.
    """
    demo_eval, problems = None, []
    if not cfg.data:
        from .demo import demo_records

        train_recs, demo_eval = demo_records(cfg.seed)
        eval_recs = demo_eval
    else:
        path = Path(cfg.data) if Path(cfg.data).exists() or cfg.data.endswith((".json", ".jsonl")) else None
        train_recs, problems = D.read_records(path or D.fetch_hub_dataset(cfg.data), "skip")
        eval_recs = None
        if cfg.eval_data:
            eval_recs, more = D.read_records(cfg.eval_data, "skip")
            problems += more
    train, evals, stats, template, columns = [], None, {}, cfg.template, set()
    if train_recs:
        columns = D.common_columns(train_recs)  # the columns most rows have: one odd row cannot mislead
        template = D.detect_template(columns) if cfg.template == "auto" else cfg.template
        train, stats = D.build_examples(train_recs, template, tok, cfg.max_seq_len, cfg.truncation, "skip")
        problems += stats.pop("problems", [])
        if eval_recs is not None:
            evals, estats = D.build_examples(eval_recs, template, tok, cfg.max_seq_len, cfg.truncation, "skip")
            problems += estats.pop("problems", [])
    if problems:
        report = D.problem_report(problems, " and ".join(filter(None, (cfg.data, cfg.eval_data))))
        if cfg.bad_rows == "error":
            raise D.DataError(report + D.SKIP_HINT)
        print(f"skipped {report}")
    if not train_recs:
        raise D.DataError(f"{cfg.data or 'demo'}: no training records"
                          + (f" left after skipping {len(problems)} bad row(s)." if problems else "."))
    print(f"template: {template} (columns {sorted(columns)}); examples: {stats}")
    if evals is None:
        train, evals = D.split_eval(train, cfg.eval_fraction, cfg.seed)
    if not train:
        raise D.DataError(f"{cfg.data or 'demo'}: no training examples left after filtering ({stats}).")
    print("example (the [bracketed] prompt is masked out of the loss):\n" + D.show_example(train[0], tok))
    return train, evals, template, demo_eval


# ----------------------------------------------------------------------------- the run

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu.")
    return dev


def run(cfg: TrainConfig) -> dict:
    device = dp.init(pick_device(cfg.device))  # under torchrun: join the other ranks (distributed.py)
    main_rank, world = dp.is_main(), dp.world()
    if not main_rank:  # the other ranks would print the same lines again; their errors still go to stderr
        sys.stdout = open(os.devnull, "w")
    out = prepare_output(cfg)
    resume = None  # (checkpoint folder, its trainer state)
    if cfg.resume:  # a mismatched resume is refused before anything slow
        if main_rank:
            for line in clean_leftovers(out / "checkpoints") + clean_leftovers(out):
                print(line)
        ck = newest_checkpoint(out)
        if ck is None:
            print(f"--resume: {out} has no complete checkpoint yet (stopped before the first save); starting at step 0")
        else:
            resume = ck, read_trainer_state(ck)
            check_resume(resume[1]["config"], cfg, ck)
            saved_world = resume[1].get("world_size", 1)
            if saved_world != world:
                raise UsageError(f"cannot resume from {ck}: it was written by {saved_world} rank(s), this run has "
                                 f"{world}. Resume with torchrun --nproc_per_node {saved_world}, or start over.")
    dp.barrier()  # rank 0 has cleaned the folder (--overwrite, leftovers of a killed save)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.model:
        model_path = resolve_model(cfg.model)
    else:
        from .demo import smollm2_folder

        model_path = smollm2_folder()
    tok = Tokenizer(model_path)
    train, evals, template, demo_eval = load_data(cfg, tok)  # all of it, before the model takes any memory
    dp.check_same_everywhere(asdict(cfg), train)  # every rank: same flags, same data, or a clear stop
    pad_id = D.pad_id_for(tok)

    dtype = default_dtype(device)
    mesh = dp.mesh(device) if cfg.fsdp else None
    model = load_model(model_path, device=device, dtype=dtype, quantize=None if cfg.no_4bit else cfg.quant_type,
                       trust_pickle=cfg.trust_pickle_files, shard=(lambda q: dp.shard_nf4(q, mesh)) if mesh else None)
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, targets=targets)
    # FSDP2's gather/free hooks sit inside each decoder layer, where a per-layer torch.compile would have to trace them
    setup_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing,
                       compile="off" if cfg.fsdp else cfg.compile, device=device, offload=cfg.offload)
    if mesh:
        dp.shard_root(model.model, mesh)  # the decoder stack: what training, eval and generation call
    print(describe_trainable(model))
    acfg = adapter_config(model, cfg.model or str(model_path), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                          rslora=cfg.rslora)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    # One dtype policy: base weights in `dtype`, LoRA in fp32, matmuls under autocast on the GPU.
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    scaler = make_scaler(dtype, device)

    per_step = cfg.batch_size * cfg.grad_accum * world  # examples per optimizer step, all ranks together
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / per_step))
    step, position, metrics_state = 0, 0, {"bad_in_a_row": 0, "skipped": 0, "metrics_rows": 0}
    if resume:
        ck, state = resume
        restore(state, ck, model, optimizer, scaler)
        step, position = state["step"], state["position"]
        metrics_state.update(state["metrics"])
        print(f"resumed from {ck} at step {step}")
    metrics_path = out / "metrics.jsonl"
    if main_rank:
        metrics_state["metrics_rows"] = rewind_metrics(metrics_path, step, state["metrics"].get("metrics_rows")
                                                       if resume else 0)

    def log(row):
        if not main_rank:
            return
        with open(metrics_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        metrics_state["metrics_rows"] += 1  # saved with each checkpoint: where a resume cuts the file back to

    last_ckpt = resume[0] if resume else None

    def checkpoint() -> Path | None:
        """Save the state after `step`. A failed save (disk full, no permission) warns and training goes
        on: atomic_dir leaves the previous checkpoints as they were, and one lost save beats a lost run."""
        nonlocal last_ckpt
        target = out / "checkpoints" / f"step-{step:06d}"
        if last_ckpt == target:  # already saved at this step (say, Ctrl-C right after a periodic save)
            return last_ckpt
        if not main_rank:  # rank 0 writes; the weights and optimizer state are the same on every rank
            dp.barrier()
            last_ckpt = target
            return last_ckpt
        try:
            last_ckpt = save_checkpoint(out, step, model, optimizer, cfg, acfg, position, metrics_state, scaler,
                                        rng_next)
            return last_ckpt
        except SAVE_ERRORS as e:
            print(f"\nWARNING: could not save checkpoint {target}: {why(e)}. The newest complete checkpoint is "
                  f"{last_ckpt or 'none yet'}; training goes on.", file=sys.stderr, flush=True)
            return None
        finally:
            dp.barrier()

    report = {"eval_loss_before": None}
    bar = tqdm(total=total_steps, initial=step, desc="training", unit="step", dynamic_ncols=True,
               disable=not main_rank)
    batches, oom = [], None
    # The rng state at the start of step `step + 1`. A Ctrl-C or out-of-memory inside a step saves this one,
    # not the current state, which that step's dropout has already advanced: the resume redoes the step.
    rng_next = None
    try:
        if step == 0 and evals:
            report["eval_loss_before"] = evaluate(model, evals, cfg.batch_size, pad_id, device, autocast,
                                                  cfg.padding_free)
            log({"step": 0, "split": "eval", "loss": report["eval_loss_before"],
                 "perplexity": math.exp(min(report["eval_loss_before"], 50))})
            print(f"eval loss before: {report['eval_loss_before']:.4f}")
        if demo_eval is not None and step == 0:
            report["before"] = demo_report(model, tok, demo_eval)
        model.train()
        rng_next = rng_state()
        while step < total_steps:
            epoch, offset = divmod(position, len(train))
            order = D.epoch_order(len(train), cfg.seed, epoch)
            # The step's micro-batches at batch_size x world, the same on every rank; each rank takes its slice.
            mbs = rank_slice(micro_batches(train, order, offset, cfg.grad_accum, cfg.batch_size * world),
                             dp.rank(), world)
            batches = [make_batch(mb, pad_id, device, cfg.padding_free) for mb in mbs]
            lr = lr_at(step, cfg, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            # The loss is divided by the label tokens of ALL ranks, so the ranks' losses and gradients add up
            # to the global mean and its gradient: N ranks x batch b train exactly as 1 rank x batch N*b.
            n_tokens = dp.all_reduce_sum(label_tokens(batches))
            loss, _ = train_step(model, batches, autocast, scaler, n_total=n_tokens)
            loss = dp.all_reduce_sum(loss)
            dp.all_reduce_grads(params, device)  # once per optimizer step, after every micro-batch
            scaler.unscale_(optimizer)  # fp16 only: clipping and the finiteness check need the true gradients
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")).item()
            good = math.isfinite(loss) and math.isfinite(gnorm)
            if good:  # a skipped step leaves weights and optimizer state exactly as they were
                scaler.step(optimizer)  # = optimizer.step(): the scaler's own inf check agrees with `good`
            scaler.update()  # fp16: halve the scale after an overflow, grow it after a run of good steps
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            step += 1
            position += per_step
            rng_next = rng_state()
            tokens = dp.all_reduce_sum(sum(b["input_ids"].numel() for b in batches))
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{gnorm:.3f}", tok_s=f"{tokens / dt:,.0f}",
                            mem=f"{mem:.1f}G", refresh=False)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total_steps or not good:
                log({"step": step, "split": "train", "lr": lr,  # NaN is not JSON: a non-finite value is null
                     "loss": loss if math.isfinite(loss) else None,
                     "grad_norm": gnorm if math.isfinite(gnorm) else None,
                     "tokens_per_s": tokens / dt, "label_tokens": n_tokens, "peak_mem_gib": mem,
                     "epoch": position / len(train), "skipped": not good})
            if good:
                metrics_state["bad_in_a_row"] = 0
            else:
                # An fp16 overflow (finite loss, inf gradient) is the scaler's to handle: it has just halved its
                # scale and the next step usually fits, so it counts as bad only once the scale is below 1.
                overflow = scaler.is_enabled() and math.isfinite(loss) and scaler.get_scale() >= 1
                metrics_state["skipped"] += 1
                metrics_state["bad_in_a_row"] += 0 if overflow else 1
                n = metrics_state["bad_in_a_row"]
                print(f"\nstep {step}: {'fp16 overflow' if overflow else 'non-finite'} loss {loss} / grad norm "
                      f"{gnorm}: update skipped ({n} in a row, --max-bad-steps {cfg.max_bad_steps})",
                      file=sys.stderr, flush=True)
                if n >= cfg.max_bad_steps:
                    # Skipped steps change nothing, so these are still the weights of step `step - n`: save
                    # them (unless they are non-finite themselves); older checkpoints stay as they are.
                    ck = checkpoint() if all(bool(torch.isfinite(p).all()) for p in params) else None
                    bar.close()
                    raise TrainingStopped(
                        f"{n} steps in a row had a non-finite loss or gradient (steps {step - n + 1}-{step}), so "
                        f"training stopped. Skipped steps change nothing: the weights are those of step {step - n}"
                        + (f", saved as {ck}" if ck else f"; the newest complete checkpoint is {last_ckpt}")
                        + f". Look at the data of these steps; or lower --lr (now {cfg.lr:g}) and start over with "
                          "--overwrite, or go on from here with --resume.")
            if cfg.eval_every and step % cfg.eval_every == 0 and evals and step < total_steps:
                ev = evaluate(model, evals, cfg.batch_size, pad_id, device, autocast, cfg.padding_free)
                log({"step": step, "split": "eval", "loss": ev, "perplexity": math.exp(min(ev, 50))})
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint()
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (mapped in __main__): save, then exit 130
        bar.close()
        if step == (int(last_ckpt.name[5:]) if last_ckpt else 0):
            print(f"\ninterrupted after step {step}: nothing new to save" + (f"; {last_ckpt} holds it" if step else ""))
            raise SystemExit(130)
        ck = checkpoint()
        print(f"\ninterrupted after step {step}: " + (f"saved {ck}; continue with --resume" if ck else
                                                     f"the newest complete checkpoint is {last_ckpt}"))
        raise SystemExit(130)
    except torch.OutOfMemoryError as e:
        oom = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
    bar.close()
    if oom is not None:  # outside the except block, so the failed step's tensors are already freed
        longest = max((b["input_ids"].shape[1] for b in batches), default=None)
        batches = None
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ck = checkpoint() if step > 0 else None
        raise OutOfMemory(oom_advice(cfg, step, oom, longest, device, ck or last_ckpt))
    checkpoint()  # the state after the last step, before the eval below (a resume need not redo it)

    if evals:
        report["eval_loss_after"] = evaluate(model, evals, cfg.batch_size, pad_id, device, autocast,
                                             cfg.padding_free)
        log({"step": step, "split": "eval", "loss": report["eval_loss_after"],
             "perplexity": math.exp(min(report["eval_loss_after"], 50))})
    if demo_eval is not None:  # every rank generates: under --fsdp each forward needs all of them
        report["after"] = demo_report(model, tok, demo_eval)
    if not main_rank:  # the rest is rank 0's: the adapter, the plot, the report, the upload
        dp.barrier()
        return report
    try:
        save_adapter(model, out / "adapter", acfg)
    except SAVE_ERRORS as e:
        kept = (f" Nothing is lost: {last_ckpt}/adapter holds these same weights; make room and run again with "
                "--resume to write it." if last_ckpt and last_ckpt.name == f"step-{step:06d}" else
                f" The newest complete checkpoint is {last_ckpt}." if last_ckpt else "")
        raise TrainingStopped(f"could not write the adapter to {out / 'adapter'}: {why(e)}.{kept}") from None
    finally:
        dp.barrier()  # the other ranks exit once the adapter is written
    try:
        plot_losses(out)
    except OSError as e:
        print(f"WARNING: could not draw {out / 'loss.png'}: {why(e)}", file=sys.stderr)
    if report.get("eval_loss_before") is not None:
        print(f"eval loss: {report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f}")
    if demo_eval is not None:
        print_demo_summary(report)
    print(f"adapter saved to {out / 'adapter'}")
    if cfg.push_to_hub:
        from .checkpoint import push_to_hub

        push_to_hub(out / "adapter", cfg.push_to_hub)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def oom_advice(cfg: TrainConfig, step: int, error: str, longest: int | None, device, kept: Path | None) -> str:
    """The out-of-memory message: what ran, how much memory it took, and changes that need less, with numbers."""
    B, G, L = cfg.batch_size, cfg.grad_accum, cfg.max_seq_len
    mem = "peak GPU memory: not measured on " + device.type
    if device.type == "cuda":
        mem = (f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of "
               f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
    seq = min(L, longest or L)
    lines = [f"out of memory in step {step + 1} ({error}).",
             f"  now: --batch-size {B} --grad-accum {G} --max-seq-len {L}"
             + (f" (longest batch here: {longest} tokens)" if longest else "")
             + f", gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {mem}.",
             "  each of these needs less memory:"]
    if B > 1:
        lines.append(f"    --batch-size {B // 2} --grad-accum {G * 2}   the same effective batch of {B * G} in "
                     "half-size pieces: about half the activation memory; --resume accepts it")
    if not cfg.gradient_checkpointing:
        lines.append("    --gradient-checkpointing   keep one tensor per layer and recompute the rest in backward "
                     "(~1/3 slower)")
    if not cfg.offload:
        lines.append("    --offload   lean mode: the checkpointed layer inputs and the embedding table live in "
                     "host memory")
    lines.append(f"    --max-seq-len {max(8, seq // 2)}   activations grow with the tokens per batch; longer examples "
                 "are truncated (or --truncation drop); this one needs a new run")
    lines.append(f"  kept: {kept}; continue from it with --resume." if kept else "  no checkpoint was written yet.")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- demo report and plot

def demo_report(model, tok, records) -> dict:
    """Exact-match accuracy of greedy answers on the held-out demo questions, and one sample."""
    from .demo import final_answer
    from .generate import generate, model_eos_ids

    prompts = [tok.encode(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True),
                          add_special_tokens=False) for r in records]
    outs = generate(model, prompts, max_new_tokens=48, eos_ids=model_eos_ids(tok.folder, tok),
                    pad_id=D.pad_id_for(tok))
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    correct = [final_answer(t) == r["answer"] for t, r in zip(texts, records)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct),
            "question": records[0]["messages"][0]["content"], "sample": texts[0], "expected": records[0]["answer"]}


def print_demo_summary(report: dict):
    b, a = report["before"], report["after"]
    print("\n" + "=" * 72)
    print(f"held-out exact match: {b['accuracy']:.0%} -> {a['accuracy']:.0%}  ({a['n']} questions never trained on)")
    print(f"eval loss:            {report['eval_loss_before']:.3f} -> {report['eval_loss_after']:.3f}")
    print(f"question: {a['question']}   (expected: {a['expected']})")
    print(f"--- before ---\n{b['sample'].strip()}\n--- after ---\n{a['sample'].strip()}")
    print("=" * 72)


def plot_losses(out: Path):
    """loss.png: train loss per step and eval loss, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o--")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over label tokens)")
    ax.set_title(f"minilora: {out.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out / "loss.png")
    plt.close(fig)


def main(argv=None):
    prog = "minilora.train"
    try:
        cfg = parse_config(argv)
        run(cfg)
    except (ValueError, OSError, KeyError) as e:  # bad flags, data, files: the user's to fix
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    except TrainingStopped as e:  # OutOfMemory included (exit code 3)
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
    except torch.OutOfMemoryError as e:  # outside the training loop: loading the model
        print(f"{prog}: error: out of memory before training started ({str(e).strip().splitlines()[0]}): the model "
              "does not fit; use 4-bit (drop --no-4bit), a smaller model, or a GPU with more memory.", file=sys.stderr)
        raise SystemExit(3)
    except KeyboardInterrupt:  # while loading or tokenizing, or a second Ctrl-C while saving
        print(f"{prog}: interrupted; nothing more was saved.", file=sys.stderr)
        raise SystemExit(130)
    finally:
        dp.teardown()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves a checkpoint too
    main()
