"""GGUF export (gguf_io.write_gguf) against transformers' GGUF reader, an independent implementation.

Tiny random Llama and Qwen2 models with a tiny byte-level BPE tokenizer (trained here, in
milliseconds, with the pre-tokenizer regex of Llama 3 or Qwen2), so every test runs in about a second.

Tolerances. The tiny models use weights of std 0.1 (not transformers' 0.02) so that attention is sharp
and a q/k row permutation error shows: logits are ~3, and a GGUF without llama.cpp's q/k permutation is
off by ~2. Measured errors against the fp32 checkpoint, and what we allow:
- f16 keeps 11 significant bits: ~3e-3; we allow 1e-2.
- bf16 keeps 8 bits, 8x coarser: ~3e-2; we allow 0.1.
- q8_0 rounds each weight to 1/127 of its block's absmax (blocks of 32), ~1% of a weight: ~8e-2; we allow 0.2.
"""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_hf_model
from minilora.gguf_io import GGUF_OUT_TYPES, gguf_to_hf, pre_tokenizer_name, write_gguf

TOL = {"f16": 1e-2, "bf16": 0.1, "q8_0": 0.2}
TEXTS = ["Hello world, 12345 and 6789!", "<|im_start|>user\nhi<think>ok</think><|im_end|>", "  spaces\n\n\ttabs ümlaut"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Numbers like 12345, 2024 and 3.14159 appear here.",
          "Hello world! How are you today?", "def f(x):\n    return x * 2\n", "naïve café ümlaut über"] * 20


def split_regex(kind: str) -> str:
    """The pre-tokenizer regex each family uses, taken from transformers (the reference)."""
    if kind == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX
        return PRETOKENIZE_REGEX
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    return GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]


def tiny_tokenizer(folder, kind: str, vocab_size: int = 300, bos: bool = False):
    """A byte-level BPE tokenizer.json + tokenizer_config.json shaped like Llama 3's or Qwen2's."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_regex(kind)), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.add_tokens(["<think>", "</think>"])  # added but not special: llama.cpp's USER_DEFINED
    if bos:  # Llama 3 style: the post-processor puts BOS in front
        tk.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"}))
    return tk


def tiny_model(folder, kind, **overrides):
    """A tiny random model (vocab 320, more rows than the tokenizer's ~305 tokens) with its tokenizer."""
    overrides = {"initializer_range": 0.1, **overrides}
    hf = tiny_hf_model(folder, kind, vocab_size=320, bos_token_id=1, eos_token_id=2, **overrides)
    tiny_tokenizer(folder, kind)
    return hf


def logits_from(model, ids):
    with torch.no_grad():
        return model(ids).logits


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def read_fields(path):
    import gguf

    r = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in r.fields.items()}, {t.name: t for t in r.tensors}


@pytest.mark.parametrize("out_type", GGUF_OUT_TYPES)
@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True)])
def test_logits_match_transformers_gguf_reader(tmp_path, kind, tied, out_type):
    hf = tiny_model(tmp_path / "m", kind, tie_word_embeddings=tied)
    path = write_gguf(tmp_path / "m", tmp_path / "out" / "m.gguf", out_type, progress=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    want = logits_from(hf, ids)
    got = logits_from(hf_from_gguf(path), ids)
    torch.testing.assert_close(got, want, atol=TOL[out_type], rtol=0)
    assert (got - want).abs().max() > 0  # the weights really went through out_type
    fields, tensors = read_fields(path)
    assert fields["general.architecture"] == kind
    assert ("output.weight" in tensors) == (not tied)
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"  # 1-D tensors stay f32
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == out_type.upper()
    if kind == "qwen2":
        assert "blk.1.attn_q.bias" in tensors


@pytest.mark.parametrize("kind,pre", [("llama", "llama-bpe"), ("qwen2", "qwen2")])
def test_tokenizer_matches_transformers(tmp_path, kind, pre):
    """transformers rebuilds the tokenizer from the GGUF metadata (tokens, merges, types, the pre-tokenizer
    *name*); it must tokenize like the original. A wrong pre name splits '12345' differently."""
    from transformers import AutoTokenizer

    tiny_model(tmp_path / "m", kind)
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False)
    fields, _ = read_fields(path)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == pre
    tokens, types = list(fields["tokenizer.ggml.tokens"]), list(fields["tokenizer.ggml.token_type"])
    assert len(tokens) == 320 and tokens[-1] == "[PAD319]" and types[-1] == 5  # rows past the tokenizer: UNUSED
    assert types[tokens.index("<|im_end|>")] == 3 and types[tokens.index("<think>")] == 4  # CONTROL, USER_DEFINED
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"],
            fields["tokenizer.ggml.padding_token_id"]) == (1, 2, 0)
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"].startswith("{% for m in messages %}")
    ours, ref = AutoTokenizer.from_pretrained(tmp_path / "m"), AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in TEXTS:
        assert ref(text)["input_ids"] == ours(text)["input_ids"], text


def test_add_bos_follows_the_post_processor(tmp_path):
    tiny_hf_model(tmp_path, "llama", vocab_size=320)
    tiny_tokenizer(tmp_path, "llama", bos=True)
    fields, _ = read_fields(write_gguf(tmp_path, tmp_path / "m.gguf", "f16", progress=False))
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False


def test_llama3_rope_scaling_writes_rope_freqs(tmp_path):
    """llama.cpp divides frequency i by rope_freqs[i]: unscaled / rope_freqs must be transformers' llama3 inv_freq."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    hf = tiny_model(tmp_path / "m", "llama", rope_scaling=scaling, rope_theta=10000.0, max_position_embeddings=512)
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False)
    _, tensors = read_fields(path)
    t = tensors["rope_freqs.weight"]
    assert t.tensor_type.name == "F32"
    factors = torch.from_numpy(np.array(t.data, dtype=np.float32))
    head_dim = 64 // 4
    unscaled = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    ref = hf.model.rotary_emb.inv_freq  # transformers' llama3 frequencies
    torch.testing.assert_close(unscaled / factors, ref, rtol=1e-6, atol=0)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the blend occur at this size


def test_linear_rope_scaling_metadata(tmp_path):
    tiny_model(tmp_path / "m", "llama", rope_scaling={"rope_type": "linear", "factor": 2.0})
    fields, tensors = read_fields(write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False))
    assert fields["llama.rope.scaling.type"] == "linear" and fields["llama.rope.scaling.factor"] == 2.0
    assert "rope_freqs.weight" not in tensors


def test_metadata_spelled_as_llama_cpp_reads_it(tmp_path):
    tiny_model(tmp_path / "m", "qwen2", rope_theta=12345.0, rms_norm_eps=1e-6)
    fields, _ = read_fields(write_gguf(tmp_path / "m", tmp_path / "m.gguf", "q8_0", progress=False))
    want = {"qwen2.block_count": 2, "qwen2.context_length": 512, "qwen2.embedding_length": 64,
            "qwen2.feed_forward_length": 96, "qwen2.attention.head_count": 4, "qwen2.attention.head_count_kv": 2,
            "qwen2.rope.dimension_count": 16, "qwen2.rope.freq_base": 12345.0, "qwen2.vocab_size": 320,
            "general.file_type": 7}  # 7: MOSTLY_Q8_0
    assert {k: fields[k] for k in want} == want
    assert abs(fields["qwen2.attention.layer_norm_rms_epsilon"] - 1e-6) < 1e-12


def test_minilora_reader_round_trip(tmp_path):
    """write_gguf then gguf_to_hf (the demo's reader, which un-permutes q/k) gives back the weights."""
    hf = tiny_model(tmp_path / "m", "llama")
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False)
    back = gguf_to_hf(path, tmp_path / "back", dtype=torch.float32)
    from safetensors.torch import load_file

    got = load_file(str(back / "model.safetensors"))
    assert set(got) == set(hf.state_dict())
    for name, p in hf.state_dict().items():  # 2-D weights went through f16, 1-D ones stayed f32
        torch.testing.assert_close(got[name], p if p.ndim == 1 else p.half().float(), atol=0, rtol=0)


def test_unsupported_type_lists_supported(tmp_path):
    tiny_model(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match=r"'q4_k' is not supported; choose one of f16, bf16, q8_0"):
        write_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k")


def test_unknown_pre_tokenizer_is_an_error():
    tok = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    with pytest.raises(ValueError, match="not one minilora can name.*llama-bpe"):
        pre_tokenizer_name(tok)
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    import gguf

    tiny_model(tmp_path / "m", "llama")
    out = tmp_path / "out"
    out.mkdir()
    calls = []

    def failing(data, qtype):
        calls.append(qtype)
        if len(calls) > 3:
            raise OSError("disk full")
        return real(data, qtype)

    real = gguf.quants.quantize
    monkeypatch.setattr(gguf.quants, "quantize", failing)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(tmp_path / "m", out / "m.gguf", "f16", progress=False)
    assert list(out.iterdir()) == []
