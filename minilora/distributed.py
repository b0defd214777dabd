"""Data parallelism for `torchrun --nproc_per_node N -m minilora.train`: N copies, one gradient.

Every rank holds the whole (4-bit) model and takes its own slice of each optimizer step's
examples (train.py's `rank_slice`). After the step's micro-batches, the LoRA gradients are
summed across ranks with one all-reduce, so every rank applies the same update and the
weights never drift apart. The loss is divided by the GLOBAL label-token count, so the sum
is the gradient of the mean over all ranks' tokens: N ranks x batch b == 1 rank x batch N*b.

Why not DistributedDataParallel: the trainable part is tiny (~42M parameters for an 8B model
at r=16, about 170 MB in fp32), so one flat bucket reduced once per optimizer step is all the
communication there is. DDP's machinery (a hook on every parameter, buckets overlapped with
backward, `no_sync` for accumulation) is for large dense models; here it would add code, not speed.

With WORLD_SIZE unset or 1 every function below is a no-op, so single-process runs are unchanged.

`--fsdp` (FSDP2, for a base too large for one GPU): each rank keeps 1/N of every frozen 4-bit
weight, and FSDP2 all-gathers a layer's codes just before that layer runs (forward, recompute,
backward) and frees them right after. The packed codes are plain uint8 tensors of shape
(out*in/2, 1), which FSDP2 shards along dim 0 like any other tensor (FSDP1 needed bitsandbytes'
`quant_storage` to make them a float dtype; FSDP2 shards each parameter on its own and does not
care). The absmax statistics and code book stay whole on every rank: 1/32 of the codes' bytes.
The LoRA factors are not sharded: they stay replicated and go through all_reduce_grads as in
plain data parallelism, so both modes share one update path.
"""
from __future__ import annotations

import hashlib
import os
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


def world() -> int:
    """Processes in the run (torchrun sets WORLD_SIZE); 1 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's GPU on its host."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0 alone prints, logs, and writes checkpoints and the adapter."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo on the CPU); returns this rank's device.

    The timeout bounds every collective: if one rank dies (out of memory, killed), the others
    fail after it instead of waiting forever. MINILORA_DIST_TIMEOUT (seconds) overrides the 10 minutes.
    """
    if world() == 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    try:
        timeout = timedelta(seconds=float(os.environ.get("MINILORA_DIST_TIMEOUT", 600)))
    except ValueError:
        raise ValueError(f"MINILORA_DIST_TIMEOUT={os.environ['MINILORA_DIST_TIMEOUT']!r}: expected a number of "
                         "seconds, such as 600.") from None
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            device_id=device if device.type == "cuda" else None)
    return device


def teardown():
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier():
    """Ranks wait here while rank 0 writes, so none reads a half-written run folder or exits early."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: float | int) -> float | int:
    """The sum of a Python number over ranks (label tokens, loss), as the same type."""
    if not dist.is_initialized():
        return x
    # NCCL reduces CUDA tensors only, gloo CPU ones
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return type(x)(t.item())


def all_reduce_grads(params: list[torch.Tensor], device: torch.device):
    """Sum the gradients of `params` over ranks, in one flat fp32 bucket (one collective per step).

    Summing (not averaging) is right because each rank's loss is already divided by the global token count.
    """
    if not dist.is_initialized():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]).to(device)
    dist.all_reduce(flat)
    for p, chunk in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = chunk.view_as(p).to(p.dtype)


def mesh(device: torch.device):
    """All ranks in one dimension: FSDP2 shards over every process."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world(),))


def shard_nf4(layer: nn.Module, device_mesh):
    """Keep 1/N of a 4-bit layer's packed codes on this rank (FSDP2).

    FSDP2 shards parameters, not buffers, so the codes become a frozen Parameter first.
    """
    from torch.distributed.fsdp import fully_shard

    codes = layer._buffers.pop("weight")
    layer.weight = nn.Parameter(codes, requires_grad=False)
    fully_shard(layer, mesh=device_mesh)


def shard_root(model: nn.Module, device_mesh):
    """Make the whole model FSDP2's root, managing none of its own parameters.

    Without a root, each 4-bit layer would be a root of its own, and FSDP2 keeps a root's
    weights gathered after forward (for the backward that follows at once): all N shares would
    stay in memory. Under a root, each layer is freed after its forward and gathered again for
    its backward. Every parameter not already sharded (embeddings, norms, LoRA) is left alone.
    """
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    unsharded = {p for p in model.parameters() if not isinstance(p, DTensor)}
    fully_shard(model, mesh=device_mesh, ignored_params=unsharded)
    # (Each call of a sharded layer gathers its weights, so the speed features that read the 4-bit codes
    # outside such a call are off under --fsdp: speed/__init__.py's CLASHES.)


def data_hash(examples) -> str:
    """A fingerprint of the tokenized training examples: the same file read the same way gives the same one."""
    h = hashlib.sha256()
    for e in examples:  # as int32 bytes: ~100x faster than hashing the lists' text on a large data set
        h.update(len(e.input_ids).to_bytes(8, "little") + np.asarray(e.input_ids, dtype=np.int32).tobytes())
        h.update(np.asarray(e.labels, dtype=np.int32).tobytes())
    return h.hexdigest()[:16]


def check_same_everywhere(config: dict, examples):
    """Stop if any rank was started with another config or reads other training data than rank 0.

    Different flags or files per rank would train on a mixture nobody asked for, silently;
    each rank gathers every rank's config dict and data fingerprint and compares with rank 0's.
    """
    if not dist.is_initialized():
        return
    mine = (config, data_hash(examples), len(examples))
    everyone = [None] * world()
    dist.all_gather_object(everyone, mine)
    ref_cfg, ref_hash, ref_n = everyone[0]
    for r, (cfg, h, n) in enumerate(everyone[1:], start=1):
        diffs = [f"{k}: rank 0 {ref_cfg.get(k)!r}, rank {r} {cfg.get(k)!r}"
                 for k in sorted(set(ref_cfg) | set(cfg)) if ref_cfg.get(k) != cfg.get(k)]
        if h != ref_hash:
            diffs.append(f"training data: rank 0 has {ref_n} examples (fingerprint {ref_hash}), "
                         f"rank {r} has {n} (fingerprint {h})")
        if diffs:
            raise ValueError(f"rank {r} disagrees with rank 0 ({'; '.join(diffs)}). Every rank must get the same "
                             "flags and read the same data file; start them all with one torchrun command.")
