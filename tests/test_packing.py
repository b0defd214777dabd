"""Padding-free batches (speed/padding_free.py) do not change the loss.

The reference for each example is the example alone: a batch of one, no padding, no mask,
the plain causal path that test_model.py checks against transformers. The packed row of
uneven examples (prompt-masked, as SFT data are) must give the same summed loss, the same
label-token count and the same LoRA gradients, with and without recompute, in lean mode, and
with the decoder layers compiled; and a training run with --padding-free must follow the
padded run step for step.
"""
import pytest
import torch

from conftest import tiny_hf_model, trainable_nf4_model
from minilora import data as D
from minilora.loss import causal_lm_loss
from minilora.speed import make_batch
from minilora.speed import padding_free as packing
from minilora.train import hidden_states
from test_distributed import assert_same_run
from test_train import run_train, tiny_run_args

OFF = torch.autocast("cpu", enabled=False)


def examples(n=4, seed=0):
    """Uneven lengths (5..29), the first few tokens of each a masked prompt."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(5, 30, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        prompt = 1 + i % 3
        out.append(D.Example(ids, [D.IGNORE] * prompt + ids[prompt:]))
    return out


def loss_and_grads(model, batches):
    model.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for b in batches:
        s, c = causal_lm_loss(hidden_states(model, b), model.lm_head.weight, b["labels"])
        s.backward()
        total, count = total + s.item(), count + c
    return total, count, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,setup", [("llama", {}), ("qwen2", {"gradient_checkpointing": True}),
                                        ("qwen2", {"offload": True}), ("llama", {"compile": "on"})])
def test_packed_row_equals_each_example_alone(tmp_path, kind, setup):
    tiny_hf_model(tmp_path / "m", kind, num_hidden_layers=2)
    model = trainable_nf4_model(tmp_path / "m", **setup)
    ex = examples()
    alone = loss_and_grads(model, [make_batch([e], 0, "cpu") for e in ex])
    packed = loss_and_grads(model, [make_batch(ex, 0, "cpu", padding_free=True)])
    padded = loss_and_grads(model, [make_batch(ex, 0, "cpu")])
    assert packed[1] == alone[1] == padded[1]  # the same label tokens: none lost or added at the seams
    for other in (packed, padded):
        assert abs(other[0] - alone[0]) < 1e-4 * abs(alone[0]), (other[0], alone[0])
        for k in alone[2]:
            torch.testing.assert_close(other[2][k], alone[2][k], atol=1e-5, rtol=1e-4)


def test_packed_row_has_no_padding_and_restarts_positions():
    ex = examples(3)
    b = packing.collate(ex)
    lengths = [len(e.input_ids) for e in ex]
    assert b["input_ids"].shape == (1, sum(lengths)) and b["documents"].lengths == tuple(lengths)
    assert b["positions"][0].tolist() == [p for n in lengths for p in range(n)]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(b["labels"][0, s] == D.IGNORE for s in starts)


def test_padding_free_training_follows_the_padded_run(tmp_path):
    padded, free = tmp_path / "padded", tmp_path / "free"
    r = run_train(tiny_run_args(tmp_path, padded, dropout=0.0))
    assert r.returncode == 0, r.stderr
    r = run_train(tiny_run_args(tmp_path, free, dropout=0.0) + ["--padding-free"])
    assert r.returncode == 0, r.stderr
    assert_same_run(padded, free, [1, 2, 3, 4, 5, 6])


def test_evaluate_runs_without_autograd(tmp_path, monkeypatch):
    """Eval keeps no graph: no activations held for a backward that never comes (and NF4 takes bnb's own path)."""
    from minilora.train import evaluate

    tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=1)
    model = trainable_nf4_model(tmp_path / "m")
    modes = []

    def loss(*a, **kw):  # causal_lm_loss, noting whether autograd records
        modes.append(torch.is_grad_enabled())
        return causal_lm_loss(*a, **kw)

    for padding_free in (False, True):
        loss_value = evaluate(model, examples(), 2, lambda ex: make_batch(ex, 0, "cpu", padding_free), OFF, loss)
        assert loss_value > 0
    assert modes and not any(modes)
    assert model.training  # evaluate puts the mode back
