"""export/quants.py against llama.cpp's own Python (the `gguf` package) and llama.cpp's own llama-quantize.

- The block layouts: every block type is decoded by gguf.quants.dequantize, which llama.cpp maintains
  beside its C decoders; a nibble, bit or scale in the wrong place decodes to noise.
- The bytes: for the types the gguf package can also encode (Q8_0, Q4_0, Q5_0, Q5_1), ours are identical.
  (All seven are compared with llama.cpp's C encoders in test_llama_cpp.py, through node-llama-cpp's library.)
- The mixes: the type of every tensor, for five model shapes and five file types, equals what
  `llama-quantize --dry-run` printed (tests/data/llama_quantize_types.json, from bench/llama_quantize_types.py).
"""
import json
from pathlib import Path

import numpy as np
import pytest

from minilora.export.quants import BLOCKS, MAIN_TYPE, mix_type, quantize, use_more_bits

# Relative RMS error of each type on N(0, 0.02) weights (with the edge cases below mixed in), measured, and
# the bound: 1.1x. A wrong layout decodes to errors of ~1 (uncorrelated with the input); a scale off by one
# step of its 6-bit grid, to > 0.1.
RMSE = {"Q8_0": 0.0054, "Q6_K": 0.0178, "Q5_1": 0.0380, "Q5_K": 0.0363, "Q5_0": 0.0428, "Q4_K": 0.0715, "Q4_0": 0.0863}


def weights():
    x = (np.random.default_rng(0).standard_normal((64, 1024)) * 0.02).astype(np.float32)
    x[3, :256] = 0        # a zero super-block: scales 0, all bytes of Q6_K zero
    x[5, 32:64] = 0.01    # a constant block: min == max for Q5_1, one level for the K-quants
    x[7, :256] *= 50      # outliers: one super-block 50x larger than the rest of its row
    x[9] = np.abs(x[9])   # an all-positive row: min = 0 for the K-quants' offsets
    return x


@pytest.mark.parametrize("qtype", sorted(BLOCKS))
def test_blocks_decode_with_llama_cpps_python(qtype):
    import gguf

    x = weights()
    blocks = quantize(x, qtype)
    block, nbytes = BLOCKS[qtype]
    assert blocks.shape == (64, 1024 // block * nbytes) and blocks.dtype == np.uint8
    assert gguf.quants.quant_shape_to_byte_shape((64, 1024), gguf.GGMLQuantizationType[qtype]) == blocks.shape
    back = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType[qtype])
    rmse = np.sqrt(((back - x) ** 2).mean() / (x ** 2).mean())
    assert rmse < 1.1 * RMSE[qtype], rmse
    assert (back[3, :256] == 0).all()  # zeros stay exactly zero
    np.testing.assert_allclose(back[7, :256], x[7, :256], atol=1.1 * RMSE[qtype] * 50 * 0.02 * 4)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_0", "Q5_1"])
def test_bytes_equal_the_gguf_package(qtype):
    import gguf

    x = weights()
    np.testing.assert_array_equal(quantize(x, qtype), gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype]))


def test_threads_and_chunks_do_not_change_the_bytes():
    """Blocks are independent: the chunking and the thread pool are invisible in the output."""
    import minilora.export.quants as gq

    x = weights()
    one = quantize(x, "Q4_K", threads=1)
    old, gq.CHUNK = gq.CHUNK, 256 * 3  # chunks that do not divide the rows
    try:
        np.testing.assert_array_equal(quantize(x, "Q4_K", threads=3), one)
    finally:
        gq.CHUNK = old


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"rows of 576 weights cannot be cut into Q4_K blocks of 256"):
        quantize(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match=r"no encoder for 'Q3_K'"):
        quantize(np.zeros((2, 256), np.float32), "Q3_K")
    with pytest.raises(ValueError, match=r"blk.0.attn_q.weight: rows of 100 weights .* Q4_0 .* export this model as "
                                         r"f16, bf16 or q8_0"):
        mix_type("blk.0.attn_q.weight", (64, 100), "q4_0", n_layer=2, tied=False)
    assert mix_type("blk.0.attn_q.weight", (64, 100), "q4_k_m", n_layer=2, tied=False) == "F16"  # no fallback fits
    assert mix_type("blk.0.attn_q.weight", (64, 100), "q8_0", n_layer=2, tied=False) == "F16"    # the converter's


def test_mixes_equal_llama_quantize():
    """Every tensor's type, against llama-quantize --dry-run on f16 files of five shapes: SmolLM2 (rows of 576,
    tied), the tests' tiny Qwen2 (rows of 256, tied), R1-Distill-Qwen-1.5B, -Llama-8B and -Llama-70B (llama.cpp's
    "70B", whose attn_v get Q5_K). The shapes' tensor lists are bench/llama_quantize_types.py's."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench.llama_quantize_types import tensor_shapes

    table = json.loads((Path(__file__).parent / "data" / "llama_quantize_types.json").read_text())
    checked = 0
    for key, m in table["models"].items():
        shapes = tensor_shapes(m["arch"], m["hidden"], m["intermediate"], m["layers"], m["heads"], m["kv_heads"],
                               m["vocab"], m["tied"])
        for file_type, expected in m["types"].items():
            for name, want in expected.items():
                names = [name] if "*" not in name else [name.replace("*", str(i)) for i in range(m["layers"])]
                wants = [want] if "*" not in name else want.split()
                for n, w in zip(names, wants, strict=True):
                    got = mix_type(n, shapes[n], file_type, n_layer=m["layers"], tied=m["tied"],
                                   is_70b=key == "llama-70b")
                    assert got == w, (key, file_type, n)
                    checked += 1
    assert checked == 5 * sum(len(tensor_shapes(m["arch"], m["hidden"], m["intermediate"], m["layers"], m["heads"],
                                                 m["kv_heads"], m["vocab"], m["tied"])) for m in table["models"].values())


def test_use_more_bits_for_32_layers():
    """The layers of an 8B model whose attn_v and ffn_down take Q6_K in q4_k_m (as llama.cpp's own 8B Q4_K_M
    files have them): the first and last four, and every third from 6."""
    assert [i for i in range(32) if use_more_bits(i, 32)] == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert set(MAIN_TYPE) == {"f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_k_m", "q5_k_m", "q6_k"}
