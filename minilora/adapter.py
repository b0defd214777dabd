"""LoRA adapters in and out, in PEFT's format, so that peft, vLLM and llama.cpp's converter read them.

A folder holds `adapter_config.json` plus `adapter_model.safetensors` with keys
`base_model.model.<module path>.lora_A.weight` (r, in) and `...lora_B.weight` (out, r): the module
paths are model.py's, which are Hugging Face's, so no name map is needed. An adapter that does not fit
the model (a module it lacks, a shape or rank it does not have) is an error; one that merely names
another base model is a warning.
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_dir
from .lora import LoRALinear, apply_lora, lora_state_dict

PEFT_PREFIX = "base_model.model."


def adapter_config(model: nn.Module, base_model: str, *, r, alpha, dropout, rslora) -> dict:
    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LoRALinear)})
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": targets,
        "use_rslora": rslora, "bias": "none", "use_dora": False, "modules_to_save": None,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
    }


CHAT_TEMPLATE = "chat_template.jinja"  # transformers' file name for a tokenizer folder's template


def save_adapter(model: nn.Module, folder, config: dict, overwrite: bool = True, chat_template: str | None = None):
    """adapter_config.json + adapter_model.safetensors, written atomically; with `chat_template`, the chat
    template the adapter was trained with beside them (generate --adapter renders with it)."""
    tensors = {PEFT_PREFIX + k: v.detach().to("cpu", copy=True) for k, v in lora_state_dict(model).items()}
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if chat_template:
            (tmp / CHAT_TEMPLATE).write_text(chat_template, encoding="utf-8")


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


def base_model_of(adapter) -> str:
    """The base model an adapter names (adapter_config.json's base_model_name_or_path), for commands whose --model
    is left out, as peft's AutoPeftModelForCausalLM loads it."""
    base = read_adapter_config(adapter).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{Path(adapter) / 'adapter_config.json'} names no base_model_name_or_path; give --model.")
    return base


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


