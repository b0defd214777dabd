"""The training loop: accumulation, schedule, resume, the demo run, and bad input.

References: torch's own cross-entropy over full logits (loss and accumulation),
transformers' schedulers (lr curve); resume is compared with an uninterrupted
run of the same code, which is the property itself.
"""
import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import tiny_hf_model
from minilora import data as D
from minilora import train as T
from minilora.checkpoint import load_model
from minilora.lora import apply_lora
from minilora.loss import causal_lm_loss, reference_loss
from minilora.speed import compiled_chunk


def lora_model(folder, seed=0):
    model = load_model(folder, quantize=None, progress=False)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(seed)
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)  # B = 0 would give A no gradient
    return model.train()


def uneven_batch(n=8, vocab=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        L = 5 + 3 * i  # lengths 5..26: very uneven
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        n_prompt = 1 + i % 4
        examples.append(D.Example(ids, [D.IGNORE] * n_prompt + ids[n_prompt:]))
    return examples


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_chunked_loss_equals_full_logits_cross_entropy(tmp_path, compiled):
    """The chunked loss and its dL/dh against torch's cross-entropy on full logits; compiled: the chunk's
    softmax fused by torch.compile (the GPU trainer's path), here through inductor's CPU backend."""
    tiny_hf_model(tmp_path / "m", "qwen2")
    model = lora_model(tmp_path / "m")
    b = D.collate(uneven_batch(), pad_id=0)
    h = model.model(b["input_ids"])
    chunk = {"chunk": compiled_chunk()} if compiled else {}  # the chunk function the trainer compiles on a GPU
    ours, n = causal_lm_loss(h, model.lm_head.weight, b["labels"], rows=7, **chunk)  # several chunks
    ref, n_ref = reference_loss(model.lm_head(h), b["labels"])
    assert n == n_ref
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    with torch.no_grad():  # the eval path: the loss alone
        torch.testing.assert_close(causal_lm_loss(h, model.lm_head.weight, b["labels"], rows=7, **chunk)[0],
                                   ref, atol=1e-4, rtol=1e-5)
    g_ours = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad], retain_graph=True)
    g_ref = torch.autograd.grad(ref, [p for p in model.parameters() if p.requires_grad])
    for a, r in zip(g_ours, g_ref):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-4)


def test_compiled_loss_chunk_compiles_once_for_every_row_count():
    """speed/compile.py: the chunk function's rows are dynamic from its first compile, so a chunk of another row
    count (the last one of a sequence, or another sequence length) compiles nothing more, which lets a CUDA graph
    be recorded at a new length's first use (speed/graphs.py). Each chunk's loss against torch's cross-entropy."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    chunk, g = compiled_chunk(), torch.Generator().manual_seed(0)
    for rows in (7, 5, 12):
        logits = torch.randn(rows, 50, generator=g)
        y = torch.randint(0, 50, (rows,), generator=g)
        y[0] = D.IGNORE
        loss, grad = chunk(logits, y, y != D.IGNORE, True)
        ref = torch.nn.functional.cross_entropy(logits, y, ignore_index=D.IGNORE, reduction="sum")
        torch.testing.assert_close(loss, ref, atol=1e-4, rtol=1e-5)
        assert grad.shape == logits.shape
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def grads_after_step(model, batches):
    model.zero_grad(set_to_none=True)
    loss, n = T.train_step(model, batches, torch.autocast("cpu", enabled=False))
    return float(loss), n, {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    """batch 8 x accum 1 == batch 2 x accum 4 == torch's mean CE over all label tokens, on uneven lengths."""
    tiny_hf_model(tmp_path / "m", "llama")
    model = lora_model(tmp_path / "m")
    ex = uneven_batch()
    loss8, n8, g8 = grads_after_step(model, [D.collate(ex, 0)])
    loss2, n2, g2 = grads_after_step(model, [D.collate(ex[i:i + 2], 0) for i in range(0, 8, 2)])
    # reference: one forward with full logits, torch's mean cross-entropy over every label token
    model.zero_grad(set_to_none=True)
    b = D.collate(ex, 0)
    logits = model(b["input_ids"])
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b["labels"][:, 1:].reshape(-1))
    ref.backward()
    assert n8 == n2
    assert abs(loss8 - ref.item()) < 1e-5 and abs(loss2 - ref.item()) < 1e-5
    for k, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(g8[k], p.grad, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(g2[k], p.grad, atol=1e-6, rtol=1e-4)
    # the bug this avoids: averaging per-micro-batch means gives a different loss here
    naive = sum(reference_loss(model(D.collate(ex[i:i + 2], 0)["input_ids"]), D.collate(ex[i:i + 2], 0)["labels"])[0].item()
                / reference_loss(model(D.collate(ex[i:i + 2], 0)["input_ids"]), D.collate(ex[i:i + 2], 0)["labels"])[1]
                for i in range(0, 8, 2)) / 4
    assert abs(naive - ref.item()) > 1e-3


@pytest.mark.parametrize("scheduler", ["linear", "cosine", "constant"])
def test_lr_schedule_matches_transformers(scheduler):
    import transformers

    cfg = T.TrainConfig(lr=3e-4, warmup_steps=4, scheduler=scheduler)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = transformers.get_scheduler(scheduler if scheduler != "constant" else "constant_with_warmup", opt,
                                       num_warmup_steps=4, num_training_steps=20)
    for step in range(20):
        assert math.isclose(T.lr_at(step, cfg, 20), opt.param_groups[0]["lr"], rel_tol=1e-9, abs_tol=1e-12), step
        opt.step()
        sched.step()
    assert T.lr_at(0, cfg, 20) == 0.0 and T.lr_at(4, cfg, 20) == cfg.lr


def run_train(args, check=True):
    return subprocess.run([sys.executable, "-m", "minilora.train", *args], capture_output=True, text=True,
                          check=False, timeout=900)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def tiny_run_args(tmp_path, out, **extra):
    folder = tmp_path / "m"
    if not folder.exists():
        tiny_hf_model(folder, "llama", vocab_size=49152)  # SmolLM2's vocabulary, so its tokenizer fits
        import shutil

        from minilora.demo import smollm2_folder

        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(smollm2_folder() / f, folder / f)
    data = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Say {i}", "output": f"{i} " * (1 + i % 5)}
                                               for i in range(40)])
    args = ["--model", str(folder), "--data", str(data), "--output-dir", str(out), "--batch-size", "2",
            "--grad-accum", "2", "--max-steps", "6", "--lr", "1e-2", "--warmup-steps", "1", "--r", "4",
            "--no-4bit", "--optim", "adamw", "--dropout", "0.1", "--device", "cpu", "--eval-fraction", "0.1"]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def train_losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"}


def crash_after_checkpoint(out, step: int):
    """Leave `out` as a run killed right after step `step`'s checkpoint: drop everything written later."""
    import shutil

    shutil.rmtree(out / "adapter")
    for ck in (out / "checkpoints").glob("step-*"):
        if ck.name != f"step-{step:06d}":
            shutil.rmtree(ck)
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["step"] <= step]
    write_jsonl(out / "metrics.jsonl", rows)


@pytest.mark.parametrize("rank,optim", [(4, "adamw"), (64, "adamw8bit")])
def test_resume_equals_uninterrupted(tmp_path, rank, optim):
    """Crash after the step-3 checkpoint, resume: steps 4-6 match the uninterrupted run (fp32, 1e-5).
    At r=64 most factors (64 x 64 and up) are joined into one flat tensor for the 8-bit optimizer."""
    extra = {"r": rank, "optim": optim}
    full = tmp_path / "full"
    r = run_train(tiny_run_args(tmp_path, full, **extra))
    assert r.returncode == 0, r.stderr
    part = tmp_path / "part"
    r = run_train(tiny_run_args(tmp_path, part, save_every=3, **extra))
    assert r.returncode == 0, r.stderr
    crash_after_checkpoint(part, 3)
    r = run_train(tiny_run_args(tmp_path, part, save_every=3, **extra) + ["--resume"])
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout
    a, b = train_losses(full), train_losses(part)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    for s in a:
        assert abs(a[s] - b[s]) < 1e-5, (s, a[s], b[s])
    assert a[6] < a[1]  # and it learned something


def test_resume_refuses_optimizer_state_of_another_layout(tmp_path):
    """A checkpoint whose optimizer holds one entry per LoRA factor (minilora before the factors were
    joined into one tensor) is refused by name, with the way out, instead of loading into the wrong slots."""
    extra = {"r": 64, "optim": "adamw8bit"}
    out = tmp_path / "old"
    r = run_train(tiny_run_args(tmp_path, out, save_every=3, **extra))
    assert r.returncode == 0, r.stderr
    crash_after_checkpoint(out, 3)
    path = out / "checkpoints" / "step-000003" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = list(range(40))  # the old layout: an entry per factor
    state["optimizer"]["state"] = {}
    torch.save(state, path)
    r = run_train(tiny_run_args(tmp_path, out, save_every=3, **extra) + ["--resume"])
    assert r.returncode != 0
    assert "step-000003: its optimizer state does not fit" in r.stderr and "start a new run" in r.stderr, r.stderr


@pytest.mark.parametrize("optim", ["adamw8bit", "adamw"])
def test_flat_optimizer_matches_one_entry_per_factor(optim):
    """step.flatten_for_optimizer: factors joined into one tensor train bit for bit as bitsandbytes' (or torch's)
    AdamW trains them one entry each, over 3 steps of 2 accumulated micro-batches. A factor under 4096
    values stays apart (bitsandbytes keeps 32-bit state for it); the others become views of the flat tensor."""
    from minilora.speed.flat_optimizer import flatten_for_optimizer
    from minilora.train import make_optimizer

    torch.manual_seed(0)
    shapes = [(16, 512), (256, 16), (16, 256), (64, 16), (512, 16)]  # (64, 16): 1024 values, kept apart
    ref = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    mine = [torch.nn.Parameter(p.detach().clone()) for p in ref]
    params = flatten_for_optimizer(mine)
    assert len(params) == 2 and params[0].numel() == 8192 + 4096 + 4096 + 8192 and params[1] is mine[3]
    assert all(mine[i].data_ptr() == params[0].data_ptr() + 4 * off for i, off in [(0, 0), (1, 8192), (4, 16384)])
    cfg = T.TrainConfig(lr=1e-2, optim=optim, weight_decay=0.1)
    xs = [torch.randn(s) for s in shapes]
    for group, ps in ((ref, ref), (mine, params)):
        opt = make_optimizer(ps, cfg)
        for step in range(3):
            for micro in range(2):  # loss = sum_i <w_i^2, x_i>: gradients that differ per factor and per step
                sum(((w ** 2) * x * (micro + 1)).sum() for w, x in zip(group, xs)).backward()
            torch.nn.utils.clip_grad_norm_(ps, 1e9)  # a no-op clip (factor 1.0), as the trainer calls it
            opt.step()
            opt.zero_grad(set_to_none=True)
    for a, b in zip(ref, mine):
        assert torch.equal(a, b), (a - b).abs().max()
        assert b.grad is None


def test_resume_with_different_rank_is_refused(tmp_path):
    out = tmp_path / "o"
    assert run_train(tiny_run_args(tmp_path, out, save_every=3)).returncode == 0
    import shutil

    shutil.rmtree(out / "adapter")
    r = run_train(tiny_run_args(tmp_path, out) + ["--resume", "--r", "8"])
    assert r.returncode == 2 and "r: checkpoint 4, now 8" in r.stderr


def test_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "o"
    assert run_train(tiny_run_args(tmp_path, out)).returncode == 0
    for f in ("metrics.jsonl", "loss.png", "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (out / f).is_file(), f
    before = (out / "metrics.jsonl").read_text()
    r = run_train(tiny_run_args(tmp_path, out))
    assert r.returncode == 2 and "already holds a finished run" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before
    # --overwrite with data that fails its checks: the old run stays as it was
    bad = tiny_run_args(tmp_path, out) + ["--overwrite"]
    bad[bad.index("--data") + 1] = str(tmp_path / "missing.jsonl")
    r = run_train(bad)
    assert r.returncode == 2 and "missing.jsonl: no such data file" in r.stderr
    assert (out / "metrics.jsonl").read_text() == before and (out / "adapter" / "adapter_model.safetensors").is_file()
    # a folder that holds the user's own files too is not a run to replace
    (out / "notes.txt").write_text("mine")
    r = run_train(tiny_run_args(tmp_path, out) + ["--overwrite"])
    assert r.returncode == 2 and f"--overwrite replaces a minilora run, but {out} holds other files too (notes.txt)" \
        in r.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.jsonl").read_text() == before
    (out / "notes.txt").unlink()
    (out / ".adapter.tmp-x1").mkdir()  # a save killed mid-write: the run's own leftover, replaced with it
    assert run_train(tiny_run_args(tmp_path, out) + ["--overwrite"]).returncode == 0
    assert not (out / ".adapter.tmp-x1").exists() and (out / "metrics.jsonl").read_text() != before
    # bad data for a new folder leaves no empty folder behind; a file as the folder is named
    r = run_train(bad[:bad.index("--output-dir") + 1] + [str(tmp_path / "new")] + bad[bad.index("--output-dir") + 2:])
    assert r.returncode == 2 and not (tmp_path / "new").exists()
    r = run_train(tiny_run_args(tmp_path, tmp_path / "d.jsonl"))
    assert r.returncode == 2 and "d.jsonl is a file; give a folder" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--learning-rate", "1e-4"], "unknown argument '--learning-rate'. Did you mean '--lr'?"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--r", "0"], "--r must be a positive integer"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--scheduler", "step"], "invalid choice"),
    (["--padding-free", "yes"], "argument --padding-free: invalid choice: 'yes'"),
    (["--cuda-graphs", "on", "--dropout", "0.1"], "--cuda-graphs on cannot record --dropout"),
    (["--cuda-graphs", "on", "--device", "cpu"], "--cuda-graphs on needs a CUDA GPU with bf16"),
    (["--cuda-graphs", "on", "--offload", "--device", "cpu"], "--cuda-graphs on needs a CUDA GPU"),  # no clash
    (["--keep-activations", "-1"], "--keep-activations must be >= 0"),
    (["--targets", ","], "--targets ',': no module named; give some of q_proj"),
    (["--targets", "q_proj,vproj"], "vproj is not among the projections LoRA goes on here (q_proj, k_proj, v_proj, "
                                   "o_proj, gate_proj, up_proj, down_proj; all-linear is all seven). Did you mean 'v_proj'?"),
    (["--keep-activations", "2", "--no-gradient-checkpointing"], "--keep-activations N spares N layers the recompute"),
])
def test_bad_flags(args, message):
    r = run_train(["--model", "x", "--data", "y.jsonl", *args])
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_targets_all_linear_are_the_modules_peft_adapts(tmp_path, kind):
    """--targets all-linear, peft's spelling: the projections peft's LoraConfig(target_modules="all-linear") wraps."""
    import peft

    from minilora.config import target_names

    hf = tiny_hf_model(tmp_path / "m", kind)
    wrapped = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules="all-linear"))
    peft_targets = {name.rsplit(".", 1)[-1] for name, m in wrapped.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    assert set(target_names("all-linear")) == peft_targets


def test_keep_activations_beyond_the_layers_stops_before_loading(tmp_path):
    args = tiny_run_args(tmp_path, tmp_path / "o")  # the tiny model has 2 decoder layers
    r = run_train(args + ["--keep-activations", "3"])
    assert r.returncode == 2 and "config.json has 2 decoder layers; choose 0" in r.stderr, r.stderr
    assert "template:" not in r.stdout and "trainable params" not in r.stdout  # stopped before the data and model


def test_config_file_is_validated(tmp_path):
    good = tmp_path / "c.json"
    good.write_text(json.dumps({"lr": 1e-4, "batch-size": 4, "rslora": True}))
    assert T.parse_config(["--model", "m", "--data", "d.jsonl", "--config", str(good), "--lr", "2e-4"]).batch_size == 4
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"lr": "fast"}))
    with pytest.raises(T.UsageError, match="lr must be float"):
        T.parse_config(["--config", str(bad)])
    bad.write_text(json.dumps({"lora_rank": 4}))
    with pytest.raises(T.UsageError, match="unknown key 'lora_rank'"):
        T.parse_config(["--config", str(bad)])


def test_bad_data_line_is_named(tmp_path):
    model_args = tiny_run_args(tmp_path, tmp_path / "o")[:2]
    data = tmp_path / "bad.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": \n')
    r = run_train(model_args + ["--data", str(data), "--output-dir", str(tmp_path / "o")])
    assert r.returncode == 2 and f"{data}:2: malformed JSON line" in r.stderr


def test_help_lists_every_flag():
    r = run_train(["--help"])
    assert r.returncode == 0
    for f in dataclasses.fields(T.TrainConfig):
        assert "--" + f.name.replace("_", "-") in r.stdout, f.name


def test_demo_learns(tmp_path, smollm2):
    """`python -m minilora.train` with no model/data: the real 24-step demo on SmolLM2 (a few minutes on CPU).

    Held-out questions are never trained on, so accuracy rising is learning, not recall."""
    cfg = T.parse_config(["--output-dir", str(tmp_path / "demo")])
    assert cfg.max_steps == 24 and not cfg.model and not cfg.data
    report = T.train(cfg)
    assert report["eval_loss_after"] < 0.5 * report["eval_loss_before"]
    assert report["after"]["accuracy"] >= report["before"]["accuracy"] + 0.5
    rows = [json.loads(r) for r in (tmp_path / "demo/metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert len(train) == 24 and train[-1]["loss"] < train[0]["loss"]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train[0])
    for f in ("loss.png", "report.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "checkpoints/step-000024/trainer_state.pt"):
        assert (tmp_path / "demo" / f).is_file(), f


@pytest.mark.parametrize("lengths", [None, [3, 9, 1, 7, 5, 2, 8, 4, 6, 10]], ids=["shuffled", "grouped"])
def test_each_epoch_draws_each_example_once_when_steps_cross_its_end(lengths):
    """10 examples, 4 a step (2 x 2): steps cross the epochs' ends, and each epoch still draws its own shuffle,
    whole and in order (the step that crosses goes on with the next epoch's first examples)."""
    examples = list(range(10))
    order = lambda epoch: D.epoch_order(10, 3407, epoch, lengths, batch=2)  # noqa: E731
    drawn = [e for step in range(8) for mb in T.micro_batches(examples, order, 4 * step, 2, 2) for e in mb]
    assert drawn[:30] == order(0) + order(1) + order(2)
    assert drawn[30:] == order(3)[:2]


def test_group_by_length_orders_a_permutation_with_less_padding():
    """--group-by-length: each epoch is still every example once, from the seed alone (so a resume replays it),
    and batches of 2 from lengths spread like medical-o1's (300-1,500 tokens) carry far less padding."""
    import random

    rng = random.Random(7)
    lengths = [rng.randint(300, 1500) for _ in range(1000)]
    plain = D.epoch_order(len(lengths), 3407, 0)
    grouped = D.epoch_order(len(lengths), 3407, 0, lengths, batch=2)
    assert sorted(grouped) == list(range(len(lengths))) and grouped != plain
    assert grouped == D.epoch_order(len(lengths), 3407, 0, lengths, batch=2)
    assert grouped != D.epoch_order(len(lengths), 3407, 1, lengths, batch=2)

    def padding(order):  # pad tokens / real tokens, micro-batches of 2 padded to their longest
        pairs = [order[i: i + 2] for i in range(0, len(order), 2)]
        return sum(2 * max(lengths[i] for i in p) - sum(lengths[i] for i in p) for p in pairs) / sum(lengths)

    assert padding(plain) > 0.2 and padding(grouped) < 0.02, (padding(plain), padding(grouped))
    first = [max(lengths[i] for i in grouped[b: b + 2]) for b in range(0, 200, 2)]
    assert first != sorted(first) and first != sorted(first, reverse=True)  # the steps still mix lengths


def test_group_by_length_trains_on_the_same_tokens(tmp_path):
    """One epoch at a negligible lr, grouped and not: the same label tokens, and the same summed loss over the
    epoch (every example once, padding weighing nothing), only in another order."""
    def epoch(out, *extra):
        r = run_train(tiny_run_args(tmp_path, out, max_steps=0, epochs=1, lr=1e-12, dropout=0.0) + list(extra))
        assert r.returncode == 0, r.stderr
        rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
        return sum(r["label_tokens"] for r in rows), sum(r["loss"] * r["label_tokens"] for r in rows), rows

    n_plain, loss_plain, rows_plain = epoch(tmp_path / "plain")
    n_grouped, loss_grouped, rows_grouped = epoch(tmp_path / "grouped", "--group-by-length")
    assert n_plain == n_grouped and len(rows_plain) == len(rows_grouped) == 9
    assert abs(loss_plain - loss_grouped) < 1e-5 * loss_plain
    assert [r["loss"] for r in rows_plain] != [r["loss"] for r in rows_grouped]  # other batches, in another order


def test_compile_auto_leaves_a_short_run_eager(tmp_path, monkeypatch, capsys):
    """--compile auto (speed.Speed.fit_to_run): a run too short to repay the compile (parameters x tokens under
    COMPILE_AUTO_PARAM_TOKENS) is not compiled, and the trainer says so with the run's token count, which is every
    token of its epoch here (checked against the steps' own counts). `configure` is made to choose compile, as it
    does on a GPU."""
    from minilora import speed

    chosen = speed.configure
    monkeypatch.setattr(speed, "configure", lambda *a, **k: dataclasses.replace(chosen(*a, **k), compile=True))
    monkeypatch.setattr(speed, "compile_layers", lambda model: pytest.fail("a short run was compiled"))
    out = tmp_path / "run"
    T.train(T.parse_config(tiny_run_args(tmp_path, out, max_steps=0, epochs=1, dropout=0.0)))
    printed = capsys.readouterr().out
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]
    tokens = sum(r["real_tokens"] for r in rows)
    n_params = int(printed.split("all params: ")[1].split()[0].replace(",", ""))  # peft's line
    assert len(rows) == 9 and tokens * n_params < speed.COMPILE_AUTO_PARAM_TOKENS
    assert f"compile: off for this run ({tokens:,} tokens to train; for this model compiling pays from about " \
           f"{round(speed.COMPILE_AUTO_PARAM_TOKENS / n_params):,})" in printed


def test_compile_auto_rule():
    """speed.Speed.fit_to_run: under auto, compile from COMPILE_AUTO_PARAM_TOKENS / n_params tokens on; `--compile on`
    always; a device that does not compile (the CPU's configure) is left as it is."""
    from minilora import speed

    n_params = 10**9
    pays_from = round(speed.COMPILE_AUTO_PARAM_TOKENS / n_params)
    for flag, tokens, compiled in [("auto", pays_from - 1, False), ("auto", pays_from, True), ("on", 1, True)]:
        cfg = T.TrainConfig(compile=flag)
        fast = dataclasses.replace(speed.configure(cfg, "cpu"), compile=True)  # as on a GPU
        note = fast.fit_to_run(cfg, tokens, n_params)
        assert fast.compile is compiled and (note is None) is compiled, (flag, tokens, note)
    cpu = speed.configure(T.TrainConfig(), "cpu")
    assert cpu.fit_to_run(T.TrainConfig(), 1, n_params) is None and not cpu.compile
