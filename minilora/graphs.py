"""CUDA graphs: a micro-batch's whole forward and backward replayed with one launch (--cuda-graphs).

Why: the step of a small model waits for the host. Qwen-1.5B at 2 x 2048 tokens launches ~7,000
kernels per step (per layer: 7 dequantizations, 7 base and 14 LoRA matmuls, norms, RoPE, attention;
in the forward, the recompute and the backward), and Python, autograd and the dispatcher spend
longer queueing each kernel than the GPU spends running it: the GPU was busy 30% of the step
(bench/NOTES.md, sections 7 and 8). A CUDA graph records the kernels once, arguments and addresses
included, and `replay()` runs them all back to back from one call.

What a recording needs, and how it gets it here:
- Fixed shapes and addresses. Each micro-batch shape (B, T) gets its own graph, reading static input
  tensors that each batch is copied into; train.py pads T up to `bucket_length(T)` (a multiple of
  256; past 2048 tokens, 8 lengths per doubling), so a data set needs a handful of graphs. They share
  one memory pool: they run one at a time, and what one leaves behind (the loss) is read before the
  next runs.
- Nothing that waits for the GPU inside: the loss keeps every position, unlabelled ones weighing 0
  (loss.py's `every_position`; gathering the labelled rows needs their count on the host); the
  division by the step's label count N is a product with a static 1/N set before each replay; the
  checkpointed recomputes save no RNG state (reading it is refused during a recording), so
  --dropout > 0, whose masks the recompute must redraw, is refused.
- Lean mode (--offload): the layer inputs' copies to and from page-locked host buffers are recorded
  like kernels, and each replay reuses the same buffers in the same order; the embedding rows, looked
  up on the host, are one more static input (`inputs_embeds`), copied in before each replay.
- Gradients at fixed addresses: every trainable tensor's .grad is a static buffer that each replay
  adds into. `zero_grad(set_to_none=True)` drops them between steps; `__call__` puts them back, zeroed.
- Warm-up before recording: two eager runs on a side stream compile the layers and create cuBLAS'
  workspace, as PyTorch's CUDA-graph notes ask, with the gradients saved and put back around them.

Cost: each new shape costs two eager micro-batches and a recording, once; the pool keeps the memory
of the recorded steps' activations between replays, which measured 0.6 GiB (1.5B) and 0.8 GiB (8B)
above the eager peak (bench/NOTES.md, section 9).
Reference: tests/test_graphs.py compares losses and LoRA gradients with the eager step on a GPU.
"""
from __future__ import annotations

import torch

from .loss import causal_lm_loss
from .offload import host_embedding

PAD_MULTIPLE = 256


class GraphRecordingError(RuntimeError):
    """A CUDA graph could not be recorded; the trainer saves a checkpoint and stops with advice."""


def bucket_length(T: int) -> int:
    """The length a micro-batch of longest example T is padded to, so that few shapes are recorded: a
    multiple of 256, and past 2048 tokens a multiple of 1/16 of the next power of two (8 lengths per
    doubling, at most 12.5% padding): 8 graphs up to 2048 tokens, 16 up to 4096, 64 up to 256k."""
    step = max(PAD_MULTIPLE, 1 << max(0, (T - 1).bit_length() - 4))
    return -(-T // step) * step


class GraphedMicroBatches:
    """`graphs(batch, inv_n)`: forward + backward of `batch` scaled by inv_n (= 1/N, N the step's label
    tokens), from a recording of its shape; returns the batch's loss sum (a 0-dim tensor on the GPU,
    valid until the next call)."""

    def __init__(self, model, params: list[torch.Tensor], autocast, warmup: int = 2):
        self.model, self.params, self.autocast, self.warmup = model, params, autocast, warmup
        self.recorded: dict[tuple[int, int], tuple] = {}  # (B, T) -> (graph, ids, labels, embeds, scale, loss_sum)
        self.pool = torch.cuda.graph_pool_handle()
        self.grads = [torch.zeros_like(p) for p in params]

    def __call__(self, batch: dict, inv_n: float) -> torch.Tensor:
        self._static_grads()
        shape = tuple(batch["input_ids"].shape)
        if shape not in self.recorded:
            self.recorded[shape] = self._record(batch, inv_n)
        graph, ids, labels, embeds, scale, loss_sum = self.recorded[shape]
        ids.copy_(batch["input_ids"], non_blocking=True)
        labels.copy_(batch["labels"], non_blocking=True)
        if embeds is not None:
            embeds.copy_(self._embeds(batch), non_blocking=True)
        scale.fill_(inv_n)
        graph.replay()
        return loss_sum

    def _static_grads(self):
        """Every trainable tensor's .grad at its recorded address: zeros after zero_grad, or what it held."""
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                g.zero_()
            elif p.grad is not g:  # e.g. replaced by the ranks' all-reduce (distributed.py)
                g.copy_(p.grad)
            p.grad = g

    def _embeds(self, batch: dict) -> torch.Tensor | None:
        """The embedding rows when the table is on the host: the batch's own (step.make_batch looked them
        up), or looked up now from the GPU ids, which waits for the GPU."""
        table = host_embedding(self.model)
        if table is None:
            return None
        return batch["inputs_embeds"] if "inputs_embeds" in batch else table(batch["input_ids"])

    def _forward_backward(self, ids, labels, embeds, scale) -> torch.Tensor:
        with self.autocast:
            hidden = self.model.model(ids, inputs_embeds=embeds)
            loss_sum, _ = causal_lm_loss(hidden, self.model.lm_head.weight, labels, every_position=True,
                                         compiled=self.model.compile_loss)
        (loss_sum * scale).backward()
        return loss_sum.detach()

    def _record(self, batch: dict, inv_n: float) -> tuple:
        ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
        embeds = self._embeds(batch)
        embeds = None if embeds is None else embeds.clone()
        scale = torch.full((), inv_n, dtype=torch.float32, device=ids.device)
        saved = [g.clone() for g in self.grads]  # the warm-up adds into them; this micro-batch's replay will
        graph = torch.cuda.CUDAGraph()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self._forward_backward(ids, labels, embeds, scale)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(graph, pool=self.pool):
                loss_sum = self._forward_backward(ids, labels, embeds, scale)
        except torch.OutOfMemoryError:
            raise  # the trainer's out-of-memory advice applies as it is
        except RuntimeError as e:
            raise GraphRecordingError(f"recording a CUDA graph of a {tuple(ids.shape)} micro-batch failed: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        finally:
            for g, s in zip(self.grads, saved):
                g.copy_(s)
        return graph, ids, labels, embeds, scale, loss_sum

