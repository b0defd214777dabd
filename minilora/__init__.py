"""minilora: QLoRA fine-tuning of DeepSeek-R1-Distill models (Llama and Qwen2) in plain PyTorch.

The commands: `python -m minilora.train`, `python -m minilora.generate`, `python -m minilora.merge`.
The package has four parts; README.md has the whole file map with line counts.

    the core     model.py -> nf4.py -> lora.py -> loss.py -> train.py, the learner's path; with config.py,
                 tokenizer.py, chat.py (chat records and their label spans), data.py, hub_data.py, checkpoint.py and
                 adapter.py. It imports nothing from speed/.
    speed/       what makes training fast or lean, attached to the unchanged model by speed.configure
    run/         resume, faults and the end-of-run report
    export/      merge, GGUF for llama.cpp (f16 to q4_k_m) with an Ollama Modelfile, the hub
beside them generate.py (generation and chat), distributed.py (torchrun) and demo.py (the demo task).
"""
import atexit
import contextlib
import functools
import logging
import os
import sys
import threading
import time
import warnings
from pathlib import Path

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


@contextlib.contextmanager
def compile_at_first_call():
    """torch.compile, deferred to each compiled function's first call, inside this block.

    bitsandbytes' default (CPU) backend wraps four of its functions in torch.compile as it is imported, and
    calling torch.compile imports the compiler's back end, inductor: ~2 s of every command's start, on top of
    torch._dynamo (which bitsandbytes' ops and torch's optimizers import anyway at their first use), where a GPU
    run calls none of those four and a short one compiles nothing of its own (bench/NOTES.md, section 16).
    nf4.py imports bitsandbytes inside this block, so each of those functions is handed to torch.compile at its
    first call instead: the same functions, compiled the same way, later."""
    import torch

    compile_now = torch.compile

    def deferred(model=None, **options):  # torch.compile's signature: the function is called `model`
        if model is None:  # @torch.compile(dynamic=False)
            return lambda f: deferred(f, **options)
        compiled = []

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            if not compiled:
                try:
                    compiled.append(compile_now(model, **options))
                except Exception:  # as bitsandbytes does when torch.compile refuses: the function as it is
                    compiled.append(model)
            return compiled[0](*args, **kwargs)
        return first_call_compiles

    torch.compile = deferred
    try:
        yield
    finally:
        torch.compile = compile_now


def run_command(main) -> None:
    """Run a command's `main()` and exit with its code, without the interpreter's teardown.

    Once a command has written its last file, a normal exit still takes a second or more (1.4 s for a tiny
    training run on a 2-core CPU, bench/results/teardown-cpu.txt): Python collects and frees every object of
    torch, its compiler and sympy, one module at a time, while the user waits for the prompt. None of that is
    needed by then, so this does what an exit must (wait for the threads that are not daemons, run the atexit
    handlers: logging's flush, torch's compile workers; flush stdout and stderr) and ends the process with
    os._exit. An exception that `main` does not turn into an exit code takes the normal way out, traceback and
    all. Commands only: importing the package changes nothing about how a program exits. Meanwhile minilora's own
    warnings print as one line of words, without Python's file, line and source line."""
    python_format = warnings.formatwarning

    def words(message, category, filename, lineno, line=None):
        if Path(filename).resolve().is_relative_to(Path(__file__).parent):
            return f"minilora: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = words
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    if isinstance(code, str):  # SystemExit("message"): Python prints it and exits 1
        print(code, file=sys.stderr)
        code = 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Python runs at exit; private, and unchanged since Python 2
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)
