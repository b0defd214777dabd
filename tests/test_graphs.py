"""CUDA graphs (speed/graphs.py) and what they need: the loss at every position, lengths padded to a multiple.

References: torch's cross-entropy over full logits (the every-position loss, on the CPU), and
minilora's eager step, whose own correctness test_train.py checks against torch (the graphed
step on a GPU: the same model, the same batches, replayed instead of run).
"""
import pytest
import torch

from conftest import tiny_hf_model
from minilora import data as D
from minilora.loss import causal_lm_loss, reference_loss
from test_train import lora_model, uneven_batch


def test_every_position_loss_equals_cross_entropy(tmp_path):
    """No gathering of labelled rows, pads to a multiple of 16: the same sum and gradients as torch's CE."""
    tiny_hf_model(tmp_path / "m", "qwen2")
    model = lora_model(tmp_path / "m")
    b = D.collate(uneven_batch(), pad_id=0, pad_to=lambda t: -(-t // 16) * 16)
    assert b["input_ids"].shape[1] == 32  # longest example 26 -> 32
    h = model.model(b["input_ids"])
    ours, n = causal_lm_loss(h, model.lm_head.weight, b["labels"], rows=7, every_position=True)
    ref, _ = reference_loss(model.lm_head(h), b["labels"])
    assert n is None
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    params = [p for p in model.parameters() if p.requires_grad]
    g_ours = torch.autograd.grad(ours, params, retain_graph=True)
    g_ref = torch.autograd.grad(ref, params)
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def _lora_model_on_gpu(folder, checkpointing, offload=False, graphs=False):
    """The model, what its optimizer steps, and the speed choices, as the trainer attaches them on a GPU."""
    from minilora import speed
    from minilora.checkpoint import load_model
    from minilora.lora import apply_lora
    from minilora.train import TrainConfig

    model = load_model(folder, device="cuda", dtype=torch.bfloat16, quantize="nf4", progress=False)
    torch.manual_seed(0)
    apply_lora(model, r=16, alpha=16)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would give A no gradient
    fast = speed.configure(TrainConfig(gradient_checkpointing=checkpointing, compile="on", offload=offload,
                                       cuda_graphs="on" if graphs else "off"), "cuda")
    return model, fast.attach(model), fast


def _steps(folder, checkpointing, offload, mbs, pads, graphed, padding_free=False):
    """An optimizer step over the micro-batches `mbs` for each of `pads`, padded by it; losses, gradients, weights.
    padding_free: each step's examples dealt into rows of 64 tokens (speed/padding_free.py) instead."""
    import functools

    from minilora.speed import make_batch, padding_free as pf
    from minilora.train import TrainConfig, make_optimizer, micro_step, train_step

    if padding_free:
        mbs = pf.deal([e for mb in mbs for e in mb], capacity=64)

    torch._dynamo.reset()  # each run compiles for itself: another run's graphs would serve shapes it has not seen
    model, params, fast = _lora_model_on_gpu(folder, checkpointing, offload, graphed)
    opt = make_optimizer(params, TrainConfig(optim="adamw"))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    micro = fast.record(functools.partial(micro_step, model, autocast=autocast, loss=fast.loss), params)
    losses, grads = [], []
    for pad in pads:
        batches = [make_batch(mb, 0, "cuda", padding_free, pad, fast.host_embedding) for mb in mbs]
        loss, _ = train_step(model, batches, autocast, micro=micro)
        losses.append(float(loss))
        grads.append([p.grad.clone() for p in params])
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, grads, [p.detach().clone() for p in params], micro


def _assert_same(eager, graphed):
    (l_eager, g_eager, w_eager, _), (l_graph, g_graph, w_graph, _) = eager, graphed
    for a, b in zip(l_eager, l_graph):
        assert abs(a - b) < 1e-3 * abs(a), (l_eager, l_graph)
    for ga, gb in zip(g_eager, g_graph):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=2e-2)
    for a, b in zip(w_eager, w_graph):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)


def _multiple(m):
    return lambda t: -(-t // m) * m


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["recompute", "no-recompute", "offload"])
def test_graphed_steps_equal_eager_steps(tmp_path, mode):
    """Four optimizer steps of 2 micro-batches, NF4 base, compiled layers, flat optimizer: losses,
    gradients and weights as eager. Steps 1-2 pad both micro-batches to 256: the first runs without a graph
    (the run's warm-up), the second is recorded, the rest replayed. Steps 3-4 pad to multiples of 16, two new
    lengths, each recorded at its first use in step 3 (the compile took every length already, so nothing else
    runs without a graph), the second after the first one's gradients are in the buffers, which the recording
    must leave as they were. offload: the layer inputs' copies to host memory and back are in the recording, the
    embedding rows a static input, and each shape runs once without a graph before its recording (graphs.py)."""
    tiny_hf_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, vocab_size=512)
    ex = uneven_batch(n=8, vocab=512)
    mbs = [[ex[0], ex[7]], [ex[1], ex[2]]]  # longest 26 and 11 tokens
    pads = [_multiple(256)] * 2 + [_multiple(16)] * 2  # steps 3-4: (2, 32) and (2, 16), both new
    runs = [_steps(tmp_path / "m", mode != "no-recompute", mode == "offload", mbs, pads, graphed)
            for graphed in (False, True)]
    assert len(runs[1][3].recorded) == 3 and len(runs[1][3].seen) == (3 if mode == "offload" else 1)
    _assert_same(*runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_recording_that_would_compile_is_put_off(tmp_path):
    """A micro-batch of batch size 1 after the warm-up's 2: the compiled layers took the length, not the batch size,
    as dynamic, so its first-use recording would compile, which the "fail_on_recompile" stance refuses. The
    recording is dropped, the micro-batch runs as it is (and compiles), and its shape is recorded at its second
    use, in step 2. Four steps, losses, gradients and weights as eager."""
    tiny_hf_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, vocab_size=512)
    ex = uneven_batch(n=8, vocab=512)
    mbs, pads = [[ex[0], ex[7]], [ex[1]]], [_multiple(256)] * 4  # shapes (2, 256) and (1, 256)
    runs = [_steps(tmp_path / "m", True, False, mbs, pads, graphed) for graphed in (False, True)]
    assert len(runs[1][3].recorded) == 2 and len(runs[1][3].seen) == 2
    _assert_same(*runs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_graphed_padding_free_rows_equal_eager_padded_steps(tmp_path, mode):
    """The same four steps with each step's 4 examples (50 tokens) dealt into one padding-free row, flash
    attention's variable-length kernel inside. Replayed from graphs, they must equal the same rows run eagerly
    (losses, gradients, weights); and those, the padded eager steps. Steps 1-2 pad the row to 256 tokens, steps
    3-4 to 64: two recordings, the first at the 256-token row's second use (its first was the warm-up), the
    second at the 64-token row's first use."""
    tiny_hf_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, vocab_size=512)
    ex = uneven_batch(n=8, vocab=512)
    mbs, pads, lean = [[ex[0], ex[7]], [ex[1], ex[2]]], [_multiple(256)] * 2 + [_multiple(16)] * 2, mode == "offload"
    padded = _steps(tmp_path / "m", True, lean, mbs, [None] * 4, graphed=False)
    rows = _steps(tmp_path / "m", True, lean, mbs, pads, graphed=False, padding_free=True)
    graphed = _steps(tmp_path / "m", True, lean, mbs, pads, graphed=True, padding_free=True)
    assert len(graphed[3].recorded) == 2 and len(graphed[3].seen) == 1
    _assert_same(rows, graphed)
    # Against the padded steps, another attention kernel rounds bf16 otherwise: on an H200, 3 of 122,880 gradient
    # elements, each near 0, were 1-2e-4 off at atol 1e-4, so step 1's gradients (taken at the same weights) are
    # compared at 5e-4; a leak across examples would move the losses and every element. Later steps are compared by
    # their losses: AdamW moves a near-0 gradient's element by ~lr whichever way its rounding points.
    for a, b in zip(padded[0], rows[0]):
        assert abs(a - b) < 1e-3 * abs(a), (padded[0], rows[0])
    for a, b in zip(padded[1][0], rows[1][0]):
        torch.testing.assert_close(b, a, atol=5e-4, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash attention's variable-length kernel needs a GPU")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_varlen_attention_equals_sdpa_one_example_at_a_time(compiled):
    """Three examples and the empty slots a graph-padded row has: the output and q/k/v gradients of torch's SDPA
    run on each example alone (causal, grouped-query heads), in bf16."""
    from minilora.speed.padding_free import Documents, flash_available

    if not flash_available("cuda"):
        pytest.skip("flash attention needs a GPU of compute capability 8.0 or more")

    g = torch.Generator(device="cuda").manual_seed(0)
    lengths, heads, kv, d = [37, 130, 5], 8, 2, 64
    T = sum(lengths) + 12  # and 12 tokens of padding, an example of its own
    q, k, v = (torch.randn(1, h, T, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (heads, kv, kv))
    bounds = [0, 37, 167, 172, T] + [T] * 4  # 8 slots, the last 4 empty
    docs = Documents(torch.tensor(bounds, dtype=torch.int32, device="cuda"), flash=True)
    attend = torch.compile(docs.attend, dynamic=True) if compiled else docs.attend
    out = attend(q, k, v, True)
    grad = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad)
    ref, parts = [], list(zip(bounds, bounds[1:]))[:4]
    for a, b in parts:
        ref.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b],
                                                                    is_causal=True, enable_gqa=True))
    ref = torch.cat(ref, dim=2)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), grad)
    for ours, theirs in ((out, ref), (dq, rq), (dk, rk), (dv, rv)):
        torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graphed_steps_with_the_mlp_in_pieces(tmp_path, monkeypatch):
    """Sequences longer than PIECES_AFTER run the MLP in checkpointed pieces; those must record too."""
    import minilora.speed.mlp as M

    monkeypatch.setattr(M, "PIECES_AFTER", 16)
    tiny_hf_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, vocab_size=512)
    ex = uneven_batch(n=8, vocab=512)
    mbs = [[ex[6], ex[7]]]  # 23 and 26 tokens, padded to 32: the MLP in four pieces of 8
    pads = [_multiple(32)] * 3
    runs = [_steps(tmp_path / "m", True, False, mbs, pads, graphed) for graphed in (False, True)]
    assert len(runs[1][3].recorded) == 1
    _assert_same(*runs)


def test_bucket_lengths():
    """8 padded lengths up to 2048, then 8 per doubling, never more than 12.5% padding past 2048."""
    from minilora.speed.graphs import bucket_length

    assert sorted({bucket_length(t) for t in range(1, 2049)}) == list(range(256, 2049, 256))
    assert len({bucket_length(t) for t in range(2049, 4097)}) == 8
    for t in range(2049, 300_000, 997):
        assert t <= bucket_length(t) <= t * 1.125
