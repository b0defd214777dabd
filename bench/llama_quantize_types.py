"""Record which type llama.cpp's own `llama-quantize` gives each tensor, for tests/test_export/quants.py.

For each shape below, writes an f16 GGUF header with every tensor of that shape (metadata as
minilora's write_gguf writes it), its data a sparse run of zeros (a few KB on disk even for 70B), and
runs `llama-quantize --dry-run` on it for each file type: llama.cpp picks every tensor's type
(llama_tensor_get_type) and prints it without quantizing anything. The table goes to
tests/data/llama_quantize_types.json (per layer kind, one type per layer), which the tests compare
quants.mix_type against.

llama-quantize is built from the llama.cpp source node-llama-cpp ships (a git bundle inside the npm
package; measurement only, no llama.cpp code is committed):

    git clone tests/llama_cpp/node_modules/node-llama-cpp/llama/gitRelease.bundle /tmp/llama.cpp
    cmake -S /tmp/llama.cpp -B /tmp/llama.cpp/build -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build /tmp/llama.cpp/build --target llama-quantize -j2
    python bench/llama_quantize_types.py --llama-quantize /tmp/llama.cpp/build/bin/llama-quantize
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.shapes import SHAPES  # noqa: E402

# name: (arch, hidden, intermediate, layers, heads, kv heads, vocab, tied)
MODELS = {
    "smollm2-135m": ("llama", 576, 1536, 30, 9, 3, 49152, True),     # the tests' real model: rows of 576
    "tiny-256": ("qwen2", 256, 512, 4, 4, 2, 320, True),             # the tests' tiny models
    "qwen-1.5b": ("qwen2", *[SHAPES["qwen-1.5b"][k] for k in ("hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")], False),
    "llama-8b": ("llama", *[SHAPES["llama-8b"][k] for k in ("hidden_size", "intermediate_size",
                 "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size")], False),
    "llama-70b": ("llama", 8192, 28672, 80, 64, 8, 128256, False),   # R1-Distill-Llama-70B: llama.cpp's "70B"
}
FTYPES = {"q4_0": "Q4_0", "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q5_k_m": "Q5_K_M", "q6_k": "Q6_K"}


def tensor_shapes(arch, hidden, inter, layers, heads, kv, vocab, tied):
    """GGUF name -> shape (rows, row length), as write_gguf names them."""
    hd = hidden // heads
    out = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        out["output.weight"] = (vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        out.update({b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
                    b + "attn_q.weight": (heads * hd, hidden), b + "attn_k.weight": (kv * hd, hidden),
                    b + "attn_v.weight": (kv * hd, hidden), b + "attn_output.weight": (hidden, heads * hd),
                    b + "ffn_gate.weight": (inter, hidden), b + "ffn_up.weight": (inter, hidden),
                    b + "ffn_down.weight": (hidden, inter)})
        if arch == "qwen2":
            out.update({b + "attn_q.bias": (heads * hd,), b + "attn_k.bias": (kv * hd,), b + "attn_v.bias": (kv * hd,)})
    return out


def sparse_f16_gguf(path: Path, model) -> None:
    import gguf

    arch, hidden, inter, layers, heads, kv, vocab, tied = model
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type("model")
    w.add_name(path.stem)
    w.add_block_count(layers)
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    size = 0
    for name, shape in tensor_shapes(*model).items():
        qtype = gguf.GGMLQuantizationType.F32 if len(shape) == 1 else gguf.GGMLQuantizationType.F16
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        nbytes = int(np.prod(byte_shape))
        w.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
        size += -(-nbytes // 32) * 32  # GGUF aligns each tensor's data to 32 bytes
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    with open(path, "r+b") as f:
        header = f.seek(0, 2)
        f.truncate(-(-header // 32) * 32 + size)  # the data: a hole of zeros, not written


LINE = re.compile(r"\]\s+(\S+)\s+- \[.*?\], type =\s+(\S+), size =.*?(?:\((\S+)\))?\s*$")


def dry_run(binary: str, path: Path, ftype: str) -> tuple[dict[str, str], str]:
    """({tensor: type}, llama-quantize's version line)."""
    out = subprocess.run([binary, "--dry-run", str(path), ftype], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama-quantize failed on {path} {ftype}:\n{out.stderr[-3000:]}")
    types, version = {}, ""
    for line in (out.stdout + out.stderr).splitlines():
        version = version or (line if line.startswith("version:") else "")
        m = LINE.search(line)
        if m:
            types[m.group(1)] = (m.group(3) or m.group(2)).upper()  # "(q6_K)" when it changes, else the input type
    return types, version


def compact(types: dict[str, str], layers: int) -> dict:
    """{"token_embd.weight": "Q8_0", ..., "blk.*.attn_v.weight": "Q6_K Q6_K ... (one per layer)"}."""
    out = {n: t for n, t in types.items() if not n.startswith("blk.")}
    for kind in sorted({n.split(".", 2)[2] for n in types if n.startswith("blk.")}):
        out[f"blk.*.{kind}"] = " ".join(types[f"blk.{i}.{kind}"] for i in range(layers))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-quantize", required=True)
    p.add_argument("--out", default=str(ROOT / "tests" / "data" / "llama_quantize_types.json"))
    args = p.parse_args(argv)
    table = {"llama_quantize": None, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for key, model in MODELS.items():
            path = Path(tmp) / f"{key}-f16.gguf"
            sparse_f16_gguf(path, model)
            arch, hidden, inter, layers, heads, kv, vocab, tied = model
            entry = {"arch": arch, "hidden": hidden, "intermediate": inter, "layers": layers, "heads": heads,
                     "kv_heads": kv, "vocab": vocab, "tied": tied, "types": {}}
            for ours, theirs in FTYPES.items():
                types, table["llama_quantize"] = dry_run(args.llama_quantize, path, theirs)
                assert len(types) == len(tensor_shapes(*model)), (key, ours)
                entry["types"][ours] = compact(types, layers)
            table["models"][key] = entry
            print(key, {k: len(v) for k, v in entry["types"].items()}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
