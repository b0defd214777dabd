"""bench/ in its CPU mode: the GPU benchmark's code paths, end to end, on a tiny random model.

Speed is not checked (a shared CPU, a tiny model). What is checked is what the GPU
run relies on: one row per stack with every required key and one run_id; minilora's
and peft's first-step losses agree (the same checkpoint reached through two loaders);
report.py writes a table and a PNG; max_context's bisection finds the boundary.
The two scripts run as subprocesses, the way they run on the GPU machine, side by side.
"""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts beside the package

from bench import report  # noqa: E402
from bench.max_context import bisect_max  # noqa: E402
from bench.profile_step import busy_us  # noqa: E402
from bench.train_speed import REQUIRED, compare  # noqa: E402


def _env():
    # One thread per process: two scripts share the CI machine's cores, and oversubscribed
    # OpenMP threads spin-wait (a 0.1 s step took 5 s with 2 threads on a busy 2-core box).
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def cpu_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    speed, ctx = tmp / "train_speed.jsonl", tmp / "max_context.jsonl"
    py = sys.executable
    procs = [
        subprocess.Popen([py, "bench/train_speed.py", "--shape", "tiny", "--device", "cpu", "--stacks", "minilora,peft",
                          "--steps", "2", "--warmup", "1", "--seq", "128", "--out", str(speed), "--tmp", str(tmp)],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        subprocess.Popen([py, "bench/max_context.py", "--shape", "tiny", "--device", "cpu", "--stacks", "minilora",
                          "--lo", "64", "--hi", "192", "--step", "64", "--out", str(ctx), "--tmp", str(tmp)],
                         cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
    ]
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log[-3000:]
    return tmp, speed, ctx


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_train_speed_rows(cpu_runs):
    _, speed, _ = cpu_runs
    rows = _rows(speed)
    assert [r["stack"] for r in rows] == ["minilora", "peft"]
    assert len({r["run_id"] for r in rows}) == 1
    assert re.fullmatch(r"[0-9a-f]{12}", rows[0]["versions"]["minilora_source_sha256"])  # the code that ran
    for r in rows:
        assert set(REQUIRED) <= set(r), sorted(set(REQUIRED) - set(r))
        assert not r.get("error"), r.get("error")
        assert (r["shape"], r["batch"], r["seq"], r["device"], r["quant"]) == ("tiny", 2, 128, "cpu", "nf4-dq")
        assert len(r["step_times_s"]) == 3 and r["tokens_per_s"] > 0 and 0 < r["mfu"]
        assert r["loss_match"] is True
        # a random 512-token model starts near ln(512) = 6.24
        assert abs(r["loss_first"] - math.log(512)) < 0.5 and math.isfinite(r["loss_last"])
        assert r["versions"]["torch"] and r["versions"]["peft"] and r["versions"]["minilora"]
    # fp32 on the CPU with identical NF4 codes: only the summation order differs (seen: 2e-8)
    assert rows[1]["loss_rel_diff"] < 1e-5
    assert rows[0]["vs_peft"]["tokens_per_s"] == pytest.approx(rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"])
    assert rows[1]["vs_peft"] is None and rows[0]["vs_unsloth"] is None


def test_compare_flags_a_loss_mismatch():
    rows = [{"stack": s, "shape": "tiny", "loss_first": loss, "tokens_per_s": tps, "peak_allocated_gib": mem,
             "peak_reserved_gib": mem} for s, loss, tps, mem in
            (("minilora", 10.0, 200.0, 1.0), ("peft", 10.05, 100.0, 4.0), ("unsloth", 10.2, 400.0, 2.0))]
    compare(rows)
    assert [r["loss_match"] for r in rows] == [True, True, False]  # 0.5% passes, 2% does not
    assert rows[0]["vs_peft"] == {"tokens_per_s": 2.0, "peak_allocated": 0.25, "peak_reserved": 0.25}
    assert rows[0]["vs_unsloth"]["tokens_per_s"] == 0.5 and rows[2]["vs_peft"]["tokens_per_s"] == 4.0


def test_compare_against_peft_fast_with_another_minilora_mode_as_reference():
    rows = [{"stack": s, "shape": "tiny", "loss_first": loss, "tokens_per_s": tps, "peak_allocated_gib": mem,
             "peak_reserved_gib": mem} for s, loss, tps, mem in
            (("minilora-graphs", 10.0, 300.0, 1.0), ("peft-fast", 10.3, 100.0, 5.0))]
    compare(rows)
    assert [r["loss_match"] for r in rows] == [True, False]  # minilora-graphs is the reference; 3% is too far
    assert rows[0]["vs_peft_fast"]["tokens_per_s"] == 3.0 and rows[0]["vs_peft"] is None


def test_which_stacks_recompute():
    from bench.stacks import Settings, recomputes

    on, off = Settings(checkpointing=True), Settings(checkpointing=False)
    assert recomputes("minilora", on) and recomputes("peft", on) and recomputes("minilora-lean-graphs", off)
    assert not any(recomputes(s, on) for s in ("minilora-fast", "minilora-fast-graphs", "peft-fast"))
    assert not recomputes("minilora-graphs", off)


def test_report_writes_table_and_chart(cpu_runs):
    tmp, speed, ctx = cpu_runs
    readme, png = tmp / "README.md", tmp / "chart.png"
    shutil.copy(ROOT / "bench" / "README.md", readme)
    report.main(["--results", str(speed), "--max-context", str(ctx), "--readme", str(readme), "--png", str(png)])
    text = readme.read_text()
    table = text.split("<!-- bench-table -->")[1].split("<!-- /bench-table -->")[0]
    run_id = _rows(speed)[0]["run_id"]
    assert run_id in table and "| minilora |" in table and "| peft |" in table
    assert "minilora / peft:" in table and "no run recorded" not in table
    context = text.split("<!-- max-context-table -->")[1].split("<!-- /max-context-table -->")[0]
    assert "| tiny | minilora | 192 (the largest tried) | 192 fits (" in context
    assert text.count("<!-- bench-table -->") == 1  # replaced between the markers, not appended
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_max_context_cpu_answers_hi(cpu_runs):
    _, _, ctx = cpu_runs
    (row,) = _rows(ctx)
    assert (row["stack"], row["max_seq"], row["capped"], row["error"]) == ("minilora", 192, True, None)
    assert [p["seq"] for p in row["probes"]] == [192] and row["probes"][0]["ok"]


@pytest.mark.parametrize("limit", [0, 63, 64, 100, 128, 1000, 4095, 4096, 5000])
def test_bisect_max_finds_the_boundary(limit):
    lo, hi, step = 64, 4096, 64
    seen = []

    def probe(n):  # "fits" up to `limit` tokens
        seen.append(n)
        return n <= limit

    best = bisect_max(probe, lo, hi, step)
    if limit < lo:
        assert best is None
    elif limit >= hi:
        assert best == hi and seen == [hi]
    else:
        assert best <= limit < best + step and (best - lo) % step == 0
    assert len(seen) <= math.ceil(math.log2((hi - lo) / step)) + 2


def test_targets_are_minilora_targets():
    from bench.stacks import TARGETS
    from minilora.lora import ALL_TARGETS

    assert TARGETS == ALL_TARGETS


def test_scaling_rows_and_fsdp_agrees_with_data_parallel(tmp_path):
    """bench/scaling.py on the CPU (gloo): one row per process count with its scaling against 1 rank; the FSDP2
    launch on the same 2 ranks' data computes the same losses as plain data parallelism (the base weights are
    the same whether each rank holds them whole or gathers them from halves)."""
    out = tmp_path / "scaling.jsonl"
    common = [sys.executable, "bench/scaling.py", "--shape", "tiny", "--device", "cpu", "--steps", "1", "--warmup",
              "1", "--seq", "64", "--out", str(out), "--tmp", str(tmp_path)]
    for extra in (["--gpus", "1,2"], ["--gpus", "2", "--fsdp"]):
        r = subprocess.run(common + extra, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    one, two, fsdp = _rows(out)
    assert [(x["ranks"], x["fsdp"]) for x in (one, two, fsdp)] == [(1, False), (2, False), (2, True)]
    assert not any(x.get("error") for x in (one, two, fsdp))
    assert one["scaling"] == 1.0 and two["scaling"] == pytest.approx(two["tokens_per_s"] / one["tokens_per_s"])
    assert abs(one["losses"][0] - math.log(512)) < 0.5  # a random 512-token model starts near ln(512)
    for a, b in zip(two["losses"], fsdp["losses"]):
        assert abs(a - b) < 1e-5, (two["losses"], fsdp["losses"])


def test_variable_lengths_padded_and_padding_free_agree(tmp_path):
    """--lengths: right-padded rows of random lengths. minilora padded, minilora --padding-free and peft (with
    its attention mask) compute the same first loss on them; tokens/s counts the real tokens only.
    --checkpoint: the random checkpoint is written to the folder named, and kept."""
    out, kept = tmp_path / "var.jsonl", tmp_path / "kept"
    r = subprocess.run([sys.executable, "bench/train_speed.py", "--shape", "tiny", "--device", "cpu", "--stacks",
                        "minilora,minilora-padfree,peft", "--steps", "2", "--warmup", "1", "--seq", "96",
                        "--lengths", "8:96", "--out", str(out), "--tmp", str(tmp_path), "--checkpoint", str(kept)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert (kept / "config.json").is_file() and list(kept.glob("*.safetensors"))
    rows = _rows(out)
    assert [x["stack"] for x in rows] == ["minilora", "minilora-padfree", "peft"]
    for x in rows:
        assert not x.get("error"), x["error"]
        assert x["lengths"] == "8:96" and x["loss_rel_diff"] < 1e-5, (x["stack"], x["loss_rel_diff"])


def test_max_context_at_probes_in_order_on_a_kept_checkpoint(tmp_path):
    """--at probes the lengths given, in order (no bisection); --checkpoint reuses the folder and keeps it."""
    from bench.shapes import write_checkpoint

    kept = write_checkpoint(tmp_path / "kept", "tiny")
    written = {f.name: f.stat().st_mtime_ns for f in kept.iterdir()}
    out = tmp_path / "ctx.jsonl"
    r = subprocess.run([sys.executable, "bench/max_context.py", "--shape", "tiny", "--device", "cpu", "--stacks",
                        "minilora", "--at", "96,32,64", "--checkpoint", str(kept), "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert {f.name: f.stat().st_mtime_ns for f in kept.iterdir()} == written  # used as it was, not rewritten
    (row,) = _rows(out)
    assert [p["seq"] for p in row["probes"]] == [96, 32, 64] and row["max_seq"] == 96 and row["at"] == [96, 32, 64]


@pytest.mark.parametrize("seed", range(5))
def test_busy_us_is_the_union_of_intervals(seed):
    """GPU busy time in profile_step.py: the union of kernel intervals, against counting a 1-us grid."""
    import random

    rng = random.Random(seed)
    spans = [(rng.randrange(0, 500), rng.randrange(0, 60)) for _ in range(rng.randrange(1, 40))]
    grid = set()
    for start, dur in spans:
        grid.update(range(start, start + dur))
    assert busy_us(spans) == len(grid)


def test_profile_step_cpu_writes_a_report(tmp_path):
    report_file = tmp_path / "profile.txt"
    r = subprocess.run([sys.executable, "bench/profile_step.py", "--shape", "tiny", "--device", "cpu", "--seq", "64",
                        "--warmup", "1", "--steps", "1", "--rows", "5", "--out", str(report_file)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    text = report_file.read_text()
    assert "wall per step" in text and "Top operators by host time" in text and "aten::mm" in text


def test_checkpoint_flag_never_replaces_a_folder_it_did_not_write(tmp_path):
    """--checkpoint DIR on a folder that holds something else than a checkpoint: refused, the folder untouched."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    r = subprocess.run([sys.executable, "bench/train_speed.py", "--shape", "tiny", "--device", "cpu", "--stacks",
                        "minilora", "--checkpoint", str(folder), "--out", str(tmp_path / "o.jsonl")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "not a checkpoint folder (no config.json) and not empty" in r.stderr, r.stderr[-2000:]
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and not (tmp_path / "o.jsonl").exists()


def test_trainer_speed_runs_the_trainer_per_mode(tmp_path):
    """trainer_speed.py: one row per mode from the trainer's own metrics.jsonl. On the CPU --cuda-graphs auto
    is off, so `default` and `eager` are the same run: the same last loss, bit for bit, and ratio ~1."""
    out = tmp_path / "trainer.jsonl"
    r = subprocess.run([sys.executable, "bench/trainer_speed.py", "--shape", "tiny", "--device", "cpu", "--modes",
                        "eager,default", "--steps", "3", "--skip", "1", "--examples", "24", "--lengths", "20:60",
                        "--grad-accum", "2", "--out", str(out), "--checkpoint", str(tmp_path / "ck")],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    eager, default = _rows(out)
    assert (eager["mode"], default["mode"]) == ("eager", "default") and eager["run_id"] == default["run_id"]
    assert eager["steps_timed"] == 2 and eager["label_tokens_per_s"] > 0 and eager["vs_eager"] == 1.0
    assert default["loss_last"] == eager["loss_last"]
    bad = subprocess.run([sys.executable, "bench/trainer_speed.py", "--lengths", "9:3"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--lengths" in bad.stderr
    # a mode the trainer refuses: its row carries the trainer's own message, and the script exits 1
    failed = subprocess.run([sys.executable, "bench/trainer_speed.py", "--shape", "tiny", "--device", "cpu", "--modes",
                             "graphs", "--steps", "2", "--examples", "8", "--out", str(out), "--checkpoint",
                             str(tmp_path / "ck")], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1, (failed.stdout + failed.stderr)[-2000:]
    assert "--cuda-graphs on needs a CUDA GPU" in _rows(out)[-1]["error"]


def test_job_speed_trains_minilora_and_trl_on_the_same_tokens(tmp_path):
    """bench/job_speed.py on the CPU: minilora and trl's SFTTrainer (+ peft) each run the whole job to a saved
    adapter; the script itself fails a stack whose trainer saw other label or real tokens than the records
    hold (the Qwen2Tokenizer pitfall of issue 19). Checked here: both rows, no error, the counts, sane losses."""
    out = tmp_path / "job.jsonl"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "job_speed.py"), "--shape", "tiny", "--device", "cpu",
                        "--stacks", "minilora,trl", "--examples", "16", "--lengths", "20:60", "--skip", "1",
                        "--cold-bytecode", "--out", str(out)],
                       cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["stack"] for row in rows] == ["minilora", "trl"]
    for row in rows:
        assert "error" not in row, row["error"]
        assert row["steps"] == 2 and row["expected"]["label_tokens"] > 0
        assert (row["label_tokens"], row["real_tokens"]) == (row["expected"]["label_tokens"],
                                                             row["expected"]["real_tokens"])
        assert row["adapter_s"] > row["first_step_s"] > 0 and row["steady_steps"] == 1
        assert row["examples_per_s"] > 0 and row["real_tokens_per_s"] > row["examples_per_s"]
        # the first step's loss is the base model's on that step's examples (B = 0), ~ln(vocab) for random weights
        assert abs(row["loss_first"] - math.log(512)) < 0.5
    steps = rows[0]["per_step"]  # minilora's steps: end, time, real tokens, tokens with padding
    assert len(steps) == 2 and sum(s[2] for s in steps) == rows[0]["real_tokens"]
    assert all(0 < s[1] < s[0] for s in steps) and all(s[3] >= s[2] for s in steps)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "job_speed.py"), "--explain", rows[0]["run_id"],
                        "--skip", "1", "--out", str(out)], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith(f"{rows[0]['run_id']} minilora#1: ") and "fill" in r.stdout
