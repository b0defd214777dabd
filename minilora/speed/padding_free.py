"""Padding-free batches: examples end to end in rows, with no pad tokens between them.

Padding a micro-batch to its longest example spends the linear layers' FLOPs (nearly all of
a step's) on pad tokens; for lengths spread evenly up to L, about half of them. Here a step's
examples are dealt into rows of at most batch_size x max_seq_len tokens (first-fit, longest
first), each row one micro-batch, and three things keep each example to itself, so the loss and
its gradient are exactly the padded batches':

- positions restart at 0 at each example, so RoPE turns every token by the same angle;
- attention is causal inside each example and blind across examples (a block-diagonal causal
  mask). On an Ampere or newer GPU it is one call of flash attention's variable-length kernel over the row, which
  reads the examples' bounds from a tensor (cu_seqlens); on the CPU, SDPA one example at a time.
  No T x T mask is ever built;
- the label of each example's first token is IGNORE, so the last token of one example is not
  trained to predict the first token of the next (in a padded batch the shift drops that
  label the same way), and the label-token count N is unchanged.

Why dealing the step's examples anew does not change the training: every micro-batch's loss sum
is divided by the same N, the label tokens of the whole step (train.py), so the step's gradient
is the sum over its examples, however they are grouped. (trl's `packing=True` is another thing:
it cuts the data into rows, which changes the examples a step sees.) Fewer, fuller rows mean fewer
passes and larger matmuls. Under --fsdp each rank keeps its micro-batches as they are, one row
each: every rank must make the same number of passes, for the shards' gathers.

Under CUDA graphs (graphs.py) each row length is one more recording, so rows are padded to a few
lengths, the padding one more example of its own whose labels are all IGNORE, and `cu_seqlens` to
a power-of-two count (zero-length examples at its end). The kernel's launch covers the row's whole
length for each example, so that bound is fixed too. Which lengths: the trainer knows every
step's examples before it starts (the order is seeded), so `plan_lengths` chooses them once for
the whole run, from row_lengths' multiples of capacity/8: the set that costs least over the
run's steps, in the time of a padded token, counting ROW_TOKENS for each row and RECORDING_TOKENS
for each length's recording (fitted to the 1.5B job's steps, bench/NOTES.md, section 20). Each step then
deals its examples into the rows of those lengths that cost least (`deal_to_lengths`).
Every length is recorded where a step first takes it, which on the seeds' data is within the
first few steps, and no later step waits for a recording. Rows of more than 7 examples take more
`cu_seqlens` slots, another shape the plan does not count (the seeds' rows hold 2-7). On the 1.5B
job's records, 30 steps take 2 lengths (rows 92.8% filled), 350 steps 4 (96.3%), all recorded by
step 4; first-fit rows padded to multiples of 1024 filled 91% with 4, the last at step 6.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations_with_replacement
from math import comb

import torch
import torch.nn.functional as F

from ..loss import IGNORE

MIN_SLOTS = 8  # cu_seqlens holds a power of two of examples, at least this many: few shapes to record
LENGTHS = 8  # under CUDA graphs a row is padded to a multiple of its capacity / LENGTHS (rounded up to 64 tokens)
SEARCH_LIMIT = 2000  # deal_to_lengths tries at most this many choices of lengths, each dealing at most this many times
# What the rows' choices weigh, in the time of a padded token (bench/NOTES.md, section 20: fitted to the 1.5B job's
# steady steps on an H100, 1.9 ms rms): each row costs ROW_TOKENS more than its tokens (the 4-bit weights dequantized
# for each pass, kernels too small to fill the GPU), and a length's first-use recording RECORDING_TOKENS more than a
# replay (its host pass). A larger model's token takes longer, so its recordings cost fewer tokens than this.
ROW_TOKENS = 640
RECORDING_TOKENS = 12288
PLAN_STEPS = 64  # plan_lengths deals at most this many of the run's steps, evenly spread, for each set it weighs


def row_lengths(capacity: int) -> list[int]:
    """The lengths a row of at most `capacity` tokens is padded to under CUDA graphs: multiples of capacity/8
    (rounded up to 64, which tensor cores like), the last the capacity itself."""
    unit = -(-capacity // (LENGTHS * 64)) * 64
    return sorted({min(unit * j, capacity) for j in range(1, LENGTHS + 1)})


def row_length(n: int, capacity: int, lengths: list[int] | None = None) -> int:
    """The shortest of `lengths` (ascending; `row_lengths(capacity)` if None) that holds n tokens; n itself past the
    longest. A lone row, not dealt, is padded so; deal_to_lengths pads its first-fit rows so."""
    return next((length for length in lengths or row_lengths(capacity) if length >= n), n)


@dataclass(frozen=True)
class Documents:
    """Where a row's examples start: passed to the model in place of an attention mask.

    cu_seqlens: (S + 1,) int32, 0, the cumulative lengths, then the row's length repeated (empty slots).
    flash: attend with flash attention's variable-length kernel (a CUDA GPU of compute capability 8 or more,
    in bf16 or fp16); otherwise SDPA one example at a time."""

    cu_seqlens: torch.Tensor
    flash: bool = False

    def to(self, device, non_blocking: bool = False) -> Documents:
        return Documents(self.cu_seqlens.to(device, non_blocking=non_blocking), self.flash)

    def clone(self) -> Documents:
        return Documents(self.cu_seqlens.clone(), self.flash)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Block-diagonal causal attention over (1, heads, T, head_dim) tensors."""
        if self.flash:
            qt, kt, vt = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))  # (T, heads, head_dim)
            T = q.shape[2]
            out, _ = varlen_attention(qt, kt, vt, self.cu_seqlens, T)
            return out.transpose(0, 1).unsqueeze(0)
        return _attend_each(q, k, v, self.cu_seqlens, gqa)


@torch.compiler.disable  # the bounds are read on the host: compiled, each new list would be a recompile
def _attend_each(q, k, v, cu_seqlens, gqa):
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds, bounds[1:]) if b > a]
    parts = zip(q.split(lengths, dim=2), k.split(lengths, dim=2), v.split(lengths, dim=2))
    return torch.cat([F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, enable_gqa=gqa)
                      for qi, ki, vi in parts], dim=2)


# ---- flash attention over variable-length examples, as an op torch.compile and CUDA graphs take whole.
# aten's _flash_attention_forward/backward are the kernels SDPA calls; given cu_seqlens they treat each
# [cu[i], cu[i+1]) as its own sequence (causal within it; grouped-query heads native). Dropout is 0, so the
# RNG state they return and take is not used.

@torch.library.custom_op("minilora::varlen_attention", mutates_args=())
def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, heads, d) q and (T, kv_heads, d) k, v -> the output (T, heads, d) and the log-sum-exp (heads, T)."""
    out, lse = torch.ops.aten._flash_attention_forward(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len,
                                                       0.0, True, False)[:2]
    return out, lse


@varlen_attention.register_fake
def _(q, k, v, cu_seqlens, max_len):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("minilora::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                              max_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    unused = torch.zeros(2, dtype=torch.uint64, device=q.device)
    dq, dk, dv = torch.ops.aten._flash_attention_backward(grad.contiguous(), q, k, v, out, lse, cu_seqlens,
                                                          cu_seqlens, max_len, max_len, 0.0, True, unused, unused)
    return dq, dk, dv


@varlen_attention_backward.register_fake
def _(grad, q, k, v, out, lse, cu_seqlens, max_len):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save(ctx, inputs, output):
    q, k, v, cu_seqlens, max_len = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.max_len = max_len


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    return (*varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_len), None, None)


varlen_attention.register_autograd(_backward, setup_context=_save)


# ---- rows

def deal(examples: list, capacity: int) -> list[list]:
    """The examples in rows of at most `capacity` tokens: longest first, each into the first row with room."""
    rows, room = [], []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        n = len(e.input_ids)
        i = next((i for i, r in enumerate(room) if n <= r), len(rows))
        if i == len(rows):  # no row has room: a new one
            rows.append([])
            room.append(capacity)
        rows[i].append(e)
        room[i] -= n
    return rows


def plan_lengths(steps: list[list], capacity: int, longest: int, run_steps: int) -> list[int]:
    """The row lengths of a whole run under CUDA graphs, from `steps`, the examples of (a sample of) its `run_steps`
    steps: of `row_lengths(capacity)`, the set that costs least, its steps' rows as deal_to_lengths costs them (the
    sample's, scaled to the run) and RECORDING_TOKENS for each length. A local search: from the capacity alone,
    the one change that saves most (a length added, dropped, or put in place of another), until none does. The
    longest length kept holds `longest` (the longest example). ~0.02-0.2 s on the host for 64 steps of 8 examples."""
    ladder, scale = row_lengths(capacity), run_steps / max(1, len(steps))

    def cost(lengths) -> float:
        rows = sum(rows_cost(deal_to_lengths(step, lengths)) for step in steps)
        return rows * scale + RECORDING_TOKENS * len(lengths)

    chosen = [capacity]
    best = cost(chosen)
    while True:
        others = [[u] for u in ladder if u not in chosen]
        options = [chosen + u for u in others]  # one length more
        options += [[v for v in chosen if v != t] + u for t in chosen for u in [[], *others]]  # one fewer, or swapped
        cheapest, option = min((cost(o), o) for o in map(sorted, options) if o and o[-1] >= longest)
        if cheapest >= best:
            return chosen
        best, chosen = cheapest, option


def rows_cost(rows: list[tuple[list, int]]) -> int:
    """A step's rows (deal_to_lengths's), in the time of a padded token: their tokens, and ROW_TOKENS a row."""
    return sum(length + ROW_TOKENS for _, length in rows)


def deal_to_lengths(examples: list, lengths: list[int]) -> list[tuple[list, int]]:
    """A step's examples in rows, each with the length it is padded to, one of `lengths` (ascending, the run's:
    plan_lengths): the choice of lengths that costs least (rows_cost) that the examples can be dealt into. First-fit
    decreasing into rows of the longest length, each padded to the shortest that holds it, gives the choice to beat;
    then every choice of as many rows as the tokens need, or one more, is tried, cheapest first."""
    capacity = lengths[-1]
    longest_first = sorted(examples, key=lambda e: -len(e.input_ids))
    rows = deal(longest_first, capacity)
    best = [row_length(sum(len(e.input_ids) for e in r), capacity, lengths) for r in rows], rows
    total = sum(len(e.input_ids) for e in examples)
    fewest = -(-total // capacity)
    for k in (fewest, fewest + 1):
        if comb(len(lengths) + k - 1, k) > SEARCH_LIMIT or len(examples) > 100:
            break  # a step of many rows or examples (the search recurses once per example): first-fit's rows
        choices = sorted((c for c in combinations_with_replacement(lengths, k) if sum(c) >= total), key=sum)
        for choice in choices:  # k rows each: the fewest tokens is the least cost
            if sum(choice) + ROW_TOKENS * k >= sum(best[0]) + ROW_TOKENS * len(best[0]):
                break
            longest_row_first = choice[::-1]  # combinations_with_replacement lists each choice shortest first
            if (dealt := _deal_into(longest_first, longest_row_first)) is not None:
                best = longest_row_first, dealt
                break
    return [(r, length) for r, length in zip(best[1], best[0]) if r]


def _deal_into(examples: list, lengths: list[int]) -> list[list] | None:
    """The examples (longest first) in rows of the given lengths, or None where they do not fit (or the search
    takes more than SEARCH_LIMIT placements). A depth-first search; rows with the same room left are one choice."""
    room, rows, tries = list(lengths), [[] for _ in lengths], 0

    def place(i: int) -> bool:
        nonlocal tries
        if i == len(examples):
            return True
        tries += 1
        n, seen = len(examples[i].input_ids), set()
        for r in range(len(room)):
            if n <= room[r] and room[r] not in seen and tries <= SEARCH_LIMIT:
                seen.add(room[r])
                room[r] -= n
                rows[r].append(examples[i])
                if place(i + 1):
                    return True
                room[r] += n
                rows[r].pop()
        return False

    return rows if place(0) else None


def flash_available(device) -> bool:
    """Whether flash attention's kernels run on `device`: a CUDA GPU of compute capability 8.0 (Ampere) or more.
    (torch reports bf16 on older GPUs too, emulated, so the dtype does not tell.)"""
    device = torch.device(device)
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def collate(examples, pad_id: int = 0, pad_to=None, flash: bool = False) -> dict:
    """One row of all the examples' tokens: input_ids, labels, positions (1, T) and the Documents. With
    `pad_to` (CUDA graphs), the row is padded to pad_to(length), and cu_seqlens to a power-of-two count."""
    ids, labels, positions, bounds = [], [], [], [0]
    for e in examples:
        ids += e.input_ids
        labels += [IGNORE] + list(e.labels[1:])  # the first token predicts nothing across the boundary
        positions += range(len(e.input_ids))
        bounds.append(len(ids))
    if pad_to is not None:
        T = pad_to(len(ids))
        if T < len(ids):
            raise ValueError(f"a padding-free row of {len(ids)} tokens cannot be padded to {T}")
        if T > len(ids):  # the padding: an example of its own, trained on nothing
            positions += range(T - len(ids))
            labels += [IGNORE] * (T - len(ids))
            ids += [pad_id] * (T - len(ids))
            bounds.append(T)
        slots = max(MIN_SLOTS, 1 << (len(bounds) - 2).bit_length())
        bounds += [T] * (slots + 1 - len(bounds))
    return {"input_ids": torch.tensor(ids).unsqueeze(0), "labels": torch.tensor(labels).unsqueeze(0),
            "positions": torch.tensor(positions).unsqueeze(0),
            "documents": Documents(torch.tensor(bounds, dtype=torch.int32), flash)}
