"""Non-finite losses and gradients, and the fp16 loss scaler.

The run happens in this process with `train_step` wrapped: the real step runs, then the
wrapper makes chosen steps' loss NaN or one gradient entry inf, and records the LoRA
weights each step starts from. A skipped step must leave the weights and AdamW's state
exactly as they were (torch.equal, no tolerance: nothing may touch them), be logged
with "skipped": true, and --max-bad-steps of them in a row stop the run (exit code 1).

The loss scaler is GPU-only in use (fp16 on a GPU without bf16), so its CPU test swaps
`make_scaler` for torch's CPU GradScaler and trains in fp32. Scaling by a power of two
and unscaling is exact in fp32, so the losses must equal the unscaled run's (1e-6).
"""
import json

import pytest
import torch

from minilora import train as T
from minilora.lora import lora_state_dict
from test_train import tiny_run_args, train_losses


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_nan")


def wrap_train_step(monkeypatch, bad: dict[int, str]):
    """Make step k (1-based) return a NaN loss ("nan-loss") or an inf gradient ("inf-grad"), or raise
    ("interrupt"). Returns the list of LoRA weights each step started from."""
    real, starts = T.train_step, []

    def step(model, batches, autocast, scaler=None, **kw):
        starts.append({k: v.detach().clone() for k, v in lora_state_dict(model).items()})
        k = len(starts)
        if bad.get(k) == "interrupt":
            raise KeyboardInterrupt
        loss, n = real(model, batches, autocast, scaler, **kw)
        if bad.get(k) == "nan-loss":
            return float("nan"), n
        if bad.get(k) == "inf-grad":
            next(p for p in model.parameters() if p.requires_grad).grad[0, 0] = float("inf")
        return loss, n

    monkeypatch.setattr(T, "train_step", step)
    return starts


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def train_rows(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


def state(out, step):
    return torch.load(out / "checkpoints" / f"step-{step:06d}" / "trainer_state.pt", weights_only=True)


def test_non_finite_steps_are_skipped_logged_and_change_nothing(base, monkeypatch):
    out = base / "skips"
    starts = wrap_train_step(monkeypatch, {3: "nan-loss", 5: "inf-grad"})
    T.train(T.parse_config(tiny_run_args(base, out, warmup_steps=0)))  # 6 steps, lr > 0 from the first
    after = starts[1:]  # after[k - 1]: the weights after step k (steps 1..5)
    for k in (1, 2, 4):
        assert not same(starts[k - 1], after[k - 1]), f"step {k} should have updated the weights"
    for k in (3, 5):
        assert same(starts[k - 1], after[k - 1]), f"skipped step {k} changed the weights"
    rows = train_rows(out)
    assert [k for k, r in rows.items() if r["skipped"]] == [3, 5]
    assert rows[3]["loss"] is None and rows[5]["grad_norm"] is None and rows[5]["loss"] > 0  # JSON has no NaN
    final = state(out, 6)
    assert final["metrics"]["skipped"] == 2 and final["metrics"]["bad_in_a_row"] == 0
    # AdamW counted only the 4 real updates (its bias correction depends on it)
    assert {float(s["step"]) for s in final["optimizer"]["state"].values()} == {4.0}


def test_too_many_bad_steps_in_a_row_stop_the_run(base, monkeypatch, capsys):
    out = base / "stops"
    starts = wrap_train_step(monkeypatch, {k: "nan-loss" for k in range(4, 100)})
    with pytest.raises(SystemExit) as e:
        T.main(tiny_run_args(base, out, max_steps=10, save_every=2, max_bad_steps=3))
    assert e.value.code == 1
    err = capsys.readouterr().err
    ck = out / "checkpoints" / "step-000006"
    assert ("3 steps in a row had a non-finite loss or gradient (steps 4-6), so training stopped. Skipped steps "
            f"change nothing: the weights are those of step 3, saved as {ck}.") in err
    assert "lower --lr (now 0.01)" in err and "Traceback" not in err
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    from safetensors.torch import load_file

    saved = load_file(ck / "adapter/adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model."): v for k, v in saved.items()}
    assert same(starts[3], saved)  # starts[3]: the weights step 4 started from, i.e. after step 3
    assert len(starts) == 6 and state(out, 6)["metrics"]["bad_in_a_row"] == 3


def test_make_scaler_is_for_fp16_only():
    cpu = torch.device("cpu")
    assert T.make_scaler(torch.float16, cpu).is_enabled()
    assert not T.make_scaler(torch.bfloat16, cpu).is_enabled() and not T.make_scaler(torch.float32, cpu).is_enabled()


def cpu_scaler(monkeypatch):
    """torch's CPU GradScaler, starting at 2^10 and doubling after every 2 good steps, so its state moves."""
    monkeypatch.setattr(T, "make_scaler", lambda dtype, device: torch.amp.GradScaler("cpu", init_scale=2.0**10,
                                                                                      growth_interval=2))


def test_loss_scaler_state_is_checkpointed_and_restored(base, monkeypatch):
    T.train(T.parse_config(tiny_run_args(base, base / "unscaled")))
    cpu_scaler(monkeypatch)
    T.train(T.parse_config(tiny_run_args(base, base / "scaled")))
    a, b = train_losses(base / "unscaled"), train_losses(base / "scaled")
    assert all(abs(a[k] - b[k]) < 1e-6 for k in a), (a, b)
    # 6 good steps, doubling every 2: 2^10 -> 2^13
    assert state(base / "scaled", 6)["scaler"]["scale"] == 2.0**13

    out = base / "scaled-interrupted"
    wrap_train_step(monkeypatch, {4: "interrupt"})
    with pytest.raises(SystemExit) as e:
        T.train(T.parse_config(tiny_run_args(base, out)))
    assert e.value.code == 130
    s = state(out, 3)["scaler"]
    assert s["scale"] == 2.0**11 and s["_growth_tracker"] == 1  # one good step towards the next doubling
    monkeypatch.undo()  # the real train_step again
    cpu_scaler(monkeypatch)
    T.train(T.parse_config(tiny_run_args(base, out) + ["--resume"]))
    # a fresh scaler after the resume would end at 2^11 (one doubling in steps 4-6), not 2^13
    assert state(out, 6)["scaler"]["scale"] == 2.0**13
    c = train_losses(out)
    assert all(abs(a[k] - c[k]) < 1e-5 for k in a), (a, c)


def test_fp16_overflow_is_left_to_the_scaler(base, monkeypatch):
    """An inf gradient with a finite loss under a live scaler halves the scale and does not count as bad."""
    cpu_scaler(monkeypatch)
    wrap_train_step(monkeypatch, {2: "inf-grad", 3: "inf-grad"})
    out = base / "overflow"
    T.train(T.parse_config(tiny_run_args(base, out, max_bad_steps=1)))  # would stop at the first bad step
    rows = train_rows(out)
    assert [k for k, r in rows.items() if r["skipped"]] == [2, 3]
    # 2^10, overflow: 2^9, overflow: 2^8, then steps 4-6 good: one doubling (after 4 and 5) -> 2^9
    assert state(out, 6)["scaler"]["scale"] == 2.0**9
    assert state(out, 6)["metrics"]["skipped"] == 2
