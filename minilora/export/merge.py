"""Merge a LoRA adapter into its base model, giving a plain checkpoint that needs no peft or minilora.

For every weight the adapter targets:

    W' = W + scale * B @ A        A: (r, in), B: (out, r), so B @ A is (out, in) like W
    scale = alpha / r             (alpha / sqrt(r) with rsLoRA)

computed in fp32 and then cast to the output dtype, since adding a small update to a bf16 weight
in bf16 would round most of it away. Every other tensor is copied (cast to the output dtype).

The base is streamed one tensor at a time from its safetensors files, never built as a model:
a tensor is read, merged if targeted, and appended to the current shard; a full shard is written
and dropped. Peak memory is about one shard (--max-shard-size) plus one weight in fp32, not the
whole model, so a 14B model merges on a machine with far less RAM than its 28 GB.

The output is a Hugging Face folder that transformers, vLLM and llama.cpp's converter read:
config.json (torch_dtype set), model-0000i-of-0000n.safetensors + model.safetensors.index.json,
and the tokenizer files. A chat adapter's template (the one it trained with, adapter/chat_template.jinja)
replaces the base's, unless it is minilora's training variant of the base's own (chat.for_inference). It is
written under a temporary name and renamed into place (atomic.py).
Optionally a GGUF file (gguf.py's write_gguf: f16 to q4_k_m) and an Ollama Modelfile for it (modelfile.py)
go into the same folder, and the folder to the hub.

Two traps it guards against:
- merging the same adapter twice adds scale * B @ A twice. config.json records each merged adapter
  ("minilora_merged_adapters": [{"sha256": ...}]); merging one whose file hash is listed is refused.
- merging into an NF4 base. QLoRA trains B @ A against the NF4-rounded weights, so
  `--save-method merged_4bit` reproduces that: every decoder linear weight is rounded through
  NF4 (bitsandbytes' quantize/dequantize, as training saw it), the delta is added, and the result
  is saved in 16 bits. It matches the training-time model exactly, but the base has lost the
  precision NF4 removed, and quantizing the file again later rounds a second time. The default,
  `merged_16bit`, adds the delta to the original 16-bit weights: the better model in nearly all cases.

Usage:
    python -m minilora.merge --model deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --adapter runs/demo/adapter \
        --output-dir runs/demo/merged [--gguf q4_k_m] [--push-to-hub me/my-model]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm
from safetensors.torch import save_file

from .. import run_command
from ..adapter import (CHAT_TEMPLATE, adapter_scale, base_model_of, check_adapter_base, read_adapter_config,
                       read_adapter_tensors)
from ..atomic import atomic_dir
from ..chat import for_inference
from ..checkpoint import count_tensors, is_rope_table, iter_tensors, resolve_model, safetensors_files
from ..config import HelpFormatter, Parser
from ..nf4 import NF4Linear
from .gguf import GGUF_OUT_TYPES, write_gguf
from .hub import hub_token, push_to_hub
from .modelfile import UnknownTemplate, write_modelfile

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SAVE_METHODS = ("merged_16bit", "merged_4bit")
MARKER = "minilora_merged_adapters"  # config.json: the adapters already merged into these weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "generation_config.json", "vocab.json", "merges.txt", "added_tokens.json")
MERGED_4BIT_WARNING = (
    "--save-method merged_4bit rounds every decoder linear weight of the base to NF4 and back (as QLoRA "
    "training saw it), adds the LoRA delta, and saves the result in 16 bits. It reproduces the trained model "
    "exactly, but the base keeps only NF4's precision, and quantizing this file again (e.g. to GGUF q8_0) rounds "
    "a second time. Prefer the default merged_16bit unless you need the exact training-time weights."
)


def parse_size(text: str | int) -> int:
    """'2GB' -> 2_000_000_000 bytes (GB = 10^9, GiB = 2^30, as transformers reads --max-shard-size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(text), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"--max-shard-size {text!r}: write a size such as 2GB, 500MB or 10GiB.")
    unit = (m.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    base = 1024 if "I" in unit else 1000
    return int(float(m.group(1)) * base ** power)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def plan_merge(base: Path, adapter: Path) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]], float]:
    """Check the adapter against the base's tensor shapes (headers only) before anything is written.

    Returns (adapter config, {weight name: (A, B)}, scale).
    """
    cfg = read_adapter_config(adapter)
    tensors = read_adapter_tensors(adapter)
    shapes = dict(iter_tensors(safetensors_files(base), shapes_only=True))
    pairs = {}
    for path in sorted({k.rsplit(".lora_", 1)[0] for k in tensors}):
        a, b = tensors[f"{path}.lora_A.weight"], tensors[f"{path}.lora_B.weight"]
        weight = f"{path}.weight"
        if weight not in shapes:
            raise ValueError(f"{adapter}: the adapter targets {path}, but the base model {base} has no tensor "
                             f"{weight!r} (an adapter for another model?).")
        if shapes[weight] != (b.shape[0], a.shape[1]):
            raise ValueError(f"{adapter}: {path} has lora_B {tuple(b.shape)} @ lora_A {tuple(a.shape)} = "
                             f"{(b.shape[0], a.shape[1])}, but the base weight {weight} is {shapes[weight]} "
                             "(an adapter for another model?).")
        if a.shape[0] != cfg["r"]:
            raise ValueError(f"{adapter}/adapter_config.json says r={cfg['r']}, but {path}.lora_A has rank "
                             f"{a.shape[0]}; the scale alpha/r would be wrong.")
        pairs[weight] = (a, b)
    return cfg, pairs, adapter_scale(cfg)


def nf4_round(w: torch.Tensor) -> torch.Tensor:
    """W -> dequantize(quantize_nf4(W)) in fp32: the base weight as QLoRA training saw it (nf4.py)."""
    return NF4Linear.from_weight(w.float(), quant_type="nf4", double_quant=True, compute_dtype=torch.float32).dequantize()


def merged_tensors(files, pairs, scale: float, dtype: torch.dtype, round_nf4: bool, progress: bool = True):
    """Yield (name, tensor) of the merged model, one at a time, in the base's file order."""
    for name, t in tqdm(iter_tensors(files), total=count_tensors(files), desc="merging", unit="tensor",
                        disable=not progress):
        if is_rope_table(name):
            continue  # old checkpoints carry RoPE's table; it is recomputed from config.json
        if not t.is_floating_point():
            yield name, t
            continue
        if round_nf4 and name.startswith("model.layers.") and name.endswith("_proj.weight"):
            t = nf4_round(t)  # every decoder linear, as load_model quantizes them for QLoRA
        if name in pairs:
            a, b = pairs[name]
            t = t.float() + scale * (b.float() @ a.float())  # W + s * (out, r) @ (r, in), in fp32
        yield name, t.to(dtype).contiguous()


def write_shards(tensors, folder: Path, max_shard_size: int) -> dict | None:
    """Write tensors into shards of at most `max_shard_size` bytes as they arrive; return the index, or None where
    all of them fit one file, which is then model.safetensors alone (as transformers' save_pretrained names it).

    A shard is written as soon as the next tensor would overflow it, so only one shard is held in
    memory. Its final name needs the shard count, known only at the end, so shards are renamed last.
    A single tensor larger than the limit gets a shard of its own, as transformers does.
    """
    shard, shard_bytes, written, weight_map, total = {}, 0, [], {}, 0

    def flush():
        nonlocal shard, shard_bytes
        part = folder / f"part-{len(written) + 1:05d}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        written.append((part, list(shard)))
        shard, shard_bytes = {}, 0

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > max_shard_size:
            flush()
        shard[name] = t
        shard_bytes += nbytes
        total += nbytes
    if shard or not written:
        flush()
    if len(written) == 1:
        written[0][0].rename(folder / "model.safetensors")
        return None
    for i, (part, names) in enumerate(written, 1):
        final = f"model-{i:05d}-of-{len(written):05d}.safetensors"
        part.rename(folder / final)
        weight_map.update({n: final for n in names})
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}


def merge(model: str | Path, adapter: str | Path, output_dir: str | Path, *, dtype: str = "bf16",
          save_method: str = "merged_16bit", gguf: str | None = None, overwrite: bool = False,
          max_shard_size: str | int = "2GB", push_to_hub_id: str | None = None, private: bool = False,
          progress: bool = True) -> Path:
    """Merge `adapter` into the base `model` and write a Hugging Face folder at `output_dir`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
    if save_method not in SAVE_METHODS:
        raise ValueError(f"--save-method {save_method!r}: choose one of {', '.join(SAVE_METHODS)}.")
    if gguf is not None and gguf not in GGUF_OUT_TYPES:
        raise ValueError(f"--gguf {gguf!r}: choose one of {', '.join(GGUF_OUT_TYPES)}.")
    shard_bytes = parse_size(max_shard_size)
    out, adapter = Path(output_dir), Path(adapter)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --output-dir.")
    if push_to_hub_id:
        hub_token()  # fail now, not after the merge
    base = resolve_model(model)
    hf_config = json.loads((base / "config.json").read_text())
    if "quantization_config" in hf_config:
        raise ValueError(f"{base}/config.json has a quantization_config: the base is stored quantized. Merge into "
                         "the original 16-bit checkpoint (see --save-method merged_4bit for the NF4-rounded base).")
    if out.resolve() == base.resolve():
        raise ValueError(f"--output-dir {out} is the base model folder; write the merged model somewhere else.")

    cfg, pairs, scale = plan_merge(base, adapter)
    sha = file_sha256(adapter / "adapter_model.safetensors")
    for done in hf_config.get(MARKER, []):
        if done.get("sha256") == sha:
            raise ValueError(
                f"{base} already has this adapter merged in (config.json {MARKER}: {done.get('adapter')}, "
                f"sha256 {sha[:12]}...); merging it again would add scale * B @ A a second time. "
                "Merge into the original base model instead.")
    check_adapter_base(cfg, str(base), adapter)
    if save_method == "merged_4bit":
        warnings.warn(MERGED_4BIT_WARNING, UserWarning, stacklevel=2)

    record = {"adapter": str(adapter), "sha256": sha, "base_model_name_or_path": cfg.get("base_model_name_or_path"),
              "r": cfg["r"], "lora_alpha": cfg["lora_alpha"], "use_rslora": bool(cfg.get("use_rslora")),
              "scale": scale, "modules": len(pairs), "save_method": save_method}
    name = str(DTYPES[dtype]).removeprefix("torch.")  # "bfloat16", as config.json spells it
    new_config = {**hf_config, "torch_dtype": name, "dtype": name, MARKER: hf_config.get(MARKER, []) + [record]}

    files = safetensors_files(base)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        index = write_shards(merged_tensors(files, pairs, scale, DTYPES[dtype], save_method == "merged_4bit", progress),
                             tmp, shard_bytes)
        if index is not None:
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        for f in TOKENIZER_FILES:
            if (base / f).is_file():
                shutil.copyfile(base / f, tmp / f)
        carry_chat_template(adapter, tmp)
        if gguf:
            path = write_gguf(tmp, tmp / f"{out.name}-{gguf}.gguf", gguf, progress=progress, name=out.name)
            try:  # the chat template in Ollama's terms, beside the file (modelfile.py)
                write_modelfile(path)
                print(f"GGUF for llama.cpp: {out / path.name}; Ollama: ollama create NAME -f {out / 'Modelfile'}")
            except UnknownTemplate as e:
                print(f"GGUF for llama.cpp: {out / path.name}")
                warnings.warn(str(e), UserWarning, stacklevel=2)
    if push_to_hub_id:
        print(f"pushed to {push_to_hub(out, push_to_hub_id, private=private)}")
    return out


def carry_chat_template(adapter: Path, folder: Path) -> None:
    """The adapter's chat template into the merged folder's tokenizer files, where every reader finds it:
    chat_template.jinja, and tokenizer_config.json's chat_template when it has one (read first by transformers'
    older releases, tokenizer.py and the GGUF writer)."""
    trained = adapter / CHAT_TEMPLATE
    template = for_inference(trained.read_text(encoding="utf-8")) if trained.is_file() else None
    if template is None:
        return
    (folder / CHAT_TEMPLATE).write_text(template, encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if config.is_file():
        tc = json.loads(config.read_text(encoding="utf-8"))
        old = tc.get("chat_template")
        if isinstance(old, list):  # [{"name": "default", "template": ...}, ...]: the default is the chat's
            tc["chat_template"] = [{**t, "template": template} if t.get("name") == "default" else t for t in old]
        elif old is not None:
            tc["chat_template"] = template
        if old is not None:
            config.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"chat template: the adapter's ({trained}), the one it was trained with")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="minilora.merge", formatter_class=HelpFormatter,
        description="Merge a LoRA adapter into its base model (W + scale * B @ A), streaming one tensor at a time, "
                    "into a Hugging Face folder; optionally also a GGUF file and a hub upload.")
    p.add_argument("--model", default=None,
                   help="the base model the adapter was trained on: a local Hugging Face folder or a hub id; "
                        "its 16-bit weights, not an NF4 copy. Left out: the one the adapter names (its "
                        "adapter_config.json's base_model_name_or_path)")
    p.add_argument("--adapter", required=True, default=argparse.SUPPRESS,
                   help="the adapter folder (adapter_config.json + adapter_model.safetensors, from minilora or peft)")
    p.add_argument("--output-dir", required=True, default=argparse.SUPPRESS, help="where the merged model folder is written")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                   help="dtype of the merged weights (the merge itself is computed in fp32)")
    p.add_argument("--save-method", choices=SAVE_METHODS, default="merged_16bit",
                   help="merged_16bit: add the delta to the original weights; merged_4bit: to the NF4-rounded "
                        "weights QLoRA trained against (prints a warning saying what it costs)")
    p.add_argument("--gguf", choices=GGUF_OUT_TYPES, default=None, metavar="TYPE",
                   help="also write <output-dir>/<name>-<type>.gguf for llama.cpp, and an Ollama Modelfile beside it. "
                        "TYPE: f16, bf16, q8_0 (8.5 bits/weight) as llama.cpp's converter writes them; "
                        "q6_k (6.6), q5_k_m (5.7), q5_0 (5.6), q4_k_m (4.9, the usual choice), q4_0 (4.6; for an 8B "
                        "model) as its llama-quantize writes them, with the same per-tensor mixes")
    p.add_argument("--overwrite", action="store_true", help="replace --output-dir if it exists")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (e.g. 500MB, 5GB, 4GiB)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", default=None,
                   help="upload the merged folder to this hub repo (created if needed); needs $HF_TOKEN")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        out = merge(args.model or base_model_of(args.adapter), args.adapter, args.output_dir, dtype=args.dtype,
                    save_method=args.save_method, gguf=args.gguf, overwrite=args.overwrite,
                    max_shard_size=args.max_shard_size, push_to_hub_id=args.push_to_hub, private=args.private)
    except (OSError, ValueError, KeyError) as e:  # the user's input, the disk or the network: one line, no traceback
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"minilora.merge: error: {message}", file=sys.stderr)
        return 2
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    run_command(main)
