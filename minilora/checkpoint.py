"""Hugging Face checkpoint folders in: where the model is, its config, its weights (NF4 as they arrive).

Loading streams the checkpoint one tensor at a time:

    for each tensor in the safetensors shards (memory-mapped, so nothing is read twice):
        copy it to the target device
        if it is a linear weight of a decoder layer: quantize it to NF4 there and drop the dense copy
        else: keep it in the compute dtype

so peak memory is the finished model plus one dense tensor, never a bf16 copy
of the whole model (8B: ~5.5 GiB of NF4 instead of 16 GiB of bf16).

The model is first built on the `meta` device (shapes, no storage); every
tensor then replaces its meta placeholder by name, which is why the module
names in model.py are Hugging Face's. A tensor that is missing, unexpected or
of the wrong shape is an error that names it.

The safetensors shards are found and read here for every reader of a checkpoint
(merge and GGUF export too): `shard_files`, `iter_tensors`. Adapters are adapter.py's.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub.utils import tqdm
from safetensors import safe_open

from .model import CausalLM, ModelConfig, rope_inv_freq
from .nf4 import NF4Linear

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]


# ----------------------------------------------------------------------------- where the model is

def resolve_model(name: str | os.PathLike) -> Path:
    """A local folder, or a hub id (`deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B`) fetched into the HF cache."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"{path} has no config.json: point --model at a Hugging Face checkpoint folder "
                "(config.json, *.safetensors, tokenizer.json)."
            )
        return path
    name = str(name)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such folder, and it is not a hub id of the form 'org/model'.")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo: all end the same way for the user
        raise ConnectionError(
            f"could not fetch {name!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline, download the model elsewhere and pass its local folder to --model."
        ) from None


def load_config(folder: Path) -> ModelConfig:
    path = Path(folder) / "config.json"
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    return ModelConfig.from_hf(hf, source=str(path))


def shard_files(folder: Path, single: str) -> list[Path]:
    """A Hugging Face checkpoint's weight files: the shards `<single>.index.json` names, else `single` alone.

    `single` is "model.safetensors" or "pytorch_model.bin". [] when the folder has neither, so that each
    caller can say what it looked for.
    """
    index = folder / f"{single}.index.json"
    if not index.is_file():
        return [folder / single] if (folder / single).is_file() else []
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # bad JSON, or no {"weight_map": {...}}
        raise ValueError(f"{index}: not a shard index (a JSON object whose \"weight_map\" maps each tensor "
                         f"to its file): {type(e).__name__}: {e}.") from None
    return [folder / name for name in names]


def safetensors_files(folder: Path) -> list[Path]:
    """The shards named by model.safetensors.index.json, or the single model.safetensors, or any *.safetensors."""
    folder = Path(folder)
    files = shard_files(folder, "model.safetensors") or sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    hint = (f" It has {', '.join(pickles)}: pickle files can run code when loaded, so minilora reads only "
            "safetensors unless told the files are trusted (minilora.train --trust-pickle-files); or convert "
            "them to safetensors with a tool you trust." if pickles else "")
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json.{hint}")


def unpickling_error(e: Exception) -> str:
    """The line of a torch.load error that says what was wrong (torch puts advice first, the cause last)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # torch colours its advice
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = next((line for line in lines if "Unsupported global" in line), lines[0] if lines else "")
    return f"{type(e).__name__}: {cause.removeprefix('WeightsUnpickler error: ')[:300]}"


def pickle_files(folder: Path) -> list[Path]:
    """The shards named by pytorch_model.bin.index.json, or the single pytorch_model.bin."""
    folder = Path(folder)
    files = shard_files(folder, "pytorch_model.bin")
    if not files:
        raise FileNotFoundError(f"{folder}: no safetensors, and no pytorch_model.bin or pytorch_model.bin.index.json.")
    return files


def iter_pickle_tensors(files: list[Path]):
    """Yield (name, tensor) from pickle checkpoints the user said they trust.

    torch.load(weights_only=True) is a restricted unpickler: it rebuilds tensors and plain
    containers and refuses every other global, so a file naming `os.system` is an error, not a
    command. It has had holes (CVE-2025-32434, before torch 2.6), so this path still waits for
    the user's word; safetensors (a JSON header and raw bytes) needs none.
    """
    for f in files:
        try:
            sd = torch.load(f, weights_only=True, map_location="cpu", mmap=True)
        except Exception as e:
            raise ValueError(f"{f}: refused by the weights-only unpickler, or not a torch checkpoint "
                             f"({unpickling_error(e)}).") from None
        if not isinstance(sd, dict) or not all(isinstance(t, torch.Tensor) for t in sd.values()):
            raise ValueError(f"{f}: expected a state dict (tensor names to tensors), got {type(sd).__name__}.")
        yield from sd.items()


def iter_tensors(files: list[Path], shapes_only: bool = False):
    """Yield (name, tensor) one at a time from memory-mapped safetensors files; with `shapes_only`,
    (name, shape) from the headers alone, without reading any data."""
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, tuple(st.get_slice(name).get_shape()) if shapes_only else st.get_tensor(name)


def is_rope_table(name: str) -> bool:
    """RoPE's `rotary_emb.inv_freq`, which old checkpoints carry: every reader recomputes it from config.json."""
    return name.endswith("rotary_emb.inv_freq")


def count_tensors(files: list[Path]) -> int:
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            n += len(st.keys())
    return n


# ----------------------------------------------------------------------------- building the model

def empty_model(cfg: ModelConfig) -> CausalLM:
    """The module tree with meta tensors: names and shapes, no memory."""
    with torch.device("meta"):
        return CausalLM(cfg)


def assign_tensor(model: CausalLM, name: str, tensor: torch.Tensor, *, device, dtype, quantize: str | None,
                  double_quant: bool = True, shard=None):
    """Put one checkpoint tensor in place; quantize decoder linear weights as they arrive.

    `shard(nf4_linear)`, if given, is applied to each new 4-bit layer at once (distributed.shard_nf4:
    FSDP2 keeps this rank's slice), so a rank never holds more than its share plus one layer.
    """
    mod_name, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mod_name)
        current = getattr(mod, leaf)
    except AttributeError:
        raise KeyError(f"unexpected tensor {name!r}: the {model.config.model_type} model has no such weight.") from None
    if isinstance(mod, nn.Linear) and leaf == "weight" and quantize and mod_name.startswith("model.layers."):
        if tuple(tensor.shape) != (mod.out_features, mod.in_features):
            raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies "
                             f"{(mod.out_features, mod.in_features)}.")
        q = NF4Linear.from_weight(tensor.to(device), mod.bias, quant_type=quantize, double_quant=double_quant,
                                  compute_dtype=dtype)
        if shard is not None:
            shard(q)
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, q)
        return
    if tuple(tensor.shape) != tuple(current.shape):
        raise ValueError(f"tensor {name!r} has shape {tuple(tensor.shape)}, the config implies {tuple(current.shape)}.")
    setattr(mod, leaf, nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False))


def finish_model(model: CausalLM, device) -> CausalLM:
    """Tie embeddings, build the RoPE table, and fail on any weight that never arrived."""
    cfg = model.config
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.register_buffer("inv_freq", rope_inv_freq(cfg).to(device), persistent=False)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise KeyError(f"the checkpoint lacks tensor(s) {', '.join(missing[:5])}{more}.")
    return model.eval()


def pick_device(name: str) -> torch.device:
    """--device: auto (a CUDA GPU if there is one, else the CPU), cpu, cuda or cuda:N, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is visible; use --device cpu.")
    return device


def default_dtype(device) -> torch.dtype:
    """bf16 where the GPU has it, else fp16; fp32 on the CPU, where it is exact and not slower."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(name, *, device="cpu", dtype: torch.dtype | None = None, quantize: str | None = "nf4",
               double_quant: bool = True, progress: bool = True, trust_pickle: bool = False, shard=None) -> CausalLM:
    """Load a Llama/Qwen2 checkpoint, quantizing decoder linears to NF4 (or FP4, or none) on the way.

    The embeddings, norms and lm_head stay in `dtype`, as in bitsandbytes-QLoRA.
    Only safetensors are read, unless `trust_pickle` and the folder has no safetensors: then
    pytorch_model.bin (or its shards) through the weights-only unpickler.
    `shard`: see assign_tensor (FSDP2 under `--fsdp`).
    """
    if quantize not in (None, "nf4", "fp4"):
        raise ValueError(f"quantize must be 'nf4', 'fp4' or None, got {quantize!r}.")
    folder = resolve_model(name)
    cfg = load_config(folder)
    dtype = dtype or default_dtype(device)
    model = empty_model(cfg)
    try:
        files = safetensors_files(folder)
        tensors, total = iter_tensors(files), count_tensors(files)
    except FileNotFoundError:
        if not trust_pickle:
            raise
        tensors, total = iter_pickle_tensors(pickle_files(folder)), None
    for tname, t in tqdm(tensors, total=total, desc="loading", unit="tensor", disable=not progress, leave=False):
        if is_rope_table(tname) or (tname == "lm_head.weight" and cfg.tie_word_embeddings):
            continue  # recomputed / shared with embed_tokens
        assign_tensor(model, tname, t, device=device, dtype=dtype, quantize=quantize, double_quant=double_quant,
                      shard=shard)
    model = finish_model(model, device)
    model.source = str(folder)
    return model


def random_model(cfg: ModelConfig, *, device="cpu", dtype=torch.float32, quantize: str | None = "nf4",
                 seed: int = 0, std: float = 0.02) -> CausalLM:
    """A model with random N(0, std) weights at any shape, built tensor by tensor like `load_model`
    (for benchmarks at the real R1-Distill shapes, which need no download)."""
    model = empty_model(cfg)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in list(model.named_parameters()):
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape, device=device)
        else:
            t = torch.randn(p.shape, device=device, generator=gen) * std
        assign_tensor(model, name, t, device=device, dtype=dtype, quantize=quantize)
    return finish_model(model, device)
