"""Logits parity with transformers: the model, the loader and the config reader.

Tolerance: fp32 on the CPU; the two implementations order a few reductions
differently, so logits agree to ~1e-5, far below any real disagreement (a
wrong RoPE or bias changes logits by >1e-2).
"""
import json

import pytest
import torch

from conftest import tiny_hf_model, trainable_nf4_model
from minilora.checkpoint import load_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def logits_both(folder, hf_model, T=48, B=2, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(0, hf_model.config.vocab_size, (B, T))
    ours = load_model(folder, quantize=None, dtype=torch.float32, progress=False)
    with torch.no_grad():
        return ours(ids), hf_model(ids).logits


@pytest.mark.parametrize("kind,overrides,T", [
    ("llama", {}, 48),
    ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}, 300),  # 300 > 64: scaling matters
    ("llama", {"attention_bias": True}, 32),
    ("qwen2", {"tie_word_embeddings": False, "rope_theta": 1e6}, 48),
    ("qwen2", {"tie_word_embeddings": True}, 48),
])
def test_logits_match_transformers(tmp_path, kind, overrides, T):
    hf = tiny_hf_model(tmp_path / "m", kind, **overrides)
    ours, ref = logits_both(tmp_path / "m", hf, T=T)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)


def test_llama3_rope_scaling_is_applied(tmp_path):
    """Guard the guard: without the scaling the logits must differ, or the test above proves nothing."""
    hf = tiny_hf_model(tmp_path / "m", "llama", rope_scaling=LLAMA3_ROPE, rope_theta=500000.0)
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    ours, ref = logits_both(tmp_path / "m", hf, T=300)
    assert (ours - ref).abs().max() > 1e-3


def test_smollm2_logits_match_transformers(smollm2):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ours, hf = logits_both(smollm2, ref, T=64)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)


def test_sharded_checkpoint_equals_single_file(tmp_path):
    hf = tiny_hf_model(tmp_path / "single", "qwen2")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded/model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 2
    a = load_model(tmp_path / "single", quantize=None, progress=False).state_dict()
    b = load_model(tmp_path / "sharded", quantize=None, progress=False).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)


def test_nf4_model_equals_transformers_with_bnb_dequantized_weights(tmp_path):
    """Loading in NF4 quantizes exactly the decoder linears, as bitsandbytes would: the logits equal
    transformers' model whose linear weights went through bnb's own quantize -> dequantize."""
    import bitsandbytes.functional as bnbF

    from minilora.nf4 import NF4Linear

    hf = tiny_hf_model(tmp_path / "m", "qwen2")
    q = load_model(tmp_path / "m", quantize="nf4", dtype=torch.float32, progress=False)
    kinds = {type(m).__name__ for n, m in q.named_modules() if n.endswith("_proj")}
    assert kinds == {"NF4Linear"} and not isinstance(q.lm_head, NF4Linear)
    with torch.no_grad():
        for name, m in hf.named_modules():
            if name.startswith("model.layers.") and isinstance(m, torch.nn.Linear):
                packed, state = bnbF.quantize_4bit(m.weight, blocksize=64, compress_statistics=True, quant_type="nf4")
                m.weight.copy_(bnbF.dequantize_4bit(packed, state))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(q(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input

def test_folder_without_config(tmp_path):
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")


def test_unsupported_model_type(tmp_path):
    tiny_hf_model(tmp_path / "m", "llama")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["model_type"] = "mistral"
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'mistral' is not supported.*llama, qwen2"):
        load_model(tmp_path / "m")


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    tiny_hf_model(tmp_path / "m", "llama")
    f = tmp_path / "m/model.safetensors"
    sd = load_file(f)
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, f)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        load_model(tmp_path / "m", progress=False)


def test_mismatched_tensor_is_named(tmp_path):
    tiny_hf_model(tmp_path / "m", "llama")
    cfg = json.loads((tmp_path / "m/config.json").read_text())
    cfg["intermediate_size"] = 100
    (tmp_path / "m/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight.*\(64, 96\).*\(64, 100\)"):
        load_model(tmp_path / "m", quantize=None, progress=False)


def test_unreachable_hub_id_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ConnectionError, match="offline.*local folder"):
        load_model("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")


def test_pickle_checkpoint_is_refused(tmp_path):
    tiny_hf_model(tmp_path / "m", "llama")
    (tmp_path / "m/model.safetensors").rename(tmp_path / "m/pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin.*pickle"):
        load_model(tmp_path / "m")


def _loss_and_lora_grads(model, length: int):
    from minilora.loss import causal_lm_loss

    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(1))
    s, _ = causal_lm_loss(model.model(ids), model.lm_head.weight, ids)
    s.backward()
    return s.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["plain", "recompute", "offload"])
def test_mlp_in_pieces_equals_whole_sequence(tmp_path, monkeypatch, mode):
    """The long-sequence MLP (speed/mlp.py: pieces of PIECES_AFTER / 2 positions; checkpointed ones when gradients are on,
    plain ones in the no-gradient forward of an offloaded layer) against the whole-sequence MLP: the same loss
    and LoRA gradients, without and with per-layer recompute around it, and in lean mode."""
    from minilora.speed import mlp as M

    tiny_hf_model(tmp_path / "m", "qwen2", num_hidden_layers=2)

    def run(chunk):
        monkeypatch.setattr(M, "PIECES_AFTER", chunk)
        model = trainable_nf4_model(tmp_path / "m", gradient_checkpointing=mode == "recompute",
                                     offload=mode == "offload")
        return _loss_and_lora_grads(model, 21)

    pieces = []
    real = M.TrainingMLP.swiglu_in_pieces
    monkeypatch.setattr(M.TrainingMLP, "swiglu_in_pieces", lambda self, x, piece: pieces.append(piece) or real(self, x, piece))
    whole = run(10**9)
    assert pieces == []
    chunked = run(8)  # 21 positions in pieces of 4: 6 pieces, the last one short
    assert pieces and set(pieces) == {4}
    assert abs(whole[0] - chunked[0]) < 1e-5 * abs(whole[0])
    for k in whole[1]:
        torch.testing.assert_close(chunked[1][k], whole[1][k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["recompute", "offload"])
def test_keep_activations_skips_the_recompute_of_the_last_layers_only(tmp_path, mode):
    """--keep-activations N: the same loss and LoRA gradients as without checkpointing, and only the first
    L - N layers run twice (forward, then again in backward)."""
    tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=3)

    def run(checkpointing, keep):
        model = trainable_nf4_model(tmp_path / "m", gradient_checkpointing=checkpointing,
                                     offload=checkpointing and mode == "offload", keep_activations=keep)
        calls = [0] * 3
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
        return *_loss_and_lora_grads(model, 13), calls

    plain = run(False, 0)
    assert plain[2] == [1, 1, 1]
    for keep, calls in [(0, [2, 2, 2]), (1, [2, 2, 1]), (3, [1, 1, 1])]:
        loss, grads, seen = run(True, keep)
        assert seen == calls, f"keep_activations={keep}: layer forward counts {seen}, expected {calls}"
        assert abs(loss - plain[0]) < 1e-6 * abs(plain[0])
        for k in grads:
            torch.testing.assert_close(grads[k], plain[1][k], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="3 decoder layers"):
        run(True, 4)


def test_compiled_layers_compile_once_whatever_the_lengths(tmp_path):
    """speed/compile.py: with the sequence dimension dynamic from the first call and the first layer's input
    made to need a gradient like the others', the decoder layers compile to one graph and no more as new
    lengths come; torch.compile left to itself compiles four (the first layer's own, again at the second
    length). The loss and gradients are those of the uncompiled model."""
    import torch._dynamo.utils as dynamo_utils

    tiny_hf_model(tmp_path / "m", "llama", num_hidden_layers=3)
    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    model = trainable_nf4_model(tmp_path / "m", gradient_checkpointing=True, compile="on")
    plain = trainable_nf4_model(tmp_path / "m", gradient_checkpointing=True)
    for length in (16, 33, 48):
        ids = torch.randint(3, 128, (2, length))
        losses = []
        for m in (model, plain):
            m.zero_grad(set_to_none=True)
            loss = m.model(ids).float().square().mean()
            loss.backward()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4)
        for (name, a), b in zip(model.named_parameters(), plain.parameters()):
            if a.requires_grad:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-3, atol=1e-5, msg=name)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_cached_forward_without_a_mask_equals_transformers(tmp_path, kind):
    """A prompt, then one token and then three more through the KV cache with no mask given: each step's logits are
    transformers' over the whole sequence (the causal mask after the cached positions is aligned bottom right)."""
    hf = tiny_hf_model(tmp_path / "m", kind)
    ours = load_model(tmp_path / "m", quantize=None, dtype=torch.float32, progress=False)
    ids = torch.randint(0, hf.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
        ours.setup_cache(2, 16)
        got = [ours(ids[:, a:b], cache_pos=a) for a, b in ((0, 8), (8, 9), (9, 12))]
    torch.testing.assert_close(torch.cat(got, dim=1), ref, atol=2e-5, rtol=1e-4)


def test_a_config_without_num_key_value_heads_has_one_per_query_head(tmp_path):
    """transformers reads a config.json without num_key_value_heads as multi-head attention (one kv head per query
    head); so does minilora."""
    hf = tiny_hf_model(tmp_path / "m", "llama", num_key_value_heads=None)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("num_key_value_heads", None)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    ours, ref = logits_both(tmp_path / "m", hf, T=16)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-4)
