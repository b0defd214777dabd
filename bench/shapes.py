"""The benchmark's model shapes, and the random-weight checkpoint that every stack loads.

Every stack must train the very same weights, or their losses and speeds say
nothing about each other. So the weights go through one file, as a real model
would: a Hugging Face checkpoint folder (config.json, safetensors shards and
a small tokenizer), written once per shape and read by each stack's own
loader (minilora's `load_model`, transformers' `from_pretrained`, unsloth's
`FastLanguageModel.from_pretrained`).

The weights are N(0, 0.02) (norms 1), as `minilora.checkpoint.random_model`
makes them, generated on the GPU in seconds and stored in bf16 like the real
R1-Distill checkpoints (16 GB for the 8B shape). The configs below are the
real DeepSeek-R1-Distill config.json files, so every stack sees the real
shapes, RoPE settings and untied embeddings without a download.

    python bench/shapes.py --write /tmp/ckpt --shape llama-8b --device cuda
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: find minilora in the repo, no install needed
    sys.path.insert(0, str(ROOT))

from minilora.model import CausalLM, ModelConfig  # noqa: E402

_COMMON = dict(hidden_act="silu", attention_dropout=0.0, initializer_range=0.02, use_cache=True,
               tie_word_embeddings=False, torch_dtype="bfloat16")
_QWEN2 = dict(_COMMON, model_type="qwen2", architectures=["Qwen2ForCausalLM"], max_position_embeddings=131072,
              rope_theta=10000.0, rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=4096,
              use_mrope=False, bos_token_id=151643, eos_token_id=151643)
_LLAMA = dict(_COMMON, model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=False, mlp_bias=False,
              pretraining_tp=1)

# The config.json of each DeepSeek-R1-Distill model (weights aside), plus `tiny` for CPU tests.
SHAPES = {
    "qwen-1.5b": dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                      num_key_value_heads=2, vocab_size=151936, max_window_layers=21),
    "qwen-7b": dict(_QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4, vocab_size=152064, max_window_layers=28),
    "llama-8b": dict(_LLAMA, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
                     rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
                     rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # a few-MB Llama for the CPU mode; every linear's size is a multiple of the NF4 block (64)
    "tiny": dict(_LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_theta=10000.0, bos_token_id=1, eos_token_id=2),
}


def hf_config(shape: str) -> dict:
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}.")
    return dict(SHAPES[shape])


def model_config(shape: str) -> ModelConfig:
    return ModelConfig.from_hf(hf_config(shape), source=f"shape {shape}")


def write_tokenizer(folder: Path, words: int = 60):
    """A trivial WordLevel tokenizer: unsloth's loader insists on one; the benchmark never tokenizes text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(words)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(str(folder))


def reusable(folder) -> bool:
    """For --checkpoint DIR: True if DIR holds a checkpoint (its config.json) to use as it is, False if DIR is
    missing or empty (write one there). Anything else is refused: writing replaces the folder."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return True
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise SystemExit(f"--checkpoint {folder}: not a checkpoint folder (no config.json) and not empty; writing a "
                         "random checkpoint there would replace what it holds. Name a new or empty folder.")
    return False


def checkpoint_folder(checkpoint: str, work, shape: str, *, device, seed: int = 0) -> Path:
    """The checkpoint a benchmark trains on: --checkpoint DIR's own if it has one; else a random one of
    `shape`, written into DIR (and kept) or, without --checkpoint, into the temporary folder `work`."""
    folder = Path(checkpoint) if checkpoint else Path(work) / shape
    if checkpoint and reusable(folder):
        print(f"{shape}: using the checkpoint in {folder}", flush=True)
        return folder
    t = time.perf_counter()
    write_checkpoint(folder, shape, device=device, seed=seed)
    print(f"{shape}: random checkpoint written to {folder} in {time.perf_counter() - t:.1f}s", flush=True)
    return folder


def write_checkpoint(folder, shape: str, *, device="cpu", seed: int = 0, std: float = 0.02,
                     shard_gib: float = 4.0) -> Path:
    """Write a random-weight bf16 checkpoint of `shape` into `folder` (replaced if it exists).

    Tensor names and shapes come from minilora's model built on the meta device; they are
    Hugging Face's names, and the peft stack checks that transformers finds every one of them.
    """
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    hf = hf_config(shape)
    cfg = ModelConfig.from_hf(hf, source=f"shape {shape}")
    with torch.device("meta"):
        names = [(n, tuple(p.shape)) for n, p in CausalLM(cfg).named_parameters()]  # untied: lm_head listed
    # plan the shards first, so the files get their final names "model-00001-of-00004.safetensors"
    shards, size, limit = [[]], 0, shard_gib * 2**30
    for name, shp in names:
        nbytes = 2 * torch.Size(shp).numel()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    gen = torch.Generator(device=device).manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shp, device=device, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shp, device=device, generator=gen) * std).to(torch.bfloat16)
            tensors[name] = t.cpu()
            weight_map[name] = fname
            total += 2 * t.numel()
        save_file(tensors, str(folder / fname), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    write_tokenizer(folder)
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a random-weight R1-Distill-shaped checkpoint folder.")
    p.add_argument("--write", required=True, help="folder to create (replaced if it exists)")
    p.add_argument("--shape", default="llama-8b", choices=list(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to draw the random numbers (the GPU is ~100x faster for 8B)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    t = time.perf_counter()
    write_checkpoint(a.write, a.shape, device=a.device, seed=a.seed)
    print(f"wrote {a.shape} to {a.write} in {time.perf_counter() - t:.1f}s", flush=True)


if __name__ == "__main__":
    main()
