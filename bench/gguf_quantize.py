"""How long write_gguf's quantization takes for a real model's shapes, on this machine's CPU.

Streams random N(0, 0.02) tensors with the shapes of a bench/shapes.py config (llama-8b: the real
DeepSeek-R1-Distill-Llama-8B), one at a time as write_gguf reads them, rounds each through bf16 (the
checkpoint's dtype), picks its type with quants.mix_type and encodes it with quants.quantize.
Only the encoding is timed (wall and process CPU seconds); the random numbers are not. Nothing is written
to disk: the file's size is the sum of the encoded tensors, plus the f32 1-D tensors.

    python bench/gguf_quantize.py --shape llama-8b --type q4_k_m --threads 2 --out bench/results/gguf_quantize-llama-8b-q4_k_m.json
    python bench/gguf_quantize.py --shape llama-8b --sizes    # every type's tensor bytes, from the mix alone
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.shapes import hf_config, model_config  # noqa: E402
from minilora.export.gguf import hf_to_gguf_name, is_70b  # noqa: E402
from minilora.export.quants import BLOCKS, MAIN_TYPE, mix_type, quantize  # noqa: E402


def sizes(cfg) -> dict:
    """{type: (tensor bytes, bits per weight)}: each tensor's type from mix_type, its size from its blocks."""
    out = {}
    for file_type in MAIN_TYPE:
        total = weights = 0
        for name, shape in tensors(cfg):
            qtype = mix_type(hf_to_gguf_name(name), shape, file_type, n_layer=cfg.num_hidden_layers,
                             tied=cfg.tie_word_embeddings, is_70b=is_70b(cfg))
            n = int(np.prod(shape))
            weights += n
            total += {"F32": 4 * n, "F16": 2 * n, "BF16": 2 * n}.get(qtype) or n // BLOCKS[qtype][0] * BLOCKS[qtype][1]
        out[file_type] = (total, round(8 * total / weights, 3))
    return out


def tensors(cfg):
    """(HF name, shape) in a checkpoint's order; lm_head only when untied."""
    yield "model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size)
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (cfg.hidden_size,)
        yield p + "self_attn.q_proj.weight", (q, cfg.hidden_size)
        yield p + "self_attn.k_proj.weight", (kv, cfg.hidden_size)
        yield p + "self_attn.v_proj.weight", (kv, cfg.hidden_size)
        yield p + "self_attn.o_proj.weight", (cfg.hidden_size, q)
        yield p + "post_attention_layernorm.weight", (cfg.hidden_size,)
        yield p + "mlp.gate_proj.weight", (cfg.intermediate_size, cfg.hidden_size)
        yield p + "mlp.up_proj.weight", (cfg.intermediate_size, cfg.hidden_size)
        yield p + "mlp.down_proj.weight", (cfg.hidden_size, cfg.intermediate_size)
    yield "model.norm.weight", (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        yield "lm_head.weight", (cfg.vocab_size, cfg.hidden_size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="llama-8b")
    p.add_argument("--type", default="q4_k_m")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--limit", type=int, default=0, help="stop after this many 2-D tensors (a quick check)")
    p.add_argument("--out", default=None)
    p.add_argument("--sizes", action="store_true", help="print every type's tensor bytes (no quantization) and stop")
    args = p.parse_args(argv)

    cfg = model_config(args.shape)
    if args.sizes:
        for file_type, (total, bits) in sizes(cfg).items():
            print(f"{args.shape} {file_type:7s} {total:>15,} bytes of tensors  {bits:6.3f} bits/weight")
        return 0
    gen = torch.Generator().manual_seed(0)
    per_type = defaultdict(lambda: {"tensors": 0, "weights": 0, "bytes": 0, "wall_s": 0.0, "cpu_s": 0.0})
    total_bytes, done = 0, 0
    start = time.time()
    for name, shape in tensors(cfg):
        gname = hf_to_gguf_name(name)
        qtype = mix_type(gname, shape, args.type, n_layer=cfg.num_hidden_layers, tied=cfg.tie_word_embeddings,
                         is_70b=is_70b(cfg))
        if qtype == "F32":
            total_bytes += 4 * int(np.prod(shape))
            continue
        x = (torch.randn(shape, generator=gen) * 0.02).bfloat16().float().numpy()  # as write_gguf gets it
        wall, cpu = time.perf_counter(), time.process_time()
        out = quantize(x, qtype, threads=args.threads)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        row = per_type[qtype]
        row["tensors"] += 1
        row["weights"] += x.size
        row["bytes"] += out.nbytes
        row["wall_s"] += wall
        row["cpu_s"] += cpu
        total_bytes += out.nbytes
        done += 1
        print(f"{gname:28s} {qtype:5s} {str(shape):16s} {wall:7.2f} s", flush=True)
        if args.limit and done >= args.limit:
            break
    wall = sum(r["wall_s"] for r in per_type.values())
    result = {
        "shape": args.shape, "type": args.type, "threads": args.threads, "complete": not args.limit,
        "quantize_wall_s": round(wall, 1), "quantize_cpu_s": round(sum(r["cpu_s"] for r in per_type.values()), 1),
        "elapsed_s_with_random_numbers": round(time.time() - start, 1),
        "file_bytes_without_header": total_bytes,
        "per_type": {t: {**r, "wall_s": round(r["wall_s"], 1), "cpu_s": round(r["cpu_s"], 1),
                         "ns_per_weight_wall": round(r["wall_s"] / r["weights"] * 1e9, 1),
                         "bits_per_weight": round(8 * r["bytes"] / r["weights"], 4)} for t, r in per_type.items()},
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_end": os.getloadavg(), "numpy": np.__version__},
        "config": {k: hf_config(args.shape)[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                          "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "blocks": BLOCKS,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
