"""Causal-LM cross-entropy over the label tokens only, without the full logits tensor.

The naive loss builds logits (B, T, V) in fp32: for batch 2 x 2048 and Qwen's
V = 151,936 that is 2.3 GiB, plus as much again for its gradient, the largest
tensors of the whole step. Two observations remove them:

1. Only positions with a label need logits. Prompt-masked SFT data often has
   half its tokens in the prompt, so we first gather the hidden states of the
   labelled positions: h (N, H) with N = number of label tokens.
2. Those N rows are processed in chunks of `chunk` rows; each chunk's logits
   are recomputed in backward (activation checkpointing) instead of stored, so
   peak memory is one chunk of (chunk, V) fp32 logits.

Loss math: the model at position t predicts token t+1, so hidden[:, :-1]
pairs with labels[:, 1:]. We return the SUM of token losses and the token
count; the caller divides once by the count over the whole optimizer step
(see train.py for why per-micro-batch means are wrong).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .data import IGNORE


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.T).float()  # (chunk, V), fp32 for a stable log-softmax
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of label tokens) for hidden (B, T, H) and labels (B, T)."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts t+1
    y = labels[:, 1:].reshape(-1)
    keep = (y != IGNORE).nonzero().squeeze(1)
    h, y = h.index_select(0, keep), y.index_select(0, keep)  # (N, H), (N,)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, y.numel(), chunk):
        hi, yi = h[i: i + chunk], y[i: i + chunk]
        if torch.is_grad_enabled() and hi.requires_grad:
            total = total + checkpoint(_chunk_loss, hi, lm_head_weight, yi, use_reentrant=False)
        else:
            total = total + _chunk_loss(hi, lm_head_weight, yi)
    return total, y.numel()


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain version from full logits, for tests: sum of shifted token losses and count."""
    y = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y,
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((y != IGNORE).sum())
