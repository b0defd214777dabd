"""The MLP as training runs it: speed.configure swaps each layer's model.MLP for a `TrainingMLP` that holds the
same three projections (so every name, and every adapter key, stays the same) and computes the same SwiGLU,
down(silu(gate(x)) * up(x)), two ways faster or leaner.

1. Gate and up with their LoRA adapters folded into the base GEMMs (in training only).
lora.py computes each adapted projection of the MLP input x (tokens, in) as three matmuls and an add:

    y_g = x @ W_g^T + s (x @ A_g^T) @ B_g^T        y_u = x @ W_u^T + s (x @ A_u^T) @ B_u^T

Each LoRA product is a (tokens, intermediate) tensor that one kernel writes and the add reads back, for a
few FLOPs: 4 of them per layer, in the forward and again in the recompute (bench/NOTES.md, section 11, has
the traffic and the measured gain). Folded, the products ride along in the base GEMMs as 2r more columns
of their inner dimension:

    xc  = [x | s x A_g^T | s x A_u^T]                       (tokens, in + 2r): one copy of x
    y_g = xc @ [W_g | B_g | 0]^T     y_u = xc @ [W_u | 0 | B_u]^T

the same sums, for 2r/in more GEMM FLOPs (+2% at r = 16, in = 1536). On a GPU the dequantization writes
each weight straight into its wider matrix (nf4_triton.py's `extra` columns). Backward, W frozen:

    dxc = dy_g @ [W_g | B_g | 0] + dy_u @ [W_u | 0 | B_u]    its first `in` columns are the base's dx,
    dxa = s dxc[:, in:]                                      the last 2r the gradient of x [A_g; A_u]^T
    dx  = dxc[:, :in] + dxa @ [A_g; A_u]      dA = dxa^T @ x      dB_g = dy_g^T @ xc[:, in:in+r]  (and B_u)

the weights dequantized again, as nf4.py's NF4Matmul does. It applies when both projections are LoRA over
NF4 of one rank and scale, without dropout or bias; otherwise (and in eval and generation) the projections
run as lora.py does.

2. Long sequences in pieces. The MLP's intermediates are the largest activations of a layer, four
(tokens, intermediate) tensors: for the 8B model (intermediate 14336) at 350k tokens ~40 GB for ONE
layer, even when the layer itself is recomputed. The MLP acts on each token alone, so past PIECES_AFTER
tokens it runs over the sequence in pieces of half as many. Without gradients (an offloaded layer's
forward) a piece's intermediates are freed before the next; with gradients each piece is checkpointed
(only its input is kept, its intermediates rebuilt in backward one piece at a time). At most one piece's
intermediates exist at once, for one more MLP forward in backward (its cost: bench/NOTES.md).

Neither applies under FSDP (speed/__init__.py's CLASHES says why). Reference: tests/test_lora.py compares the
fold's outputs and gradients with LoRALinear's, tests/test_model.py the pieces with the whole sequence.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import nf4
from ..lora import LoRALinear
from ..nf4 import NF4Linear
from . import nf4_triton

# Sequences longer than this run through the MLP in pieces of half as many positions.
PIECES_AFTER = 32768


class TrainingMLP(nn.Module):
    """model.MLP's projections, computed as above: `fold` the gate/up LoRA into the base GEMMs (training mode
    only), `in_pieces` past PIECES_AFTER tokens. Either way the same function as model.MLP."""

    def __init__(self, mlp: nn.Module, fold: bool, in_pieces: bool):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        # decided by the mode, not by whether gradients flow, so that an offloaded layer's no-grad forward and its
        # recompute compute alike
        self.fold = fold and can_fold(self.gate_proj, self.up_proj)
        self.in_pieces = in_pieces

    def swiglu(self, x):
        if self.fold and self.training:
            gate, up = gate_up(self.gate_proj, self.up_proj, x)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def forward(self, x):
        if self.in_pieces and x.shape[1] > PIECES_AFTER:
            return self.swiglu_in_pieces(x, PIECES_AFTER // 2)
        return self.swiglu(x)

    @torch.compiler.disable  # long sequences only, where compute dwarfs the lost fusion
    def swiglu_in_pieces(self, x, piece: int):
        if not torch.is_grad_enabled():
            return torch.cat([self.swiglu(xi) for xi in x.split(piece, dim=1)], dim=1)
        # swiglu draws no random numbers: no RNG state to save (a CUDA graph recording could not read it)
        return torch.cat([torch.utils.checkpoint.checkpoint(self.swiglu, xi, use_reentrant=False,
                                                            preserve_rng_state=False)
                          for xi in x.split(piece, dim=1)], dim=1)


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
    extra = torch.cat([b, zeros] if first else [zeros, b], dim=1)
    wide = nf4_triton.dequantize(packed, qs, b.dtype, extra)  # the weight written straight into the wide matrix
    return wide if wide is not None else torch.cat([nf4.dequantize(packed, qs, b.dtype), extra], dim=1)


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
