"""Files in and out: Hugging Face checkpoints in, PEFT adapters in and out.

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

Adapters use PEFT's layout, so peft, vLLM and llama.cpp's converter read them:
`adapter_config.json` plus `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r).
An adapter that does not fit the model (a module it lacks, a shape or rank it
does not have) is an error; one that merely names another base model is a warning.
`push_to_hub` uploads a finished adapter or merged folder (token from $HF_TOKEN).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from huggingface_hub.utils import tqdm
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir
from .gguf_io import shard_files
from .lora import LoRALinear, apply_lora, lora_state_dict
from .model import CausalLM, ModelConfig, rope_inv_freq
from .quant import NF4Linear

HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"]
PEFT_PREFIX = "base_model.model."


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


def iter_tensors(files: list[Path]):
    """Yield (name, tensor) one at a time from memory-mapped safetensors files."""
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():
                yield name, st.get_tensor(name)


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
        if tname.endswith("rotary_emb.inv_freq") or (tname == "lm_head.weight" and cfg.tie_word_embeddings):
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


# ----------------------------------------------------------------------------- adapters (PEFT format)

def adapter_config(model: nn.Module, base_model: str, *, r, alpha, dropout, rslora) -> dict:
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "use_rslora": rslora, "bias": "none", "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    }


def save_adapter(model: nn.Module, folder, config: dict, overwrite: bool = True):
    """adapter_config.json + adapter_model.safetensors, written atomically."""
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", copy=True) for k, v in lora_state_dict(model).items()}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})


def read_adapter_config(folder) -> dict:
    """adapter_config.json, checked for the PEFT options minilora cannot honour."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such adapter folder (it should hold adapter_config.json and "
                                "adapter_model.safetensors, as written by minilora.train or peft's save_pretrained).")
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no adapter_config.json; is this a LoRA adapter folder?")
    if not (folder / "adapter_model.safetensors").is_file():
        hint = " (adapter_model.bin is a pickle and is not read)" if (folder / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors{hint}.")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}).") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type {cfg.get('peft_type')!r} is not LORA.")
    for key in ("r", "lora_alpha"):
        if not isinstance(cfg.get(key), (int, float)) or cfg[key] <= 0:
            raise ValueError(f"{path}: field {key!r} must be a positive number, got {cfg.get(key)!r}.")
    for key, why in (("use_dora", "DoRA adds a magnitude vector"),
                     ("fan_in_fan_out", "it stores weights transposed (GPT-2 Conv1D), which Llama/Qwen2 never do")):
        if cfg.get(key):
            raise ValueError(f"{path}: {key}=true is not supported by minilora ({why}).")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key):
            raise ValueError(f"{path}: per-module {key} is not supported by minilora.")
    return cfg


def adapter_scale(cfg: dict) -> float:
    """scale = alpha / r, or alpha / sqrt(r) with rsLoRA: the factor on B @ A, as peft computes it."""
    r, alpha = cfg["r"], cfg["lora_alpha"]
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def read_adapter_tensors(folder) -> dict[str, torch.Tensor]:
    """The LoRA factors keyed by HF module path (`model.layers.0.self_attn.q_proj.lora_A.weight`).

    Every module must have both factors, A (r, in) and B (out, r), with one rank:
    a lone A would leave B at zero and the adapter silently half-missing.
    """
    folder = Path(folder)
    tensors = {}
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt", device="cpu") as st:
        for k in st.keys():
            name = k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k
            tensors[name.replace(".default.", ".")] = st.get_tensor(k)  # peft's in-memory names carry ".default"
    other = [k for k in tensors if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    if other:
        raise ValueError(f"{folder}: adapter holds non-LoRA tensors ({', '.join(other[:3])}); minilora loads "
                         "LoRA factors only (no modules_to_save, bias or embedding LoRA).")
    if not tensors:
        raise ValueError(f"{folder}/adapter_model.safetensors holds no tensors.")
    for path in sorted({k.rsplit(".lora_", 1)[0] for k in tensors}):
        a, b = tensors.get(f"{path}.lora_A.weight"), tensors.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            raise ValueError(f"{folder}: {path} has lora_{'A' if a is None else 'B'}.weight missing; the file is incomplete.")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{folder}: {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                             "they must be (r, in) and (out, r) with the same r.")
    return tensors


def same_base(adapter_base: str | None, source: str | None) -> bool:
    """Whether the adapter's base_model_name_or_path plausibly names the model at `source`.

    The same path, the hub cache folder of that hub id (`models--org--name`), or a folder with the
    same last name (the model downloaded to another place) all count; an unknown side counts too.
    """
    if not adapter_base or not source:
        return True
    a, s = str(adapter_base).rstrip("/"), str(source).rstrip("/")
    if a == s or Path(a).expanduser().resolve() == Path(s).expanduser().resolve():
        return True
    return f"models--{a.replace('/', '--')}" in s or Path(a).name == Path(s).name


def check_adapter_base(cfg: dict, source: str | None, folder) -> None:
    """Warn, not fail, when the adapter names another base: only shapes can prove a mismatch (they raise),
    and a renamed copy of the same model is common. A wrong base with fitting shapes gives poor outputs."""
    base = cfg.get("base_model_name_or_path")
    if not same_base(base, source):
        warnings.warn(f"{folder}/adapter_config.json: base_model_name_or_path is {base!r} but the model is {source!r}; "
                      "the shapes fit so it loads, but an adapter trained on another base model gives wrong outputs.",
                      stacklevel=3)


def load_adapter(model: nn.Module, folder) -> dict:
    """Wrap the model's targets in LoRA and load the factors (from minilora or from peft)."""
    folder = Path(folder)
    cfg = read_adapter_config(folder)
    tensors = read_adapter_tensors(folder)
    paths = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    targets = sorted({p.rsplit(".", 1)[-1] for p in paths})
    try:
        wrapped = apply_lora(model, r=cfg["r"], alpha=cfg["lora_alpha"], dropout=0.0,
                             rslora=bool(cfg.get("use_rslora")), targets=targets, paths=paths)
    except ValueError as e:
        raise ValueError(f"{folder}: the adapter does not fit this model: {e}") from None
    missing = sorted(set(paths) - set(wrapped))
    if missing:
        raise ValueError(f"{folder}: adapter tensors for {', '.join(missing[:3])}"
                         f"{f' (and {len(missing) - 3} more)' if len(missing) > 3 else ''} have no matching module "
                         f"in the {model.config.num_hidden_layers}-layer model (an adapter for another base model?).")
    own = lora_state_dict(model)
    for name, t in tensors.items():
        if own[name].shape != t.shape:
            raise ValueError(f"{folder}: adapter tensor {name!r} has shape {tuple(t.shape)}, "
                             f"the model needs {tuple(own[name].shape)} (different base model or rank?).")
        own[name].copy_(t)
    check_adapter_base(cfg, getattr(model, "source", None), folder)
    return cfg


# ----------------------------------------------------------------------------- the hub

def hub_token() -> str:
    """The write token from $HF_TOKEN; checked before any long work, so a missing token fails at once."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PermissionError("pushing to the Hugging Face hub needs a write token: create one at "
                           "https://huggingface.co/settings/tokens and set it with `export HF_TOKEN=hf_...`.")
    return token


def push_to_hub(folder, repo_id: str, private: bool = False) -> str:
    """Upload a finished folder (adapter or merged model) to the hub repo `repo_id`, creating it if needed.

    Hidden files (our `.tmp-*` leftovers) are not uploaded. Returns the repo URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder to push.")
    api = HfApi(token=hub_token())
    url = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", ignore_patterns=[".*", "**/.*"],
                      commit_message=f"Upload {folder.name} with minilora")
    return str(url)
