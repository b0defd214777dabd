"""Where one training step's time goes: how long the GPU is busy against the wall clock, and the top operators.

    python bench/profile_step.py --shape qwen-1.5b --stack minilora --out bench/results/profile-qwen-1.5b.txt

Loads one stack (bench/stacks.py) on a random checkpoint of --shape, trains --warmup
steps (compilation happens there), then --steps more under torch.profiler. Reports:

- wall time per step, and GPU busy time per step: the union of the kernels' intervals
  in the trace. busy / wall near 1 means the kernels are the cost (make them faster or
  fewer FLOPs); well under 1 means the GPU waits for the host (Python, dispatch, kernel
  launches, syncs), and CUDA graphs or fewer, larger kernels are the cure;
- kernels launched per step;
- the operators taking the most host time and the most GPU time.

The same settings as bench/train_speed.py (batch 2 x 2048, r=16 on all 7 projections, NF4,
AdamW8bit). --device cpu with --shape tiny runs the same code for the tests (no kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if __name__ == "__main__" and "unsloth" in sys.argv:
    import unsloth  # noqa: F401  (before transformers, which it patches)

import torch  # noqa: E402

from bench import shapes, stacks  # noqa: E402


def busy_us(kernels: list[tuple[float, float]]) -> float:
    """Length of the union of (start, duration) intervals: time with at least one kernel running."""
    total, end = 0.0, float("-inf")
    for start, dur in sorted(kernels):
        stop = start + dur
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def kernel_intervals(trace: Path) -> list[tuple[float, float]]:
    """(ts, dur) in microseconds of every GPU kernel and memory copy/set in a Chrome trace from torch.profiler."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    return [(e["ts"], e["dur"]) for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")
            and "dur" in e]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="qwen-1.5b", choices=list(shapes.SHAPES))
    p.add_argument("--stack", default="minilora", choices=stacks.STACKS)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=3, help="steps before profiling (compilation happens in them)")
    p.add_argument("--steps", type=int, default=2, help="profiled steps")
    p.add_argument("--rows", type=int, default=25, help="operators listed per table")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--checkpoint", default="", metavar="DIR",
                   help="use this checkpoint folder of --shape (written there first if missing, kept afterwards)")
    p.add_argument("--out", default="", help="also write the report to this text file")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is visible; use --device cpu (with --shape tiny)")
    work = Path(tempfile.mkdtemp(prefix="minilora-profile-"))
    try:
        return profile(a, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def profile(a, work: Path) -> dict:
    cuda = a.device == "cuda"
    folder = shapes.checkpoint_folder(a.checkpoint, work, a.shape, device=a.device)
    s = stacks.Settings(max_seq=a.seq, device=a.device)
    stacks.import_stack(a.stack)
    run = stacks.load(a.stack, folder, s)
    vocab = shapes.model_config(a.shape).vocab_size
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, vocab, (a.batch, a.seq), generator=gen).to(a.device)
               for _ in range(a.warmup + a.steps)]

    def step(ids):
        run.step(ids)
        if cuda:
            torch.cuda.synchronize()

    for ids in batches[:a.warmup]:
        step(ids)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        t = time.perf_counter()
        for ids in batches[a.warmup:]:
            step(ids)
        wall = (time.perf_counter() - t) / a.steps
    trace = work / "trace.json"
    prof.export_chrome_trace(str(trace))
    kernels = kernel_intervals(trace)
    busy = busy_us(kernels) / 1e6 / a.steps
    lines = [f"{a.shape} / {a.stack} on {torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
             f"batch {a.batch} x {a.seq}, {a.steps} profiled steps",
             f"wall per step (under the profiler): {wall * 1e3:.1f} ms",
             f"GPU busy per step: {busy * 1e3:.1f} ms ({busy / wall:.0%} of wall)",
             f"kernels and copies per step: {len(kernels) / a.steps:.0f}", ""]
    table = prof.key_averages()
    lines += ["Top operators by host time (self):",
              table.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=70)]
    if cuda:
        lines += ["Top operators by GPU time (self):",
                  table.table(sort_by="self_device_time_total", row_limit=a.rows, max_name_column_width=70)]
    report = "\n".join(lines)
    print(report, flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(report + "\n")
    return {"wall_s": wall, "busy_s": busy, "kernels_per_step": len(kernels) / a.steps}


if __name__ == "__main__":
    main()
