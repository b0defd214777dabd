"""Padding-free batches (speed/padding_free.py) do not change the loss.

The reference for each example is the example alone: a batch of one, no padding, no mask,
the plain causal path that test_model.py checks against transformers. The packed row of
uneven examples (prompt-masked, as SFT data are) must give the same summed loss, the same
label-token count and the same LoRA gradients, with and without recompute, in lean mode, and
with the decoder layers compiled, padded as CUDA graphs pad it or not; and a training run with
--padding-free, whose steps deal their micro-batches' examples into fuller rows, must follow the
padded run step for step. (The GPU's variable-length kernel: tests/test_graphs.py.)
"""
import itertools

import pytest
import torch

from conftest import tiny_hf_model, trainable_nf4_model
from minilora import data as D
from minilora.loss import causal_lm_loss
from minilora.speed import make_batch
from minilora.speed import padding_free as packing
from minilora.speed.graphs import bucket_length
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
    for_graphs = loss_and_grads(model, [make_batch(ex, 0, "cpu", padding_free=True, pad_to=bucket_length)])
    padded = loss_and_grads(model, [make_batch(ex, 0, "cpu")])
    assert packed[1] == for_graphs[1] == alone[1] == padded[1]  # the same label tokens: none lost or added
    for other in (packed, for_graphs, padded):
        assert abs(other[0] - alone[0]) < 1e-4 * abs(alone[0]), (other[0], alone[0])
        for k in alone[2]:
            torch.testing.assert_close(other[2][k], alone[2][k], atol=1e-5, rtol=1e-4)


def test_packed_row_has_no_padding_and_restarts_positions():
    ex = examples(3)
    b = packing.collate(ex)
    lengths = [len(e.input_ids) for e in ex]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert b["input_ids"].shape == (1, sum(lengths))
    assert b["documents"].cu_seqlens.tolist() == starts + [sum(lengths)]
    assert b["documents"].cu_seqlens.dtype == torch.int32  # what flash attention's kernel reads
    assert b["positions"][0].tolist() == [p for n in lengths for p in range(n)]
    assert all(b["labels"][0, s] == D.IGNORE for s in starts)


def test_a_row_for_cuda_graphs_pads_with_an_example_of_its_own():
    ex = examples(3)
    n = sum(len(e.input_ids) for e in ex)
    b = packing.collate(ex, pad_id=7, pad_to=bucket_length)
    T = bucket_length(n)
    assert b["input_ids"].shape == (1, T) and (b["input_ids"][0, n:] == 7).all()
    assert (b["labels"][0, n:] == D.IGNORE).all()
    cu = b["documents"].cu_seqlens.tolist()
    assert len(cu) == packing.MIN_SLOTS + 1  # 3 examples and the padding, in 8 slots: one shape for up to 8
    assert cu[:5] == [0] + [sum(len(e.input_ids) for e in ex[:i + 1]) for i in range(3)] + [T] and set(cu[5:]) == {T}
    many = packing.collate(examples(11), pad_to=bucket_length)
    assert len(many["documents"].cu_seqlens) == 16 + 1
    # a lone row is padded to the next of the rows' lengths: multiples of capacity/8 (rounded up to 64 tokens)
    assert packing.row_lengths(4096) == [512, 1024, 1536, 2048, 2560, 3072, 3584, 4096]
    assert packing.row_lengths(1000) == [128, 256, 384, 512, 640, 768, 896, 1000]
    assert [packing.row_length(n, 4096) for n in (1, 512, 513, 3585, 4096, 5000)] == [512, 512, 1024, 4096, 4096, 5000]


def test_label_count_on_the_host_equals_the_batches_counts():
    """data.label_count (the trainer's N, counted from the examples' lists) against the label tokens of the
    batches the step trains on: padded rows, a padding-free row, and one padded for CUDA graphs."""
    from minilora.train import label_tokens

    ex = examples(6, seed=2)
    ex[0] = D.Example(ex[0].input_ids, [D.IGNORE] * len(ex[0].input_ids))  # an example with no label at all
    want = D.label_count(ex)
    assert want == label_tokens([D.collate(ex, 0)]) == label_tokens([D.collate(ex[:2], 0), D.collate(ex[2:], 0)])
    assert want == label_tokens([packing.collate(ex)]) == label_tokens([packing.collate(ex, pad_to=bucket_length)])


def test_deal_fills_rows_longest_first_within_the_capacity():
    ex = examples(12, seed=1)
    rows = packing.deal(ex, capacity=60)
    assert sorted(id(e) for r in rows for e in r) == sorted(id(e) for e in ex)  # each example once
    assert all(sum(len(e.input_ids) for e in r) <= 60 for r in rows)
    total = sum(len(e.input_ids) for e in ex)
    assert len(rows) <= -(-total // 60) + 1  # first-fit decreasing: at most one row more than the tokens need
    assert packing.deal(ex, capacity=10_000) == [sorted(ex, key=lambda e: -len(e.input_ids))]


def _partitions(items):
    """Every way to split `items` into groups (the reference search: all of them)."""
    if not items:
        yield []
        return
    for rest in _partitions(items[1:]):
        for i in range(len(rest)):
            yield rest[:i] + [[items[0]] + rest[i]] + rest[i + 1:]
        yield [[items[0]]] + rest


def _uneven(n, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return [D.Example([1] * k, [1] * k) for k in torch.randint(low, high, (n,), generator=g).tolist()]


@pytest.mark.parametrize("seed", range(6))
def test_deal_to_lengths_finds_the_cheapest_rows(seed):
    """deal_to_lengths against every partition of the step's examples (up to one row more than the tokens need),
    each group padded to the shortest of the lengths that holds it: its rows cost least (their tokens, and ROW_TOKENS
    a row); each example once; each row within one of the lengths."""
    ladder = packing.row_lengths(4096)
    lengths = ladder if seed % 2 else sorted({*ladder[seed::3], 4096})  # the whole ladder, or a run's few
    ex = _uneven(7, 300, 1561, seed)

    def padded(groups):  # None where a group fits no length
        sums = [sum(len(e.input_ids) for e in grp) for grp in groups]
        return None if max(sums) > 4096 else sum(min(t for t in lengths if t >= n) + packing.ROW_TOKENS for n in sums)

    fewest = -(-sum(len(e.input_ids) for e in ex) // 4096)
    want = min(c for p in _partitions(ex) if len(p) <= fewest + 1 and (c := padded(p)))
    rows = packing.deal_to_lengths(ex, lengths)
    assert packing.rows_cost(rows) == sum(length + packing.ROW_TOKENS for _, length in rows) == want
    assert sorted(id(e) for r, _ in rows for e in r) == sorted(id(e) for e in ex)
    assert all(sum(len(e.input_ids) for e in r) <= length and length in lengths for r, length in rows)


def test_deal_to_lengths_of_a_step_too_large_to_search_takes_first_fit_rows():
    """Past 100 examples, or more rows than SEARCH_LIMIT choices of lengths allow, the rows are first-fit's: each
    example once, each row within the shortest length that holds it."""
    for seed, (n, low, high) in enumerate(((150, 10, 60), (40, 900, 1100))):
        ex = _uneven(n, low, high, seed)
        rows = packing.deal_to_lengths(ex, packing.row_lengths(4096))
        assert sorted(id(e) for r, _ in rows for e in r) == sorted(id(e) for e in ex)
        assert [length for _, length in rows] == [packing.row_length(sum(len(e.input_ids) for e in r), 4096)
                                                  for r in packing.deal(ex, 4096)]


def test_plan_lengths_weighs_padding_against_recordings():
    """plan_lengths against every set of the ladder's lengths (the reference: all 255, each costed as the plan
    costs it, the steps' rows plus RECORDING_TOKENS for each length): within 1% of the cheapest, on a short run and
    a long one; a long run affords more lengths than a short one; the longest length holds the longest
    example; and a length kept only where a run uses it enough to repay its recording."""
    ladder = packing.row_lengths(4096)
    steps = [_uneven(8, 300, 1561, seed) for seed in range(6)]
    longest = max(len(e.input_ids) for step in steps for e in step)

    def cost(lengths, run_steps):
        rows = sum(packing.rows_cost(packing.deal_to_lengths(step, lengths)) for step in steps)
        return rows * run_steps / len(steps) + packing.RECORDING_TOKENS * len(lengths)

    plans = {}
    for run_steps in (6, 600):
        plans[run_steps] = plan = packing.plan_lengths(steps, 4096, longest, run_steps)
        sets = [list(c) for k in range(1, 9) for c in itertools.combinations(ladder, k) if c[-1] >= longest]
        assert cost(plan, run_steps) <= 1.01 * min(cost(c, run_steps) for c in sets)
        assert plan == sorted(set(plan)) and set(plan) <= set(ladder) and plan[-1] >= longest
    assert len(plans[600]) > len(plans[6])
    alike = [[D.Example([1] * 1300, [1] * 1300) for _ in range(8)]] * 4  # rows of 3 x 1,300, 3 x 1,300, 2 x 1,300
    assert packing.plan_lengths(alike, 4096, 1300, 4) == [4096]  # the last row's 1,024 tokens saved 4 times: no
    assert packing.plan_lengths(alike, 4096, 1300, 30) == [3072, 4096]  # 30 times: they repay a recording


def test_rows_dealt_for_cuda_graphs_train_as_the_padded_batches(tmp_path):
    """A step's examples as the trainer deals them under CUDA graphs (speed.Speed.make_batches: rows of a few
    lengths, padded with an example of their own) give the padded micro-batches' loss, label count and gradients.
    (On the CPU: attention one example at a time; the GPU's kernel is tests/test_graphs.py's.)"""
    from minilora import speed
    from minilora.train import TrainConfig

    tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=2)
    model = trainable_nf4_model(tmp_path / "m")
    ex = examples(8, seed=3)
    fast = speed.configure(TrainConfig(batch_size=2, max_seq_len=256, padding_free="on"), "cpu")
    fast.graphs = True  # as on a GPU, where configure takes them
    fast.plan_rows(lambda i: ex, 1, max(len(e.input_ids) for e in ex))  # the run's lengths, as the trainer plans
    batches = fast.make_batches([ex[i:i + 2] for i in range(0, 8, 2)], 0)
    lengths = [b["input_ids"].shape[1] for b in batches]
    assert len(batches) < 4 and set(lengths) <= set(fast.row_plan) <= set(packing.row_lengths(512))
    padded = loss_and_grads(model, [make_batch(ex[i:i + 2], 0, "cpu") for i in range(0, 8, 2)])
    dealt = loss_and_grads(model, batches)
    assert dealt[1] == padded[1]
    assert abs(dealt[0] - padded[0]) < 1e-4 * abs(padded[0])
    for k in padded[2]:
        torch.testing.assert_close(dealt[2][k], padded[2][k], atol=1e-5, rtol=1e-4)


def test_padding_free_training_follows_the_padded_run(tmp_path):
    padded, free = tmp_path / "padded", tmp_path / "free"
    r = run_train(tiny_run_args(tmp_path, padded, dropout=0.0))
    assert r.returncode == 0, r.stderr
    r = run_train(tiny_run_args(tmp_path, free, dropout=0.0) + ["--padding-free"])  # 2 micro-batches: 1 row
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


def test_the_row_plan_sees_the_steps_the_run_trains(tmp_path, monkeypatch):
    """The trainer plans its rows (speed.Speed.plan_rows, under CUDA graphs) from the steps to come: what it hands the
    plan as step i is what step i trains on, across an epoch's end, and the longest example is the data's. (The plan
    runs only under CUDA graphs; here the trainer's side of it is recorded on the CPU.)"""
    from minilora import speed
    from minilora import train as T
    from test_train import tiny_run_args

    planned, trained, make_batches = {}, [], speed.Speed.make_batches

    def plan_rows(self, step_examples, steps, longest):
        planned.update(steps=steps, longest=longest, each=[[e.input_ids for e in step_examples(i)]
                                                           for i in range(steps)])

    def recorded_make_batches(self, micro_batches, pad_id):
        trained.append([e.input_ids for mb in micro_batches for e in mb])
        return make_batches(self, micro_batches, pad_id)

    monkeypatch.setattr(speed.Speed, "plan_rows", plan_rows)
    monkeypatch.setattr(speed.Speed, "make_batches", recorded_make_batches)
    T.train(T.parse_config(tiny_run_args(tmp_path, tmp_path / "out", max_steps=12, dropout=0.0)))  # 9 steps an epoch
    assert planned["steps"] == len(trained) == 12 and planned["each"] == trained
    assert planned["longest"] == max(len(ids) for step in trained[:9] for ids in step)  # an epoch: every example
