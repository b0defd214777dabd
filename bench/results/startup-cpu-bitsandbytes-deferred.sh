#!/usr/bin/env bash
# bench/NOTES.md, section 16: what deferring bitsandbytes' import-time torch.compile calls saves on the CPU.
# Run from the repository root with the test venv: bash bench/results/startup-cpu-bitsandbytes-deferred.sh
set -euo pipefail
PY="$PWD/.venv/bin/python"
echo "# 1. the compiler's import, in a fresh process each (torch imported first, not timed)"
for i in 1 2 3; do $PY -c "
import time, torch
t = time.perf_counter(); import torch._dynamo; a = time.perf_counter() - t
t = time.perf_counter(); torch.compile(lambda x: x); b = time.perf_counter() - t
print(f'import torch._dynamo {a:.2f} s, then the first torch.compile call {b:.2f} s')"; done
for i in 1 2 3; do $PY -c "
import time, torch
t = time.perf_counter(); torch.compile(lambda x: x); print(f'torch.compile alone {time.perf_counter() - t:.2f} s')"; done
echo "# 2. tests/test_train.py's tiny run (--padding-free on --optim adamw8bit, CPU): report.json's start_up_s"
run() {
  (cd tests && $PY - <<'PY'
import json, pathlib, subprocess, sys, tempfile
sys.path.insert(0, ".")
from test_train import tiny_run_args
tmp = pathlib.Path(tempfile.mkdtemp())
for i in range(3):
    args = tiny_run_args(tmp, tmp / f"out{i}", max_steps=2, padding_free="on", optim="adamw8bit")
    subprocess.run([sys.executable, "-m", "minilora.train", *args], capture_output=True, check=True)
    r = json.loads((tmp / f"out{i}" / "report.json").read_text())["start_up_s"]
    print({k: round(v, 2) for k, v in r.items()})
PY
  )
}
echo "## after: nf4.py imports bitsandbytes inside compile_at_first_call"
run
echo "## before: nf4.py's plain import (a876f72's), swapped in for this run only"
cp minilora/nf4.py /tmp/nf4.after.py
git show a876f72:minilora/nf4.py > minilora/nf4.py
trap 'cp /tmp/nf4.after.py minilora/nf4.py' EXIT
run
