"""Lean mode against its plain reference: offloaded checkpointing and the host embedding table
give the same loss and LoRA gradients as torch.utils.checkpoint with the embedding in place.

On the CPU the copies are plain copies, so this checks the recompute logic (RNG replay for
dropout, gradient flow through a frozen first input, prefetch bookkeeping); the GPU run of
the same code path is recorded in bench/."""
import pytest
import torch

from conftest import attach_speed, tiny_hf_model
from minilora import data as D
from minilora.checkpoint import load_model
from minilora.lora import apply_lora
from minilora.speed import make_batch
from minilora.speed.offload import HostEmbedding, host_embedding, pinned_empty
from minilora.train import train_step


def grads(folder, offload: bool, steps=2, device="cpu", dropout=0.2, lengths=(17, 17), host_rows=False):
    """Losses and LoRA gradients of `steps` steps, each of one micro-batch (3, lengths[step]). host_rows: the
    batch brings its embedding rows, looked up on the host (speed.make_batch's `host_embedding`)."""
    torch.manual_seed(0)
    model = load_model(folder, device=device, quantize="nf4", progress=False)
    apply_lora(model, r=4, alpha=8, dropout=dropout)  # dropout: the recompute must replay the same masks
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    attach_speed(model, device, gradient_checkpointing=True, compile="off", offload=offload)
    g = torch.Generator().manual_seed(1)
    out = []
    for step in range(steps):  # a second step checks the buffers are reused correctly
        ids = torch.randint(3, 128, (3, lengths[step]), generator=g)
        batch = {"input_ids": ids.to(device), "labels": ids.to(device)}
        if host_rows:
            batch = make_batch([D.Example(r.tolist(), r.tolist()) for r in ids], 0, device,
                               host_embedding=host_embedding(model))
            assert torch.equal(batch["inputs_embeds"].cpu(), model.model.embed_tokens.weight[ids])
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        loss, _ = train_step(model, [batch], torch.autocast("cpu", enabled=False))
        out.append((float(loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return model, out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_offloaded_checkpoint_equals_plain_checkpoint(tmp_path, device):
    """On the GPU the copies are real: page-locked buffers, a side stream, prefetch one layer ahead."""
    tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=3)
    model, lean = grads(tmp_path / "m", offload=True, device=device)
    assert isinstance(model.model.embed_tokens, HostEmbedding)
    assert model.model.call_layer.offloader.slots == []  # every offloaded input was taken back
    _, plain = grads(tmp_path / "m", offload=False, device=device)
    for (la, ga), (lb, gb) in zip(lean, plain):
        assert abs(la - lb) < 1e-6
        assert ga.keys() == gb.keys() and len(ga) == 3 * 7 * 2
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-5)


def _assert_same(a, b):
    for (la, ga), (lb, gb) in zip(a, b):
        assert abs(la - lb) < 1e-6
        assert ga.keys() == gb.keys()
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-5)


def test_offload_without_dropout_and_with_host_rows(tmp_path):
    """No dropout: the recompute saves no RNG state (the path CUDA graphs take). Rows looked up by make_batch:
    the same losses and gradients as the lookup inside the model. Lengths 17, 9, 21: the host buffers grow
    only for the longest, one per layer, and the shorter batch reuses them."""
    tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=3)
    lengths = (17, 9, 21)
    model, lean = grads(tmp_path / "m", offload=True, steps=3, dropout=0.0, lengths=lengths, host_rows=True)
    offloader = model.model.call_layer.offloader
    assert [a.numel() for a in offloader.arenas] == [3 * 21 * 64] * 3 and len(offloader.outgrown) == 3
    _, plain = grads(tmp_path / "m", offload=False, steps=3, dropout=0.0, lengths=lengths)
    _assert_same(lean, plain)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_host_buffers_are_exact_and_page_locked():
    """Registered with CUDA itself (unregistering succeeds only for registered memory), at the tensor's size."""
    host = pinned_empty((3, 1000, 7), torch.bfloat16)
    assert host.is_pinned() and host.untyped_storage().nbytes() == 3 * 1000 * 7 * 2
    cudart = torch.cuda.cudart()
    torch.cuda.check_error(cudart.cudaHostUnregister(host.data_ptr()))
    torch.cuda.check_error(cudart.cudaHostRegister(host.data_ptr(), 3 * 1000 * 7 * 2, 0))
    x = torch.randn(3, 1000, 7, device="cuda", dtype=torch.bfloat16)
    host.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host.to("cuda", non_blocking=True), x)
