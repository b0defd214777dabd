"""`python -m minilora.train`: QLoRA supervised fine-tuning, one loop written out by hand.

With no arguments it runs the offline demo: SmolLM2-135M-Instruct learns to
count days and months forward with <think> reasoning (see demo.py), and prints
eval loss, exact-match accuracy and a sample answer before and after.

The loop, per optimizer step:
1. take `grad_accum` micro-batches and count their label tokens N (all of them);
2. for each micro-batch: loss_sum = sum of its token losses; backward(loss_sum / N);
3. clip the gradient norm (fp16: after unscaling), skip the step if the loss or the norm
   is not finite, step AdamW, set the lr.

Step 2 is the gradient-accumulation fix the peers made in late 2024; step.py, which
holds the parts of a step, says why.

This file reads in the order a run goes: the config and its flags; set_up (the output
folder and a resume's settings, then all of the data, then the model); train_loop; and
finish (the eval after, the adapter, the report). Checkpoints and --resume are in
resume.py; the demo report, the loss plot and the out-of-memory advice in report.py.

Faults (README.md, "What happens when…"; tests/test_fault_*.py). Each checkpoint is one folder,
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
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm

from . import data as D
from . import distributed as dp
from .checkpoint import adapter_config, default_dtype, load_model, resolve_model, save_adapter
from .graphs import GraphedMicroBatches, GraphRecordingError, bucket_length
from .lora import ALL_TARGETS, apply_lora, describe_trainable
from .offload import host_embedding
from .report import demo_report, oom_advice, plot_losses, print_demo_summary
from .resume import (SAVE_ERRORS, find_resume, prepare_output, restore, rewind_metrics, rng_state, save_checkpoint,
                     why)
from .step import (check_keep_activations, evaluate, flatten_for_optimizer, label_tokens, lr_at, make_batch,
                   make_optimizer, make_scaler, micro_batches, rank_slice, setup_for_training, train_step)
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
                                   "the longest (trl's padding_free): no compute on pad tokens, the same loss; "
                                   "measured slower on an H100 at small batches (bench/NOTES.md)")
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
    keep_activations: int = _f(0, "with gradient checkpointing or --offload: this many of the last decoder layers keep "
                                  "their activations instead of being recomputed in backward; each saves ~1/L of the "
                                  "recompute time (L: the model's decoder layers, the most this can be) and costs one "
                                  "layer's activations of GPU memory (0.29 GiB for the 1.5B model at 2 x 2048 tokens)")
    offload: bool = _f(False, "lean mode: keep checkpointed layer inputs and the embedding table in host memory")
    fsdp: bool = _f(False, "under torchrun: shard the frozen 4-bit base across the ranks with FSDP2, for models "
                           "too large for one GPU (LoRA stays replicated)")
    compile: str = _f("auto", "torch.compile each decoder layer (fuses norms, RoPE, SwiGLU); auto: on CUDA only",
                      ("auto", "on", "off"))
    cuda_graphs: str = _f("auto", "replay each micro-batch's forward and backward from a CUDA graph: no per-kernel "
                                  "host cost (1.5B: 2.4x the tokens/s); pads lengths to a multiple of 256 (past 2048 "
                                  "tokens, to one of 8 lengths per doubling) and computes "
                                  "the loss at prompt positions too (graphs.py). auto: on a CUDA GPU with bf16 unless "
                                  "--padding-free, --fsdp, --dropout > 0, several processes, or batch-size x "
                                  "max-seq-len over 32768 tokens",
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
PEER_FLAGS = {"--learning-rate": "--lr",
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


# The flags a CUDA graph recording cannot hold, and why (graphs.py).
GRAPH_CLASHES = {
    "padding-free": "its row layout changes with every batch; graphs need a few fixed shapes.",
    "fsdp": "FSDP2's gathers run between the layers' kernels.",
    "dropout": "the checkpointed recompute must save the RNG state to redraw the same masks, and a recording "
               "cannot read it (without checkpointing, dropout in a graph is untested here).",
}


def graph_clashes(cfg: TrainConfig) -> list[str]:
    """The GRAPH_CLASHES flags this run sets."""
    set_ = {"padding-free": cfg.padding_free, "fsdp": cfg.fsdp, "dropout": cfg.dropout > 0}
    return [name for name in GRAPH_CLASHES if set_[name]]


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
    need(cfg.keep_activations >= 0, f"--keep-activations must be >= 0, got {cfg.keep_activations}.")
    need(cfg.keep_activations == 0 or cfg.gradient_checkpointing or cfg.offload,
         "--keep-activations N spares N layers the recompute of gradient checkpointing, which is off "
         "(--no-gradient-checkpointing keeps every layer's activations already); drop one of the two.")
    need(cfg.max_bad_steps >= 1, f"--max-bad-steps must be >= 1, got {cfg.max_bad_steps}.")
    need(cfg.template in ("auto",) + D.TEMPLATES, f"--template must be one of auto, {', '.join(D.TEMPLATES)}.")
    for name in ("truncation", "bad_rows", "scheduler", "optim", "quant_type", "compile", "cuda_graphs"):
        choices = TrainConfig.__dataclass_fields__[name].metadata["choices"]
        need(getattr(cfg, name) in choices, f"--{name.replace('_', '-')} must be one of {', '.join(choices)}.")
    need(not (cfg.resume and cfg.overwrite), "--resume and --overwrite contradict each other; pick one.")
    need(not cfg.fsdp or dp.world() > 1, "--fsdp shards the model across processes, but this is a single process. "
         "Launch with torchrun --nproc_per_node N -m minilora.train ... (N >= 2), or drop --fsdp.")
    need(not cfg.fsdp or tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 7),
         f"--fsdp needs torch >= 2.7 (FSDP2's fully_shard with ignored_params); this is torch {torch.__version__}.")
    need(not (cfg.fsdp and not cfg.model and not cfg.data), "--fsdp is for a model too large for one GPU; the demo "
         "(no --model, no --data) generates answers rank by rank, which sharded weights cannot serve. Give --model "
         "and --data, or drop --fsdp.")
    need(not (cfg.fsdp and cfg.no_4bit), "--fsdp shards the 4-bit base weights; it does not work with --no-4bit.")
    for other in graph_clashes(cfg):
        need(cfg.cuda_graphs != "on", f"--cuda-graphs on cannot record --{other}: {GRAPH_CLASHES[other]} "
             "Drop one of the two (--cuda-graphs auto does).")
    need(not (cfg.fsdp and cfg.compile == "on"), "--fsdp and --compile on: per-layer compile cannot trace FSDP2's "
         "gather/free hooks inside each layer here; use --compile off (or auto, which is off under --fsdp).")


# ----------------------------------------------------------------------------- the run

@dataclass
class Run:
    """What set_up builds, shared by the loop and the finish. The fields after `total_steps` are where
    training stands: each checkpoint saves them and --resume puts them back."""
    cfg: TrainConfig
    out: Path  # --output-dir
    device: torch.device
    tok: Tokenizer
    model: torch.nn.Module
    acfg: dict  # adapter_config.json, in PEFT's format
    params: list  # what the optimizer steps: the LoRA factors, most of them as one flat tensor (step.py)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # fp16 only; disabled it passes everything through (step.py)
    autocast: torch.autocast
    graphs: GraphedMicroBatches | None  # --cuda-graphs
    train: list  # tokenized examples
    evals: list
    demo_eval: list | None  # the demo's held-out questions (no --data): for its accuracy before and after
    pad_id: int
    per_step: int  # examples per optimizer step, all ranks together
    total_steps: int
    step: int = 0  # optimizer steps done
    position: int = 0  # examples taken so far: the epoch, and where in its order the next step starts
    metrics_state: dict = field(default_factory=lambda: {"bad_in_a_row": 0, "skipped": 0, "metrics_rows": 0})
    last_ckpt: Path | None = None  # the newest complete checkpoint
    # The rng state at the start of step `step + 1`. A Ctrl-C or out-of-memory inside a step saves this one,
    # not the current state, which that step's dropout has already advanced: the resume redoes the step.
    rng_next: dict | None = None
    report: dict = field(default_factory=lambda: {"eval_loss_before": None})  # report.json: what run() returns


def run(cfg: TrainConfig) -> dict:
    """One training run: set up, train, finish. Returns the report (eval losses, the demo's accuracy)."""
    return finish(train_loop(set_up(cfg)))


# ----------------------------------------------------------------------------- set-up

def set_up(cfg: TrainConfig) -> Run:
    """Everything before the first step, cheapest checks first: the output folder and a resume's settings,
    then all of the data, then the model. A mistake in the first two costs seconds, not a model load."""
    device = dp.init(pick_device(cfg.device))  # under torchrun: join the other ranks (distributed.py)
    graphed = use_cuda_graphs(cfg, device, default_dtype(device))
    if not dp.is_main():  # the other ranks would print the same lines again; their errors still go to stderr
        sys.stdout = open(os.devnull, "w")
    out = prepare_output(cfg)
    resume = find_resume(cfg, out)  # (checkpoint folder, its trainer state) or None; a mismatch stops here
    dp.barrier()  # rank 0 has cleaned the folder (--overwrite, leftovers of a killed save)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    if cfg.model:
        model_path = resolve_model(cfg.model)
    else:
        from .demo import smollm2_folder

        if dp.is_main():  # rank 0 converts the demo model into the shared cache; the others then read it
            smollm2_folder()
        dp.barrier()
        model_path = smollm2_folder()
    if cfg.keep_activations:  # against the model's layer count now, not after minutes of loading
        config = Path(model_path) / "config.json"
        check_keep_activations(cfg.keep_activations, json.loads(config.read_text()).get("num_hidden_layers", 0),
                               str(config))
    tok = Tokenizer(model_path)
    train, evals, _template, demo_eval = load_data(cfg, tok)  # all of it, before the model takes any memory
    dp.check_same_everywhere(asdict(cfg), train)  # every rank: same flags, same data, or a clear stop
    pad_id = D.pad_id_for(tok)

    model = build_model(cfg, model_path, device)
    acfg = adapter_config(model, cfg.model or str(model_path), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                          rslora=cfg.rslora)
    params = flatten_for_optimizer([p for p in model.parameters() if p.requires_grad])
    dtype = default_dtype(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    per_step = cfg.batch_size * cfg.grad_accum * dp.world()
    run = Run(cfg=cfg, out=out, device=device, tok=tok, model=model, acfg=acfg, params=params,
              optimizer=make_optimizer(params, cfg), scaler=make_scaler(dtype, device),
              # One dtype policy: base weights in `dtype`, LoRA in fp32, matmuls under autocast on the GPU.
              autocast=autocast,
              graphs=GraphedMicroBatches(model, params, autocast) if graphed else None,
              train=train, evals=evals, demo_eval=demo_eval, pad_id=pad_id, per_step=per_step,
              total_steps=cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / per_step)))
    start_from(run, resume)
    return run


# Above this many tokens per micro-batch a step is GPU time already (the 8B step gains 2.5% at 4k tokens), while
# each recording costs two more passes (minutes at 350k tokens) and the memory of its pool: auto leaves graphs off.
GRAPH_AUTO_TOKENS = 32768


def use_cuda_graphs(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> bool:
    """--cuda-graphs: `on` asks for them (validate refused the flags they cannot record), `auto` takes them where
    they work and pay. Several processes are left out of auto: the recording with the ranks' all-reduce is not yet
    measured."""
    fits = device.type == "cuda" and dtype == torch.bfloat16
    if cfg.cuda_graphs == "on" and not fits:
        raise UsageError(f"--cuda-graphs on needs a CUDA GPU with bf16 (this run trains on {device} in {dtype}); "
                         "use --cuda-graphs off.")
    return cfg.cuda_graphs == "on" or (cfg.cuda_graphs == "auto" and fits and not graph_clashes(cfg)
                                       and dp.world() == 1 and cfg.max_seq_len * cfg.batch_size <= GRAPH_AUTO_TOKENS)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is visible; use --device cpu.")
    return dev


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


def build_model(cfg: TrainConfig, model_path: Path, device: torch.device):
    """The base model (NF4 unless --no-4bit), LoRA on --targets, the memory switches; --fsdp shards it."""
    mesh = dp.mesh(device) if cfg.fsdp else None
    model = load_model(model_path, device=device, dtype=default_dtype(device),
                       quantize=None if cfg.no_4bit else cfg.quant_type, trust_pickle=cfg.trust_pickle_files,
                       shard=(lambda q: dp.shard_nf4(q, mesh)) if mesh else None)
    targets = [t.strip() for t in cfg.targets.split(",") if t.strip()]
    apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora, targets=targets)
    # FSDP2's gather/free hooks sit inside each decoder layer, where a per-layer torch.compile would have to trace them
    setup_for_training(model, gradient_checkpointing=cfg.gradient_checkpointing,
                       compile="off" if cfg.fsdp else cfg.compile, device=device, offload=cfg.offload,
                       keep_activations=cfg.keep_activations)
    if mesh:
        dp.shard_root(model.model, mesh)  # the decoder stack: what training, eval and generation call
    print(describe_trainable(model))
    return model


def start_from(run: Run, resume: tuple[Path, dict] | None):
    """Put a checkpoint back (--resume), and cut metrics.jsonl back to the rows it held when it was saved."""
    rows = 0
    if resume:
        ck, state = resume
        restore(state, ck, run.model, run.optimizer, run.scaler)
        run.step, run.position, run.last_ckpt = state["step"], state["position"], ck
        run.metrics_state.update(state["metrics"])
        rows = state["metrics"].get("metrics_rows")
        print(f"resumed from {ck} at step {run.step}")
    if dp.is_main():
        run.metrics_state["metrics_rows"] = rewind_metrics(run.out / "metrics.jsonl", run.step, rows)


# ----------------------------------------------------------------------------- the loop

def train_loop(run: Run) -> Run:
    """The optimizer steps from where the run stands to the last, then a checkpoint of the final state.

    Ctrl-C or SIGTERM saves the last completed step and exits 130; out of memory saves it and stops
    with advice (exit 3); --max-bad-steps non-finite steps in a row stop the run (exit 1).
    """
    cfg = run.cfg
    bar = tqdm(total=run.total_steps, initial=run.step, desc="training", unit="step", dynamic_ncols=True,
               disable=not dp.is_main())
    batches, oom, no_graph = [], None, None
    try:
        if run.step == 0:
            before_training(run)
        run.model.train()
        run.rng_next = rng_state()
        while run.step < run.total_steps:
            batches = step_batches(run)
            lr = lr_at(run.step, cfg, run.total_steps)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            loss, gnorm, n_tokens, good = optimizer_step(run, batches)
            dt = time.perf_counter() - t0
            run.step += 1
            run.position += run.per_step
            run.rng_next = rng_state()
            log_step(run, bar, batches, lr, loss, gnorm, n_tokens, dt, good)
            if good:
                run.metrics_state["bad_in_a_row"] = 0
            else:
                bad_step(run, bar, loss, gnorm)  # the --max-bad-steps-th in a row saves and stops the run
            if cfg.eval_every and run.step % cfg.eval_every == 0 and run.evals and run.step < run.total_steps:
                log_eval(run)
            if cfg.save_every and run.step % cfg.save_every == 0:
                checkpoint(run)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (mapped in __main__): save, then exit 130
        bar.close()
        if run.step == (int(run.last_ckpt.name[5:]) if run.last_ckpt else 0):
            print(f"\ninterrupted after step {run.step}: nothing new to save"
                  + (f"; {run.last_ckpt} holds it" if run.step else ""))
            raise SystemExit(130)
        ck = checkpoint(run, together=False)  # each rank was interrupted at its own point: no collectives now
        print(f"\ninterrupted after step {run.step}: " + (f"saved {ck}; continue with --resume" if ck else
                                                         f"the newest complete checkpoint is {run.last_ckpt}"))
        raise SystemExit(130)
    except torch.OutOfMemoryError as e:
        oom = str(e).strip().splitlines()[0] if str(e).strip() else "out of memory"
    except GraphRecordingError as e:  # a micro-batch length seen for the first time, maybe hundreds of steps in
        no_graph = str(e)
    bar.close()
    if no_graph is not None:
        ck = checkpoint(run, together=False) if run.step > 0 else None
        raise TrainingStopped(f"{no_graph}. " + (f"Saved {ck}; continue" if ck else "Start again") +
                              " without CUDA graphs: --cuda-graphs off" + (" --resume." if ck else "."))
    if oom is not None:  # outside the except block, so the failed step's tensors are already freed
        longest = max((b["input_ids"].shape[1] for b in batches), default=None)
        batches = None
        run.optimizer.zero_grad(set_to_none=True)
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        ck = checkpoint(run, together=False) if run.step > 0 else None  # the other ranks may be mid-step
        raise OutOfMemory(oom_advice(cfg, run.step, oom, longest, run.device, ck or run.last_ckpt,
                                     graphs=run.graphs is not None))
    checkpoint(run)  # the state after the last step, before the eval in finish() (a resume need not redo it)
    return run


def before_training(run: Run):
    """The eval loss, and the demo's answers, of the model as it starts (for the 'before -> after' report)."""
    if run.evals:
        run.report["eval_loss_before"] = log_eval(run)
        print(f"eval loss before: {run.report['eval_loss_before']:.4f}")
    if run.demo_eval is not None:
        run.report["before"] = demo_report(run.model, run.tok, run.demo_eval)


def step_batches(run: Run) -> list[dict]:
    """This rank's micro-batches for the next step, on the device.

    The step's micro-batches are drawn at batch_size x world, the same on every rank; each rank takes its slice.
    """
    cfg, world = run.cfg, dp.world()
    epoch, offset = divmod(run.position, len(run.train))
    order = D.epoch_order(len(run.train), cfg.seed, epoch)
    mbs = rank_slice(micro_batches(run.train, order, offset, cfg.grad_accum, cfg.batch_size * world),
                     dp.rank(), world)
    pad_to = bucket_length if run.graphs else None  # a few fixed shapes: one CUDA graph each
    return [make_batch(mb, run.pad_id, run.device, cfg.padding_free, pad_to, host_embedding(run.model)) for mb in mbs]


def optimizer_step(run: Run, batches: list[dict]) -> tuple[float, float, int, bool]:
    """Forward and backward over the micro-batches (train_step), the gradients summed over the ranks and
    clipped, and AdamW's step unless the loss or the norm is not finite. Returns (loss, grad norm, N, applied)."""
    # The loss is divided by the label tokens of ALL ranks, so the ranks' losses and gradients add up
    # to the global mean and its gradient: N ranks x batch b train exactly as 1 rank x batch N*b.
    n_tokens = dp.all_reduce_sum(label_tokens(batches))
    loss, _ = train_step(run.model, batches, run.autocast, run.scaler, n_total=n_tokens, graphs=run.graphs)
    loss = dp.all_reduce_sum(loss)
    dp.all_reduce_grads(run.params, run.device)  # once per optimizer step, after every micro-batch
    run.scaler.unscale_(run.optimizer)  # fp16 only: clipping and the finiteness check need the true gradients
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, run.cfg.max_grad_norm or float("inf")).item()
    good = math.isfinite(loss) and math.isfinite(gnorm)
    if good:  # a skipped step leaves weights and optimizer state exactly as they were
        run.scaler.step(run.optimizer)  # = optimizer.step(): the scaler's own inf check agrees with `good`
    run.scaler.update()  # fp16: halve the scale after an overflow, grow it after a run of good steps
    run.optimizer.zero_grad(set_to_none=True)
    if run.device.type == "cuda":
        torch.cuda.synchronize()  # so that the step's time is the GPU's, not the time to queue its kernels
    return loss, gnorm, n_tokens, good


def log_step(run: Run, bar, batches: list[dict], lr: float, loss: float, gnorm: float, n_tokens: int, dt: float,
             good: bool):
    """The progress bar, and a train row of metrics.jsonl every --log-every steps, at the last and at a skipped one."""
    tokens = dp.all_reduce_sum(sum(b["input_ids"].numel() for b in batches))
    mem = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else 0.0
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{gnorm:.3f}", tok_s=f"{tokens / dt:,.0f}",
                    mem=f"{mem:.1f}G", refresh=False)
    bar.update(1)
    if run.step % run.cfg.log_every == 0 or run.step == run.total_steps or not good:
        log(run, {"step": run.step, "split": "train", "lr": lr,  # NaN is not JSON: a non-finite value is null
                  "loss": loss if math.isfinite(loss) else None,
                  "grad_norm": gnorm if math.isfinite(gnorm) else None,
                  "tokens_per_s": tokens / dt, "label_tokens": n_tokens, "step_s": dt, "peak_mem_gib": mem,
                  "epoch": run.position / len(run.train), "skipped": not good})


def bad_step(run: Run, bar, loss: float, gnorm: float):
    """Count a skipped step; the --max-bad-steps-th in a row saves the weights and stops the run (exit 1)."""
    cfg, counts = run.cfg, run.metrics_state
    # An fp16 overflow (finite loss, inf gradient) is the scaler's to handle: it has just halved its
    # scale and the next step usually fits, so it counts as bad only once the scale is below 1.
    overflow = run.scaler.is_enabled() and math.isfinite(loss) and run.scaler.get_scale() >= 1
    counts["skipped"] += 1
    counts["bad_in_a_row"] += 0 if overflow else 1
    n, step = counts["bad_in_a_row"], run.step
    print(f"\nstep {step}: {'fp16 overflow' if overflow else 'non-finite'} loss {loss} / grad norm "
          f"{gnorm}: update skipped ({n} in a row, --max-bad-steps {cfg.max_bad_steps})",
          file=sys.stderr, flush=True)
    if n >= cfg.max_bad_steps:
        # Skipped steps change nothing, so these are still the weights of step `step - n`: save
        # them (unless they are non-finite themselves); older checkpoints stay as they are.
        ck = checkpoint(run) if all(bool(torch.isfinite(p).all()) for p in run.params) else None
        bar.close()
        raise TrainingStopped(
            f"{n} steps in a row had a non-finite loss or gradient (steps {step - n + 1}-{step}), so "
            f"training stopped. Skipped steps change nothing: the weights are those of step {step - n}"
            + (f", saved as {ck}" if ck else f"; the newest complete checkpoint is {run.last_ckpt}")
            + f". Look at the data of these steps; or lower --lr (now {cfg.lr:g}) and start over with "
              "--overwrite, or go on from here with --resume.")


# ----------------------------------------------------------------------------- logging and saving

def log(run: Run, row: dict):
    """One row of metrics.jsonl; rank 0 writes it."""
    if not dp.is_main():
        return
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    run.metrics_state["metrics_rows"] += 1  # saved with each checkpoint: where a resume cuts the file back to


def log_eval(run: Run) -> float:
    """The mean token loss over the eval examples now, logged as an eval row."""
    loss = evaluate(run.model, run.evals, run.cfg.batch_size, run.pad_id, run.device, run.autocast,
                    run.cfg.padding_free)
    log(run, {"step": run.step, "split": "eval", "loss": loss, "perplexity": math.exp(min(loss, 50))})
    return loss


def checkpoint(run: Run, together: bool = True) -> Path | None:
    """Save the state after `run.step`. A failed save (disk full, no permission) warns and training goes
    on: atomic_dir leaves the previous checkpoints as they were, and one lost save beats a lost run.

    Rank 0 writes; the weights and optimizer state are the same on every rank. `together`: every rank
    is here at the same step, and learns whether rank 0's save worked (so that all agree on the newest
    checkpoint); False when a rank stops alone (Ctrl-C, out of memory), where a collective could hang.
    """
    target = run.out / "checkpoints" / f"step-{run.step:06d}"
    if run.last_ckpt == target:  # already saved at this step (say, Ctrl-C right after a periodic save)
        return run.last_ckpt
    saved = None
    if dp.is_main():
        try:
            saved = save_checkpoint(run.out, run.step, run.model, run.optimizer, run.cfg, run.acfg, run.position,
                                    run.metrics_state, run.scaler, run.rng_next)
        except SAVE_ERRORS as e:
            print(f"\nWARNING: could not save checkpoint {target}: {why(e)}. The newest complete checkpoint is "
                  f"{run.last_ckpt or 'none yet'}; training goes on.", file=sys.stderr, flush=True)
    if together and dp.world() > 1:  # rank 0's outcome, to every rank (and a barrier)
        saved = target if dp.all_reduce_sum(int(saved is not None)) else None
    if saved:
        run.last_ckpt = saved
    return saved


# ----------------------------------------------------------------------------- the finish

def finish(run: Run) -> dict:
    """After the last step: the eval loss and the demo's answers after training; then rank 0 writes the
    adapter, the loss plot and report.json, and prints the summary."""
    cfg, out, report = run.cfg, run.out, run.report
    if run.evals:
        report["eval_loss_after"] = log_eval(run)
    if run.demo_eval is not None:  # every rank generates: under --fsdp each forward needs all of them
        report["after"] = demo_report(run.model, run.tok, run.demo_eval)
    if not dp.is_main():  # the rest is rank 0's: the adapter, the plot, the report, the upload
        dp.barrier()
        return report
    try:
        save_adapter(run.model, out / "adapter", run.acfg)
    except SAVE_ERRORS as e:
        last, step = run.last_ckpt, run.step
        kept = (f" Nothing is lost: {last}/adapter holds these same weights; make room and run again with "
                "--resume to write it." if last and last.name == f"step-{step:06d}" else
                f" The newest complete checkpoint is {last}." if last else "")
        raise TrainingStopped(f"could not write the adapter to {out / 'adapter'}: {why(e)}.{kept}") from None
    finally:
        dp.barrier()  # the other ranks exit once the adapter is written
    try:
        plot_losses(out)
    except OSError as e:
        print(f"WARNING: could not draw {out / 'loss.png'}: {why(e)}", file=sys.stderr)
    if report.get("eval_loss_before") is not None:
        print(f"eval loss: {report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f}")
    if run.demo_eval is not None:
        print_demo_summary(report)
    print(f"adapter saved to {out / 'adapter'}")
    if cfg.push_to_hub:
        from .checkpoint import push_to_hub

        push_to_hub(out / "adapter", cfg.push_to_hub)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


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
