"""Data parallelism: `torchrun --nproc_per_node 2` on the CPU (gloo), against one process.

The reference is the single-process trainer with the whole global batch: 2 ranks x batch 2
must give the same per-step losses and the same final LoRA weights as 1 rank x batch 4
(fp32, dropout 0, uneven lengths; 1e-5: the only difference is the order in which the
ranks' partial sums are added, ~1e-7). That the single-process trainer itself computes the
mean over all label tokens is checked against torch in test_train.py.
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from test_train import crash_after_checkpoint, run_train, tiny_run_args, train_losses, write_jsonl


def run_torchrun(args, nproc=2):
    env = {**os.environ, "MINILORA_DIST_TIMEOUT": "60", "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--standalone", "-m", "minilora.train", *args],
                          capture_output=True, text=True, env=env, timeout=600)


def args_for(tmp_path, out, batch_size, **extra):
    """tiny_run_args, spelled for torchrun: its own parser rejects `--r` (an ambiguous abbreviation of its
    --rdzv-*/--role/--run-path options) even after the module name, so the rank goes as peft's `--lora-r`."""
    args = tiny_run_args(tmp_path, out, batch_size=batch_size, dropout=0.0, **extra)
    args[args.index("--r")] = "--lora-r"
    return args


def assert_same_run(a, b, steps):
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == steps
    for s in la:
        assert abs(la[s] - lb[s]) < 1e-5, (s, la[s], lb[s])
    wa = load_file(a / "adapter" / "adapter_model.safetensors")
    wb = load_file(b / "adapter" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)


def test_two_ranks_equal_one_rank_with_twice_the_batch(tmp_path):
    one = tmp_path / "one"
    r = run_train(args_for(tmp_path, one, 4))
    assert r.returncode == 0, r.stderr
    two = tmp_path / "two"
    r = run_torchrun(args_for(tmp_path, two, 2))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("adapter saved to") == 1  # rank 0 alone prints
    assert_same_run(one, two, [1, 2, 3, 4, 5, 6])
    rows = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [x["label_tokens"] for x in rows if x["split"] == "train"] == \
           [x["label_tokens"] for x in ref if x["split"] == "train"]  # the GLOBAL token count is logged
    assert train_losses(two)[6] < train_losses(two)[1]  # and it learned something


def test_two_rank_resume_equals_uninterrupted(tmp_path):
    """Crash after the step-3 checkpoint of a 2-rank run, resume with 2 ranks: steps 4-6 and the adapter match.
    Resuming it with 1 process is refused, naming both world sizes."""
    full = tmp_path / "full"
    r = run_torchrun(args_for(tmp_path, full, 2))
    assert r.returncode == 0, r.stderr
    part = tmp_path / "part"
    r = run_torchrun(args_for(tmp_path, part, 2, save_every=3))
    assert r.returncode == 0, r.stderr
    state = torch.load(part / "checkpoints" / "step-000003" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2
    crash_after_checkpoint(part, 3)
    r = run_train(args_for(tmp_path, part, 2, save_every=3) + ["--resume"])
    assert r.returncode == 2 and "written by 2 rank(s), this run has 1" in r.stderr, r.stderr
    r = run_torchrun(args_for(tmp_path, part, 2, save_every=3) + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    assert_same_run(full, part, [1, 2, 3, 4, 5, 6])


def test_ranks_with_different_data_are_stopped(tmp_path):
    """Each rank reads a data file of its own (a path that resolves per host, say): a clear stop naming rank 1."""
    args = args_for(tmp_path, tmp_path / "o", 2)
    other = write_jsonl(tmp_path / "other.jsonl", [{"instruction": f"Say {i}", "output": "x"} for i in range(40)])
    # one flag, two meanings: the data path comes from an environment variable each rank sees differently
    boot = ("import os, runpy, sys; i = sys.argv.index('--data'); "
            f"sys.argv[i + 1] = sys.argv[i + 1] if os.environ['RANK'] == '0' else {str(other)!r}; "
            "runpy.run_module('minilora.train', run_name='__main__', alter_sys=True)")
    script = tmp_path / "boot.py"
    script.write_text(boot)
    env = {**os.environ, "MINILORA_DIST_TIMEOUT": "60"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(script), *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode != 0
    assert "rank 1 disagrees with rank 0" in r.stderr and "data:" in r.stderr, r.stderr


def test_fsdp_shards_the_4bit_base_and_trains_like_one_rank(tmp_path):
    """--fsdp: each rank keeps half of every NF4 layer's codes (FSDP2), and the run equals 1 rank x batch 4
    on the same 4-bit model."""
    one, two = tmp_path / "one", tmp_path / "two"
    nf4 = lambda a: [x for x in a if x != "--no-4bit"]  # noqa: E731
    r1 = run_train(nf4(args_for(tmp_path, one, 4)))
    assert r1.returncode == 0, r1.stderr
    r2 = run_torchrun(nf4(args_for(tmp_path, two, 2)) + ["--fsdp"])
    assert r2.returncode == 0, r2.stderr
    assert_same_run(one, two, [1, 2, 3, 4, 5, 6])
    counts = [next(x for x in r.stdout.splitlines() if x.startswith("trainable params")) for r in (r1, r2)]
    assert counts[0] == counts[1], counts  # the sharded codes are not counted as extra parameters


def test_fsdp_on_one_process_is_refused(tmp_path):
    r = run_train(args_for(tmp_path, tmp_path / "o", 2) + ["--fsdp"])
    assert r.returncode == 2 and "--fsdp shards the model across processes" in r.stderr, r.stderr


def test_fsdp_layer_keeps_half_the_codes_and_matches_the_whole_layer(tmp_path):
    """The sharding itself, against bitsandbytes' own dequantization: after shard_nf4 each of 2 ranks holds
    half of the packed codes, and a forward and backward through the layer equal the unsharded layer's."""
    script = tmp_path / "shard.py"
    script.write_text(SHARD_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(script)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MINILORA_DIST_TIMEOUT": "60"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok") == 2, r.stdout


SHARD_SCRIPT = """
import torch, torch.distributed as dist, torch.nn as nn
from torch.distributed.tensor import DTensor
from minilora import distributed as dp
from minilora.nf4 import NF4Linear
import bitsandbytes.functional as bnbF

device = dp.init(torch.device("cpu"))
torch.manual_seed(0)
w = torch.randn(96, 64)
layer = NF4Linear.from_weight(w, compute_dtype=torch.float32)
dense = bnbF.dequantize_4bit(layer.weight, layer.quant_state)  # bitsandbytes' view of the 4-bit weight
root = nn.Sequential(layer)
mesh = dp.mesh(device)
dp.shard_nf4(layer, mesh)
dp.shard_root(root, mesh)
assert isinstance(layer.weight, DTensor) and layer.weight.to_local().shape[0] == 96 * 64 // 2 // 2
x = torch.randn(3, 64, requires_grad=True)
y = root(x)
assert isinstance(layer.weight, DTensor)  # freed again after forward
y.square().sum().backward()
ref_x = x.detach().clone().requires_grad_()
ref_y = ref_x @ dense.T
ref_y.square().sum().backward()
torch.testing.assert_close(y, ref_y)
torch.testing.assert_close(x.grad, ref_x.grad)
print("ok")
dp.teardown()  # as train.py does: a process group left to the interpreter's exit can abort there (gloo's threads)
"""


def test_a_dying_rank_stops_the_others_in_bounded_time(tmp_path):
    """Rank 1 dies in its third step (killed, out of memory, a lost node): rank 0 must not wait forever in the
    next all-reduce. torchrun ends the group, and the process-group timeout bounds it where torchrun cannot."""
    import time

    args = args_for(tmp_path, tmp_path / "o", 2, max_steps=50)
    boot = ("import os, runpy, sys\n"
            "import minilora.train as T\n"
            "real, calls = T.train_step, []\n"
            "def step(*a, **kw):\n"
            "    calls.append(1)\n"
            "    if os.environ['RANK'] == '1' and len(calls) == 3:\n"
            "        os._exit(9)\n"
            "    return real(*a, **kw)\n"
            "T.train_step = step\n"
            "sys.argv[0] = T.__file__\n"
            "T.main()\n")
    script = tmp_path / "boot.py"
    script.write_text(boot)
    t = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                        str(script), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "MINILORA_DIST_TIMEOUT": "30"})
    assert r.returncode != 0
    assert time.monotonic() - t < 150, "the surviving rank waited too long"
    assert "exitcode  : 9" in r.stderr, r.stderr[-2000:]
