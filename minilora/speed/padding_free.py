"""Padding-free batches: a micro-batch's examples end to end in one row, with no pad tokens.

Padding a micro-batch to its longest example spends the linear layers' FLOPs (nearly all of
a step's) on pad tokens; for lengths spread evenly up to L, about half of them. Here the B
examples become one row of sum(len) tokens instead of B x max(len), and three things keep each
example to itself, so the loss and its gradient are exactly the padded batch's:

- positions restart at 0 at each example, so RoPE turns every token by the same angle;
- attention is causal inside each example and blind across examples (a block-diagonal causal
  mask). It is computed one example at a time with SDPA's causal kernel, so no T x T mask is
  ever built and flash attention still applies on the GPU;
- the label of each example's first token is IGNORE, so the last token of one example is not
  trained to predict the first token of the next (in a padded batch the shift drops that
  label the same way), and the label-token count N is unchanged.

This is trl's `padding_free=True`: the same examples per micro-batch, only the padding gone.
(Packing several examples into rows of a fixed token budget would change how many examples
each step sees, and so the training itself; that is not done here.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..loss import IGNORE


@dataclass(frozen=True)
class Documents:
    """The example lengths of a packed row; passed to the model in place of an attention mask."""

    lengths: tuple[int, ...]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Block-diagonal causal attention over (1, heads, T, head_dim) tensors, one example at a time."""
        return _attend(q, k, v, self.lengths, gqa)


@torch.compiler.disable  # lengths change every step: compiled, each new list would be a recompile
def _attend(q, k, v, lengths, gqa):
    parts = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
    return torch.cat([F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
                      for qi, ki, vi in parts], dim=2)


def collate(examples) -> dict:
    """One row of all the examples' tokens: input_ids, labels, positions (1, T) and the Documents."""
    ids = torch.tensor([t for e in examples for t in e.input_ids]).unsqueeze(0)
    labels, positions = [], []
    for e in examples:
        labels += [IGNORE] + list(e.labels[1:])  # the first token predicts nothing across the boundary
        positions += range(len(e.input_ids))
    return {"input_ids": ids, "labels": torch.tensor(labels).unsqueeze(0),
            "positions": torch.tensor(positions).unsqueeze(0),
            "documents": Documents(tuple(len(e.input_ids) for e in examples))}
