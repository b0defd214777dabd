"""Lean mode against its plain reference: offloaded checkpointing and the host embedding table
give the same loss and LoRA gradients as torch.utils.checkpoint with the embedding in place.

On the CPU the copies are plain copies, so this checks the recompute logic (RNG replay for
dropout, gradient flow through a frozen first input, prefetch bookkeeping); the GPU run of
the same code path is recorded in bench/."""
import pytest
import torch

from conftest import tiny_hf_model
from minilora import data as D
from minilora.checkpoint import load_model
from minilora.lora import apply_lora
from minilora.offload import HostEmbedding, pinned_empty
from minilora.step import setup_for_training, train_step


def grads(folder, offload: bool, steps=2, device="cpu"):
    torch.manual_seed(0)
    model = load_model(folder, device=device, quantize="nf4", progress=False)
    apply_lora(model, r=4, alpha=8, dropout=0.2)  # dropout: the recompute must replay the same masks
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    setup_for_training(model, gradient_checkpointing=True, compile="off", device=device, offload=offload)
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):  # a second step checks the buffers are reused correctly
        ids = torch.randint(3, 128, (3, 17), generator=g).to(device)
        torch.manual_seed(123)
        model.zero_grad(set_to_none=True)
        loss, _ = train_step(model, [{"input_ids": ids, "labels": ids}], torch.autocast("cpu", enabled=False))
        out.append((loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    return model, out


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_offloaded_checkpoint_equals_plain_checkpoint(tmp_path, device):
    """On the GPU the copies are real: page-locked buffers, a side stream, prefetch one layer ahead."""
    tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=3)
    model, lean = grads(tmp_path / "m", offload=True, device=device)
    assert isinstance(model.model.embed_tokens, HostEmbedding)
    assert model.model.offloader.slots == []  # every offloaded input was taken back
    _, plain = grads(tmp_path / "m", offload=False, device=device)
    for (la, ga), (lb, gb) in zip(lean, plain):
        assert abs(la - lb) < 1e-6
        assert ga.keys() == gb.keys() and len(ga) == 3 * 7 * 2
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_pinned_host_buffers_are_exact_and_page_locked():
    """Exactly the bytes asked for (torch's pinned allocator would round 3 x 1000 x 7 x 2 up to 64 KiB)."""
    host = pinned_empty((3, 1000, 7), torch.bfloat16)
    assert host.is_pinned() and host.untyped_storage().nbytes() == 3 * 1000 * 7 * 2
    x = torch.randn(3, 1000, 7, device="cuda", dtype=torch.bfloat16)
    host.copy_(x, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host.to("cuda", non_blocking=True), x)
