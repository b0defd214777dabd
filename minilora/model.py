"""A Llama / Qwen2 decoder in plain PyTorch, with Hugging Face module names.

Qwen2 is Llama with three flags: a bias on q/k/v, tied or untied embeddings,
and its own rope_theta. So there is one model here, configured by `ModelConfig`.

Module names follow transformers' `LlamaForCausalLM` exactly
(`model.layers.3.self_attn.q_proj`, `model.norm`, `lm_head`), so checkpoint
tensors load without a name map and LoRA keys come out in PEFT's format.

The model knows nothing of how it is trained fast. Everything that makes training
lean or quick (recompute, host offload, the folded MLP kernels, compile, CUDA
graphs) is attached from outside by minilora/speed/, through module swaps and
one seam: `DecoderModel.call_layer`, how each decoder layer is called.

References: transformers `models/llama/modeling_llama.py` (the math we must
match, checked by tests/test_model.py), the Llama 3 paper for `llama3` RoPE
scaling, gpt-fast `model.py` for the static KV cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 0  # 0: num_attention_heads, as transformers reads a config without it; fewer: GQA
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8, ...} or "linear"
    max_position_embeddings: int = 4096
    qkv_bias: bool = False  # Qwen2: True
    o_bias: bool = False  # Llama's `attention_bias` also puts a bias on o_proj
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads == 0:
            self.num_key_value_heads = self.num_attention_heads

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Read a Hugging Face config.json dict (transformers 4.x and 5.x spellings)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type {model_type!r} is not supported; minilora supports "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (LlamaForCausalLM, Qwen2ForCausalLM)."
            )
        if hf.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported (R1-Distill models leave it off).")
        # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope = dict(hf.get("rope_parameters") or {})
        theta = hf.get("rope_theta", rope.pop("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = dict(scaling)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind not in ("default", "linear", "llama3"):
                raise ValueError(f"{source}: rope_scaling type {kind!r} is not supported; use default, linear or llama3.")
            scaling = None if kind == "default" else {**scaling, "rope_type": kind}
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in known and v is not None and k not in ("rope_scaling", "rope_theta")}
        if model_type == "qwen2":
            kw["qkv_bias"] = True  # Qwen2 always has q/k/v bias and never an o_proj bias
        elif hf.get("attention_bias"):
            kw["qkv_bias"] = kw["o_bias"] = True
        return cls(**kw, rope_theta=float(theta), rope_scaling=scaling)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32 as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Per-pair rotation frequencies theta^(-2i/d), adjusted by `rope_scaling`.

    llama3 scaling (Llama 3.1 / R1-Distill-Llama-8B) leaves high frequencies
    alone, divides low frequencies (wavelength > original_ctx / low_freq_factor)
    by `factor`, and blends linearly in between.
    """
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_ctx = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_ctx / hi) & (wavelen <= old_ctx / lo)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """cos/sin tables for positions (B, T) -> (B, 1, T, head_dim), halves repeated as HF does."""
    angles = positions[..., None].float() * inv_freq  # (B, T, d/2)
    emb = torch.cat((angles, angles), dim=-1)  # (B, T, d)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+d/2}) by the position angle: the "rotate_half" layout of HF checkpoints."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# ----------------------------------------------------------------------------- blocks

class KVCache(nn.Module):
    """A static (B, n_kv, max_len, head_dim) buffer per layer: fixed shapes keep generation compile-friendly."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, mask=None, cache_pos: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(cache_pos, k, v)
        # Grouped-query attention: each of the n_kv heads serves n_heads / n_kv query heads.
        # `mask` is None, a boolean (B, 1, T, S) tensor (padded generation), or an object with an
        # `attend(q, k, v, gqa)` method (speed/padding_free.py: several examples in one row, each
        # attending only to itself). With no mask the attention is causal: SDPA's is_causal (flash attention)
        # where the T queries are all the S keys; after S - T cached positions, query i sees keys 0..S-T+i
        # (SDPA's is_causal would align the triangle to the top left instead).
        if mask is None and k.shape[2] != T:
            mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
        gqa = self.n_kv != self.n_heads
        if mask is not None and not torch.is_tensor(mask):
            y = mask.attend(q, k, v, gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache_pos: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


def call_layer(layer: DecoderLayer, x: torch.Tensor, *args) -> torch.Tensor:
    """How the decoder calls each of its layers: directly. This is the model's one seam for training
    machinery: speed/recompute.py and speed/offload.py put their own caller here, which runs the same
    layer but keeps less for backward (recompute it, or keep its input in host memory)."""
    return layer(x, *args)


class DecoderModel(nn.Module):
    """`model.` in HF names: embeddings, layers, final norm. Returns hidden states, not logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.call_layer = call_layer

    def forward(self, input_ids, positions=None, mask=None, cache_pos: int = 0, inputs_embeds=None):
        """Hidden states (B, T, H). `inputs_embeds`: the embedding rows of input_ids, looked up already
        (as transformers' argument of that name; lean mode looks them up in host memory)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(cache_pos, cache_pos + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = rope_cos_sin(self.inv_freq, positions, x.dtype)
        for layer in self.layers:
            x = self.call_layer(layer, x, cos, sin, mask, cache_pos)
        return self.norm(x)


class CausalLM(nn.Module):
    """`LlamaForCausalLM` / `Qwen2ForCausalLM`: the decoder plus `lm_head`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions=None, mask=None, cache_pos: int = 0) -> torch.Tensor:
        """Logits (B, T, vocab). Training uses `model.model` + a chunked loss instead (see loss.py)."""
        return self.lm_head(self.model(input_ids, positions, mask, cache_pos))

    def setup_cache(self, batch: int, max_len: int):
        """Give each attention layer a static KV cache; `clear_cache` removes them."""
        p = self.lm_head.weight  # on the compute device even when the embedding table is not (lean mode)
        c = self.config
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, p.dtype, p.device)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache = None
