"""Every command prints only minilora's own words, on any x86 CPU (minilora/__init__.py's START_UP_NOISE).

bitsandbytes logs a hub-kernel warning at import on CPUs with AVX512-BF16 only, and CI's CPU may lack it.
So these tests make bitsandbytes believe it has AVX512-BF16 (and that the optional `kernels` package is
absent), through a sitecustomize.py on PYTHONPATH that runs before anything else in the child process;
the first test proves that this does make bitsandbytes log the line.
"""
import os
import shutil
import subprocess
import sys

import pytest

from conftest import tiny_hf_model

NOISE = "Failed to load CPU gemm_4bit_forward from kernels-community"

SITECUSTOMIZE = '''
import importlib.abc, sys
sys.modules["kernels"] = None  # the optional package is not installed (an import of it fails)

class PretendAVX512BF16(importlib.abc.MetaPathFinder):
    """Just before bitsandbytes' CPU backend is imported, its CPU check answers yes."""
    def find_spec(self, name, path, target=None):
        if name == "bitsandbytes.backends.cpu.ops":
            sys.modules["bitsandbytes.functional"].has_avx512bf16 = lambda: True
        return None  # the module itself is found and loaded as usual

sys.meta_path.insert(0, PretendAVX512BF16())
'''


@pytest.fixture(scope="module")
def noisy_env(tmp_path_factory):
    """The environment of a child process on a CPU where bitsandbytes logs its hub-kernel warning."""
    site = tmp_path_factory.mktemp("avx512bf16")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])),
            "HF_HUB_OFFLINE": "1"}


def run(args, env):
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def test_bitsandbytes_logs_the_line_on_such_a_cpu(noisy_env):
    """Without minilora, bitsandbytes prints the warning: the simulation is real, so the tests below can fail."""
    r = run(["-c", "import bitsandbytes"], noisy_env)
    assert r.returncode == 0, r.stderr
    assert NOISE in r.stderr


@pytest.mark.parametrize("command", [
    ["-m", "minilora.train", "--model", "/nonexistent/model", "--output-dir", "unused"],
    ["-m", "minilora.generate", "--model", "/nonexistent/model", "--prompt", "hi"],
    ["-m", "minilora.merge", "--model", "/nonexistent/model", "--adapter", "/nonexistent/a", "--output-dir", "x"],
])
def test_commands_print_only_their_own_error(command, noisy_env, tmp_path):
    r = subprocess.run([sys.executable, *command], env=noisy_env, capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    prog = command[1]
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith(f"{prog}: error: "), r.stderr
    assert r.stdout == ""


def test_a_training_run_prints_no_third_party_line(noisy_env, smollm2, tmp_path):
    """A real (tiny, NF4) training run and a generation from its adapter: stderr holds only minilora's progress
    bars and notes, no line of bitsandbytes'."""
    folder = tmp_path / "m"
    tiny_hf_model(folder, "llama", vocab_size=49152)  # SmolLM2's vocabulary, so its tokenizer fits
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / f, folder / f)
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a b", "output": "c d"}\n' * 8)
    out = tmp_path / "run"
    r = run(["-m", "minilora.train", "--model", str(folder), "--data", str(data), "--output-dir", str(out),
             "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1", "--eval-fraction", "0"], noisy_env)
    assert r.returncode == 0, r.stderr
    g = run(["-m", "minilora.generate", "--model", str(folder), "--adapter", str(out / "adapter"), "--raw",
             "--prompt", "a b", "--max-new-tokens", "2"], noisy_env)
    assert g.returncode == 0, g.stderr
    for stderr in (r.stderr, g.stderr):
        assert NOISE not in stderr and "bitsandbytes" not in stderr and "Traceback" not in stderr, stderr


def test_other_bitsandbytes_warnings_still_show(noisy_env):
    """Only the one known line is dropped: a different warning on the same logger reaches stderr."""
    code = ("import minilora, logging; "
            "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('a warning that matters')")
    r = run(["-c", code], noisy_env)
    assert r.returncode == 0 and "a warning that matters" in r.stderr, r.stderr
