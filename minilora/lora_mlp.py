"""The MLP's gate and up projections with their LoRA adapters folded into the base GEMMs (training only).

lora.py computes each adapted projection of the MLP input x (tokens, in) as three matmuls and an add:

    y_g = x @ W_g^T + s (x @ A_g^T) @ B_g^T        y_u = x @ W_u^T + s (x @ A_u^T) @ B_u^T

Each LoRA product is a (tokens, intermediate) tensor that one kernel writes and the add reads back, for a
few FLOPs: at 1.5B (intermediate 8960, 2 x 2048 tokens) 4 x 73 MB of memory traffic per layer, in the
forward and again in the recompute, ~15 GB per step (bench/NOTES.md, section 11). Folded, the products
ride along in the base GEMMs as 2r more columns of their inner dimension:

    xc  = [x | s x A_g^T | s x A_u^T]                       (tokens, in + 2r): one copy of x
    y_g = xc @ [W_g | B_g | 0]^T     y_u = xc @ [W_u | 0 | B_u]^T

the same sums, for 2r/in more GEMM FLOPs (+2% at r = 16, in = 1536). The dequantization writes each
weight straight into its wider matrix (quant.dequantize's `extra` columns). Backward, W frozen:

    dxc = dy_g @ [W_g | B_g | 0] + dy_u @ [W_u | 0 | B_u]    its first `in` columns are the base's dx,
    dxa = s dxc[:, in:]                                      the last 2r the gradient of x [A_g; A_u]^T
    dx  = dxc[:, :in] + dxa @ [A_g; A_u]      dA = dxa^T @ x      dB_g = dy_g^T @ xc[:, in:in+r]  (and B_u)

the weights dequantized again, as quant.py's NF4Matmul does. model.MLP uses this in training mode when both
projections are LoRA over NF4 of one rank and scale, without dropout or bias; otherwise (generation, eval,
FSDP) the projections run as lora.py does. Reference: tests/test_lora.py compares outputs and
gradients with LoRALinear's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .lora import LoRALinear
from .quant import NF4Linear, dequantize


def can_fold(gate: nn.Module, up: nn.Module) -> bool:
    """Whether gate and up are LoRA over bias-free NF4 layers, of one rank and scale, without dropout."""
    return (isinstance(gate, LoRALinear) and isinstance(up, LoRALinear) and gate.r == up.r and gate.scale == up.scale
            and all(isinstance(m.base_layer, NF4Linear) and m.base_layer.bias is None
                    and isinstance(m.lora_dropout, nn.Identity) for m in (gate, up)))


def gate_up(gate: LoRALinear, up: LoRALinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate(x), up(x)), folded as above. The fp32 factors are cast to the compute dtype here, in autograd's
    view, so their gradients come back to them as lora.py's do."""
    g, u = gate.base_layer, up.base_layer
    dtype = g.compute_dtype
    a = torch.cat([gate.lora_A.weight, up.lora_A.weight]).to(dtype)  # (2r, in)
    lead = x.shape[:-1]
    y_g, y_u = FoldedGateUp.apply(x.to(dtype).reshape(-1, x.shape[-1]), a, gate.lora_B.weight.to(dtype),
                                  up.lora_B.weight.to(dtype), g.weight, u.weight, gate.scale, g.quant_state,
                                  u.quant_state)
    return y_g.view(*lead, -1), y_u.view(*lead, -1)


def _widened(packed: torch.Tensor, qs, b: torch.Tensor, first: bool) -> torch.Tensor:
    """[W | B | 0] (first) or [W | 0 | B]: the (out, in + 2r) weight of one projection."""
    zeros = torch.zeros_like(b)
    return dequantize(packed, qs, b.dtype, torch.cat([b, zeros] if first else [zeros, b], dim=1))


class FoldedGateUp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, b_g, b_u, packed_g, packed_u, scale, qs_g, qs_u):
        xc = torch.cat([x, (x @ a.t()) * scale], dim=1)  # [x | s x A_g^T | s x A_u^T]
        ctx.save_for_backward(xc, a, b_g, b_u, packed_g, packed_u)
        ctx.scale, ctx.qs_g, ctx.qs_u = scale, qs_g, qs_u
        return xc @ _widened(packed_g, qs_g, b_g, True).t(), xc @ _widened(packed_u, qs_u, b_u, False).t()

    @staticmethod
    def backward(ctx, dy_g, dy_u):
        xc, a, b_g, b_u, packed_g, packed_u = ctx.saved_tensors
        n, r = a.shape[1], b_g.shape[1]
        dxc = dy_g @ _widened(packed_g, ctx.qs_g, b_g, True)
        dxc = dxc.addmm_(dy_u, _widened(packed_u, ctx.qs_u, b_u, False))
        dxa = dxc[:, n:] * ctx.scale  # (tokens, 2r)
        dx = torch.addmm(dxc[:, :n], dxa, a)
        da = dxa.t() @ xc[:, :n]
        db_g, db_u = dy_g.t() @ xc[:, n:n + r], dy_u.t() @ xc[:, n + r:]
        return dx, da, db_g, db_u, None, None, None, None, None
