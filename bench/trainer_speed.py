"""The trainer itself on SFT-like data: `python -m minilora.train` in several modes, same data, same run.

train_speed.py times one batch shape, every row full; a real fine-tune is not like that. Its
examples have different lengths, a masked prompt, several micro-batches per step, and the
trainer's own loop around the step. This script writes an alpaca-style
.jsonl of random words (instruction ~1/3, output ~2/3 of each example, lengths uniform in
[MIN, MAX] words, one token per word with the benchmark checkpoints' word tokenizer), runs the
trainer on it once per mode, and reads each run's metrics.jsonl:

    label tok/s = sum of label tokens / sum of step times, over the steps after --skip

Label tokens (the output's, which carry the loss) are the same in every mode, since the data and its
order are; padding and prompt tokens are not counted, so a mode that pads more is not flattered.
A step's time is the trainer's `step_s`: forward, backward, clipping and the optimizer over the
step's micro-batches (building them, logging and eval are outside it). With CUDA graphs, a padded
length first met after the --skip steps is recorded inside the timed steps, as in a real run.

    python bench/trainer_speed.py --shape qwen-1.5b --modes eager,graphs --steps 30
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import shapes  # noqa: E402
import torch  # noqa: E402

from bench.train_speed import start_run  # noqa: E402

MODES = {"eager": ["--cuda-graphs", "off"], "graphs": ["--cuda-graphs", "on"], "lean": ["--offload"],
         "default": []}


def write_data(path: Path, n: int, lo: int, hi: int, seed: int = 0):
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [f"w{r.randrange(60)}" for _ in range(r.randint(lo, hi))]
            cut = len(words) // 3
            f.write(json.dumps({"instruction": " ".join(words[:cut]), "output": " ".join(words[cut:])}) + "\n")


def summarize(metrics: Path, skip: int) -> dict:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if r.get("split") == "train" and r["step"] > skip]
    if not steps:
        raise SystemExit(f"{metrics}: no train rows after step {skip}; raise --steps")
    times = sorted(r["step_s"] for r in steps)
    return {"label_tokens_per_s": sum(r["label_tokens"] for r in steps) / sum(times),
            "step_s_median": times[len(times) // 2], "peak_allocated_gib": max(r["peak_mem_gib"] for r in steps),
            "loss_last": steps[-1]["loss"], "steps_timed": len(steps)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="qwen-1.5b", choices=list(shapes.SHAPES))
    p.add_argument("--checkpoint", default="", metavar="DIR", help="train on this folder (written there if empty)")
    p.add_argument("--modes", default="eager,graphs", help=f"comma-separated, from {', '.join(MODES)}")
    p.add_argument("--lengths", default="200:1800", metavar="MIN:MAX", help="words (= tokens) per example")
    p.add_argument("--examples", type=int, default=400)
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per mode")
    p.add_argument("--skip", type=int, default=5, help="first steps left out of the figures (compilation, most "
                   "graph recordings)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--timeout", type=float, default=300, help="seconds per mode before it is stopped")
    p.add_argument("--out", default="bench/results/trainer_speed.jsonl", help="JSON lines, appended")
    a = p.parse_args(argv)
    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODES)}")
    try:
        lo, hi = (int(x) for x in a.lengths.split(":"))
        assert 1 <= lo <= hi
    except (ValueError, AssertionError):
        p.error(f"--lengths: expected MIN:MAX with 1 <= MIN <= MAX, got {a.lengths!r}")

    out_file = Path(a.out).resolve()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    rid, gpu, vers = start_run(torch.device(a.device))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        folder = shapes.checkpoint_folder(str(Path(a.checkpoint).resolve()) if a.checkpoint else "", work, a.shape,
                                          device=a.device)
        data = Path(work) / "data.jsonl"
        write_data(data, a.examples, lo, hi)
        for mode in modes:
            run_dir = Path(work) / f"run-{mode}"
            cmd = [sys.executable, "-m", "minilora.train", "--model", str(folder), "--data", str(data),
                   "--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--grad-accum", str(a.grad_accum),
                   "--max-seq-len", str(hi + 64), "--eval-fraction", "0", "--device", a.device,
                   "--output-dir", str(run_dir), *MODES[mode]]
            print(f"--- {mode}: {' '.join(cmd[1:])}", flush=True)
            row = {"run_id": rid, "gpu": gpu, "shape": a.shape, "mode": mode, "flags": MODES[mode], "lengths": [lo, hi],
                   "batch_size": a.batch_size, "grad_accum": a.grad_accum, "steps": a.steps, "skip": a.skip}
            try:  # the trainer's stdout goes to this log as it runs; its stderr is kept for the row's error
                r = subprocess.run(cmd, timeout=a.timeout, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
                sys.stderr.write(r.stderr)
                if r.returncode != 0:
                    tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-2:]
                    raise RuntimeError(f"exit code {r.returncode}: {' / '.join(tail) or 'no message'}")
                row.update(summarize(run_dir / "metrics.jsonl", a.skip))
            except (subprocess.SubprocessError, RuntimeError, OSError, ValueError, KeyError, SystemExit) as e:
                row["error"] = str(e)
            eager = next((x for x in rows + [row] if x["mode"] == "eager" and "error" not in x), None)
            if eager and "error" not in row:
                row["vs_eager"] = row["label_tokens_per_s"] / eager["label_tokens_per_s"]
            row["versions"] = vers
            rows.append(row)
            with open(out_file, "a") as f:  # row by row: a later mode's failure loses nothing
                f.write(json.dumps(row) + "\n")
    for r in rows:
        print(f"{a.shape} {r['mode']:>8}: " + (r["error"] if "error" in r else
              f"{r['label_tokens_per_s']:,.0f} label tok/s, median step {r['step_s_median']:.3f}s, "
              f"peak {r['peak_allocated_gib']:.2f} GiB" + (f", {r['vs_eager']:.2f}x eager" if "vs_eager" in r else "")))
    print(f"appended to {out_file} (run_id {rid})")
    if any("error" in r for r in rows):
        raise SystemExit(1)

if __name__ == "__main__":
    main()
