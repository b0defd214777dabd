"""torch.compile: each decoder layer, compiled once for every sequence length; the loss's chunks.

Compiling each decoder layer (not the whole model) keeps compile time to one layer's graph, which every
layer then reuses (their parameters are the graph's inputs, not constants), and fuses the elementwise work
between the matmuls (norms, RoPE, SwiGLU). Left to itself, torch.compile specialises the first graph to the
first batch's length and compiles again, with the length symbolic, at the second length; and the first
layer, whose input (the frozen embedding's output) needs no gradient, gets a graph of its own each time. So
a fine-tune on uneven data paid four compiles before its steps ran at speed, each 2-13 s on a fresh machine
(bench/NOTES.md, section 14). `DynamicLength`, put around the decoder's `call_layer`, marks the sequence
dimension of the layer's inputs dynamic from the first call, and in training makes the first layer's input
require a gradient, as every other layer's does: one compile in all, whatever lengths follow
(tests/test_model.py counts them; under --offload the forward runs without gradients and the recompute with
them, two graphs as before). The price is the first layer's input gradient, which nothing uses: its q/k/v
input gradients and its input norm's backward (the MLP's input gradient is needed anyway, for the attention's
LoRA). Measured on the 1.5B job (bench/NOTES.md, section 14): 9 s less before the first step on a fresh
machine, 2 s less with warm caches, and 1-3% fewer examples/s, more than those few matmuls should cost.

The loss's chunk function (loss.py) is compiled on its own: two kernels instead of ~8 per chunk, its row count
dynamic from the first compile too, so that the last chunk's other row count costs no second compile.
A new length then compiles nothing, which lets a CUDA graph be recorded at a shape's first use (graphs.py).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..loss import chunk_loss_and_grad


class DynamicLength:
    """DecoderModel.call_layer around compiled layers: `inner(layer, x, cos, sin, ...)` with the sequence
    dimension of x (B, T, H) and of cos/sin (B, 1, T, d) marked dynamic for torch.compile."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *args):
        if layer.training and torch.is_grad_enabled() and not x.requires_grad:
            x = x.detach().requires_grad_()  # the first layer: the same graph as the others (above)
        for t, dim in ((x, 1), (cos, 2), (sin, 2)):
            torch._dynamo.maybe_mark_dynamic(t, dim)
        if args and hasattr(args[0], "cu_seqlens"):  # a padding-free row's example bounds: a few sizes, one graph
            torch._dynamo.maybe_mark_dynamic(args[0].cu_seqlens, 0)
        return self.inner(layer, x, cos, sin, *args)


def compile_layers(model) -> None:
    """Compile every decoder layer, lengths dynamic (above)."""
    for layer in model.model.layers:
        layer.compile()
    model.model.call_layer = DynamicLength(model.model.call_layer)


@functools.cache
def compiled_chunk():
    """loss.chunk_loss_and_grad through torch.compile, made once for the process; one graph for every row count."""
    compiled = torch.compile(chunk_loss_and_grad)

    def chunk(logits, y, keep, need_grad):
        for t in (logits, y, keep):
            torch._dynamo.maybe_mark_dynamic(t, 0)
        return compiled(logits, y, keep, need_grad)
    return chunk
