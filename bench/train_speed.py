"""QLoRA training throughput and memory: minilora against transformers+peft and unsloth, same run, same GPU.

    python bench/train_speed.py --shape qwen-1.5b,llama-8b --out bench/results/train_speed.jsonl

For each shape: write one random-weight checkpoint folder (bench/shapes.py), then
train each stack on it (bench/stacks.py) with the same settings and the same
random token batches, one stack after another, and append one JSON line per
stack to --out. Per stack:

    load:   time and peak memory from the folder to a trainable model (NF4 + LoRA)
    train:  warm-up steps (compilation happens here), then timed steps, each synchronised before and after
    step time = median of the timed steps;  tokens/s = batch * seq / step time
    peak = torch.cuda.max_memory_allocated / max_memory_reserved over the training steps
    MFU = tokens/s * FLOPs per token (stacks.flops_per_token) / the bf16 matmul rate measured here
    loss_match: the first step's loss (before any update, so the same function of the same
                weights and data) is within 1% of minilora's

By default each stack runs in a fresh child process (--isolate on): `import unsloth`
patches transformers, peft and bitsandbytes for the whole process, so a peft
measured after it is no longer plain peft, and a process exit frees memory for
certain. --isolate off runs all stacks in this one process, freeing memory
between them (del, gc.collect, empty_cache, reset_peak_memory_stats).

--device cpu with --shape tiny is the mode the tests run: same code, no speed claims.
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights: nothing to download, and the GPU box is offline
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # minilora from this checkout, no `pip install -e .` needed
    sys.path.insert(0, str(ROOT))


def _unsloth_first(argv: list[str]) -> bool:
    """Whether this process will train unsloth: then `import unsloth` must precede transformers (and
    everything else), so it is decided from the raw command line before any other import."""
    def value(flag, default):
        for i, a in enumerate(argv):
            if a == flag and i + 1 < len(argv):
                return argv[i + 1]
            if a.startswith(flag + "="):
                return a.split("=", 1)[1]
        return default

    if value("--worker", "") == "unsloth":
        return True
    one_process = value("--isolate", "on") == "off"
    return one_process and "unsloth" in value("--stacks", "minilora,peft,unsloth").split(",") \
        and value("--device", "cuda") != "cpu" and importlib.util.find_spec("unsloth") is not None


if __name__ == "__main__" and _unsloth_first(sys.argv[1:]):
    try:
        import unsloth  # noqa: F401  (must be first: it patches transformers, peft and bitsandbytes)
    except Exception:  # noqa: S110  the unsloth stack imports it again and records the error in its row
        pass

import torch  # noqa: E402

from bench import shapes, stacks  # noqa: E402

REQUIRED = ("stack", "shape", "run_id", "batch", "seq", "rank", "checkpointing", "tokens_per_s", "step_time_s_median",
            "peak_allocated_gib", "peak_reserved_gib", "loss_first", "loss_last", "load_time_s", "load_peak_gib",
            "mfu", "matmul_tflops", "device", "gpu", "versions", "loss_match", "vs_peft", "vs_unsloth")
FIGURES = ("tokens_per_s", "step_time_s_median", "step_times_s", "losses", "peak_allocated_gib", "peak_reserved_gib",
           "loss_first", "loss_last", "load_time_s", "load_peak_gib", "trainable_params", "quant")
LOSS_TOLERANCE = 0.01  # first-step losses agree to ~1e-3 in bf16 (NF4 kernels and reduction order differ)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen-1.5b,llama-8b", help=f"comma list of {', '.join(shapes.SHAPES)}")
    p.add_argument("--stacks", default="minilora,peft,unsloth", help="comma list of minilora, peft, unsloth")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--lengths", default="", metavar="MIN:MAX",
                   help="rows of random lengths in [MIN, MAX] (<= --seq), right-padded, as SFT batches are; "
                        "tokens/s then counts real tokens only. Default: every row --seq tokens, no padding")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens in them)")
    p.add_argument("--checkpointing", choices=("on", "off"), default="on", help="gradient checkpointing")
    p.add_argument("--keep-activations", type=int, default=0, metavar="N",
                   help="minilora stacks: the last N layers keep their activations (train.py --keep-activations)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="minilora: torch.compile each decoder layer, as `minilora.train --compile` (auto: on CUDA, "
                   "whatever the run's length: minilora.train's auto also leaves short runs eager)")
    p.add_argument("--out", default="bench/results/train_speed.jsonl", help="JSON lines, appended")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=0, help="weights, data and LoRA init")
    p.add_argument("--isolate", choices=("on", "off"), default="on", help="each stack in a fresh child process")
    p.add_argument("--stack-timeout", type=float, default=400, help="seconds before a child stack is killed")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the random checkpoints are written")
    p.add_argument("--checkpoint", default="", metavar="DIR",
                   help="one --shape only: train on this checkpoint folder, written there first if missing and kept "
                        "afterwards (so several runs share one random checkpoint; a real model of the shape works too)")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one stack, write its figures
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    p.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.shapes = [s.strip() for s in a.shape.split(",") if s.strip()]
    a.stack_list = [s.strip() for s in a.stacks.split(",") if s.strip()]
    for s in a.shapes:
        if s not in shapes.SHAPES:
            p.error(f"--shape: unknown shape {s!r}; choose from {', '.join(shapes.SHAPES)}")
    for s in a.stack_list:
        if s not in stacks.STACKS:
            p.error(f"--stacks: unknown stack {s!r}; choose from {', '.join(stacks.STACKS)}")
    if a.checkpoint and len(a.shapes) != 1:
        p.error(f"--checkpoint {a.checkpoint}: give exactly one --shape (the folder's), not {a.shape!r}")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible; use --device cpu (with --shape tiny) for the CPU mode")
    if min(a.steps, a.batch, a.seq, a.rank) < 1 or a.warmup < 0:
        p.error("--steps, --batch, --seq and --rank must be >= 1, and --warmup >= 0")
    a.length_range = None
    if a.lengths:
        try:
            lo, hi = (int(x) for x in a.lengths.split(":"))
        except ValueError:
            p.error(f"--lengths: expected MIN:MAX, two integers, got {a.lengths!r}")
        if not 2 <= lo <= hi <= a.seq:
            p.error(f"--lengths {a.lengths}: need 2 <= MIN <= MAX <= --seq ({a.seq})")
        a.length_range = (lo, hi)
    return a


# ----------------------------------------------------------------------------- measuring one stack

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def batches(shape: str, a) -> list[tuple[torch.Tensor, list[int] | None]]:
    """warmup + steps batches of random token ids from a fixed seed: the same for every stack.
    Random, not zeros, so kernels see realistic data; the labels are the ids themselves.
    Each is (ids (batch, seq), None) or, with --lengths, (ids cut to the batch's longest row, row lengths)."""
    vocab = shapes.model_config(shape).vocab_size
    gen = torch.Generator().manual_seed(a.seed + 1)
    ids = torch.randint(0, vocab, (a.warmup + a.steps, a.batch, a.seq), generator=gen)
    if not a.length_range:
        return [(x, None) for x in ids]
    lo, hi = a.length_range
    lengths = torch.randint(lo, hi + 1, (a.warmup + a.steps, a.batch), generator=gen).tolist()
    return [(x[:, :max(n)], n) for x, n in zip(ids, lengths)]


def measure(stack: str, folder, shape: str, a) -> dict:
    """Load `stack` from `folder`, train warmup + steps steps, return the figures."""
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    s = stacks.Settings(rank=a.rank, alpha=a.alpha, checkpointing=a.checkpointing == "on", compile=a.compile,
                        keep_activations=a.keep_activations if stack.startswith("minilora") else 0,
                        max_seq=a.seq, device=a.device, seed=a.seed)
    # padding-free builds its row from Python lists on the host, as the trainer does (then one copy to the GPU)
    data = [(ids if stack == "minilora-padfree" else ids.to(device), lengths) for ids, lengths in batches(shape, a)]
    stacks.import_stack(stack)
    gib = 2**30
    sync(device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    t = time.perf_counter()
    run = stacks.load(stack, folder, s)
    sync(device)
    load_time = time.perf_counter() - t
    load_peak = (torch.cuda.max_memory_allocated() - base) / gib if cuda else None
    print(f"[{stack}] loaded in {load_time:.1f}s" + (f", peak {load_peak:.2f} GiB" if cuda else ""), flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, (ids, lengths) in enumerate(data):
        sync(device)
        t = time.perf_counter()
        losses.append(run.step(ids, lengths))
        sync(device)
        times.append(time.perf_counter() - t)
        kind = "warm-up" if i < a.warmup else "timed"
        print(f"[{stack}] step {i + 1}/{len(data)} ({kind}): loss {losses[-1]:.4f}, {times[-1]:.3f}s", flush=True)
    median = statistics.median(times[a.warmup:])
    tokens_per_s = a.batch * a.seq / median
    if a.length_range:  # steps differ in size: real tokens over time, summed over the timed steps
        tokens_per_s = sum(sum(n) for _, n in data[a.warmup:]) / sum(times[a.warmup:])
    out = dict(tokens_per_s=tokens_per_s, step_time_s_median=median, step_times_s=times, losses=losses,
               loss_first=losses[0], loss_last=losses[-1], load_time_s=load_time, load_peak_gib=load_peak,
               peak_allocated_gib=torch.cuda.max_memory_allocated() / gib if cuda else None,
               peak_reserved_gib=torch.cuda.max_memory_reserved() / gib if cuda else None,
               trainable_params=sum(p.numel() for p in run.params), quant=run.quant)
    if not cuda:  # no allocator statistics on the CPU; the process's peak RSS is the nearest figure
        import resource

        out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def error_text(e: BaseException) -> str:
    kind = "CUDA out of memory" if stacks.is_oom(e) else type(e).__name__
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{kind}: {first}"[:500]


def run_in_process(stack: str, folder, shape: str, a) -> dict:
    try:
        figures = measure(stack, folder, shape, a)
    except Exception as e:  # an OOM or a peer's failure must not stop the other stacks
        figures = {"error": error_text(e)}
        print(f"[{stack}] failed: {figures['error']}", flush=True)
    # past the except block the failed run's frames, and the model and tensors they held, are gone
    free_memory()
    return figures


def run_isolated(stack: str, folder, shape: str, a) -> dict:
    """The same `measure`, in a fresh child process of this script; its figures come back as a JSON file."""
    row_file = Path(a.work) / f"{shape}-{stack}.json"  # this run's own folder: never a last run's row
    row_file.unlink(missing_ok=True)
    flags = ["--shape", shape, "--stacks", stack, "--batch", a.batch, "--seq", a.seq, "--lengths", a.lengths,
             "--rank", a.rank,
             "--alpha", a.alpha, "--steps", a.steps, "--warmup", a.warmup, "--checkpointing", a.checkpointing,
             "--compile", a.compile, "--keep-activations", a.keep_activations, "--device", a.device, "--seed", a.seed,
             "--worker", stack, "--folder", folder, "--row-out", row_file]
    cmd = [sys.executable, str(Path(__file__).resolve())] + [str(f) for f in flags]
    proc = subprocess.Popen(cmd, start_new_session=True)  # its own process group, to end it with its children
    try:
        rc = proc.wait(timeout=a.stack_timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return {"error": f"timeout: still running after {a.stack_timeout:.0f}s (--stack-timeout)"}
    if row_file.is_file():
        return json.loads(row_file.read_text())
    return {"error": f"the {stack} child process died with exit code {rc} before reporting (killed for memory?)"}


def worker_main(a):
    """Child process: measure one stack, write the figures (or the error) to --row-out."""
    shape = a.shapes[0]
    try:
        row = measure(a.worker, a.folder, shape, a)
    except Exception as e:
        print(f"[{a.worker}] failed: {error_text(e)}", flush=True)
        row = {"error": error_text(e)}
    Path(a.row_out).write_text(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- the run

def matmul_tflops(device: torch.device) -> float:
    """The achievable matmul rate here: 8192^3 bf16 on the GPU (512^3 fp32 on the CPU), median of 5 x 10."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        x @ y
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(10):
            x @ y
        sync(device)
        times.append((time.perf_counter() - t) / 10)
    del x, y
    free_memory()
    return 2 * n**3 / statistics.median(times) / 1e12


def versions() -> dict:
    out = {}
    for pkg in ("torch", "transformers", "peft", "bitsandbytes", "unsloth", "unsloth_zoo", "trl"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    from minilora import __version__ as ver
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    out["minilora"] = f"{ver}+g{head}" if head else ver
    # The code that ran, whatever git says: a copy of the tree can carry a stale .git (the GPU machine's does).
    out["minilora_source_sha256"] = source_sha256(ROOT)
    return out


def source_sha256(root) -> str:
    """A short hash of the minilora package under `root`, its parts (speed/, run/, export/) included."""
    digest, root = hashlib.sha256(), Path(root)
    for f in sorted((root / "minilora").rglob("*.py")):
        digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()[:12]


def unavailable(stack: str, device) -> str | None:
    """Why `stack` cannot run here, or None."""
    if stack == "unsloth" and importlib.util.find_spec("unsloth") is None:
        return "not run: unsloth is not installed"
    if stack == "unsloth" and torch.device(device).type != "cuda":
        return "not run: unsloth needs a CUDA GPU"
    return None


def ratio(a, b):
    return a / b if a is not None and b else None


PEERS = ("peft", "peft-fast", "unsloth")  # each row gets its ratios to these: vs_peft, vs_peft_fast, vs_unsloth


def compare(rows: list[dict]):
    """loss_match against minilora's first loss (or the first minilora mode's), and each row's ratios to peft and unsloth."""
    ok = {r["stack"]: r for r in rows if not r.get("error")}
    ref = ok.get("minilora") or next((r for s, r in ok.items() if s.startswith("minilora")), None)
    for r in rows:
        r["loss_match"] = r["loss_rel_diff"] = None
        if ref and not r.get("error"):
            r["loss_rel_diff"] = abs(r["loss_first"] - ref["loss_first"]) / abs(ref["loss_first"])
            r["loss_match"] = r["loss_rel_diff"] <= LOSS_TOLERANCE
            if not r["loss_match"]:
                print(f"WARNING: {r['shape']}: {r['stack']}'s first loss {r['loss_first']:.5f} differs from "
                      f"{ref['stack']}'s {ref['loss_first']:.5f} by {100 * r['loss_rel_diff']:.2f}% (> 1%): the stacks "
                      "are not training the same thing, and their speeds are not comparable.", flush=True)
        for peer in PEERS:
            p = ok.get(peer)
            r[f"vs_{peer.replace('-', '_')}"] = None if r.get("error") or not p or peer == r["stack"] else {
                "tokens_per_s": ratio(r["tokens_per_s"], p["tokens_per_s"]),
                "peak_allocated": ratio(r["peak_allocated_gib"], p["peak_allocated_gib"]),
                "peak_reserved": ratio(r["peak_reserved_gib"], p["peak_reserved_gib"])}


def start_run(device: torch.device) -> tuple[str, str | None, dict]:
    """A new run id, the GPU's name and the package versions, printed: the head of every results row."""
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    vers = versions()
    print(f"run {run_id} on {gpu or 'cpu'}; {vers}", flush=True)
    return run_id, gpu, vers


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    device = torch.device(a.device)
    run_id, gpu, vers = start_run(device)
    tflops = matmul_tflops(device)
    print(f"matmul rate: {tflops:.1f} TFLOP/s", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = a.work = Path(tempfile.mkdtemp(prefix="minilora-bench-", dir=a.tmp))
    started = time.perf_counter()
    try:
        for shape in a.shapes:
            cfg = shapes.model_config(shape)
            folder = shapes.checkpoint_folder(a.checkpoint, work, shape, device=device, seed=a.seed)
            free_memory()  # what writing it left on the GPU
            flops_seq = a.seq
            if a.length_range:  # attention's FLOPs per token follow its sequence's length: the timed rows'
                timed = [n for _, ns in batches(shape, a)[a.warmup:] for n in ns]  # token-weighted mean length
                flops_seq = sum(n * n for n in timed) / sum(timed)
            rows = []
            for stack in a.stack_list:
                print(f"--- {shape} / {stack} ({time.perf_counter() - started:.0f}s into the run)", flush=True)
                why = unavailable(stack, device)
                figures = {"error": why} if why else (run_isolated if a.isolate == "on" else run_in_process)(
                    stack, folder, shape, a)
                row = {"stack": stack, "shape": shape, "run_id": run_id, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                       "batch": a.batch, "seq": a.seq, "lengths": a.lengths or None, "rank": a.rank, "alpha": a.alpha,
                       "checkpointing": a.checkpointing, "compile": a.compile if stack.startswith("minilora") else None,
                       "keep_activations": a.keep_activations if stack.startswith("minilora") else None,
                       "steps": a.steps, "warmup": a.warmup, "seed": a.seed,
                       "labels": "all real tokens (labels = input_ids, pads unlabelled)",
                       "isolated": a.isolate == "on",
                       **{k: None for k in FIGURES}, **figures}
                recompute = stacks.recomputes(stack, stacks.Settings(checkpointing=a.checkpointing == "on"))
                if recompute and stack.startswith("minilora"):  # the kept layers skip their recompute
                    recompute = 1 - a.keep_activations / cfg.num_hidden_layers
                fpt = stacks.flops_per_token(cfg, flops_seq, recompute)
                row["flops_per_token"] = fpt
                row["mfu"] = (row["tokens_per_s"] * fpt / (tflops * 1e12)) if row["tokens_per_s"] else None
                row.update(matmul_tflops=tflops, device=device.type, gpu=gpu, versions=vers)
                rows.append(row)
            compare(rows)
            with out.open("a") as f:
                for r in rows:
                    f.write(json.dumps({k: r.get(k) for k in dict.fromkeys(REQUIRED + tuple(r))}) + "\n")
            if not a.checkpoint:
                shutil.rmtree(folder, ignore_errors=True)
            for r in rows:
                if r.get("error"):
                    print(f"{shape:>10} {r['stack']:>9}: {r['error']}", flush=True)
                else:
                    mem = f"{r['peak_allocated_gib']:.2f} GiB" if r["peak_allocated_gib"] is not None else "n/a"
                    print(f"{shape:>10} {r['stack']:>9}: {r['tokens_per_s']:>9,.0f} tok/s  peak {mem}  "
                          f"loss {r['loss_first']:.4f} -> {r['loss_last']:.4f}  MFU {r['mfu']:.1%}  "
                          f"loss_match {r['loss_match']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"appended to {out} (run_id {run_id}) in {time.perf_counter() - started:.0f}s", flush=True)
    return run_id


if __name__ == "__main__":
    main()
