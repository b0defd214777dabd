"""NF4 against bitsandbytes, LoRA against its definition and against peft.

Tolerances: fp32 on the CPU, so 1e-5-level agreement; where a matmul order
differs (dequantize-then-matmul vs bnb's fused path) we allow 1e-4.
"""
import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import pytest
import torch

from conftest import tiny_hf_model
from minilora.checkpoint import load_model
from minilora.lora import LoRALinear, apply_lora, count_parameters, describe_trainable
from minilora.nf4 import NF4Linear


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("nf4", False), ("fp4", True)])
def test_nf4_linear_matches_bitsandbytes_linear4bit(quant_type, double_quant):
    torch.manual_seed(0)
    w, b, x = torch.randn(96, 128), torch.randn(96), torch.randn(3, 7, 128)
    ours = NF4Linear.from_weight(w, b, quant_type=quant_type, double_quant=double_quant, compute_dtype=torch.float32)
    ref = bnb.nn.Linear4bit(128, 96, bias=True, compute_dtype=torch.float32, quant_type=quant_type,
                            compress_statistics=double_quant)
    ref.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant,
                                   blocksize=64)
    ref.bias = torch.nn.Parameter(b)
    ref = ref.to("cpu")  # Params4bit quantizes on its first .to()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
    # and equals dequantize-then-matmul with bnb's own dequantizer
    dense = bnbF.dequantize_4bit(ref.weight.data, ref.weight.quant_state)
    torch.testing.assert_close(ours(x), x @ dense.T + b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.dequantize(), dense, atol=0, rtol=0)
    # backward: our re-dequantizing autograd function gives bnb's input gradient
    xa, xb, g = x.clone().requires_grad_(), x.clone().requires_grad_(), torch.randn(3, 7, 96)
    ours(xa).backward(g)
    ref(xb).backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-4, rtol=1e-4)


NF4_KERNEL_CHECK = """
import torch, bitsandbytes.functional as bnbF
from minilora.speed import nf4_triton
from minilora.nf4 import NF4Linear
torch.manual_seed(0)
# 320 x 640: 3,200 blocks of 64, so the last of the 13 groups of 256 scales is partly filled; and a
# size that is not a multiple of the kernel's 2,048 weights per program
for rows, cols, dtype in [(320, 640, torch.float32), (96, 192, torch.bfloat16), (7, 64, torch.float32)]:
    w = torch.randn(rows, cols) * torch.logspace(-3, 1, cols)  # scales that differ from block to block
    qs_layer = NF4Linear.from_weight(w, compute_dtype=dtype)
    qs = qs_layer.quant_state
    ref = bnbF.dequantize_4bit(qs_layer.weight, qs).to(dtype)
    got = nf4_triton.launch(qs_layer.weight, qs.code, qs.absmax, qs.state2.code, qs.state2.absmax,
                            qs.offset.reshape(1), rows, cols, dtype)
    if dtype == torch.float32:
        assert torch.equal(got, ref), (rows, cols, (got - ref).abs().max())
        extra = torch.randn(rows, 8)  # columns after each row (lora_mlp.py): the weight is written rows 8 apart
        wide = nf4_triton.launch(qs_layer.weight, qs.code, qs.absmax, qs.state2.code, qs.state2.absmax,
                                 qs.offset.reshape(1), rows, cols, dtype, extra)
        assert torch.equal(wide[:, :cols], ref) and torch.equal(wide[:, cols:], extra)
    else:  # the interpreter's fp32 -> bf16 conversion truncates: one bf16 step (2^-8..2^-7 relative) at most
        torch.testing.assert_close(got, ref, atol=0, rtol=2**-7)
print("ok")
"""


def test_triton_nf4_kernel_equals_bitsandbytes_on_the_cpu_interpreter():
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    # TRITON_INTERPRET must be set before triton compiles anything, so the check runs in a fresh process
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", NF4_KERNEL_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_nf4_kernel_equals_bitsandbytes_on_the_gpu():
    from minilora.speed import nf4_triton

    pytest.importorskip("triton")
    nf4_triton.install()  # nf4.dequantize runs the kernel from now on, as speed.configure makes it on a GPU
    torch.manual_seed(0)
    for rows, cols in [(8960, 1536), (256, 1536), (4096, 14336)]:
        layer = NF4Linear.from_weight(torch.randn(rows, cols, device="cuda"), compute_dtype=torch.bfloat16)
        assert nf4_triton.supports(layer.weight, layer.quant_state)
        ref = bnbF.dequantize_4bit(layer.weight, layer.quant_state).to(torch.bfloat16)
        # the kernel may fuse scale * absmax2 + offset into one rounding (FMA): at most one bf16 step apart
        torch.testing.assert_close(layer.dequantize(), ref, atol=0, rtol=2**-7)
        assert (layer.dequantize() != ref).float().mean() < 1e-3
        extra = torch.randn(rows, 32, device="cuda", dtype=torch.bfloat16)  # lora_mlp.py's [W | B | 0]
        wide = nf4_triton.dequantize(layer.weight, layer.quant_state, torch.bfloat16, extra)
        assert torch.equal(wide[:, :cols], layer.dequantize()) and torch.equal(wide[:, cols:], extra)


def test_qlora_equals_lora_over_dequantized_weight():
    torch.manual_seed(0)
    w, x = torch.randn(64, 96), torch.randn(4, 96, requires_grad=True)
    q = LoRALinear(NF4Linear.from_weight(w, compute_dtype=torch.float32), r=8, alpha=16)
    dense = torch.nn.Linear(96, 64, bias=False)
    dense.weight.data = q.base_layer.dequantize().clone()
    d = LoRALinear(dense, r=8, alpha=16)
    torch.nn.init.normal_(q.lora_B.weight)  # B = 0 would hide the LoRA path
    d.lora_A.weight.data.copy_(q.lora_A.weight)
    d.lora_B.weight.data.copy_(q.lora_B.weight)
    torch.testing.assert_close(q(x), d(x), atol=1e-4, rtol=1e-4)
    # the gradient reaches A and B through the 4-bit base exactly as through the dense one
    q(x).square().sum().backward()
    ga = q.lora_A.weight.grad.clone()
    q.lora_A.weight.grad = None
    d(x).square().sum().backward()
    torch.testing.assert_close(ga, d.lora_A.weight.grad, atol=1e-3, rtol=1e-4)


def test_lora_output_is_base_plus_scaled_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 16)
    for rslora, scale in ((False, 24 / 4), (True, 24 / 2)):
        m = LoRALinear(base, r=4, alpha=24, rslora=rslora)
        torch.nn.init.normal_(m.lora_B.weight)
        x = torch.randn(5, 32)
        want = base(x) + scale * (x @ m.lora_A.weight.T @ m.lora_B.weight.T)
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
        assert m.scale == scale


def test_lora_with_b_zero_equals_base_model(tmp_path):
    tiny_hf_model(tmp_path / "m", "qwen2")
    ids = torch.randint(0, 128, (2, 12))
    for quantize in (None, "nf4"):
        model = load_model(tmp_path / "m", quantize=quantize, progress=False)
        with torch.no_grad():
            before = model(ids)
            apply_lora(model, r=8, alpha=16)
            torch.testing.assert_close(model(ids), before, atol=0, rtol=0)


def test_only_lora_trains_and_counts_match_peft(tmp_path):
    from peft import LoraConfig, get_peft_model

    hf = tiny_hf_model(tmp_path / "m", "llama")
    ours = load_model(tmp_path / "m", quantize=None, progress=False)
    wrapped = apply_lora(ours, r=8, alpha=16, targets=["q_proj", "v_proj", "down_proj"])
    assert len(wrapped) == 6
    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        f"{w}.lora_{ab}.weight" for w in wrapped for ab in "AB"}
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert count_parameters(ours) == (trainable, total)
    assert describe_trainable(ours).startswith(f"trainable params: {trainable:,} || all params: {total:,}")


def test_unknown_target_lists_available(tmp_path):
    tiny_hf_model(tmp_path / "m", "llama")
    model = load_model(tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match=r"\['qkv'\]: not found.*down_proj, gate_proj, k_proj, o_proj, q_proj"):
        apply_lora(model, targets=["q_proj", "qkv"])
    with pytest.raises(ValueError, match=r"\['lm_head'\]: LoRA on lm_head is not supported; LoRA goes on: down_proj"):
        apply_lora(model, targets=["lm_head"])  # a peft adapter may put LoRA there


@pytest.mark.parametrize("r", [0, -4])
def test_bad_rank(tmp_path, r):
    tiny_hf_model(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match="positive"):
        apply_lora(load_model(tmp_path / "m", progress=False), r=r)


@pytest.mark.parametrize("double_quant", [True, False])
def test_folded_gate_up_equals_two_lora_linears(double_quant):
    """speed/mlp.py's gate_up against LoRALinear's y = base(x) + s B A x: outputs, and the gradients of x, A and B."""
    from minilora.speed.mlp import can_fold, gate_up

    torch.manual_seed(0)
    mods = [LoRALinear(NF4Linear.from_weight(torch.randn(96, 64), double_quant=double_quant,
                                             compute_dtype=torch.float32), r=4, alpha=8) for _ in range(2)]
    for m in mods:
        torch.nn.init.normal_(m.lora_B.weight)  # B = 0 would hide the LoRA path
    assert can_fold(*mods)
    x = torch.randn(2, 5, 64)
    g1, g2 = torch.randn(2, 5, 96), torch.randn(2, 5, 96)

    def run(fn):
        xi = x.clone().requires_grad_()
        y_g, y_u = fn(xi)
        ((y_g * g1).sum() + (y_u * g2).sum()).backward()
        grads = [xi.grad] + [p.grad.clone() for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]
        for m in mods:
            m.zero_grad(set_to_none=True)
        return (y_g, y_u), grads

    ref_out, ref_grads = run(lambda xi: (mods[0](xi), mods[1](xi)))
    out, grads = run(lambda xi: gate_up(mods[0], mods[1], xi))
    for got, want in zip(list(out) + grads, list(ref_out) + ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    # two ranks, dropout or a bias: not folded
    assert not can_fold(mods[0], LoRALinear(NF4Linear.from_weight(torch.randn(96, 64)), r=8, alpha=8))
    assert not can_fold(mods[0], LoRALinear(NF4Linear.from_weight(torch.randn(96, 64)), r=4, alpha=8, dropout=0.1))
    assert not can_fold(mods[0], LoRALinear(NF4Linear.from_weight(torch.randn(96, 64), torch.randn(96)), r=4, alpha=8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_folded_gate_up_equals_two_lora_linears_on_the_gpu():
    """The GPU path: bf16, the Triton kernel writing each weight into its wider matrix."""
    from minilora.speed.mlp import gate_up

    torch.manual_seed(0)
    mods = [LoRALinear(NF4Linear.from_weight(torch.randn(1024, 512, device="cuda")), r=16, alpha=16)
            for _ in range(2)]
    for m in mods:
        torch.nn.init.normal_(m.lora_B.weight, std=0.1)
    x = torch.randn(2, 256, 512, device="cuda", dtype=torch.bfloat16)
    outs = []
    for fn in (lambda xi: (mods[0](xi), mods[1](xi)), lambda xi: gate_up(mods[0], mods[1], xi)):
        xi = x.clone().requires_grad_()
        y_g, y_u = fn(xi)
        (y_g.float().square().sum() + y_u.float().sum()).backward()
        outs.append([y_g, y_u, xi.grad] + [p.grad.clone() for m in mods for p in (m.lora_A.weight, m.lora_B.weight)])
        for m in mods:
            m.zero_grad(set_to_none=True)
    for got, want in zip(outs[1], outs[0]):  # bf16 sums in another order: ~0.3% apart (reviewer's H100 run)
        assert (got.float() - want.float()).norm() <= 2e-2 * want.float().norm()


def test_training_mlp_folds_gate_and_up_and_eval_does_not(tmp_path, monkeypatch):
    from minilora.speed import mlp as lora_mlp
    from conftest import trainable_nf4_model

    tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=1)
    model = trainable_nf4_model(tmp_path / "m")
    calls = []
    real = lora_mlp.gate_up
    monkeypatch.setattr(lora_mlp, "gate_up", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        model.model(ids)  # training mode without gradients (an offloaded layer's forward): folded too
    assert len(calls) == 1
    model.eval()
    model.model(ids)
    assert len(calls) == 1
