"""The training run's settings: one dataclass, `TrainConfig`, whose fields are the command's flags.

Each field's help text is its `--help` line; `--config run.json` takes the same keys, checked for type and
range like the flags, naming the file. Flags given on the command line win over the file. With neither
--model nor --data the demo's settings (DEMO) apply, under anything the user set.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from . import distributed as dp
from .chat import read_template
from .data import TEMPLATES
from .lora import ALL_TARGETS

def _f(default, help, choices=None):
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class TrainConfig:
    # model and data
    model: str = _f("", "model folder or hub id (e.g. deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B); empty: the demo model")
    trust_pickle_files: bool = _f(False, "read pytorch_model.bin (pickle) weights when the model has no safetensors; "
                                         "only for files you trust")
    data: str = _f("", ".json/.jsonl file, or hub data set id org/name[:config][@split]; empty: the demo task")
    template: str = _f("auto", "how records become text; auto picks from the columns", ("auto",) + TEMPLATES)
    chat_template: str = _f("", "for --template chat: a Jinja chat template file to use instead of the tokenizer's "
                                "(give the same file to generate --chat-template); empty: the tokenizer's, with "
                                "DeepSeek-R1-Distill's swapped for minilora/templates/deepseek_r1_distill.jinja, "
                                "which keeps the reasoning (chat.py)")
    empty_think: str = _f("train", "chat turns without <think> reasoning, under a template whose generation prompt "
                                   "opens <think> (DeepSeek-R1-Distill) get DeepSeek's empty thought "
                                   "'<think>\\n\\n</think>\\n\\n'. train: the target is its '\\n</think>\\n\\n' "
                                   "and the answer; mask: it stays in the input, masked, and the target is the "
                                   "answer alone", ("train", "mask"))
    last_turn_only: bool = _f(False, "chat: train on the last assistant turn of each conversation only, not on every "
                                     "assistant turn")
    max_seq_len: int = _f(2048, "longest example in tokens")
    truncation: str = _f("truncate", "what to do with longer examples", ("truncate", "drop"))
    bad_rows: str = _f("error", "malformed data rows: stop with every problem listed, or skip them", ("error", "skip"))
    # batching and schedule
    batch_size: int = _f(2, "examples per micro-batch")
    padding_free: str = _f("auto", "auto, on or off: put a step's examples end to end in rows of up to batch-size x "
                                   "max-seq-len tokens instead of padding each micro-batch to its longest (like "
                                   "trl's padding_free, with the step's examples dealt anew into full rows): no "
                                   "compute on pad tokens, the same loss and gradients; flash attention's "
                                   "variable-length kernel on an Ampere or newer GPU (speed/padding_free.py). "
                                   "auto: on with CUDA graphs on such a GPU; a bare --padding-free means on",
                           ("auto", "on", "off"))
    group_by_length: bool = _f(False, "put examples of like length in the same micro-batch (sorted within windows "
                                      "of 50 micro-batches of the seeded shuffle; transformers' group_by_length), "
                                      "so that batches carry less padding")
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
    targets: str = _f(",".join(ALL_TARGETS), "comma-separated module names to adapt, of "
                      f"{', '.join(ALL_TARGETS)}; all-linear (peft's spelling) is all seven")
    rslora: bool = _f(False, "rank-stabilised LoRA scale alpha/sqrt(r)")
    no_4bit: bool = _f(False, "keep the base in 16-bit (plain LoRA) instead of NF4 (QLoRA)")
    quant_type: str = _f("nf4", "4-bit data type of the base weights", ("nf4", "fp4"))
    # optimizer and memory
    optim: str = _f("adamw8bit", "optimizer (bitsandbytes 8-bit AdamW, or torch's)", ("adamw8bit", "adamw", "paged_adamw8bit"))
    gradient_checkpointing: bool = _f(True, "recompute each decoder layer in backward: less memory, ~1/3 more compute")
    keep_activations: int = _f(0, "with gradient checkpointing or --offload: this many of the last decoder layers keep "
                                  "their activations instead of being recomputed in backward; each saves ~1/L of the "
                                  "recompute time (L: the model's decoder layers, the most this can be) and costs one "
                                  "layer's activations of GPU memory (0.29 GiB for the 1.5B model at 2 x 2048 tokens)")
    offload: bool = _f(False, "lean mode: keep checkpointed layer inputs and the embedding table in host memory")
    fsdp: bool = _f(False, "under torchrun: shard the frozen 4-bit base across the ranks with FSDP2, for models "
                           "too large for one GPU (LoRA stays replicated)")
    compile: str = _f("auto", "torch.compile each decoder layer (fuses norms, RoPE, SwiGLU; 1.5B: ~1.4x the tokens/s "
                              "after ~13 s of compiling on a fresh machine); auto: on CUDA, for runs long enough to "
                              "repay it (parameters x tokens >= 2e15: ~1.1M tokens at 1.5B, ~250k at 8B)",
                      ("auto", "on", "off"))
    cuda_graphs: str = _f("auto", "replay each micro-batch's forward and backward from a CUDA graph: no per-kernel "
                                  "host cost (1.5B: 2.4x the tokens/s); pads lengths to a multiple of 256 (past 2048 "
                                  "tokens, to one of 8 lengths per doubling; padding-free rows to multiples of "
                                  "batch-size x max-seq-len / 8, a few chosen per step) and computes the loss at "
                                  "prompt positions too (graphs.py). auto: on a CUDA GPU with bf16 unless --fsdp, "
                                  "--dropout > 0, several processes, or batch-size x max-seq-len over 32768 tokens",
                          ("auto", "on", "off"))
    # eval, saving and run control
    eval_fraction: float = _f(0.05, "fraction of the data held out for eval (ignored with --eval-data)")
    eval_data: str = _f("", "separate eval .json/.jsonl file")
    eval_every: int = _f(0, "eval every N steps; 0: at the start and end only")
    save_every: int = _f(0, "checkpoint every N steps; 0: only at the end (and on Ctrl-C)")
    log_every: int = _f(1, "write a metrics.jsonl row every N steps")
    output_dir: str = _f("runs/minilora", "where metrics, checkpoints and the adapter go")
    resume: bool = _f(False, "continue from the newest checkpoint in --output-dir")
    overwrite: bool = _f(False, "replace the run in --output-dir (its files only, and only once the new run has "
                                "loaded its data and model; a folder holding other files is refused)")
    max_bad_steps: int = _f(5, "stop after this many consecutive steps with a non-finite loss or gradient")
    seed: int = _f(3407, "seed for data order, LoRA init and dropout")
    device: str = _f("auto", "cuda, cuda:N, cpu, or auto")
    push_to_hub: str = _f("", "upload the final adapter to this hub repo (token from HF_TOKEN)")
    config: str = _f("", "JSON file of these same keys; flags given on the command line win")


DEMO = dict(batch_size=8, padding_free="on", grad_accum=1, max_steps=24, lr=2e-3, warmup_steps=3, r=16, alpha=32,
            max_seq_len=256, eval_every=0, gradient_checkpointing=False, output_dir="runs/demo")


# peft's LoraConfig names, as second spellings. `--lora-r` is also the one torchrun accepts: its own parser
# reads `--r` as an ambiguous abbreviation of its --rdzv-*/--role/--run-path options, even after `-m module`.
PEFT_NAMES = {"r": ["--lora-r"], "alpha": ["--lora-alpha"], "dropout": ["--lora-dropout"]}


class UsageError(ValueError):
    """A bad flag or value: printed as one line, exit code 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default where it has one to say (not None, False or empty)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse for the commands (train, generate, merge): a bad flag raises UsageError, one line for the command
    to print (argparse would print its usage block first), with a hint for a flag spelled like a near one."""

    def error(self, message):
        hint = ""
        if message.startswith("unrecognized arguments: "):  # e.g. --max_new_tokens, as transformers spells it
            flag = message.split(": ", 1)[1].split()[0].split("=")[0]
            hint = closest(flag.replace("_", "-"), [o for a in self._actions for o in a.option_strings])
        raise UsageError(f"{message}.{hint} (--help lists every flag)")


def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m minilora.train", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        flags = ["--" + f.name.replace("_", "-")] + PEFT_NAMES.get(f.name, [])
        meta = f.metadata
        if f.type == "bool" or isinstance(f.default, bool):
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            p.add_argument(*flags, dest=f.name, action=action, default=argparse.SUPPRESS, help=meta["help"])
        else:  # --padding-free, a switch once, given bare means on
            bare = {"nargs": "?", "const": "on"} if f.name == "padding_free" else {}
            p.add_argument(*flags, dest=f.name, type=type(f.default), default=argparse.SUPPRESS,
                           choices=meta["choices"], help=meta["help"] + f" (default: {f.default!r})",
                           metavar=None if meta["choices"] else f.name.upper(), **bare)  # choices: {a,b,c}
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def config_from_json(path: str, checks=()) -> dict:
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
            raise UsageError(f"--config {path}: unknown key {k!r}.{closest(name, known)}")
        want = type(known[name].default)
        if want is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if isinstance(v, bool) and name == "padding_free":
            v = "on" if v else "off"  # {"padding_free": true}, as the flag was a switch once
        if not isinstance(v, want) or (want is int and isinstance(v, bool)):
            raise UsageError(f"--config {path}: {k} must be {want.__name__}, got {json.dumps(v)}.")
        out[name] = v
    try:  # ranges too, naming the file: {"lr": -1} is as wrong here as on the command line
        validate(TrainConfig(**out), checks)
    except UsageError as e:
        raise UsageError(f"--config {path}: {e}") from None
    return out


# The names trl / transformers / peft users type, mapped to ours for the "did you mean" hint.
PEER_FLAGS = {"--learning-rate": "--lr",
              "--per-device-train-batch-size": "--batch-size", "--gradient-accumulation-steps": "--grad-accum",
              "--num-train-epochs": "--epochs", "--target-modules": "--targets", "--max-seq-length": "--max-seq-len",
              "--lr-scheduler-type": "--scheduler", "--use-rslora": "--rslora", "--load-in-4bit": "(the default)",
              "--dataset": "--data", "--model-name": "--model", "--model-name-or-path": "--model"}


def parse_config(argv: list[str] | None = None, checks=()) -> TrainConfig:
    """The flags (and --config's file) as a checked TrainConfig; `checks` as in validate."""
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args, unknown = p.parse_known_args(argv)
    if unknown:
        flags = [a.split("=")[0] for a in unknown if a.startswith("-")] or unknown
        options = [o for a in p._actions for o in a.option_strings]
        flag = flags[0].replace("_", "-")
        hint = f" Did you mean {PEER_FLAGS[flag]!r}?" if flag in PEER_FLAGS else closest(flag, options)
        raise UsageError(f"unknown argument {flags[0]!r}.{hint}")
    given = vars(args)
    values = config_from_json(given["config"], checks) if given.get("config") else {}
    values.update(given)
    if not values.get("model") and not values.get("data"):
        values = {**DEMO, **values}  # the demo's defaults, under anything the user set
    cfg = TrainConfig(**values)
    validate(cfg, checks)
    return cfg


def target_names(targets: str) -> list[str]:
    """--targets as a list of module names; `all-linear` is every projection, as in peft (all but lm_head)."""
    names = [t.strip() for t in targets.split(",") if t.strip()]
    return list(ALL_TARGETS) if names == ["all-linear"] else names


def validate(cfg: TrainConfig, checks=()):
    """Every field's type, range and choices, and the flags that contradict each other; then `checks`, more such
    functions of the config (train.py passes speed.check: the speed features that cannot run together)."""
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
    need(cfg.keep_activations >= 0, f"--keep-activations must be >= 0, got {cfg.keep_activations}.")
    need(cfg.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}.")
    need(cfg.template in ("auto",) + TEMPLATES, f"--template must be one of auto, {', '.join(TEMPLATES)}.")
    targets = target_names(cfg.targets)
    unknown = [t for t in targets if t not in ALL_TARGETS]
    need(targets and not unknown, f"--targets {cfg.targets!r}: " + (
        f"{', '.join(unknown)} is not among the projections LoRA goes on here ({', '.join(ALL_TARGETS)}; all-linear "
        f"is all seven).{closest(unknown[0], ALL_TARGETS)}" if unknown else
        f"no module named; give some of {', '.join(ALL_TARGETS)}, comma-separated, or all-linear."))
    for name in ("truncation", "bad_rows", "scheduler", "optim", "quant_type", "compile", "cuda_graphs",
                 "empty_think", "padding_free"):
        choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
        need(getattr(cfg, name) in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}.")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; pick one.")
    if cfg.chat_template:  # a missing or broken file stops here, before the output folder is made
        read_template(cfg.chat_template)
    need(not cfg.fsdp or dp.world() > 1, "--fsdp shards the model across processes, but this is a single process. "
         "Launch with torchrun --nproc_per_node N -m minilora.train ... (N >= 2), or drop --fsdp.")
    need(not cfg.fsdp or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 7),
         f"--fsdp needs torch >= 2.7 (FSDP2's fully_shard with ignored_params); this is torch {torch.__version__}.")
    need(not (cfg.fsdp and not cfg.model and not cfg.data), "--fsdp is for a model too large for one GPU; the demo "
         "(no --model, no --data) generates answers rank by rank, which sharded weights cannot serve. Give --model "
         "and --data, or drop --fsdp.")
    need(not (cfg.fsdp and cfg.no_4bit), "--fsdp shards the 4-bit base weights; it does not work with --no-4bit.")
    for check in checks:
        check(cfg)


def closest(word: str, choices) -> str:
    """A " Did you mean ...?" hint naming the nearest of `choices`, or an empty string."""
    m = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean {m[0]!r}?" if m else ""
