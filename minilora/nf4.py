"""NF4 (4-bit NormalFloat) linear layers, stored by bitsandbytes.

QLoRA (Dettmers et al., 2023) keeps the frozen base weights in 4 bits:
- each block of 64 weights is scaled by its absmax into [-1, 1] and snapped to
  the nearest of 16 NF4 levels (quantiles of a normal distribution, since
  weights are roughly normal), two codes to a byte;
- "double quantization" stores the fp32 absmax of each block in 8 bits too,
  in blocks of 256, saving ~0.37 bits per weight;
- every matmul dequantizes to the compute dtype (bf16) and runs a normal GEMM,
  so the 4 bits save memory, not FLOPs.

Storage: 4 bits * N + 8 bits * N/64 + 32 bits * N/(64*256) ~ 4.13 bits/weight,
against 16 for bf16. bitsandbytes does the packing, here as on the GPU (since
0.49 its NF4 kernels also run on the CPU, so the tests exercise this real path).
A faster dequantization can be installed from outside (`faster_dequantize`:
speed/nf4_triton.py puts its one-kernel version there on a GPU).
"""
from __future__ import annotations

import torch

from . import compile_at_first_call

with compile_at_first_call():  # bitsandbytes compiles some functions as it is imported: see there
    import bitsandbytes as bnb
import bitsandbytes.functional as bnbF
import torch.nn as nn
import torch.nn.functional as F

BLOCKSIZE = 64  # weights per absmax block, as in the QLoRA paper and bitsandbytes' default


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in 4 bits.

    `weight` holds the packed codes (uint8, two per byte) as a buffer, so it
    never becomes a trainable parameter; `quant_state` holds the absmax
    statistics and the 16-entry code book. Forward: y = x @ dequant(W).T + b.
    """

    def __init__(self, in_features: int, out_features: int, weight: torch.Tensor, quant_state, bias, compute_dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", weight)
        self.quant_state = quant_state
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)

    @classmethod
    def from_weight(cls, w: torch.Tensor, bias=None, *, quant_type="nf4", double_quant=True, compute_dtype=torch.bfloat16):
        """Quantize a dense (out, in) weight on its current device; the dense copy can then be freed."""
        packed, state = bnbF.quantize_4bit(
            w.to(compute_dtype), blocksize=BLOCKSIZE, compress_statistics=double_quant, quant_type=quant_type
        )
        return cls(w.shape[1], w.shape[0], packed, state, bias, compute_dtype)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) weight in compute dtype, as the matmul sees it."""
        return dequantize(self.weight, self.quant_state, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            return NF4Matmul.apply(x, self.weight, self.bias, self.quant_state)
        # No gradient: bitsandbytes' own path (a fused 4-bit GEMV when decoding one token at a time).
        return bnb.matmul_4bit(x, self.weight.t(), self.quant_state, bias=self.bias)

    def _apply(self, fn, recurse=True):
        # `.to(device)` moves the buffers; the statistics live outside the tensor tree.
        super()._apply(fn, recurse)
        if self.quant_state is not None and self.quant_state.absmax.device != self.weight.device:
            self.quant_state.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        qs = self.quant_state
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={qs.quant_type}, double_quant={qs.nested}, compute_dtype={self.compute_dtype}"
        )


class NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W).T + b, re-dequantizing W in backward instead of saving it.

    Saving the dense bf16 weight for backward would keep a 16-bit copy of every
    layer alive until backward reaches it, undoing the 4-bit storage. Instead,
    backward dequantizes again (a memory-bound pass over 4.13 bits/weight, far
    cheaper than the matmul) and computes dL/dx = dL/dy @ W. W is frozen, so there
    is no dL/dW. bitsandbytes' `matmul_4bit` does the same; this version calls
    bitsandbytes' registered torch ops only, so `torch.compile` can trace it.
    """

    @staticmethod
    def forward(ctx, x, packed, bias, quant_state):
        ctx.quant_state = quant_state
        ctx.save_for_backward(packed)
        return F.linear(x, dequantize(packed, quant_state, x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        return grad_y @ dequantize(packed, ctx.quant_state, grad_y.dtype), None, None, None


# (packed codes, quant_state, dtype) -> the weight, or None where it does not apply. None: bitsandbytes' alone.
faster_dequantize = None


def dequantize(packed: torch.Tensor, qs, dtype: torch.dtype) -> torch.Tensor:
    """The (out, in) weight in `dtype`: the installed faster kernel where it applies, else bitsandbytes'."""
    if faster_dequantize is not None:
        w = faster_dequantize(packed, qs, dtype)
        if w is not None:
            return w
    return bnbF.dequantize_4bit(packed, qs).to(dtype)
