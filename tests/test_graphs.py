"""CUDA graphs (graphs.py) and what they need: the loss at every position, lengths padded to a multiple.

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
    b = D.collate(uneven_batch(), pad_id=0, multiple=16)
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("checkpointing", [True, False])
def test_graphed_steps_equal_eager_steps(tmp_path, checkpointing):
    """Three optimizer steps of 2 micro-batches (two shapes, so two recordings, one replayed again),
    NF4 base, compiled layers, flat optimizer: losses, gradients and weights as eager."""
    from minilora.graphs import GraphedMicroBatches
    from minilora.step import flatten_for_optimizer, make_batch, make_optimizer, setup_for_training, train_step
    from minilora.train import TrainConfig

    tiny_hf_model(tmp_path / "m", "llama", hidden_size=256, intermediate_size=512, vocab_size=512)
    ex = uneven_batch(n=8, vocab=512)
    mbs = [[ex[0], ex[7]], [ex[1], ex[2]]]  # longest 26 and 11 tokens: (2, 256) in steps 1-2, (2, 32) in step 3
    runs = []
    for graphed in (False, True):
        from minilora.checkpoint import load_model
        from minilora.lora import apply_lora

        model = load_model(tmp_path / "m", device="cuda", dtype=torch.bfloat16, quantize="nf4", progress=False)
        torch.manual_seed(0)
        apply_lora(model, r=16, alpha=16)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
        setup_for_training(model, gradient_checkpointing=checkpointing, compile="on", device="cuda")
        params = flatten_for_optimizer([p for p in model.parameters() if p.requires_grad])
        opt = make_optimizer(params, TrainConfig(optim="adamw"))
        autocast = torch.autocast("cuda", dtype=torch.bfloat16)
        graphs = GraphedMicroBatches(model, params, autocast) if graphed else None
        losses, grads = [], []
        for step in range(3):
            batches = [make_batch(mb, 0, "cuda", multiple=256 if step < 2 else 32) for mb in mbs]
            loss, _ = train_step(model, batches, autocast, graphs=graphs)
            losses.append(loss)
            grads.append([p.grad.clone() for p in params])
            opt.step()
            opt.zero_grad(set_to_none=True)
        if graphed:
            assert len(graphs.recorded) == 2
        runs.append((losses, grads, [p.detach().clone() for p in params]))
    (l_eager, g_eager, w_eager), (l_graph, g_graph, w_graph) = runs
    for a, b in zip(l_eager, l_graph):
        assert abs(a - b) < 1e-3 * abs(a), (l_eager, l_graph)
    for ga, gb in zip(g_eager, g_graph):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=2e-2)
    for a, b in zip(w_eager, w_graph):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3)
