"""Lean memory: checkpointed layer inputs in pinned CPU memory, and the embedding table on the host.

Gradient checkpointing keeps one tensor per decoder layer, its input x (B, T, H),
and recomputes the rest in backward. For the 8B shape at 2 x 2048 tokens that
is 32 layers x 32 MiB = 1 GiB of GPU memory that sits idle until backward.

`OffloadedCheckpoint` moves each x to pinned host memory on a side stream as
soon as the layer has consumed it, and brings it back in backward one layer
ahead of use (layer i-1's input is copied while layer i's backward computes),
so the copies hide behind compute. 32 MiB over PCIe (~25 GB/s) takes ~1.3 ms,
against ~9 ms for a layer's recompute + backward.

The layer is recomputed exactly like torch.utils.checkpoint (recompute.py): with
dropout, the RNG state is saved before forward and restored for the recompute, so
the masks match; without, nothing random runs and no state is saved. `Offload` is
the decoder's `call_layer` (model.py) in this mode, as `Recompute` is otherwise.

`HostEmbedding` keeps the frozen embedding table (1 GiB for a 128k vocabulary
at 4096 wide) on the host: a lookup is a gather of B*T rows, and only those
rows (32 MiB here) cross to the GPU. The trainer looks them up while building
the batch (speed.make_batch), from ids that are still on the host: looking up
GPU ids would make the host wait for the GPU at every micro-batch.

Under a CUDA graph (graphs.py) all of this is recorded once and replayed: the
copies are stream-ordered, each replay writes and reads the same page-locked
buffers in the same order, and the lookup happens outside the recording.

Reference: plain `torch.utils.checkpoint` and `nn.Embedding`; tests/test_offload.py
checks the losses and LoRA gradients are equal.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


def pinned_empty(shape, dtype) -> torch.Tensor:
    """Page-locked host memory of exactly this size.

    torch's own pinned memory (`pin_memory=True`) comes from a caching allocator that rounds each
    request up to a power of two: at 350k tokens an 8B layer input of 2.9 GB takes 4 GiB, and the
    32 layers 128 GiB, more than the benchmark machine's 125 GiB (the 350k probe was killed so).
    cudaHostRegister page-locks an ordinary tensor's memory as it is; it is unlocked when this
    tensor object is collected (the callers keep it for as long as they copy through it).
    """
    t = torch.empty(shape, dtype=dtype)
    if t.numel() == 0:
        return t
    cudart, ptr, size = torch.cuda.cudart(), t.data_ptr(), t.numel() * t.element_size()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(ptr, size, 0))
    except RuntimeError as e:
        raise RuntimeError(f"--offload could not page-lock {size / 2**30:.2f} GiB of host memory ({e}). The "
                           "host may be short of free RAM, or the locked-memory limit (`ulimit -l`) too low; "
                           "use shorter sequences, or train without --offload.") from e
    weakref.finalize(t, cudart.cudaHostUnregister, ptr)
    return t


class HostOffloader:
    """Copies tensors to page-locked host buffers and back, on a side stream.

    Slot i of a micro-batch (the i-th layer's input) always goes to arena i, one flat host buffer
    per slot that grows to the largest input seen, so batches of ever new lengths reuse the same
    memory. An outgrown arena is kept, not freed: a recorded CUDA graph may still copy through it.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.arenas: list[torch.Tensor] = []  # by slot: a flat page-locked buffer
        self.outgrown: list[torch.Tensor] = []
        self.ready: dict[int, torch.Tensor] = {}  # prefetched device copies by slot
        self.slots: list = []  # this step's host copies, in forward order

    def _buffer(self, t: torch.Tensor, slot: int) -> torch.Tensor:
        if slot == len(self.arenas):
            self.arenas.append(torch.empty(0, dtype=t.dtype))
        arena = self.arenas[slot]
        if arena.numel() < t.numel() or arena.dtype != t.dtype:
            if arena.numel():
                self.outgrown.append(arena)
            n = t.numel()
            arena = self.arenas[slot] = pinned_empty((n,), t.dtype) if self.cuda else torch.empty(n, dtype=t.dtype)
        return arena[:t.numel()].view(t.shape)

    def put(self, t: torch.Tensor) -> int:
        """Start copying t to the host; returns its slot number."""
        host = self._buffer(t, len(self.slots))
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # t is fully written
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # t's memory is not reused before the copy ends
        else:
            host.copy_(t)
        self.slots.append(host)
        return len(self.slots) - 1

    def _fetch(self, slot: int):
        if slot < 0 or slot in self.ready or self.slots[slot] is None:
            return
        host = self.slots[slot]
        if self.cuda:
            with torch.cuda.stream(self.stream):
                self.ready[slot] = host.to(self.device, non_blocking=True)
        else:
            self.ready[slot] = host.clone()

    def take(self, slot: int) -> torch.Tensor:
        """The device copy of `slot`; starts fetching slot-1, which backward needs next."""
        self._fetch(slot)
        self._fetch(slot - 1)
        t = self.ready.pop(slot)
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            t.record_stream(torch.cuda.current_stream(self.device))
        self.slots[slot] = None
        if all(s is None for s in self.slots):
            self.slots = []  # the step's backward is done
        return t


class OffloadedCheckpoint(torch.autograd.Function):
    """y = layer(x, ...) without saving activations; x waits in host memory until backward."""

    @staticmethod
    def forward(ctx, x, offloader: HostOffloader, layer, preserve_rng: bool, *args):
        ctx.offloader, ctx.layer, ctx.args = offloader, layer, args
        # With dropout the recompute must draw the same masks: save the RNG state. Without, skip it: a CUDA
        # graph recording (graphs.py) cannot read the GPU's RNG state.
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None) \
            if preserve_rng else None
        with torch.no_grad():
            y = layer(x, *args)
        ctx.slot = offloader.put(x.detach())
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x = ctx.offloader.take(ctx.slot).requires_grad_(True)
        if ctx.rng is None:
            with torch.enable_grad():
                y = ctx.layer(x, *ctx.args)
        else:
            with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # put the state back afterwards
                torch.set_rng_state(ctx.rng[0])
                if x.is_cuda:
                    torch.cuda.set_rng_state(ctx.rng[1], x.device)
                with torch.enable_grad():
                    y = ctx.layer(x, *ctx.args)
        torch.autograd.backward(y, grad_y)  # accumulates the LoRA gradients of this layer
        return (x.grad, None, None, None) + (None,) * len(ctx.args)


class Offload:
    """DecoderModel.call_layer for lean mode: each layer in training through OffloadedCheckpoint, except those
    in `keep` (--keep-activations), which keep their activations on the GPU."""

    def __init__(self, device, keep: set[nn.Module], preserve_rng: bool):
        self.offloader = HostOffloader(device)
        self.keep, self.preserve_rng = keep, preserve_rng

    def __call__(self, layer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
        if not layer.training or layer in self.keep:
            return layer(x, *args)
        if not x.requires_grad:  # the frozen embedding's output: so that the custom checkpoint's backward runs
            x = x.detach().requires_grad_()
        return OffloadedCheckpoint.apply(x, self.offloader, layer, self.preserve_rng, *args)


class HostEmbedding(nn.Module):
    """A frozen embedding table in (pinned) host memory; looks up rows there and sends only those."""

    def __init__(self, weight: torch.Tensor, device):
        super().__init__()
        if torch.device(device).type == "cuda":
            host = pinned_empty(weight.shape, weight.dtype).copy_(weight.detach())
        else:
            host = weight.detach().cpu()
        self.register_buffer("weight", host)
        self.target = torch.device(device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to("cpu")
        if self.target.type != "cuda":
            return F.embedding(ids, self.weight)
        # gathered straight into page-locked memory (one pass over the rows, not a gather and then a copy into
        # pinned memory), then sent asynchronously; torch's pinned allocator reuses it once the copy is done
        rows = torch.empty((ids.numel(), self.weight.shape[1]), dtype=self.weight.dtype, pin_memory=True)
        torch.index_select(self.weight, 0, ids.reshape(-1), out=rows)
        return rows.view(*ids.shape, -1).to(self.target, non_blocking=True)

    def _apply(self, fn, recurse=True):
        return self  # stays on the host whatever .to() the model gets


def host_embedding(model) -> HostEmbedding | None:
    """The model's embedding table if it lives on the host (lean mode), else None."""
    table = model.model.embed_tokens
    return table if isinstance(table, HostEmbedding) else None
