"""Data-parallel scaling: minilora's training step on 1 GPU and on N GPUs under torchrun, in one run.

    python bench/scaling.py --shape llama-8b --gpus 1,2 --out bench/results/scaling.jsonl
    python bench/scaling.py --shape llama-8b --gpus 2 --fsdp     # the 4-bit base sharded by FSDP2

Weak scaling, as people use a bigger box: every rank trains its own batch x seq tokens per step
(the seed settings, 2 x 2048), so N ranks take N times the tokens per optimizer step, and

    scaling = tokens/s on N ranks / tokens/s on 1 rank      (ideal: N)

Each rank runs what `torchrun -m minilora.train` runs in a step: train_step with the loss divided
by the label tokens of all ranks, distributed.all_reduce_grads (one flat all-reduce of the LoRA
gradients), clip 1.0, AdamW8bit. The weights come from one random checkpoint at the real shape
(bench/shapes.py), written once; each rank draws its own random tokens.

The parent process writes the checkpoint, launches `python -m torch.distributed.run` once per GPU
count (a fresh process group each time) and appends one JSON line per count to --out.
--device cpu --shape tiny runs the same code with gloo: the mode the tests use, no speed claims.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # minilora from this checkout
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# NVLink multicast (NCCL's NVLS) off unless the caller says otherwise: shared multi-GPU hosts ask for it.
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")

import torch  # noqa: E402

from bench import shapes, stacks  # noqa: E402
from bench.train_speed import start_run, sync  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-8b", help=f"one of {', '.join(shapes.SHAPES)}")
    p.add_argument("--gpus", default="1,2", help="comma list of process counts (GPUs, or CPU processes)")
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens in them)")
    p.add_argument("--fsdp", action="store_true", help="shard the 4-bit base with FSDP2, as minilora.train --fsdp")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/scaling.jsonl", help="JSON lines, appended")
    p.add_argument("--timeout", type=float, default=500, help="seconds before one torchrun launch is killed")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the random checkpoint is written")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: the checkpoint folder
    p.add_argument("--row-out", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.shape not in shapes.SHAPES:
        p.error(f"--shape: unknown shape {a.shape!r}; choose from {', '.join(shapes.SHAPES)}")
    try:
        a.gpu_counts = [int(g) for g in a.gpus.split(",") if g.strip()]
    except ValueError:
        p.error(f"--gpus: expected a comma list of integers, got {a.gpus!r}")
    if not a.gpu_counts or min(a.gpu_counts) < 1:
        p.error("--gpus: every count must be >= 1")
    if a.fsdp and 1 in a.gpu_counts:
        p.error("--fsdp needs at least 2 processes per launch; drop 1 from --gpus (compare with a plain run)")
    if a.device == "cuda" and not a.worker and torch.cuda.device_count() < max(a.gpu_counts):
        p.error(f"--gpus {a.gpus}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    return a


# ----------------------------------------------------------------------------- one rank (under torchrun)

def worker(a):
    import functools

    from minilora import distributed as dp
    from minilora import speed
    from minilora.checkpoint import load_model
    from minilora.lora import apply_lora
    from minilora.train import TrainConfig, make_optimizer, micro_step, train_step

    device = dp.init(torch.device(a.device))
    rank, world = dp.rank(), dp.world()
    s = stacks.Settings(rank=a.rank, alpha=16.0, max_seq=a.seq, device=a.device, seed=a.seed)
    mesh = dp.mesh(device) if a.fsdp else None
    gib = 2**30
    sync(device)
    t = time.perf_counter()
    model = load_model(a.worker, device=device, dtype=s.dtype, quantize="nf4", progress=False,
                       shard=(lambda q: dp.shard_nf4(q, mesh)) if mesh else None)
    torch.manual_seed(a.seed)  # the same LoRA init on every rank, as minilora.train seeds it
    apply_lora(model, r=a.rank, alpha=16.0, targets=stacks.TARGETS)
    # as the trainer under torchrun: recompute, compiled layers (off under --fsdp), no CUDA graphs (auto's rule)
    fast = speed.configure(TrainConfig(fsdp=a.fsdp, cuda_graphs="off"), device, world)
    params = fast.attach(model)
    if mesh:
        dp.shard_root(model.model, mesh)
    optimizer = make_optimizer(params, TrainConfig(lr=s.lr, optim="adamw8bit"))
    autocast = s.autocast()
    micro = functools.partial(micro_step, model, autocast=autocast, loss=fast.loss)
    sync(device)
    load_time = time.perf_counter() - t
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    vocab = shapes.model_config(a.shape).vocab_size
    gen = torch.Generator().manual_seed(a.seed + 1 + rank)  # each rank its own tokens
    data = torch.randint(0, vocab, (a.warmup + a.steps, a.batch, a.seq), generator=gen)
    times, losses = [], []
    for i, ids in enumerate(data):
        ids = ids.to(device)
        sync(device)
        t = time.perf_counter()
        batch = [{"input_ids": ids, "labels": ids}]
        n_total = dp.all_reduce_sum(ids.shape[0] * (ids.shape[1] - 1))  # every token after the first is labelled
        loss, _ = train_step(model, batch, autocast, n_total=n_total, micro=micro)
        dp.all_reduce_grads(params, device)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = dp.all_reduce_sum(float(loss))  # the global mean: each rank's part is its sum / n_total
        sync(device)
        times.append(time.perf_counter() - t)
        losses.append(loss)
        if rank == 0:
            kind = "warm-up" if i < a.warmup else "timed"
            print(f"[{world} rank(s)] step {i + 1}/{len(data)} ({kind}): loss {loss:.4f}, {times[-1]:.3f}s",
                  flush=True)
    peak = torch.cuda.max_memory_allocated() / gib if device.type == "cuda" else None
    peaks = [None] * world
    if world > 1:
        torch.distributed.all_gather_object(peaks, peak)
    else:
        peaks = [peak]
    if rank == 0:
        median = statistics.median(times[a.warmup:])
        row = dict(tokens_per_s=world * a.batch * a.seq / median, step_time_s_median=median, step_times_s=times,
                   losses=losses, load_time_s=load_time, peak_allocated_gib_per_rank=peaks,
                   trainable_params=sum(p.numel() for p in params))
        Path(a.row_out).write_text(json.dumps(row) + "\n")
    dp.teardown()


# ----------------------------------------------------------------------------- the parent

def launch(n: int, folder: Path, a) -> dict:
    """One `torchrun --nproc_per_node n` of this script; its rank 0's figures, or the error."""
    row_file = folder.parent / f"scaling-{n}.json"
    flags = ["--shape", a.shape, "--gpus", n, "--batch", a.batch, "--seq", a.seq, "--rank", a.rank, "--steps", a.steps,
             "--warmup", a.warmup, "--device", a.device, "--seed", a.seed, "--worker", folder, "--row-out", row_file]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           str(Path(__file__).resolve())] + [str(f) for f in flags] + (["--fsdp"] if a.fsdp else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        rc = subprocess.run(cmd, env=env, timeout=a.timeout).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"timeout: {n} rank(s) still running after {a.timeout:.0f}s (--timeout)"}
    if row_file.is_file():
        return json.loads(row_file.read_text())
    return {"error": f"torchrun with {n} rank(s) exited with code {rc} before reporting"}


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    device = torch.device(a.device)
    run_id, gpu, vers = start_run(device)
    work = Path(tempfile.mkdtemp(prefix="minilora-scaling-", dir=a.tmp))
    rows = []
    try:
        folder = shapes.write_checkpoint(work / a.shape, a.shape, device=device, seed=a.seed)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for n in a.gpu_counts:
            print(f"--- {a.shape}: {n} rank(s){' with FSDP2' if a.fsdp else ''}", flush=True)
            figures = launch(n, folder, a)
            rows.append({"bench": "scaling", "shape": a.shape, "run_id": run_id, "ranks": n, "fsdp": a.fsdp,
                         "batch_per_rank": a.batch, "seq": a.seq, "rank": a.rank, "steps": a.steps,
                         "warmup": a.warmup, "device": device.type, "gpu": gpu, "versions": vers,
                         "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **figures})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    one = next((r for r in rows if r["ranks"] == 1 and not r.get("error")), None)
    for r in rows:
        r["scaling"] = r["tokens_per_s"] / one["tokens_per_s"] if one and not r.get("error") else None
        if r.get("error"):
            print(f"{r['ranks']} rank(s): {r['error']}", flush=True)
        else:
            scale = f"  scaling {r['scaling']:.2f}x (ideal {r['ranks']}x)" if r["scaling"] else ""
            print(f"{r['ranks']} rank(s): {r['tokens_per_s']:,.0f} tok/s, peak per rank "
                  f"{r['peak_allocated_gib_per_rank']} GiB{scale}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"appended to {out} (run_id {run_id})", flush=True)
    return rows


if __name__ == "__main__":
    main()
