"""LoRA: a trainable low-rank update beside a frozen linear layer.

    y = base(x) + scale * B(A(dropout(x)))      A: (r, in), B: (out, r)
    scale = alpha / r            (Hu et al., 2021)
    scale = alpha / sqrt(r)      (rsLoRA, Kalajdzievski 2023: keeps the update's
                                  size stable as r grows)

A starts Kaiming-uniform and B at zero, so training starts exactly at the base
model. The base may be an `NF4Linear` (QLoRA) or a plain `nn.Linear` (16-bit LoRA).

Names follow PEFT: the wrapped layer is `base_layer`, the factors are
`lora_A` / `lora_B`. So `model.layers.0.self_attn.q_proj.lora_A.weight`,
prefixed with `base_model.model.`, is exactly PEFT's adapter key.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4 import NF4Linear

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.r, self.alpha = r, alpha
        self.scale = alpha / math.sqrt(r) if rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base.weight.device
        # Trainable factors stay fp32 (the optimizer's master copy); autocast runs the matmuls in bf16.
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as nn.Linear and PEFT do
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        # (x @ A.T) @ B.T costs r*(in+out) per token, against in*out for the dense delta.
        # The small fp32 factors are cast to x's dtype, never the (tokens, in) activations to fp32.
        a, b = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
        return y + F.linear(F.linear(self.lora_dropout(x), a), b * self.scale).to(y.dtype)


def apply_lora(model: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
               targets=ALL_TARGETS, paths=None) -> list[str]:
    """Wrap every linear whose last name is in `targets` (e.g. "q_proj") and freeze all else.

    `paths` narrows it to those module paths (an adapter trained on some layers only).
    Returns the wrapped module paths. Unknown target names raise, listing what the model has.
    """
    if r <= 0:
        raise ValueError(f"LoRA rank r must be a positive integer, got r={r}.")
    targets = set(targets)
    linears = {name for name, m in model.named_modules() if isinstance(m, (nn.Linear, NF4Linear))}
    available = sorted({n.rsplit(".", 1)[-1] for n in linears} - {"lm_head"})
    unknown = targets - set(available)
    if unknown:
        unsupported = unknown & {"lm_head", "embed_tokens"}  # in the model, but LoRA here is on projections only
        raise ValueError(f"target module(s) {sorted(unknown)}: " + (
            f"LoRA on {' or '.join(sorted(unsupported))} is not supported" if unsupported else "not found in the model")
            + f"; LoRA goes on: {', '.join(available)}.")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name in sorted(linears):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in targets and (paths is None or name in paths):
            parent = model.get_submodule(parent_name)
            setattr(parent, leaf, LoRALinear(getattr(parent, leaf), r, alpha, dropout, rslora))
            wrapped.append(name)
    return wrapped


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA factors, keyed by their HF module path (`...q_proj.lora_A.weight`)."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total), counting a 4-bit weight as its logical element count, as peft does."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # uint8 parameters are packed 4-bit codes (a Parameter only under --fsdp, a buffer otherwise): counted below
    total = sum(p.numel() for p in model.parameters() if p.dtype != torch.uint8)
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, NF4Linear))
    return trainable, total


def describe_trainable(model: nn.Module) -> str:
    """The line peft's `print_trainable_parameters` prints."""
    t, n = count_parameters(model)
    return f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / n:.4f}"
