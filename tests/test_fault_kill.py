"""Kills and interrupts: SIGKILL mid-step and mid-save, Ctrl-C and SIGTERM, then --resume.

The reference is an uninterrupted run with the same seed: after any of these faults,
the resumed run's losses equal it within 1e-5 (fp32 on the CPU; the only difference
is summation order between processes, ~1e-7), with --dropout 0.1 so the dropout masks
(the restored rng) matter too.

The faults are real signals sent to a real `python -m minilora.train`. To land them at
a chosen point, the child runs the module through BOOT, which wraps two torch functions
the loop calls: `clip_grad_norm_` (once per optimizer step, between backward and the
update) and `torch.save` (writing trainer_state.pt inside a checkpoint's temp folder).
minilora itself has no test hooks.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from minilora import train as T
from minilora.atomic import clean_leftovers
from minilora.run.resume import ResumeError, newest_checkpoint
from test_train import run_train, tiny_run_args, train_losses

BOOT = r"""
import os, runpy, signal, sys, time
from pathlib import Path
import torch

# Ctrl-C as in a terminal: a job started in the background of a script (as CI may start the tests) inherits
# SIGINT ignored, and Python then installs no KeyboardInterrupt handler, so the test's SIGINT would do nothing.
signal.signal(signal.SIGINT, signal.default_int_handler)

action, at = os.environ["FAULT"].split(":")
at = int(at)
calls = 0
real_clip, real_save = torch.nn.utils.clip_grad_norm_, torch.save


def clip(*args, **kwargs):  # once per optimizer step: after backward, before the update
    global calls
    calls += 1
    if calls == at and action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if calls == at and action == "wait":  # the test sends the signal while we sleep
        Path(os.environ["FAULT_MARKER"]).touch()
        time.sleep(300)
    return real_clip(*args, **kwargs)


def save(obj, f, *args, **kwargs):  # half a trainer_state.pt in the temp folder, then SIGKILL
    if action == "kill-in-save" and f".step-{at:06d}.tmp-" in str(f):
        Path(f).write_bytes(b"PK\x03\x04 half-written")
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.nn.utils.clip_grad_norm_, torch.save = clip, save
runpy.run_module("minilora.train", run_name="__main__", alter_sys=True)
"""

STEPS = 8
# SIGKILL inside step k, with a checkpoint every 3 steps: k in {5, 6, 8} leaves 1-2 logged steps after the
# newest checkpoint, which the resume must drop from metrics.jsonl. Which one is random per session.
KILL_STEP = random.choice([5, 6, 8])


def boot(args, fault, env=None, **popen):
    env = {**os.environ, "FAULT": fault, **(env or {})}
    return subprocess.Popen([sys.executable, "-c", BOOT, *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_kill")


def args_for(base, out, **extra):
    return tiny_run_args(base, out, max_steps=STEPS, **extra)


@pytest.fixture(scope="module")
def reference(base):
    """Losses of the uninterrupted run (in this process: the same code and seed)."""
    T.train(T.parse_config(args_for(base, base / "reference")))
    return train_losses(base / "reference")


def assert_clean_and_equal(out, reference):
    """Every step logged once, eval at the start and the end only, and the losses of the reference."""
    r = rows(out)
    assert [x["step"] for x in r if x["split"] == "train"] == list(range(1, STEPS + 1))
    assert [x["step"] for x in r if x["split"] == "eval"] == [0, STEPS]
    got = train_losses(out)
    for s in reference:
        assert abs(got[s] - reference[s]) < 1e-5, (s, got[s], reference[s])


def test_sigkill_mid_step_then_resume_equals_uninterrupted(base, reference):
    out = base / f"killed-at-{KILL_STEP}"
    args = args_for(base, out, save_every=3)
    p = boot(args, f"kill:{KILL_STEP}")
    p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL
    newest = (KILL_STEP - 1) // 3 * 3
    assert newest_checkpoint(out).name == f"step-{newest:06d}"
    logged = [x["step"] for x in rows(out) if x["split"] == "train"]
    assert logged[-1] == KILL_STEP - 1 > newest  # the killed run logged steps its checkpoint does not hold

    r = run_train(args + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert f"resumed from {out / 'checkpoints' / f'step-{newest:06d}'} at step {newest}" in r.stdout
    assert_clean_and_equal(out, reference)


def test_sigkill_during_a_save_keeps_the_previous_checkpoint(base, reference):
    """Killed while writing step 4's trainer_state.pt: the half-written folder is never taken for a checkpoint."""
    out = base / "killed-in-save"
    args = args_for(base, out, save_every=2)
    p = boot(args, "kill-in-save:4")
    p.communicate(timeout=600)
    assert p.returncode == -signal.SIGKILL
    tmp, complete = checkpoints(out)  # "." sorts first
    assert complete == "step-000002" and tmp.startswith(".step-000004.tmp-")
    assert (out / "checkpoints" / tmp / "trainer_state.pt").read_bytes().endswith(b"half-written")
    assert newest_checkpoint(out).name == "step-000002"

    r = run_train(args + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert f"removed the unfinished save {out / 'checkpoints' / tmp}" in r.stdout
    assert "at step 2" in r.stdout
    assert checkpoints(out) == ["step-000002", "step-000004", "step-000006", "step-000008"]
    assert_clean_and_equal(out, reference)


def interrupt_at(out, args, sig, step):
    """Start a run, send `sig` while it is inside `step`, return the finished process and its output."""
    marker = out.parent / f"{out.name}.in-step"
    p = boot(args, f"wait:{step}", env={"FAULT_MARKER": str(marker)})
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "the run never reached the step"
        time.sleep(0.1)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=300)
    return p, stdout, stderr


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(base, reference):
    out = base / "ctrl-c"
    args = args_for(base, out)  # no --save-every: the only checkpoint is the one Ctrl-C writes
    p, stdout, stderr = interrupt_at(out, args, signal.SIGINT, 4)
    assert p.returncode == 130, stderr
    ck = out / "checkpoints" / "step-000003"  # steps 1-3 done; step 4 was under way and is redone
    assert f"interrupted after step 3: saved {ck}; continue with --resume" in stdout
    assert checkpoints(out) == ["step-000003"]
    assert torch.load(ck / "trainer_state.pt", weights_only=True)["step"] == 3
    assert "Traceback" not in stderr

    r = run_train(args + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert_clean_and_equal(out, reference)


def test_sigterm_saves_a_checkpoint_too(base):
    out = base / "sigterm"
    p, stdout, stderr = interrupt_at(out, args_for(base, out), signal.SIGTERM, 2)
    assert p.returncode == 130, stderr
    assert checkpoints(out) == ["step-000001"] and "interrupted after step 1" in stdout


@pytest.mark.parametrize("change,difference", [
    (["--targets", "q_proj,v_proj"], "targets: checkpoint 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj', "
                                     "now 'q_proj,v_proj'"),
    (["--model", "{other}"], "model: checkpoint '{model}', now '{other}'"),
    (["--batch-size", "1"], "effective batch (batch_size x grad_accum): checkpoint 2 x 2, now 1 x 2"),
])
def test_resume_with_other_settings_is_refused_before_loading(base, monkeypatch, change, difference):
    out = base / "refuse"
    if not (out / "checkpoints").exists():
        T.train(T.parse_config(tiny_run_args(base, out, max_steps=1)))
        shutil.rmtree(out / "adapter")  # unfinished, so --resume is allowed to look at it
        shutil.copytree(base / "m", base / "m2")
    model, other = str(base / "m"), str(base / "m2")
    change = [c.format(other=other) for c in change]

    def never(*a, **k):
        raise AssertionError("the model was loaded before the resume check")

    monkeypatch.setattr(T, "load_model", never)
    with pytest.raises(ResumeError) as e:
        T.train(T.parse_config(tiny_run_args(base, out, max_steps=1) + change + ["--resume"]))
    assert difference.format(model=model, other=other) in str(e.value)
    assert f"cannot resume from {out / 'checkpoints' / 'step-000001'}" in str(e.value)


def test_newest_checkpoint_takes_only_complete_folders(tmp_path):
    ck = tmp_path / "checkpoints"

    def make(name, files=("trainer_state.pt", "adapter/adapter_model.safetensors")):
        for f in files:
            (ck / name / f).parent.mkdir(parents=True, exist_ok=True)
            (ck / name / f).write_bytes(b"x")

    assert newest_checkpoint(tmp_path) is None
    make("step-999999")
    make("step-1000000")  # more digits than the padding: sorted as a number, not as text
    make(".step-1000001.tmp-abc")  # a save that never finished
    make("step-1000002", files=("adapter/adapter_model.safetensors",))  # no trainer_state.pt
    make("step-1000003-copy")
    assert newest_checkpoint(tmp_path).name == "step-1000000"


def test_clean_leftovers_restores_a_folder_caught_between_renames(tmp_path):
    """atomic_dir replacing `adapter`: killed after moving the old one aside, before renaming the new one in."""
    (tmp_path / ".adapter.old-123").mkdir()
    (tmp_path / ".adapter.old-123" / "adapter_config.json").write_text("{}")
    (tmp_path / ".adapter.tmp-xyz").mkdir()
    done = clean_leftovers(tmp_path)
    assert (tmp_path / "adapter" / "adapter_config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert len(done) == 2 and "restored" in done[1]
