"""Out of memory: the message says what would fit, with numbers; exit code 3; nothing trained is lost.

A real CUDA OOM needs a GPU, so `train_step` is wrapped to raise torch.OutOfMemoryError
(the class torch.cuda.OutOfMemoryError is) with CUDA's own wording, inside the loop
where a real one would come from. The advice it prints is then followed: a resume with
--batch-size halved and --grad-accum doubled trains the same steps as the run that never
ran out (dropout 0, so the split into micro-batches changes only summation order: 1e-5).
"""
import json

import pytest
import torch

from minilora import train as T
from minilora.run.faults import oom_advice
from test_train import tiny_run_args, train_losses

CUDA_OOM = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "1.05 GiB is free.")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("fault_oom")


def oom_at(monkeypatch, at: int):
    real, calls = T.train_step, []

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise torch.OutOfMemoryError(CUDA_OOM)
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "train_step", step)


def test_oom_in_the_first_step_says_what_would_fit(base, monkeypatch, capsys):
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # catching one catches both
    out = base / "first"
    oom_at(monkeypatch, 1)
    with pytest.raises(SystemExit) as e:
        T.main(tiny_run_args(base, out, batch_size=4, grad_accum=2, max_seq_len=512) + ["--no-gradient-checkpointing"])
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"out of memory in step 1 ({CUDA_OOM.split('. GPU')[0]}." in err
    assert "now: --batch-size 4 --grad-accum 2 --max-seq-len 512 (longest batch here: " in err
    assert "gradient checkpointing off" in err and "peak GPU memory: not measured on cpu" in err
    assert "--batch-size 2 --grad-accum 4   the same effective batch of 8" in err
    assert "--gradient-checkpointing   keep one tensor per layer" in err
    assert "--offload   lean mode" in err
    longest = int(err.split("longest batch here: ")[1].split()[0])
    assert f"--max-seq-len {max(8, longest // 2)}   activations grow" in err
    assert "no checkpoint was written yet" in err
    assert not (out / "checkpoints").exists()


def test_oom_advice_offers_only_what_is_left():
    cfg = T.TrainConfig(batch_size=1, grad_accum=8, max_seq_len=4096, gradient_checkpointing=True, offload=True)
    text = oom_advice(cfg, 0, "CUDA out of memory", 3000, torch.device("cpu"), None)
    assert "--batch-size" not in text.split("each of these")[1]
    assert "--gradient-checkpointing " not in text and "--offload " not in text
    assert "--max-seq-len 1500 " in text  # half the longest batch actually seen, not of the limit


def test_oom_later_keeps_the_progress_and_the_advice_resumes(base, monkeypatch, capsys):
    reference = base / "reference"
    T.train(T.parse_config(tiny_run_args(base, reference, dropout=0.0)))

    out = base / "later"
    args = tiny_run_args(base, out, dropout=0.0, save_every=2)  # batch 2 x accum 2
    oom_at(monkeypatch, 4)
    with pytest.raises(SystemExit) as e:
        T.main(args)
    assert e.value.code == 3
    err = capsys.readouterr().err
    ck = out / "checkpoints" / "step-000003"
    assert f"kept: {ck}; continue from it with --resume." in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]

    monkeypatch.undo()
    assert "--batch-size 1 --grad-accum 4" in err
    T.train(T.parse_config(args + ["--batch-size", "1", "--grad-accum", "4", "--resume"]))
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]
    a, b = train_losses(reference), train_losses(out)
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a), (a, b)


def test_oom_while_loading_the_model(base, monkeypatch, capsys):
    def load(*args, **kwargs):
        raise torch.OutOfMemoryError(CUDA_OOM)

    monkeypatch.setattr(T, "load_model", load)
    with pytest.raises(SystemExit) as e:
        T.main(tiny_run_args(base, base / "load"))
    assert e.value.code == 3
    err = capsys.readouterr().err
    assert "out of memory before training started" in err and "the model does not fit" in err
