"""One optimizer step, in parts: the learning-rate schedule, the optimizer, the micro-batches, forward
and backward over them, and the eval loss. train.py's loop puts them together.

The loss of a step is the mean over ALL its label tokens: with N the label tokens of every
micro-batch of the step, each micro-batch runs backward(loss_sum / N). This is the
gradient-accumulation fix the peers made in late 2024: dividing each micro-batch by its own
token count and averaging the means weights a token in a short micro-batch more than one in
a long one, so batch 8 x accum 1 and batch 2 x accum 4 would train differently. Dividing
every micro-batch by the step's total N makes the accumulated gradient exactly the gradient
of the mean over all N tokens (tests/test_train.py checks it).

A `cfg` below is train.py's TrainConfig, of which only the fields named are read.
"""
from __future__ import annotations

import math

import torch

from . import data as D
from . import packing
from .loss import causal_lm_loss
from .offload import HostEmbedding, HostOffloader, host_embedding


# ----------------------------------------------------------------------------- set-up

def setup_for_training(model, *, gradient_checkpointing: bool, compile: str, device, offload: bool = False,
                       keep_activations: int = 0) -> None:
    """Memory and speed switches, in one place: per-layer recompute, host offload, regional torch.compile.

    Compiling each decoder layer (not the whole model) keeps compile time to one layer's
    graph, reused 28-32 times; it fuses the elementwise work between the matmuls. The loss's
    per-chunk softmax is compiled alongside (loss.py). `keep_activations`: the last N layers are not
    recomputed (model.py).
    """
    check_keep_activations(keep_activations, len(model.model.layers), "the model")
    model.model.gradient_checkpointing = gradient_checkpointing or offload
    model.model.keep_activations = keep_activations
    model.model.recompute_rng = any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    if offload:
        model.model.offloader = HostOffloader(device)
        if not model.config.tie_word_embeddings:  # a tied table is also lm_head, which the GPU needs
            model.model.embed_tokens = HostEmbedding(model.model.embed_tokens.weight, device)
    if compile == "on" or (compile == "auto" and torch.device(device).type == "cuda"):
        for layer in model.model.layers:
            layer.compile()
        model.compile_loss = True
    model.train()


def check_keep_activations(keep: int, layers: int, source: str) -> None:
    """--keep-activations must lie in 0..L; train.py calls this with the config.json's L before loading anything."""
    if not 0 <= keep <= layers:
        raise ValueError(f"--keep-activations {keep}: {source} has {layers} decoder layers; "
                         f"choose 0 (recompute every layer) to {layers}.")


def make_optimizer(params, cfg):
    # Every trainable tensor is a LoRA factor (a matrix, or flatten_for_optimizer's buffer of them), and all
    # get weight decay, as the HF Trainer gives every weight that is not a bias or a norm.
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


# bitsandbytes' 8-bit optimizers quantize their state in blocks of 256 values, and keep it in 32 bits for
# tensors of fewer than 4096 values.
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096


def flatten_for_optimizer(factors: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """What the optimizer steps: the LoRA factors end to end in ONE fp32 Parameter, each factor
    becoming a view into it; autograd, state_dict and the adapter file still see the factors.

    Why: bitsandbytes' AdamW8bit updates one parameter at a time, and after each one it waits for the
    GPU (`sync_gpu` in its Optimizer8bit.step): ~0.2 ms of host time and an idle GPU per parameter, for
    a few microseconds of work. Qwen-1.5B at r=16 on 7 targets has 392 factors: ~70 ms per step, on a
    step that already waits for the host (bench/NOTES.md, section 7). One flat tensor is one update.

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


def make_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only: fp16's smallest normal is 6e-5, so small gradients underflow;
    bf16 and fp32 share fp32's exponent range and need none. A disabled scaler passes everything
    through (scale() returns the loss, step() is optimizer.step(), unscale_/update do nothing)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


# ----------------------------------------------------------------------------- schedule

def lr_at(step: int, cfg, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then linear or cosine decay to 0 at `total_steps`.

    `step` counts optimizer steps from 0. The curve is transformers' `get_*_schedule_with_warmup`
    (so the first warmup step has lr 0, as there), which trl users already tune for.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


# ----------------------------------------------------------------------------- batches

def micro_batches(examples, order, start: int, count: int, batch_size: int):
    """`count` micro-batches of `batch_size` from position `start` of `order` (cyclic)."""
    out = []
    for b in range(count):
        idx = [order[(start + b * batch_size + i) % len(order)] for i in range(batch_size)]
        out.append([examples[i] for i in idx])
    return out


def rank_slice(mbs: list[list], rank: int, world: int) -> list[list]:
    """This rank's part of each micro-batch: rank r takes the r-th of `world` equal pieces.

    The step's micro-batches are drawn at batch_size x world, the same on every rank, so the
    ranks' pieces together are exactly what one process with batch world x batch_size would take.
    """
    return [mb[rank * len(mb) // world: (rank + 1) * len(mb) // world] for mb in mbs]


def make_batch(examples, pad_id: int, device, padding_free: bool = False, pad_to=None, host_embedding=None) -> dict:
    """One micro-batch on `device`: padded to its longest example (or to `pad_to(longest)`), or end
    to end in one row (packing.py). With the embedding table on the host (offload.host_embedding), its
    rows are looked up here, while the ids are still on the host, and sent as `inputs_embeds`."""
    b = packing.collate(examples) if padding_free else D.collate(examples, pad_id, pad_to)
    if host_embedding is not None:
        b["inputs_embeds"] = host_embedding(b["input_ids"])
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}


def label_tokens(batches: list[dict]) -> int:
    """Tokens that carry a loss: labels after the shift that are not IGNORE (prompt or padding)."""
    return sum(int((b["labels"][:, 1:] != D.IGNORE).sum()) for b in batches)


# ----------------------------------------------------------------------------- forward and backward

def hidden_states(model, b: dict) -> torch.Tensor:
    """The decoder's output for a batch; a padding-free one brings its own positions and example bounds."""
    return model.model(b["input_ids"], b.get("positions"), b.get("documents"), inputs_embeds=b.get("inputs_embeds"))


def train_step(model, batches: list[dict], autocast, scaler=None, n_total: int | None = None,
               graphs=None) -> tuple[float, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (loss sum / N, N).

    Every micro-batch's loss sum is divided by the SAME token count N of the whole step
    (with several ranks, `n_total` is N over all of them: then the ranks' returned losses and
    gradients sum to the global mean and its gradient).
    With fp16, `scaler` multiplies the loss by its scale S before backward, so gradients
    too small for fp16 do not flush to zero; they are S times too large until `scaler.unscale_`.
    `graphs` (graphs.GraphedMicroBatches) replays each micro-batch from a CUDA graph instead;
    then the losses, summed on the device and read once per step, let the host queue the next
    micro-batch while the GPU still works on this one.
    """
    if graphs is not None and scaler is not None and scaler.is_enabled():
        raise ValueError("CUDA graphs record the step without fp16 loss scaling; train in bf16 or without graphs.")
    n_total = label_tokens(batches) if n_total is None else n_total
    loss_total = torch.zeros((), dtype=torch.float32, device=batches[0]["labels"].device)
    for b in batches:
        if graphs is not None:
            loss_total += graphs(b, 1.0 / max(n_total, 1))
            continue
        with autocast:
            hidden = hidden_states(model, b)
            loss_sum, _ = causal_lm_loss(hidden, model.lm_head.weight, b["labels"], compiled=model.compile_loss)
        loss = loss_sum / max(n_total, 1)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        loss_total += loss_sum.detach().float()
    return loss_total.item() / max(n_total, 1), n_total


@torch.no_grad()
def evaluate(model, examples, batch_size, pad_id, device, autocast, padding_free=False) -> float:
    """Mean token loss over the eval examples."""
    was_training = model.training
    model.eval()
    loss, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = make_batch(examples[i: i + batch_size], pad_id, device, padding_free, host_embedding=host_embedding(model))
        with autocast:
            s, c = causal_lm_loss(hidden_states(model, b), model.lm_head.weight, b["labels"],
                                  compiled=model.compile_loss)
        loss, n = loss + s.item(), n + c
    model.train(was_training)
    return loss / max(n, 1)
