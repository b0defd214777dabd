"""NF4 dequantization in one Triton kernel: on a GPU, `install()` makes it nf4.py's `dequantize`.

Every training matmul of a QLoRA model first turns a 4-bit weight back into bf16. bitsandbytes does
it in two kernels: one dequantizes the 8-bit absmax of every block of 64 weights to fp32 (double
quantization), the next the 4-bit codes, and the pair stays well short of the GPU's memory bandwidth
(bench/NOTES.md, sections 10 and 11, has the profiles). Here one kernel reads the codes and both levels
of scales and writes the weight:

    w[2i], w[2i+1] = NF4[byte_i >> 4] * s, NF4[byte_i & 15] * s     (high nibble first, as bitsandbytes packs)
    s = CODE8[absmax8[i // 32]] * absmax2[i // (32 * 256)] + offset   (32 bytes = one block of 64 weights;
                                                                        256 blocks share one fp32 scale)

Each program handles BYTES packed bytes (2 * BYTES weights); the 16-entry NF4 table and the 256-entry
8-bit code book are tiny and stay in cache, so the traffic is the 4.13 bits read and the 16 bits
written per weight. torch.compile sees the kernel as one opaque op (`minilora::dequantize_nf4`),
as it sees bitsandbytes'. `extra` columns can follow each row of the weight (speed/mlp.py puts the LoRA
factors there): the kernel then writes rows `cols + extra` apart, and no copy of the weight is needed.
Without Triton or a GPU, or for FP4 / single quantization, nf4.py keeps bitsandbytes'.

Reference: bitsandbytes' `dequantize_4bit`; tests/test_lora.py compares the two on the CPU through
Triton's interpreter (TRITON_INTERPRET=1) and, on a GPU, the compiled kernel.
"""
from __future__ import annotations

import contextlib

import torch

from .. import nf4

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: nf4.py keeps bitsandbytes'
    triton = None

BYTES = 1024  # packed bytes per program: 2,048 weights, 32 absmax blocks


def supports(packed: torch.Tensor, qs) -> bool:
    """Whether the kernel applies: Triton present, a CUDA tensor, NF4 with double quantization in blocks of
    64 (and 256 for the scales), and whole blocks (every linear of the supported models)."""
    return (triton is not None and packed.is_cuda and packed.dtype == torch.uint8 and packed.is_contiguous()
            and qs.quant_type == "nf4" and qs.nested
            and qs.blocksize == 64 and qs.state2.blocksize == 256 and qs.shape.numel() % 64 == 0)


def install():
    """From now on nf4.dequantize runs this kernel wherever it applies (speed.configure calls this on a GPU)."""
    if triton is not None:
        nf4.faster_dequantize = dequantize


def dequantize(packed: torch.Tensor, qs, dtype: torch.dtype, extra: torch.Tensor | None = None):
    """The (out, in) weight in `dtype`; with `extra` (out, k), the (out, in + k) matrix [weight | extra].
    None where the kernel does not apply (the contract of nf4.faster_dequantize)."""
    if not supports(packed, qs):
        return None
    rows, cols = qs.shape
    return dequantize_nf4(packed, qs.code, qs.absmax, qs.state2.code, qs.state2.absmax, qs.offset.reshape(1),
                          rows, cols, dtype, extra)


if triton is not None:
    @triton.jit
    def _dequantize_kernel(packed_ptr, code_ptr, absmax8_ptr, code8_ptr, absmax2_ptr, offset_ptr, out_ptr, n_bytes,
                           cols, row_stride, BYTES: tl.constexpr, STRIDED: tl.constexpr):
        i = tl.program_id(0) * BYTES + tl.arange(0, BYTES)  # byte i holds weights 2i and 2i+1
        inside = i < n_bytes
        byte = tl.load(packed_ptr + i, mask=inside, other=0).to(tl.int32)
        block = i // 32
        q = tl.load(absmax8_ptr + block, mask=inside, other=0).to(tl.int32)
        scale = tl.load(code8_ptr + q) * tl.load(absmax2_ptr + block // 256, mask=inside, other=0.0)
        scale = scale + tl.load(offset_ptr)
        hi = tl.load(code_ptr + (byte >> 4)) * scale
        lo = tl.load(code_ptr + (byte & 15)) * scale
        w = tl.interleave(hi, lo)  # (2 * BYTES,): weight 2i, then 2i + 1
        j = tl.program_id(0) * 2 * BYTES + tl.arange(0, 2 * BYTES)  # weight j is row j // cols, column j % cols
        where = (j // cols) * row_stride + j % cols if STRIDED else j
        tl.store(out_ptr + where, w.to(out_ptr.dtype.element_ty), mask=j < 2 * n_bytes)


def launch(packed, code, absmax8, code8, absmax2, offset, rows: int, cols: int, dtype: torch.dtype,
           extra: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel (on the CPU too, under TRITON_INTERPRET=1: how the tests check it)."""
    k = 0 if extra is None else extra.shape[1]
    out = torch.empty(rows, cols + k, dtype=dtype, device=packed.device)
    n_bytes = rows * cols // 2
    # Triton launches on the current device: make it the weight's (--device cuda:1 in a single process)
    with torch.cuda.device(packed.device) if packed.is_cuda else contextlib.nullcontext():
        _dequantize_kernel[(triton.cdiv(n_bytes, BYTES),)](packed, code, absmax8, code8, absmax2, offset, out,
                                                           n_bytes, cols, cols + k, BYTES=BYTES, STRIDED=k > 0)
    if k:
        out[:, cols:] = extra
    return out


@torch.library.custom_op("minilora::dequantize_nf4", mutates_args=())
def dequantize_nf4(packed: torch.Tensor, code: torch.Tensor, absmax8: torch.Tensor, code8: torch.Tensor,
                   absmax2: torch.Tensor, offset: torch.Tensor, rows: int, cols: int, dtype: torch.dtype,
                   extra: torch.Tensor | None = None) -> torch.Tensor:
    return launch(packed, code, absmax8, code8, absmax2, offset, rows, cols, dtype, extra)


@dequantize_nf4.register_fake
def _(packed, code, absmax8, code8, absmax2, offset, rows, cols, dtype, extra=None):
    return packed.new_empty((rows, cols + (0 if extra is None else extra.shape[1])), dtype=dtype)
