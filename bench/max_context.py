"""The longest sequence each stack can train one step on (batch 1) without running out of GPU memory.

    python bench/max_context.py --shape llama-8b --stacks minilora,peft,unsloth --lo 1024 --hi 131072

Bisection over the length in multiples of --step: probe --hi first (if it
fits, the answer is "at least --hi"), then --lo, then halve the gap, about
log2((hi - lo) / step) + 2 probes per stack. A probe trains one full step
(forward, backward, AdamW8bit) on random tokens, every token labelled, with
the same settings as bench/train_speed.py.

Each stack gets a worker process that loads the model once and answers probes
sent on its stdin. After a CUDA OOM it frees what the step held (gradients,
batch, the exception's frames, then gc and empty_cache) and checks that
allocated memory is back where it was; if it is not, or if the failure was not
torch's own OOM error (cuBLAS or triton can leave CUDA unsafe), it answers and
exits, and the next probe gets a fresh worker. A probe slower than
--probe-timeout kills the worker and counts as "does not fit". The parent never
touches the GPU (the checkpoint is written by a child too), so the workers
have the whole card.

--gpu-mem-gib N caps each worker's share of the card (torch's
set_per_process_memory_fraction), to answer "how long on a 24 GB GPU?".
On the CPU (tests) nothing runs out of memory: the answer is --hi after one probe.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _unsloth_worker(argv: list[str]) -> bool:
    return "--worker=unsloth" in argv or any(x == "--worker" and y == "unsloth" for x, y in zip(argv, argv[1:]))


if __name__ == "__main__" and _unsloth_worker(sys.argv[1:]):
    try:
        import unsloth  # noqa: F401  (before transformers, which it patches)
    except Exception:  # noqa: S110  loading imports it again and reports the error
        pass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import shapes, stacks  # noqa: E402
from bench.train_speed import error_text, unavailable, versions  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-8b", choices=list(shapes.SHAPES))
    p.add_argument("--stacks", default="minilora,peft,unsloth", help="comma list of minilora, peft, unsloth")
    p.add_argument("--lo", type=int, default=1024, help="shortest length to try")
    p.add_argument("--hi", type=int, default=131072, help="longest length to try")
    p.add_argument("--step", type=int, default=1024, help="resolution of the answer, in tokens")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--checkpointing", choices=("on", "off"), default="on")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto", help="minilora's per-layer compile")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--gpu-mem-gib", type=float, default=0, help="cap each worker to this much GPU memory; 0: all")
    p.add_argument("--probe-timeout", type=float, default=300, help="seconds one probe may take")
    p.add_argument("--load-timeout", type=float, default=300, help="seconds a worker may take to load the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/max_context.jsonl", help="JSON lines, appended")
    p.add_argument("--at", default="", metavar="N,N,...",
                   help="instead of the bisection: probe these lengths in this order, stopping at the first that "
                        "does not fit (for lengths whose step takes minutes: short ones first)")
    p.add_argument("--tmp", default=tempfile.gettempdir(), help="where the random checkpoint is written")
    p.add_argument("--checkpoint", default="", metavar="DIR",
                   help="use this checkpoint folder of --shape, written there first if missing and kept afterwards")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--folder", default="", help=argparse.SUPPRESS)
    p.add_argument("--results", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.stack_list = [s.strip() for s in a.stacks.split(",") if s.strip()]
    bad = [s for s in a.stack_list if s not in stacks.STACKS]
    if bad:
        p.error(f"--stacks: unknown stack(s) {bad}; choose from {', '.join(stacks.STACKS)}")
    try:
        a.at_list = [int(x) for x in a.at.split(",") if x.strip()]
    except ValueError:
        p.error(f"--at: expected comma-separated token counts, got {a.at!r}")
    if a.at_list:
        if min(a.at_list) < 1:
            p.error(f"--at: lengths must be >= 1, got {a.at}")
        a.lo, a.hi = min(a.at_list), max(a.at_list)
    if not 0 < a.lo <= a.hi or a.step < 1:
        p.error(f"need 0 < --lo <= --hi and --step >= 1 (got lo={a.lo}, hi={a.hi}, step={a.step})")
    return a


# ----------------------------------------------------------------------------- the search

def bisect_max(probe, lo: int, hi: int, step: int) -> int | None:
    """The largest length in [lo, hi], to within `step`, for which probe(length) is True, assuming
    that whatever fits, every shorter length fits too. `hi` if it fits; None if not even `lo` does."""
    if probe(hi):
        return hi
    if lo == hi or not probe(lo):
        return None
    good, bad = lo, hi  # invariant: probe(good) held, probe(bad) failed
    while bad - good > step:
        mid = good + max(step, (bad - good) // 2 // step * step)
        if mid >= bad:
            break
        if probe(mid):
            good = mid
        else:
            bad = mid
    return good


def ascend(probe, lengths: list[int]) -> int | None:
    """Probe `lengths` in order until one does not fit; the longest that fitted, or None."""
    best = None
    for n in lengths:
        if not probe(n):
            break
        best = max(best or 0, n)
    return best


# ----------------------------------------------------------------------------- the worker (child process)

def worker_main(a):
    """Load the stack once, then answer one probe per stdin line (a length) with one JSON line in --results."""
    import gc

    import torch

    results = open(a.results, "a")

    def answer(row):
        results.write(json.dumps(row) + "\n")
        results.flush()

    device = torch.device(a.device)
    cuda = device.type == "cuda"
    try:
        if cuda and a.gpu_mem_gib:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, a.gpu_mem_gib * 2**30 / total), device)
        s = stacks.Settings(rank=a.rank, alpha=a.alpha, checkpointing=a.checkpointing == "on", compile=a.compile,
                            max_seq=a.hi, device=a.device, seed=a.seed)
        run = stacks.load(a.worker, a.folder, s)
    except Exception as e:
        answer({"ready": False, "error": error_text(e)})
        return
    vocab = shapes.model_config(a.shape).vocab_size
    gen = torch.Generator().manual_seed(a.seed + 1)
    baseline = torch.cuda.memory_allocated() if cuda else 0
    answer({"ready": True, "gpu": torch.cuda.get_device_name() if cuda else None})
    for line in sys.stdin:
        n = int(line)
        ids = torch.randint(0, vocab, (1, n), generator=gen).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        row, torch_oom = {"seq": n, "ok": True}, False
        try:
            run.step(ids)
            if cuda:
                torch.cuda.synchronize()
        except Exception as e:
            row.update(ok=False, oom=stacks.is_oom(e), error=error_text(e))
            torch_oom = isinstance(e, torch.OutOfMemoryError)
        # past the except block the failed step's frames, and every tensor they held, are gone
        run.optimizer.zero_grad(set_to_none=True)
        del ids
        gc.collect()
        row["seconds"] = round(time.perf_counter() - t, 2)
        if cuda:
            row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.empty_cache()
            if row["ok"]:
                baseline = torch.cuda.memory_allocated()  # the optimizer's state appears at the first step
            row["leaked_gib"] = round((torch.cuda.memory_allocated() - baseline) / 2**30, 3)
        fresh = row["ok"] or (torch_oom and row.get("leaked_gib", 0) < 0.0625)
        row["worker_exits"] = not fresh
        answer(row)
        if not fresh:
            return


# ----------------------------------------------------------------------------- the parent

class Prober:
    """probe(n) -> bool through a worker process, restarted when it exits, dies or hangs."""

    def __init__(self, stack: str, folder: Path, a, work: Path):
        self.stack, self.folder, self.a, self.work = stack, folder, a, work
        self.proc, self.results, self.seen = None, work / f"{stack}-probes.jsonl", 0
        self.log, self.gpu, self.starts = [], None, 0

    def _next_line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.results.read_text().splitlines() if self.results.exists() else []
            if len(lines) > self.seen and lines[self.seen].endswith("}"):
                self.seen += 1
                return json.loads(lines[self.seen - 1])
            if self.proc.poll() is not None and len(lines) <= self.seen:
                return None
            time.sleep(0.2)
        return None

    def _start(self):
        a = self.a
        flags = ["--worker", self.stack, "--folder", self.folder, "--results", self.results, "--shape", a.shape,
                 "--hi", a.hi, "--lo", a.lo, "--rank", a.rank, "--alpha", a.alpha, "--checkpointing",
                 a.checkpointing, "--compile", a.compile, "--device", a.device, "--gpu-mem-gib", a.gpu_mem_gib,
                 "--seed", a.seed]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())] + [str(f) for f in flags],
                                     stdin=subprocess.PIPE, text=True, start_new_session=True)
        self.starts += 1
        ready = self._next_line(a.load_timeout)
        if not ready or not ready.get("ready"):
            self._kill()
            why = (ready or {}).get("error") or f"no answer within {a.load_timeout:.0f}s of starting (--load-timeout)"
            raise RuntimeError(f"{self.stack} worker could not load the model: {why}")
        self.gpu = ready.get("gpu")

    def _kill(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc:
            self.proc.wait()
        self.proc = None

    def __call__(self, n: int) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        print(f"[{self.stack}] probing {n} tokens ...", flush=True)
        self.proc.stdin.write(f"{n}\n")
        self.proc.stdin.flush()
        row = self._next_line(self.a.probe_timeout)
        if row is None:
            died = self.proc.poll() is not None
            row = {"seq": n, "ok": False, "error": "the worker died (killed for host memory?)" if died else
                   f"timeout: no answer within {self.a.probe_timeout:.0f}s (--probe-timeout)"}
            self._kill()
        elif row.get("worker_exits"):
            self.proc.wait(timeout=60)
            self.proc = None
        self.log.append(row)
        verdict = "fits" if row["ok"] else f"does not fit ({row['error']})"
        peak = f", peak {row['peak_gib']} GiB" if "peak_gib" in row else ""
        print(f"[{self.stack}] {n} tokens: {verdict}; {row.get('seconds', '?')}s{peak}", flush=True)
        return row["ok"]

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()  # end of input: the worker returns
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        self._kill()


def main(argv=None):
    a = parse_args(argv)
    if a.worker:
        return worker_main(a)
    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)
    vers = versions()
    work = Path(tempfile.mkdtemp(prefix="minilora-maxctx-", dir=a.tmp))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        folder = Path(a.checkpoint) if a.checkpoint else work / a.shape
        if not shapes.reusable(folder):
            # a child writes the checkpoint, so this process never creates a CUDA context of its own
            subprocess.run([sys.executable, str(ROOT / "bench" / "shapes.py"), "--write", str(folder), "--shape",
                            a.shape, "--device", a.device, "--seed", str(a.seed)], check=True)
        for stack in a.stack_list:
            t = time.perf_counter()
            prober, best, error = Prober(stack, folder, a, work), None, None
            try:
                error = unavailable(stack, a.device)
                if not error:
                    best = ascend(prober, a.at_list) if a.at_list else bisect_max(prober, a.lo, a.hi, a.step)
            except Exception as e:
                error = error_text(e)
            finally:
                prober.close()
            non_oom = [p["error"] for p in prober.log if not p["ok"] and not p.get("oom")]
            row = {"stack": stack, "shape": a.shape, "max_seq": best, "capped": best == a.hi, "batch": 1,
                   "lo": a.lo, "hi": a.hi, "step": a.step, "at": a.at_list or None, "rank": a.rank, "alpha": a.alpha,
                   "checkpointing": a.checkpointing, "compile": a.compile if stack.startswith("minilora") else None,
                   "gpu_mem_gib": a.gpu_mem_gib or None, "run_id": run_id,
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - t, 1),
                   "device": a.device, "gpu": prober.gpu, "versions": vers, "worker_starts": prober.starts,
                   "probes": prober.log, "non_oom_failures": non_oom, "error": error}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"{a.shape} {stack}: max_seq {best}{' (= --hi, the cap)' if row['capped'] else ''}"
                  f"{'; error: ' + error if error else ''}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"appended to {out} (run_id {run_id})", flush=True)
    return run_id


if __name__ == "__main__":
    main()
