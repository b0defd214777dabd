"""The flat optimizer: every LoRA factor a view into one fp32 tensor, so 8-bit AdamW steps them in one launch.

Reference: tests/test_train.py checks the steps equal those of one optimizer entry per factor.
"""
from __future__ import annotations

import torch

# bitsandbytes' 8-bit optimizers quantize their state in blocks of 256 values, and keep it in 32 bits for
# tensors of fewer than 4096 values.
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096


def flatten_for_optimizer(factors: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """What the optimizer steps: the LoRA factors end to end in ONE fp32 Parameter, each factor
    becoming a view into it; autograd, state_dict and the adapter file still see the factors.

    Why: bitsandbytes' AdamW8bit updates one parameter at a time, and after each one it waits for the
    GPU (`sync_gpu` in its Optimizer8bit.step): host time and an idle GPU per parameter, for a few
    microseconds of work. Qwen-1.5B at r=16 on 7 targets has 392 factors (bench/NOTES.md, section 7,
    measured what they cost a step). One flat tensor is one update.

    Same numbers: AdamW is elementwise, and a factor joins the flat tensor only when its size is a
    multiple of 256 and at least 4096, so the 8-bit state's blocks are the blocks it has alone. Smaller
    factors (k/v projections of small models at low rank) stay separate parameters. Each factor's
    gradient is added into the flat gradient as soon as backward has it (a post-accumulate hook), and
    dropped: no second copy of the gradients, and micro-batches accumulate as before. (One difference:
    a joined factor that got no gradient at all would still see weight decay and momentum, its slice
    being zeros rather than None. Every factor is on the loss's path in these models, so none does.)
    """
    big = [p for p in factors if p.numel() % BNB_BLOCK == 0 and p.numel() >= BNB_MIN_8BIT]
    if len(big) < 2:
        return list(factors)
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in big]))
    start = 0
    for p in big:
        n = p.numel()
        p.data = flat.data[start:start + n].view_as(p)
        p.register_post_accumulate_grad_hook(_add_grad_into(flat, start, n))
        start += n
    joined = {id(p) for p in big}
    return [flat] + [p for p in factors if id(p) not in joined]


def _add_grad_into(flat: torch.nn.Parameter, start: int, n: int):
    def hook(p):
        try:
            if flat.grad is None:  # the step's first gradient (zero_grad sets it to None)
                flat.grad = torch.zeros_like(flat)
            flat.grad[start:start + n].add_(p.grad.reshape(-1))
        finally:  # also after an out-of-memory error: zero_grad cannot reach a factor's own .grad
            p.grad = None
    return hook
