"""Causal-LM cross-entropy over the label tokens only, without the full logits tensor.

The naive loss builds logits (B, T, V) in fp32: for batch 2 x 2048 and Qwen's
V = 151,936 that is 2.3 GiB, plus as much again for its gradient, the largest
tensors of the whole step. Three observations remove them:

1. Only positions with a label need logits. Prompt-masked SFT data often has
   half its tokens in the prompt, so we first gather the hidden states of the
   labelled positions: h (N, H), N = number of label tokens.
2. The gradient of the loss with respect to the logits is known in the forward
   pass already: d/dz [logsumexp(z) - z_y] = softmax(z) - onehot(y). So each
   chunk of rows computes its logits, its loss and its contribution to dL/dh
   = (softmax - onehot) @ W, then drops the logits. Backward only scales the
   stored dL/dh (N, H) by the incoming gradient.
3. lm_head is frozen in LoRA, so dL/dW is never needed.

Peak memory: one chunk's (rows, V) logits and their temporaries, plus h's
gradient; FLOPs: the same 2 matmuls (logits, dL/dh) that full logits need,
with no recompute.

Between the two matmuls of a chunk lies elementwise work over all (rows, V)
logits: upcast, logsumexp, the softmax, minus the one-hot, downcast. Run op by
op that is ~40 bytes of memory traffic per logit, which for 4096 tokens of
Qwen's vocabulary is ~25 GB per step. So `chunk_loss_and_grad` is one plain
function that a compiler can fuse: on a GPU speed/ passes it through
torch.compile (`chunk=`), which makes it a reduction and a pointwise kernel
reading the bf16 logits twice and writing their gradient once, ~8 bytes per
logit, with no fp32 copy of the chunk, so its chunks can be twice as long
(`logit_elements=`). Run op by op (the CPU, --compile off, --fsdp) the function
holds ~5 fp32 (rows, V) temporaries at once. tests/test_train.py checks both
against torch's cross-entropy.

Loss math: the model at position t predicts token t+1, so hidden[:, :-1] pairs
with labels[:, 1:]. We return the SUM of token losses and the token count; the
caller divides once by the count over the whole optimizer step (see train.py).
`reference_loss` is the plain version the tests compare against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a position without a loss (prompt or padding): cross_entropy's ignore_index

LOGIT_ELEMENTS = 2**24  # rows per chunk = this / vocab: 32 MiB of bf16 logits, and ~5 fp32 temporaries of them


def chunk_loss_and_grad(logits: torch.Tensor, y: torch.Tensor, keep: torch.Tensor, need_grad: bool):
    """One chunk of rows: (sum over kept rows of CE(logits_i, y_i), dL/dlogits = softmax - onehot(y) on kept
    rows and 0 on the others, in the logits' dtype; None without need_grad). The math in fp32."""
    z = logits.float()
    y = torch.where(keep, y, 0)  # an unlabelled row points at class 0, then weighs 0
    lse = torch.logsumexp(z, dim=-1)  # (rows,)
    loss = torch.where(keep, lse - z.gather(1, y[:, None]).squeeze(1), 0.0).sum()
    if not need_grad:
        return loss, None
    onehot = torch.arange(z.shape[1], device=z.device)[None, :] == y[:, None]  # compiled: an index test, no tensor
    grad = torch.where(keep[:, None], (z - lse[:, None]).exp() - onehot.float(), 0.0)  # where, not 0 * inf
    return loss, grad.to(logits.dtype)


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i @ W.T, y_i), computing dL/dh chunk by chunk during the forward pass.
    Rows whose label is IGNORE add 0 to the sum and get a zero gradient."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, rows: int, chunk):
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty_like(h) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        w = weight.to(h.dtype)
        for i in range(0, h.shape[0], rows):
            yi = y[i: i + rows]
            loss, grad_logits = chunk(h[i: i + rows] @ w.T, yi, yi != IGNORE, need_grad)  # (rows, V) logits
            total += loss
            if need_grad:
                grad_h[i: i + rows] = grad_logits @ w
        ctx.save_for_backward(grad_h)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return grad_h * grad_out.to(grad_h.dtype), None, None, None, None


def causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                   rows: int | None = None, every_position: bool = False, chunk=chunk_loss_and_grad,
                   logit_elements: int = LOGIT_ELEMENTS) -> tuple[torch.Tensor, int | None]:
    """(sum of token losses, number of label tokens) for hidden (B, T, H) and labels (B, T).

    `chunk`: the function each chunk of rows runs (chunk_loss_and_grad, or it compiled: see above); each
    chunk has `rows` rows, by default as many as hold `logit_elements` logits.

    `every_position` skips the gathering of the labelled rows, whose count the host must wait for
    (`nonzero`): every position's logits are computed and unlabelled ones weigh 0. Same sum, more
    FLOPs on prompt and pad rows, and no wait, which a CUDA graph needs (graphs.py); the count is
    then not known here and None is returned in its place.
    """
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # position t predicts t+1
    y = labels[:, 1:].reshape(-1)
    if not every_position:
        keep = (y != IGNORE).nonzero().squeeze(1)
        h, y = h.index_select(0, keep), y.index_select(0, keep)  # (N, H), (N,)
    rows = rows or max(16, logit_elements // lm_head_weight.shape[0])
    if h.requires_grad and lm_head_weight.requires_grad:
        raise ValueError("causal_lm_loss assumes a frozen lm_head (LoRA does not train it).")
    return LinearCrossEntropy.apply(h, lm_head_weight, y, rows, chunk), None if every_position else y.numel()


def reference_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The plain version from full logits, for tests: sum of shifted token losses and count."""
    y = labels[:, 1:].reshape(-1)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), y,
                           ignore_index=IGNORE, reduction="sum")
    return loss, int((y != IGNORE).sum())
