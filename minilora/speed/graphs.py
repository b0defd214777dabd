"""CUDA graphs: a micro-batch's whole forward and backward replayed with one launch (--cuda-graphs).

Why: the step of a small model waits for the host. Qwen-1.5B at 2 x 2048 tokens launches ~7,000
kernels per step (per layer: 7 dequantizations, 7 base and 14 LoRA matmuls, norms, RoPE, attention;
in the forward, the recompute and the backward), and Python, autograd and the dispatcher spend
longer queueing each kernel than the GPU spends running it (bench/NOTES.md, sections 7 and 8, has
the profiles). A CUDA graph records the kernels once, arguments and addresses included, and
`replay()` runs them all back to back from one call. What is recorded is the trainer's own
micro-step (train.micro_step): the same function the loop calls without graphs.

What a recording needs, and how it gets it here:
- Fixed shapes and addresses. Each micro-batch shape (B, T, and its other inputs' shapes) gets its own
  graph, reading static input tensors that each batch is copied into; batches are padded to
  `bucket_length(T)` (a multiple of 256; past 2048 tokens, 8 lengths per doubling), so a data set needs
  a handful of graphs (padding-free rows, padding_free.py, take a few lengths, chosen step by step, and add
  their positions and example bounds, in a few sizes). They share
  one memory pool: they run one at a time, and what one leaves behind (the loss) is read before the
  next runs.
- Nothing that waits for the GPU inside: the loss keeps every position, unlabelled ones weighing 0
  (loss.py's `every_position`, which the recorded step is given; gathering the labelled rows needs
  their count on the host); the
  division by the step's label count N is a product with a static 1/N set before each replay; the
  checkpointed recomputes save no RNG state (reading it is refused during a recording), so
  --dropout > 0, whose masks the recompute must redraw, is refused.
- Lean mode (--offload): the layer inputs' copies to and from page-locked host buffers are recorded
  like kernels, and each replay reuses the same buffers in the same order; the embedding rows, looked
  up on the host, are one more static input (`inputs_embeds`), copied in before each replay.
- Gradients at fixed addresses: every trainable tensor's .grad is a static buffer that each replay
  adds into. `zero_grad(set_to_none=True)` drops them between steps; `__call__` puts them back, zeroed.
- Nothing run for the first time inside a recording: compiling, the Triton kernels' first build,
  cuBLAS's first call (PyTorch's CUDA-graph notes warm up before capturing for this). So the run's first
  micro-batch simply runs, as a step without graphs would: that run is the warm-up, and its gradient counts.
  The compiled layers and loss take every length from their first compile (compile.py), so after it each shape
  is recorded the first time it comes (the warm-up's own, its next time), under the "fail_on_recompile" stance:
  if a recording would compile after all (a shape the compile did not make dynamic, say), it is dropped, the
  micro-batch runs as it is, and that shape is recorded the next time it comes.

Cost: each shape costs a recording (the step's Python run once, with no kernels, then the graph's build), once;
the pool keeps the memory of the recorded steps' activations between replays (bench/NOTES.md, sections
9 and 16, have the figures).
Reference: tests/test_graphs.py compares losses and LoRA gradients with the eager step on a GPU.
"""
from __future__ import annotations

import torch

PAD_MULTIPLE = 256


class GraphRecordingError(RuntimeError):
    """A CUDA graph could not be recorded; the trainer saves a checkpoint and stops with advice."""


def bucket_length(T: int, multiple: int = PAD_MULTIPLE) -> int:
    """The length a micro-batch of longest example T is padded to, so that few shapes are recorded: a
    multiple of 256, and past 2048 tokens a multiple of 1/16 of the next power of two (8 lengths per
    doubling, at most 12.5% padding): 8 graphs up to 2048 tokens, 16 up to 4096, 64 up to 256k.
    (padding_free.py pads its rows to lengths of its own: row_lengths.)"""
    step = max(multiple, 1 << max(0, (T - 1).bit_length() - 4))
    return -(-T // step) * step


def replay_inputs(batch: dict) -> dict[str, torch.Tensor]:
    """What a replay reads of a batch: its tensors (input_ids, labels; positions for a padding-free row, and in
    lean mode the embedding rows) and a padding-free row's example bounds."""
    inputs = {k: v for k, v in batch.items() if torch.is_tensor(v)}
    if batch.get("documents") is not None:
        inputs["cu_seqlens"] = batch["documents"].cu_seqlens
    return inputs


class GraphedMicroBatches:
    """`graphs(batch, inv_n)`: `step(batch, inv_n)` (forward + backward of `batch`, scaled by inv_n = 1/N, N the
    step's label tokens) from a recording of its shape; returns the batch's loss sum (a 0-dim tensor on the GPU,
    valid until the next call)."""

    def __init__(self, step, params: list[torch.Tensor], offload: bool = False):
        self.step, self.params = step, params
        # under --offload each shape runs once without a graph before it is recorded: its page-locked host buffers are
        # allocated at a shape's first use, which a capture cannot do (on an H100 the first-use recording failed)
        self.offload = offload
        self.seen: set[tuple] = set()  # the shapes run without a graph: the warm-up, and any whose recording failed
        self.recorded: dict[tuple, tuple] = {}  # the inputs' shapes -> (graph, static inputs, scale, loss_sum)
        self.pool = torch.cuda.graph_pool_handle()
        self.grads = [torch.zeros_like(p) for p in params]

    def __call__(self, batch: dict, inv_n: float) -> torch.Tensor:
        self._static_grads()
        inputs = replay_inputs(batch)
        shape = tuple((k, tuple(t.shape)) for k, t in inputs.items())
        if shape not in self.recorded:
            # uncaptured: the run's first micro-batch, the warm-up (above); under --offload, each shape's first run,
            # which allocates its page-locked host buffers
            if not self.seen or (self.offload and shape not in self.seen):
                recorded = None
            elif shape in self.seen:  # it ran once already, without a graph
                recorded = self._record(batch, inv_n)
            else:  # its first time: recorded, unless the recording would compile
                with torch.compiler.set_stance("fail_on_recompile"):
                    recorded = self._record(batch, inv_n, first_use=True)
            if recorded is None:
                self.seen.add(shape)
                return self.step(batch, torch.full((), inv_n, dtype=torch.float32, device=inputs["input_ids"].device))
            self.recorded[shape] = recorded
        graph, static, scale, loss_sum = self.recorded[shape]
        for k, t in static.items():
            t.copy_(inputs[k], non_blocking=True)
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

    def _record(self, batch: dict, inv_n: float, first_use: bool = False) -> tuple | None:
        """(graph, static inputs, scale, loss_sum) of the batch's shape; None where a `first_use` recording failed
        (it is tried again at the shape's next use, after an uncaptured run, and fails for good only then)."""
        static = {k: v.clone() for k, v in batch.items()}  # tensors, and a padding-free row's Documents
        ids = static["input_ids"]
        scale = torch.full((), inv_n, dtype=torch.float32, device=ids.device)
        graph = torch.cuda.CUDAGraph()
        try:  # a recording runs no kernels: the gradients are left as they are, for the replay to add into
            with torch.cuda.graph(graph, pool=self.pool):
                loss_sum = self.step(static, scale)
        except torch.OutOfMemoryError:
            raise  # the trainer's out-of-memory advice applies as it is
        except RuntimeError as e:
            if first_use:  # e.g. "Detected recompile when torch.compile stance is 'fail_on_recompile'"
                return None
            raise GraphRecordingError(f"recording a CUDA graph of a {tuple(ids.shape)} micro-batch failed: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from e
        return graph, replay_inputs(static), scale, loss_sum
