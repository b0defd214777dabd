"""Gradient checkpointing: recompute each decoder layer in backward instead of keeping its activations.

Backward needs what every op of a layer's forward saw: the norms' inputs, q/k/v, the attention output,
the MLP's four (tokens, intermediate) tensors. Kept for all L layers they are most of a step's memory.
Checkpointing keeps only each layer's input x and runs the layer's forward once more in backward, just
before the layer's own backward: one more forward per step (~1/3 more compute) for one tensor per layer.

`keep` (--keep-activations N) spares the last N layers the recompute: each one kept saves 1/L of the
recompute for one layer's activations of GPU memory.

The model calls each layer through `DecoderModel.call_layer` (model.py); `Recompute` is put there by
speed.configure, so the layers and their math are untouched. With dropout the recompute must draw the same
masks as the forward did, so the RNG state is saved per layer; with nothing random in the layers that is
skipped, which a CUDA graph recording needs (it cannot read the GPU's RNG state; graphs.py).
Reference: tests/test_model.py checks the gradients equal those of the plain model, and which layers run twice.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class Recompute:
    """DecoderModel.call_layer for gradient checkpointing: layer(x, ...) in training, its activations rebuilt in
    backward, except for the layers in `keep`; eval and generation call the layer directly."""

    def __init__(self, keep: set[nn.Module], preserve_rng: bool):
        self.keep, self.preserve_rng = keep, preserve_rng

    def __call__(self, layer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        if not layer.training or layer in self.keep:
            return layer(x, *args)
        return torch.utils.checkpoint.checkpoint(layer, x, *args, use_reentrant=False,
                                                 preserve_rng_state=self.preserve_rng)


def kept_layers(model, keep_activations: int) -> set[nn.Module]:
    """The last `keep_activations` decoder layers: backward reaches them first, so their kept activations are
    freed first too."""
    layers = list(model.model.layers)
    return set(layers[len(layers) - keep_activations:]) if keep_activations else set()


def draws_random_numbers(model) -> bool:
    """Whether any layer has dropout: then each recompute must replay the forward's random masks."""
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def check_keep_activations(keep: int, layers: int, source: str) -> None:
    """--keep-activations must lie in 0..L; train.py calls this with the config.json's L before loading anything."""
    if not 0 <= keep <= layers:
        raise ValueError(f"--keep-activations {keep}: {source} has {layers} decoder layers; "
                         f"choose 0 (recompute every layer) to {layers}.")
