"""The package's structure (minilora/__init__.py, README "Files"): the core imports nothing from speed/.

The core is what a learner reads: the plain model, NF4, LoRA, the loss, the tokenizer, the data, the
checkpoint and adapter files, the config. train.py joins it to the speed machinery through `speed.configure`
alone. Checked two ways: the import statements themselves, and importing the core with speed/ unimportable.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minilora"
CORE = ["model.py", "nf4.py", "lora.py", "loss.py", "tokenizer.py", "chat.py", "data.py", "hub_data.py",
        "checkpoint.py", "adapter.py", "config.py", "atomic.py"]


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved inside the minilora package."""
    parts = ["minilora"] + list(path.relative_to(PACKAGE).parent.parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found.add(module)
            found |= {f"{module}.{a.name}" for a in node.names}  # `from . import speed`
    return found


def test_no_core_file_imports_the_speed_part():
    for name in CORE:
        speedy = sorted(m for m in imported_modules(PACKAGE / name) if m.startswith("minilora.speed"))
        assert not speedy, f"minilora/{name} imports {speedy}: the core must not know the speed machinery"


def test_train_reaches_the_speed_part_through_its_entry_point_only():
    deep = sorted(m for m in imported_modules(PACKAGE / "train.py") if m.startswith("minilora.speed."))
    assert not deep, f"minilora/train.py imports {deep}; it should use `speed.configure` and what it returns"


BLOCK_SPEED = """
import importlib.abc, sys

class NoSpeed(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "minilora.speed" or name.startswith("minilora.speed.") or name == "triton":
            raise ImportError(f"{name} is blocked: the core must work without it")
        return None

sys.meta_path.insert(0, NoSpeed())
import torch
from minilora import model
assert not any(m == "bitsandbytes" or m.startswith(("bitsandbytes.", "triton")) for m in sys.modules), \\
    "importing the model imported bitsandbytes or triton"
from minilora import adapter, atomic, checkpoint, config, data, lora, loss, nf4, tokenizer
from minilora.checkpoint import random_model
from minilora.lora import apply_lora
from minilora.loss import causal_lm_loss
from minilora.model import ModelConfig

cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
m = random_model(cfg, quantize="nf4")
apply_lora(m, r=4, alpha=8)
ids = torch.randint(0, 64, (2, 9))
loss_sum, n = causal_lm_loss(m.model(ids), m.lm_head.weight, ids)
loss_sum.backward()  # a QLoRA step's forward and backward, on the core alone
assert n == 16 and not any(k.startswith("minilora.speed") for k in sys.modules)
print("ok")
"""


def test_the_core_trains_with_the_speed_part_unimportable():
    r = subprocess.run([sys.executable, "-c", BLOCK_SPEED], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


UNCOMPILED_START = """
import sys
from minilora import generate, train  # the commands' imports, bitsandbytes' among them
from minilora.speed import configure
from minilora.train import TrainConfig, build_model, make_optimizer
model, params = build_model(TrainConfig(model=sys.argv[1], compile="off", optim="adamw8bit"), sys.argv[1], "cpu",
                            configure(TrainConfig(compile="off"), "cpu"), run_tokens=1000)
make_optimizer(params, TrainConfig())
import torch
assert torch.compile.__name__ == "compile", "torch.compile was left deferred after bitsandbytes' import"
print(sorted(m for m in ("torch._inductor.compile_fx", "torch._inductor.select_algorithm") if m in sys.modules))
"""


def test_an_uncompiled_run_does_not_import_the_compiler(tmp_path):
    """A run that compiles nothing must not pay for importing torch's compiler (inductor: ~2 s): bitsandbytes' own
    torch.compile calls at import are deferred (minilora/__init__.py's compile_at_first_call; bench/NOTES.md,
    section 16). torch._dynamo is imported all the same, by bitsandbytes' ops at their first call and by torch's
    optimizers as they are built."""
    from conftest import tiny_hf_model

    tiny_hf_model(tmp_path / "m", "llama")
    r = subprocess.run([sys.executable, "-c", UNCOMPILED_START, str(tmp_path / "m")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
