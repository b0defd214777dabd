"""GGML's quantized weight formats, and which tensor gets which: llama.cpp's Q4_K_M and friends, in numpy.

llama.cpp stores a weight matrix row by row, each row cut into blocks; a block holds a few scales and one
small integer per weight, and a weight is read back as  w = d * q  or  w = d * q - m. This file writes those
blocks. Each encoder below follows llama.cpp's *reference* C encoder of the same name, the one its
`llama-quantize` runs when no importance matrix is given (ggml/src/ggml-quants.c, `quantize_row_*_ref`;
`quantize_q4_K` and the rest call it when `quant_weights` is NULL). The arithmetic is float32 throughout,
as in C, and rounds as C does: `nearest_int` (ties to even, i.e. np.rint), `roundf` (ties away from zero)
and casts to int (towards zero) where the C code uses each. The loops over blocks become array operations
over all blocks of a chunk of rows at once; only the search over trial scales stays a Python loop.
Against llama.cpp's own encoders the bytes are identical (tests/test_llama_cpp.py; bench/gguf_kl.py on
SmolLM2), but where two trial scales of the K-quants' search nearly tie and float32 sums taken in another
order break the tie the other way: 3 Q4_K/Q5_K super-blocks in 10^6 on SmolLM2, 0.2% of Q4_K's on random data.

The block layouts, from ggml/src/ggml-common.h (little-endian; f16 = IEEE half, rounded to nearest even):

    type  weights  bytes  bits/w  layout
    Q8_0     32      34    8.5    d:f16, qs:int8[32]                         w = d*q
    Q4_0     32      18    4.5    d:f16, qs:u8[16] (q[j] | q[j+16] << 4)     w = d*(q - 8)
    Q5_0     32      22    5.5    d:f16, qh:u32 (bit 4 of q[j] at bit j), qs:u8[16] as Q4_0   w = d*(q - 16)
    Q5_1     32      24    6.0    d:f16, m:f16, qh:u32, qs:u8[16]            w = d*q + m
    Q4_K    256     144    4.5    d:f16, dmin:f16, scales:u8[12], qs:u8[128] w = d*sc[j]*q - dmin*m[j]
    Q5_K    256     176    5.5    d:f16, dmin:f16, scales:u8[12], qh:u8[32], qs:u8[128]  as Q4_K, q 5 bits
    Q6_K    256     210    6.5625 ql:u8[128], qh:u8[64], scales:int8[16], d:f16      w = d*sc[j]*(q - 32)

The K-quants ("super-blocks" of 256) give each sub-block its own scale (and min), and quantize those
scales too: Q4_K/Q5_K have 8 sub-blocks of 32 with 6-bit scales and mins (relative to d and dmin); Q6_K
has 16 sub-blocks of 16 with 8-bit signed scales (relative to d). That is why they beat Q4_0/Q5_0 at the
same size: a scale per 32 weights costs 6 bits instead of 16, and an offset (min) fits skewed blocks.

The second half of the file is the per-tensor choice of the `_M` mixes (llama.cpp's `llama_tensor_get_type`).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

QK = 32     # weights per block of Q4_0, Q5_0, Q5_1, Q8_0
QK_K = 256  # weights per super-block of the K-quants

# GGML type name -> (weights per block, bytes per block)
BLOCKS = {"Q8_0": (QK, 34), "Q4_0": (QK, 18), "Q5_0": (QK, 22), "Q5_1": (QK, 24),
          "Q4_K": (QK_K, 144), "Q5_K": (QK_K, 176), "Q6_K": (QK_K, 210)}

f32 = np.float32
GROUP_MAX_EPS = f32(1e-15)  # ggml-quants.c: a (sub-)block whose largest |x| is below this is all zero


def _f16(a: np.ndarray) -> np.ndarray:
    """float32 -> the two little-endian bytes of its f16 (GGML_FP32_TO_FP16: round to nearest even)."""
    return np.ascontiguousarray(a, dtype=np.float32).astype("<f2").view(np.uint8).reshape(*np.shape(a), 2)


def _f16_round(a: np.ndarray) -> np.ndarray:
    """What a scale becomes once stored as f16 and read back (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(a)))."""
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def _roundf(v: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (np.rint would send 2.5 to 2). v - trunc(v) is exact in float32."""
    t = np.trunc(v)
    return np.where(np.abs(v - t) >= 0.5, t + np.sign(v), t)


def _signed_absmax(x: np.ndarray) -> np.ndarray:
    """The entry of largest |x| along the last axis, with its sign; the first one on ties, as C's `amax < fabsf(v)`."""
    return np.take_along_axis(x, np.abs(x).argmax(axis=-1)[..., None], axis=-1)[..., 0]


def _inverse(d: np.ndarray) -> np.ndarray:
    """C's `id = d ? 1.0f/d : 0.0f`."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, f32(1) / d, f32(0)).astype(np.float32)


# ----------------------------------------------------------------------------- blocks of 32: one scale each

def q8_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q8_0_ref. x: (nb, 32) -> (nb, 34). d = absmax / 127, q = roundf(x / d)."""
    d = np.abs(x).max(axis=-1) / f32(127)
    q = _roundf(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_f16(d), q.view(np.uint8)], axis=-1)


def q4_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_0_ref. x: (nb, 32) -> (nb, 18).

    d = max / -8, where max is the signed entry of largest |x|: that entry becomes q = 0 (w = -8 d), the
    end of [-8, 7] that has room, so the largest weight is exact. q = min(15, (int)(x / d + 8.5)).
    """
    d = _signed_absmax(x) / f32(-8)
    q = np.minimum(15, np.trunc(x * _inverse(d)[:, None] + f32(8.5))).astype(np.uint8)
    return np.concatenate([_f16(d), q[:, :16] | (q[:, 16:] << 4)], axis=-1)


def _low_nibbles_and_bit4(q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q5_0/Q5_1 packing of 32 5-bit values: qs[j] = q[j] & 15 | (q[j+16] & 15) << 4, and the u32 qh whose
    bit j is bit 4 of q[j]."""
    qs = (q[:, :16] & 15) | ((q[:, 16:] & 15) << 4)
    qh = ((q.astype(np.uint32) >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=-1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs


def q5_0(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_0_ref. x: (nb, 32) -> (nb, 22). As Q4_0 on [-16, 15]: d = max / -16."""
    d = _signed_absmax(x) / f32(-16)
    q = np.minimum(31, np.trunc(x * _inverse(d)[:, None] + f32(16.5))).astype(np.uint8)
    qh, qs = _low_nibbles_and_bit4(q)
    return np.concatenate([_f16(d), qh, qs], axis=-1)


def q5_1(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_1_ref. x: (nb, 32) -> (nb, 24). w = d q + m with m = min, d = (max - min) / 31,
    q = (int)((x - min) / d + 0.5). (llama.cpp's fallback for Q5_K rows whose length is not a multiple of 256.)"""
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    d = (hi - lo) / f32(31)
    q = np.trunc((x - lo[:, None]) * _inverse(d)[:, None] + f32(0.5)).astype(np.uint8)
    qh, qs = _low_nibbles_and_bit4(q)
    return np.concatenate([_f16(d), _f16(lo), qh, qs], axis=-1)


# ----------------------------------------------------------------------------- the K-quants' scale searches

# Layout: these two searches hold a chunk of sub-blocks as (k, n), the k weights of sub-block i down
# column i, so that a sum over a sub-block is k - 1 adds of contiguous rows (numpy reduces a short last
# axis several times slower), and write every trial into the same preallocated buffers (a fresh array
# per operation would cost a page fault per 4 KB). Only per-sub-block sums (length n) are new each trial.

def _scale_min_search(x, w, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants, for every column of x at once: fit x ~ scale * L - the_min, L in [0, nmax].

    x, w: (k, n) values and their weights. Start from the range: min = min(x, 0), scale = (max - min) / nmax.
    Then try nstep + 1 grids, iscale = (nmax + rmin + rdelta * is) / (max - min): round x onto each,
    l = clamp(round(iscale (x - min)), 0, nmax), and solve weighted least squares for the best scale and min
    for those integers,
        [sum w l^2  sum w l] [scale]   [sum w l x]
        [sum w l    sum w  ] [ min ] = [sum w x  ]      (D = its determinant)
    with min clamped to <= 0, keeping the grid with the smallest  E = sum w (scale l + min - x)^2.
    As in the C code, a better fit's min is used by the grids after it (in both x - min and max - min).

    E takes a pass over the weights, as in C: expanding it into the sums above would save a third of the
    time, but its terms nearly cancel, and near-ties between two grids would then go the other way more
    often (1 Q5_K block in 50 differed from llama.cpp's, against none). The integers are not kept per grid:
    the winning grid is remembered, and they are rounded on it once more at the end.
    Returns (scale (n,), the_min = -min (n,), L (k, n) uint8).
    """
    lo = np.minimum(x.min(axis=0), f32(0))
    hi = x.max(axis=0)
    flat = hi == lo  # all equal (e.g. all zero): L = 0, scale 0
    wx = w * x
    sum_w, sum_x = w.sum(axis=0), wx.sum(axis=0)
    t, diff = np.empty_like(x), np.empty_like(x)

    def grid(iscale, lo):  # t = clamp(round(iscale (x - lo)), 0, nmax), in place
        np.subtract(x, lo, out=t)
        np.multiply(t, iscale, out=t)
        np.rint(t, out=t)
        return np.clip(t, 0, nmax, out=t)

    def sums(iscale, lo):  # sum w l, sum w l^2, sum w x l over each sub-block (einsum: no temporaries)
        l = grid(iscale, lo)
        return np.einsum("ij,ij->j", w, l), np.einsum("ij,ij,ij->j", w, l, l), np.einsum("ij,ij->j", wx, l)

    def error(s, m):  # sum w (s l + m - x)^2 on the grid in t (the last one `sums` rounded)
        np.multiply(t, s, out=diff)
        np.add(diff, m, out=diff)
        np.subtract(diff, x, out=diff)
        return np.einsum("ij,ij,ij->j", w, diff, diff)

    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        iscale = f32(nmax) / np.where(flat, f32(1), hi - lo)
        scale = f32(1) / iscale
        sums(iscale, lo)
        best = error(scale, lo)
        best_iscale, best_lo = iscale, lo  # the grid the kept integers were rounded on
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            s_l, s_l2, s_xl = sums(iscale, lo)
            D = sum_w * s_l2 - s_l * s_l
            this_scale = (sum_w * s_xl - sum_x * s_l) / D
            this_min = (s_l2 * sum_x - s_l * s_xl) / D
            positive = this_min > 0  # an offset above zero would not be a "min": refit the scale alone
            this_min = np.where(positive, f32(0), this_min)
            this_scale = np.where(positive, s_xl / s_l2, this_scale)
            err = error(this_scale, this_min)
            better = (D > 0) & (err < best) & ~flat
            best_iscale, best_lo = np.where(better, iscale, best_iscale), np.where(better, lo, best_lo)
            best = np.where(better, err, best)
            scale, lo = np.where(better, this_scale, scale), np.where(better, this_min, lo)
        L = grid(best_iscale.astype(np.float32), best_lo.astype(np.float32)).astype(np.uint8)
    L[:, flat] = 0
    return np.where(flat, f32(0), scale).astype(np.float32), (-lo).astype(np.float32), L


def _symmetric_search(x, nmax: int):
    """make_qx_quants with rmse_type 1 (weights w = x^2), for every column of x at once: x ~ scale * l,
    l in [-nmax, nmax - 1]. The grid iscale = -nmax / max puts the largest |x| on -nmax; 18 more grids,
    -(nmax + 0.1 is) / max for is = -9..9, is != 0, are tried, each with its least-squares scale
    sum w x l / sum w l^2, keeping the one with the largest (sum w x l)^2 / sum w l^2 (the smallest error).
    x: (k, n). Returns (scale (n,), L = l + nmax (k, n) uint8)."""
    mx = np.take_along_axis(x, np.abs(x).argmax(axis=0)[None], axis=0)[0]  # signed; the first on ties
    zero = np.abs(mx) < GROUP_MAX_EPS
    mx = np.where(zero, f32(1), mx)
    w = x * x
    wx = w * x
    t = np.empty_like(x)

    def grid(iscale):
        np.multiply(x, iscale, out=t)
        np.rint(t, out=t)
        return np.clip(t, -nmax, nmax - 1, out=t)

    def sums(iscale):  # sum w x l, sum w l^2
        l = grid(iscale)
        return np.einsum("ij,ij->j", wx, l), np.einsum("ij,ij,ij->j", w, l, l)

    with np.errstate(divide="ignore", invalid="ignore"):
        best_iscale = f32(-nmax) / mx
        sumlx, suml2 = sums(best_iscale)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(f32(nmax) + f32(0.1) * f32(step)) / mx
            sumlx, suml2 = sums(iscale)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
            best_iscale = np.where(better, iscale, best_iscale)
    L = (grid(best_iscale) + nmax).astype(np.uint8)
    L[:, zero] = 0
    return np.where(zero, f32(0), scale).astype(np.float32), L


# ----------------------------------------------------------------------------- Q4_K, Q5_K: 8 x 32, 6-bit scales and mins

def _pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and eight 6-bit mins -> 12 bytes (get_scale_min_k4 reads them back):
    bytes 0-3: ls[0:4] | top 2 bits of ls[4:8] << 6;  bytes 4-7: lm[0:4] | top 2 bits of lm[4:8] << 6;
    bytes 8-11: low 4 bits of ls[4:8] | low 4 bits of lm[4:8] << 4."""
    return np.concatenate([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                           (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4)], axis=-1).astype(np.uint8)


def _k_scales(x: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int):
    """quantize_row_q4_K_ref / quantize_row_q5_K_ref up to the integers. x: (nb, 256).

    Each sub-block of 32 is fitted by _scale_min_search with weights  sqrt(mean x^2) + |x|. The 8 scales
    and 8 mins are then quantized to 6 bits against the largest of each, d = max_scale / 63 and
    dmin = max_min / 63 (stored f16), and every weight is rounded again onto the grid the *stored*
    scales give: q = clamp(round((x + dmin m) / (d sc)), 0, nmax). Returns (d, dmin, packed scales, q (nb, 256)).
    """
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    cols = np.ascontiguousarray(sub.T)  # (32, nb * 8): see "Layout" above
    av_x = np.sqrt(np.einsum("ij,ij->j", cols, cols) / f32(32))
    scales, mins, L = _scale_min_search(cols, av_x[None, :] + np.abs(cols), nmax, rmin, rdelta, nstep)
    L = L.T
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=-1), f32(0))
    max_min = np.maximum(mins.max(axis=-1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0)).astype(np.float32)
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0)).astype(np.float32)
    # C: uint8_t ls = nearest_int(...); ls = MIN(63, ls)  (the cast to uint8 wraps, then the clamp)
    ls = np.minimum(63, np.rint(inv_scale[:, None] * scales).astype(np.int64) & 0xFF).astype(np.uint8)
    lm = np.minimum(63, np.rint(inv_min[:, None] * mins).astype(np.int64) & 0xFF).astype(np.uint8)
    d, dmin = max_scale / f32(63), max_min / f32(63)
    step = (_f16_round(d)[:, None] * ls).reshape(nb * 8, 1)  # d * sc of each sub-block, as stored
    offset = (_f16_round(dmin)[:, None] * lm).reshape(nb * 8, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint((sub + offset) / step), 0, nmax)
    L = np.where(step != 0, q, L).astype(np.uint8).reshape(nb, 256)  # a zero scale keeps the first fit's L
    return d, dmin, _pack_scales_mins(ls, lm), L


def q4_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q4_K_ref. x: (nb, 256) -> (nb, 144): d, dmin, scales[12], qs[128] where for each
    64 weights n: qs[32 n + l] = q[64 n + l] | q[64 n + 32 + l] << 4. Scale search: 15 levels,
    grids nmax - 1 + 0.1 is, is = 0..20."""
    d, dmin, sc, L = _k_scales(x, 15, -1.0, 0.1, 20)
    L = L.reshape(-1, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16(d), _f16(dmin), sc, qs], axis=-1)


def q5_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q5_K_ref. x: (nb, 256) -> (nb, 176): d, dmin, scales[12], qh[32], qs[128]. The low 4
    bits pack as Q4_K's; bit 4 of q[64 n + l] is bit 2n of qh[l], of q[64 n + 32 + l] bit 2n + 1.
    Scale search: 31 levels, grids nmax - 0.5 + 0.1 is, is = 0..15."""
    d, dmin, sc, L = _k_scales(x, 31, -0.5, 0.1, 15)
    L = L.reshape(-1, 4, 2, 32)
    qs = ((L[:, :, 0] & 15) | ((L[:, :, 1] & 15) << 4)).reshape(-1, 128)
    bit = (np.arange(4)[:, None] * 2 + np.arange(2)[None, :]).astype(np.uint8)  # (n, half) -> 2n + half
    qh = ((L >> 4) << bit[None, :, :, None]).sum(axis=(1, 2), dtype=np.uint8)
    return np.concatenate([_f16(d), _f16(dmin), sc, qh, qs], axis=-1)


# ----------------------------------------------------------------------------- Q6_K: 16 x 16, 8-bit scales

def q6_k(x: np.ndarray) -> np.ndarray:
    """quantize_row_q6_K_ref. x: (nb, 256) -> (nb, 210): ql[128], qh[64], scales:int8[16], d.

    Each sub-block of 16 gets a symmetric scale (_symmetric_search, 6-bit l in [-32, 31]); the 16 scales
    are quantized to int8 against the one of largest |scale|, d = -max_scale / 128, and every weight is
    rounded again onto the stored grid: q = clamp(round(x / (d sc)), -32, 31) + 32.
    Packing, per half h of 128 weights (l < 32): ql[64h + l] = q[128h + l] & 15 | (q[128h + 64 + l] & 15) << 4,
    ql[64h + 32 + l] = q[128h + 32 + l] & 15 | (q[128h + 96 + l] & 15) << 4,
    qh[32h + l] = sum over k < 4 of (q[128h + 32k + l] >> 4) << 2k.
    """
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)
    scales, L = _symmetric_search(np.ascontiguousarray(sub.T), 32)
    L = L.T
    scales = scales.reshape(nb, 16)
    max_scale = _signed_absmax(scales)
    zero = np.abs(max_scale) < GROUP_MAX_EPS  # such a block is written as all zero bytes
    with np.errstate(divide="ignore"):
        iscale = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale)).astype(np.float32)
        d = np.where(zero, f32(0), f32(1) / iscale).astype(np.float32)
    sc = np.minimum(127, np.rint(iscale[:, None] * scales)).astype(np.int8)
    step = (_f16_round(d)[:, None] * sc).reshape(nb * 16, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.clip(np.rint(sub / step), -32, 31) + 32
    L = np.where(step != 0, q, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # (half, quarter, l)
    ql = np.stack([(L[:, :, 0] & 15) | ((L[:, :, 2] & 15) << 4),
                   (L[:, :, 1] & 15) | ((L[:, :, 3] & 15) << 4)], axis=2).reshape(nb, 128)
    qh = ((L >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(axis=2, dtype=np.uint8)
    out = np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), _f16(d)], axis=-1)
    out[zero] = 0
    return out


ENCODERS = {"Q8_0": q8_0, "Q4_0": q4_0, "Q5_0": q5_0, "Q5_1": q5_1, "Q4_K": q4_k, "Q5_K": q5_k, "Q6_K": q6_k}
CHUNK = 1 << 16  # weights encoded per step: the search's work arrays (256 KB each) stay in the core's cache


def quantize(data: np.ndarray, qtype: str, threads: int | None = None) -> np.ndarray:
    """A float array (..., n) -> its GGML blocks as uint8 (..., n / block * bytes), n a multiple of the block.

    Blocks are independent, so the tensor is encoded CHUNK weights at a time, on `threads` threads
    (default: every core; numpy releases the GIL inside its loops). Memory stays at the tensor, its
    output and a few chunk-sized work arrays per thread.
    """
    if qtype not in ENCODERS:
        raise ValueError(f"quants.py: no encoder for {qtype!r}; there are {', '.join(ENCODERS)}.")
    block, nbytes = BLOCKS[qtype]
    if data.shape[-1] % block:
        raise ValueError(f"quants.py: rows of {data.shape[-1]} weights cannot be cut into {qtype} blocks of "
                         f"{block}; choose the type per tensor with mix_type, which falls back as llama.cpp does.")
    x = np.ascontiguousarray(data, dtype=np.float32).reshape(-1, block)
    out = np.empty((x.shape[0], nbytes), dtype=np.uint8)
    per_chunk = max(1, CHUNK // block)

    def encode(start: int) -> None:
        out[start:start + per_chunk] = ENCODERS[qtype](x[start:start + per_chunk])

    starts = range(0, x.shape[0], per_chunk)
    threads = min(threads or os.cpu_count() or 1, len(starts))
    if threads <= 1:
        for start in starts:
            encode(start)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(encode, starts))  # list(): re-raises an encoder's exception here
    return out.reshape(*data.shape[:-1], data.shape[-1] // block * nbytes)


# ----------------------------------------------------------------------------- which tensor gets which type
# A GGUF "file type" is a mix: most 2-D weights take its main type, a few take more bits. For the types
# llama.cpp's converter writes (f16, bf16, q8_0: convert_hf_to_gguf.py) every 2-D weight takes the type.
# For the types its `llama-quantize` writes, the choice below is llama.cpp's `llama_tensor_get_type`
# (src/llama-quant.cpp, with `tensor_type_fallback`) for a dense Llama/Qwen2 model and no importance
# matrix, which is how unsloth's save_pretrained_gguf runs it. 1-D tensors (norms, biases, rope_freqs)
# stay f32 in every mix.

# --gguf name -> the type of most 2-D weights
MAIN_TYPE = {"f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q5_0": "Q5_0",
             "q4_k_m": "Q4_K", "q5_k_m": "Q5_K", "q6_k": "Q6_K"}
# tensor_type_fallback: a K-quant needs rows of a multiple of 256 weights; a row that is not (SmolLM2's
# hidden size is 576) takes the 32-block type of about the same size, and F16 if even 32 does not divide it.
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def use_more_bits(i_layer: int, n_layer: int) -> bool:
    """llama.cpp's layers that get more bits in the _M mixes: the first and last eighth, and every third
    layer between (integer division, as in C)."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def mix_type(name: str, shape: tuple[int, ...], file_type: str, *, n_layer: int, tied: bool,
             is_70b: bool = False) -> str:
    """The GGML type of one tensor (GGUF name, shape as (rows, row length)) in a `file_type` file.

    - q4_k_m / q5_k_m: attn_v and ffn_down take Q6_K in the layers `use_more_bits` picks (for 32 layers:
      0-3, 6, 9, ..., 27 and 28-31: half of them). A 70B model (80 layers, grouped-query attention) puts
      the other attn_v at Q5_K: its attn_v is 8x smaller than attn_q, so the bits are cheap.
    - output.weight takes Q6_K in every llama-quantize mix, Q8_0 if its rows do not fit the main type's
      blocks; a tied token_embd.weight *is* the output, so it is chosen the same way. An untied
      token_embd.weight takes the main type (it is looked up, not multiplied: errors matter less).
    - Then the fallback for rows that K-quant blocks do not fit (FALLBACK).
    `n_layer`: the model's layer count; `tied`: no output.weight (the embedding doubles as it).
    """
    if len(shape) < 2:
        return "F32"
    main, ncols = MAIN_TYPE[file_type], shape[-1]
    if file_type in ("f16", "bf16"):
        return main
    if file_type == "q8_0":  # convert_hf_to_gguf.py keeps a tensor it cannot cut into blocks of 32 in f16
        return main if ncols % QK == 0 else "F16"
    qtype = main
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        qtype = "Q8_0" if ncols % BLOCKS[main][0] else "Q6_K"
    elif name.endswith((".attn_v.weight", ".ffn_down.weight")):
        layer = int(name.split(".")[1])  # blk.{i}.: llama.cpp counts these tensors in layer order
        if file_type in ("q4_k_m", "q5_k_m") and use_more_bits(layer, n_layer):
            qtype = "Q6_K"
        elif is_70b and name.endswith(".attn_v.weight") and qtype == "Q4_K":
            qtype = "Q5_K"
    if ncols % BLOCKS[qtype][0]:
        if qtype not in FALLBACK:
            raise ValueError(f"{name}: rows of {ncols} weights cannot be cut into {qtype} blocks of "
                             f"{BLOCKS[qtype][0]}, and llama.cpp defines no fallback for {qtype} (its llama-quantize "
                             "stops here too); export this model as f16, bf16 or q8_0.")
        qtype = FALLBACK[qtype]
        if ncols % BLOCKS[qtype][0]:
            qtype = "F16"
    return qtype
