"""minilora: QLoRA fine-tuning of DeepSeek-R1-Distill models (Llama and Qwen2) in plain PyTorch.

The commands: `python -m minilora.train`, `python -m minilora.generate`, `python -m minilora.merge`.
The package has four parts; README.md has the whole file map with line counts.

    the core     model.py -> nf4.py -> lora.py -> loss.py -> train.py, the learner's path; with config.py,
                 tokenizer.py, chat.py (chat records and their label spans), data.py, checkpoint.py and
                 adapter.py. It imports nothing from speed/.
    speed/       what makes training fast or lean, attached to the unchanged model by speed.configure
    run/         resume, faults and the end-of-run report
    export/      merge, GGUF for llama.cpp (f16 to q4_k_m) with an Ollama Modelfile, the hub
beside them generate.py (generation and chat), distributed.py (torchrun) and demo.py (the demo task).
"""
import logging
import time

__version__ = "0.1.0"
STARTED = time.perf_counter()  # the package's first import, nearly a command's launch: where start-up is timed from

# Third-party start-up lines that tell a minilora user nothing they can act on, dropped here, once, for every
# command (each starts by importing this package). Each is matched by its logger and the start of its message,
# so every other warning of those libraries still shows.
START_UP_NOISE = {
    # bitsandbytes >= 0.50, on CPUs with AVX512-BF16, tries to fetch a faster CPU kernel from the hub through the
    # optional `kernels` package at import; without it (or offline, as the tests are) it uses its own kernel and
    # logs this. Nothing is wrong: the NF4 results are the same either way.
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community",),
}


def _drop_start_up_noise():
    for name, prefixes in START_UP_NOISE.items():
        logging.getLogger(name).addFilter(lambda record, p=prefixes: not str(record.msg).startswith(p))


_drop_start_up_noise()
