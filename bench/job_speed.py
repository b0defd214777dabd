"""The seeds' whole job, as a user runs it: launch -> saved adapter, for minilora, trl and unsloth, in one run.

train_speed.py times one fixed-shape step. A user's job is more: start Python, import, load the
NF4 model, read the records, compile, train one epoch of uneven examples, save the adapter. This
script runs that job once per stack, each in its own process, on the same checkpoint and records:

- `minilora`: `python -m minilora.train --data records.jsonl` (its defaults are the seeds' settings);
  `minilora-padded` adds `--padding-free off` (each micro-batch padded to its longest, as before the
  padding-free rows), `minilora-compiled` `--compile on` (auto leaves a short run eager:
  speed.COMPILE_AUTO_PARAM_TOKENS), `minilora-grouped` `--group-by-length`, `minilora-nocompile`
  `--compile off`, `minilora-eager` `--compile off --cuda-graphs off`; `baseline` is minilora from the
  folder --baseline names (another checkout, for a before/after in one run), `baseline-compiled` the same with
  `--compile on`. Each stack starts with empty compile caches of its own (TORCHINDUCTOR_CACHE_DIR,
  TRITON_CACHE_DIR), as on a fresh machine; a stack
  named twice runs twice, and the second run finds the caches the first left: the warm start of a user's
  second job. Python's bytecode, though, is warm for every stack: pip compiles each package's .pyc as it
  installs it, but the GPU machine's packages come without them and cannot keep them, so every process would
  compile ~3,000 modules from source (8-12 s; bench/NOTES.md, section 16). Before the stacks run,
  `compileall` writes the bytecode of everything on sys.path into a cache (PYTHONPYCACHEPREFIX) that every
  stack reads;
- `trl`: transformers + bitsandbytes NF4 + trl's SFTTrainer with a peft LoraConfig, as the seeds set it up;
- `unsloth`: unsloth's FastLanguageModel (get_peft_model, its "unsloth" checkpointing) with the same SFTTrainer.

The records are medical-o1-like (Question / Complex_CoT / Response; 15% / 55% / 30% of LO..HI words,
one token per word with the benchmark checkpoint's word tokenizer). minilora renders and tokenizes
them with its r1 template (the prompt masked); the peers get those very ids and labels as a
pre-tokenized data set. They have to: transformers maps a qwen2 config to Qwen2Tokenizer, which
ignores the word-level tokenizer.json and returns no ids, and trl then trains on one-token examples
at loss 0. So every stack must report the same label and real (non-pad) tokens for the epoch, or
its row gets an error: the check is of what each trainer saw, counted in its collated batches.

The seeds' settings for all: batch 2, accumulation 4, lr 2e-4 linear, warmup 5, weight decay 0.01,
AdamW8bit, clip 1.0, max length 2048, LoRA r=16 alpha=16 on all seven projections, one epoch, bf16.

Figures per stack (the parent clocks launch; each process its own steps):
- `adapter_s`: launch to the adapter file on disk (its mtime), `wall_s`: to the process's exit;
- `first_step_s`: the process's start to the end of its first optimizer step (compilation included);
- steady `examples_per_s` and `real_tokens_per_s`: over the steps after --skip, wall clock between
  step ends (data, logging and all);
- `peak_gib`: torch.cuda.max_memory_allocated; `loss_first`, `loss_last`: steps 1 and N.

Where the work differs: minilora's time includes reading and tokenizing the records (the peers are handed
the ids) and, after the last step, writing a checkpoint for --resume (the adapter and the optimizer's
state) besides the adapter; trl saves none at this length (save_strategy "no", and the seeds' default of
every 500 steps is never reached).

    python bench/job_speed.py --shape qwen-1.5b --examples 240            # 30 steps
    python bench/job_speed.py --shape llama-8b --examples 120             # 15 steps
    python bench/job_speed.py --shape tiny --device cpu --stacks minilora,trl --examples 16 --lengths 20:60
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

T_START = time.perf_counter()  # this process's start, for a worker's first_step_s (before its imports)

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.stacks import TARGETS  # noqa: E402  (the seven projections, as every bench stack adapts them)
from minilora.loss import IGNORE  # noqa: E402  (-100, the label transformers and trl mask with too)

MINILORA_FLAGS = {"minilora": [], "minilora-compiled": ["--compile", "on"],
                  "minilora-padded": ["--padding-free", "off"],
                  "minilora-grouped": ["--group-by-length"], "minilora-nocompile": ["--compile", "off"],
                  "minilora-eager": ["--compile", "off", "--cuda-graphs", "off"], "baseline": [],
                  "baseline-compiled": ["--compile", "on"]}
STACKS = (*MINILORA_FLAGS, "trl", "unsloth")
SEEDS = dict(batch_size=2, grad_accum=4, lr=2e-4, warmup_steps=5, weight_decay=0.01, max_grad_norm=1.0,
             max_seq_len=2048, r=16, alpha=16, seed=3407)
PER_STEP = SEEDS["batch_size"] * SEEDS["grad_accum"]  # examples per optimizer step


# ----------------------------------------------------------------------------- the records, tokenized once

def write_records(path: Path, n: int, lo: int, hi: int, seed: int = 0):
    """medical-o1-like rows: Question, Complex_CoT, Response of random words, LO..HI words in all."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            total = r.randint(lo, hi)
            q, cot = max(1, total * 15 // 100), max(1, total * 55 // 100)
            words = [f"w{r.randrange(60)}" for _ in range(total)]
            f.write(json.dumps({"Question": " ".join(words[:q]), "Complex_CoT": " ".join(words[q:q + cot]),
                                "Response": " ".join(words[q + cot:]) or "w0"}) + "\n")


def tokenize_records(records: Path, folder: Path, max_seq_len: int) -> list[dict]:
    """minilora's own examples of the records (r1 template, prompt masked): what every stack trains on."""
    from minilora.data import build_examples, read_records
    from minilora.tokenizer import Tokenizer

    recs, _ = read_records(records)
    examples, _ = build_examples(recs, "r1", Tokenizer(folder), max_seq_len)
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in examples]


def expected_counts(rows: list[dict]) -> dict:
    """Label tokens (after the shift, as every loss counts them) and real tokens of one epoch."""
    return {"label_tokens": sum(sum(1 for t in r["labels"][1:] if t != IGNORE) for r in rows),
            "real_tokens": sum(len(r["input_ids"]) for r in rows)}


# ----------------------------------------------------------------------------- one stack's figures

def steady(step_ends: list[float], step_real: list[int], skip: int) -> dict:
    """Examples/s and real tokens/s of the steps after the first `skip` (>= 1): from the end of step `skip`
    to the end of the last."""
    if len(step_ends) <= skip:
        return {}
    dt = step_ends[-1] - step_ends[skip - 1]
    n = len(step_ends) - skip
    return {"examples_per_s": PER_STEP * n / dt, "real_tokens_per_s": sum(step_real[skip:]) / dt,
            "steady_steps": n}


def minilora_result(run: Path, skip: int) -> dict:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in rows if x.get("split") == "train"]
    report = json.loads((run / "report.json").read_text())
    return {"first_step_s": report["start_up_s"]["first_step"], "start_up_s": report["start_up_s"],
            "label_tokens": sum(x["label_tokens"] for x in train), "real_tokens": sum(x["real_tokens"] for x in train),
            "steps": len(train), "peak_gib": max(x["peak_mem_gib"] for x in train),
            "loss_first": train[0]["loss"], "loss_last": train[-1]["loss"],
            # per step: [end (s from launch), its GPU-synchronised time, real tokens, tokens with padding]
            "per_step": [[round(x["elapsed_s"], 4), round(x["step_s"], 4), x["real_tokens"],
                          round(x["tokens_per_s"] * x["step_s"])] for x in train],
            **steady([x["elapsed_s"] for x in train], [x["real_tokens"] for x in train], skip)}


def run_stack(stack: str, a, folder: Path, records: Path, tokens: Path, work: Path, env: dict, i: int) -> dict:
    out = work / f"run-{i}-{stack}"
    if stack in MINILORA_FLAGS:
        profile = ["-m", "cProfile", "-o", str(work / f"{i}-{stack}.prof")] if a.profile else []
        cmd = [sys.executable, *profile, "-m", "minilora.train", "--model", str(folder), "--data", str(records),
               "--template", "r1", "--eval-fraction", "0", "--log-every", "1", "--device", a.device,
               "--output-dir", str(out), *MINILORA_FLAGS[stack]]
    else:
        spec = work / f"spec-{i}.json"
        spec.write_text(json.dumps({"stack": stack, "folder": str(folder), "tokens": str(tokens), "out": str(out),
                                    "device": a.device, "skip": a.skip}))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec)]
    adapter = out / "adapter" / "adapter_model.safetensors"
    caches = work / f"caches-{stack}"  # this stack's own: cold at its first run, warm at a second
    env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "TRITON_CACHE_DIR": str(caches / "triton")}
    if stack.startswith("baseline"):
        env["PYTHONPATH"] = os.pathsep.join([str(Path(a.baseline).resolve()), env["PYTHONPATH"]])
    print(f"--- {stack}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.time()
    try:  # cwd: the work folder, where unsloth writes its compiled cache
        r = subprocess.run(cmd, cwd=work, env=env, timeout=a.timeout, stderr=subprocess.PIPE, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {a.timeout:.0f} s (--timeout)"}
    wall = time.time() - t0
    sys.stderr.write(r.stderr[-4000:])
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-3:]
        return {"error": f"exit code {r.returncode}: {' / '.join(tail) or 'no message'}", "wall_s": wall}
    if not adapter.is_file():
        return {"error": f"no adapter at {adapter}", "wall_s": wall}
    row = {"wall_s": wall, "adapter_s": adapter.stat().st_mtime - t0}
    if a.profile and stack in MINILORA_FLAGS:
        row["profiled"] = True  # under cProfile: slower than a plain run
        write_profile(work / f"{i}-{stack}.prof", Path(a.profile) / f"profile-{a.shape}-{i}-{stack}.txt")
    try:
        row.update(minilora_result(out, a.skip) if stack in MINILORA_FLAGS
                   else json.loads((out / "result.json").read_text()))
    except (OSError, KeyError, ValueError, IndexError) as e:  # e.g. a --baseline older than real_tokens/elapsed_s
        row["error"] = f"could not read the run's figures: {type(e).__name__}: {e}"
    return row


def write_profile(prof: Path, txt: Path, top: int = 70):
    """cProfile's view of a minilora run, by cumulative time: where its seconds before and between steps go.
    (cProfile slows pure-Python work, such as torch.compile's tracing, more than GPU waits: compare shares.)"""
    import io
    import pstats

    txt.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    stats = pstats.Stats(str(prof), stream=buf)
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top // 2)
    txt.write_text(buf.getvalue())


def warm_bytecode(env: dict, extra: list[str]) -> float:
    """Byte-compile every package the stacks can import (and the `extra` folders: a --baseline) into env's
    PYTHONPYCACHEPREFIX, as pip's install does in place (see the top); returns the seconds it took."""
    t = time.perf_counter()
    paths = subprocess.run([sys.executable, "-c", "import json, sys; print(json.dumps(sys.path))"], env=env,
                           capture_output=True, text=True, check=True).stdout
    dirs = [d for d in json.loads(paths) + extra if d and Path(d).is_dir()]
    # -qq: some packages ship files that are not Python 3 (templates, tests); they are skipped, as pip skips them
    subprocess.run([sys.executable, "-m", "compileall", "-qq", "-j", "0", *dirs], env=env)
    return time.perf_counter() - t


def explain(rows: list[dict], skip: int) -> list[str]:
    """Where each minilora row's steady window went, from its per-step figures: the real share of the padded
    tokens, the host's gap between steps (the GPU idle), and the steps that ran a shape for the first time or
    recorded it (slower than 1.5x the median time per padded token)."""
    lines = []
    for r in rows:
        steps = r.get("per_step", [])[skip:]
        if not steps:
            continue
        ends, dts, real, padded = zip(*r["per_step"])
        per_token = sorted(dt / p for _, dt, _, p in steps)[len(steps) // 2]
        slow = [i + 1 + skip for i, (_, dt, _, p) in enumerate(steps) if dt > 1.5 * per_token * p]
        gaps = [ends[i] - ends[i - 1] - dts[i] for i in range(skip, len(ends))]
        lines.append(f"{r['run_id']} {r['stack']}#{r['run']}: {r['real_tokens_per_s']:,.0f} real tok/s over steps "
                     f"{skip + 1}-{len(ends)}: fill {sum(real[skip:]) / sum(padded[skip:]):.3f}, gap "
                     f"{1e3 * sum(gaps) / len(gaps):.1f} ms/step ({sum(gaps) / (ends[-1] - ends[skip - 1]):.1%}), "
                     f"{len(slow)} slow steps {slow} ({sum(dts[i - 1] - per_token * padded[i - 1] for i in slow):.2f} "
                     f"s over the median rate), median {1 / per_token:,.0f} padded tok/s")
    return lines


# ----------------------------------------------------------------------------- the peers' process

def worker(spec_path: str):
    """One trl or unsloth job in this process: load, train one epoch, save the adapter, write result.json."""
    spec = json.loads(Path(spec_path).read_text())
    stack, folder, out = spec["stack"], spec["folder"], Path(spec["out"])
    if stack == "unsloth":
        import unsloth  # noqa: F401  (before transformers and trl, which it patches)
        from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    device = torch.device(spec["device"])
    bf16 = dict(dtype=torch.bfloat16)
    # the benchmark's word-level tokenizer, by its class: AutoTokenizer would pick Qwen2Tokenizer (see above)
    tok = PreTrainedTokenizerFast.from_pretrained(folder)
    peft_config = None
    if stack == "unsloth":
        model, _ = FastLanguageModel.from_pretrained(folder, max_seq_length=SEEDS["max_seq_len"], load_in_4bit=True,
                                                     **bf16)
        model = FastLanguageModel.get_peft_model(model, r=SEEDS["r"], lora_alpha=SEEDS["alpha"], lora_dropout=0,
                                                 target_modules=list(TARGETS), bias="none", random_state=SEEDS["seed"],
                                                 use_gradient_checkpointing="unsloth")
    else:
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, attn_implementation="sdpa",
                                                     device_map={"": device.index or 0} if device.type == "cuda"
                                                     else {"": "cpu"}, **bf16)
        peft_config = LoraConfig(r=SEEDS["r"], lora_alpha=SEEDS["alpha"], lora_dropout=0.0,
                                 target_modules=list(TARGETS), bias="none", task_type="CAUSAL_LM")
    rows = [json.loads(x) for x in Path(spec["tokens"]).read_text().splitlines()]
    data = Dataset.from_list(rows)  # input_ids + labels: trl trains on them as they are

    batches, step_ends = [], []  # per collated micro-batch: (real, label) tokens; per optimizer step: its end

    class Counted:  # what the trainer really trains on, counted as it is collated (in the order it is used)
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, examples):
            b = self.inner(examples)
            batches.append((int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel(),
                            int((b["labels"][:, 1:] != IGNORE).sum())))
            return b

    class StepEnds(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if device.type == "cuda":
                torch.cuda.synchronize()
            step_ends.append(time.perf_counter() - T_START)

    args = SFTConfig(output_dir=str(out / "trainer"), per_device_train_batch_size=SEEDS["batch_size"],
                     gradient_accumulation_steps=SEEDS["grad_accum"], learning_rate=SEEDS["lr"],
                     warmup_steps=SEEDS["warmup_steps"], weight_decay=SEEDS["weight_decay"],
                     max_grad_norm=SEEDS["max_grad_norm"], lr_scheduler_type="linear", optim="adamw_8bit",
                     num_train_epochs=1, max_length=SEEDS["max_seq_len"], packing=False, bf16=True,
                     seed=SEEDS["seed"], logging_steps=1, save_strategy="no", report_to="none",
                     use_cpu=device.type == "cpu",
                     # trl + peft recompute layers as the QLoRA notebooks do; unsloth brings its own
                     gradient_checkpointing=stack == "trl",
                     gradient_checkpointing_kwargs={"use_reentrant": False} if stack == "trl" else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft_config,
                         callbacks=[StepEnds()])
    trainer.data_collator = Counted(trainer.data_collator)
    trainer.train()
    trainer.save_model(str(out / "adapter"))  # a peft model saves its adapter only
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    accum = SEEDS["grad_accum"]
    step_real = [sum(r for r, _ in batches[s * accum:(s + 1) * accum]) for s in range(len(step_ends))]
    result = {"first_step_s": step_ends[0], "steps": len(step_ends),
              "label_tokens": sum(n for _, n in batches), "real_tokens": sum(r for r, _ in batches),
              "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
              "loss_first": losses[0], "loss_last": losses[-1],
              **steady(step_ends, step_real, spec["skip"])}
    (out / "result.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="qwen-1.5b", help="a shape of bench/shapes.py: qwen-1.5b, qwen-7b, llama-8b, "
                   "tiny")
    p.add_argument("--checkpoint", default="", metavar="DIR", help="train on this folder (written there if empty)")
    p.add_argument("--stacks", default="minilora,minilora,trl,unsloth",
                   help=f"comma-separated, in order, from {', '.join(STACKS)}; a stack named twice runs twice")
    p.add_argument("--examples", type=int, default=240, help="records in the epoch (8 per step)")
    p.add_argument("--lengths", default="300:1500", metavar="LO:HI", help="words (= tokens) per record")
    p.add_argument("--skip", type=int, default=5, help="steps left out of the steady figures (at least 1: the "
                   "figures are timed from the end of the last one left out)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--baseline", default="", metavar="DIR", help="for the stack `baseline`: a folder holding "
                   "another minilora package (e.g. `git archive OLD minilora | tar -x -C DIR`)")
    p.add_argument("--profile", default="", metavar="DIR", help="run each minilora stack under cProfile and write "
                   "its top functions by cumulative time to DIR/profile-SHAPE-I-STACK.txt")
    p.add_argument("--cold-bytecode", action="store_true", help="leave Python's bytecode as the machine has it "
                   "(see the top; the job figures before 2026-12-04 were taken so), and skip the minute it takes")
    p.add_argument("--timeout", type=float, default=600, help="seconds per stack before it is stopped")
    p.add_argument("--out", default="bench/results/job_speed.jsonl", help="JSON lines, appended")
    p.add_argument("--explain", default="", metavar="RUN_ID", help="print where the steady window of each minilora "
                   "row of that run (in --out) went, from its per-step figures, and exit")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker)
    if a.explain:
        rows = [json.loads(x) for x in Path(a.out).read_text().splitlines()]
        print("\n".join(explain([r for r in rows if r["run_id"].endswith(a.explain)], a.skip)))
        return
    stacks = [s.strip() for s in a.stacks.split(",") if s.strip()]
    if bad := [s for s in stacks if s not in STACKS]:
        p.error(f"--stacks: unknown {bad}; choose from {', '.join(STACKS)}")
    if any(s.startswith("baseline") for s in stacks) and (not a.baseline or Path(a.baseline).resolve() == ROOT
                                 or not (Path(a.baseline) / "minilora" / "train.py").is_file()):
        p.error(f"--stacks baseline needs --baseline DIR, another checkout with a minilora package in it (not this "
                f"one); got {a.baseline!r}")
    if a.examples % PER_STEP:  # minilora fills a last short step from the next epoch, trl trains it short
        p.error(f"--examples must be a multiple of {PER_STEP} (the examples of one step), got {a.examples}")
    if a.skip < 1:
        p.error(f"--skip must be at least 1, got {a.skip}")
    try:
        lo, hi = (int(x) for x in a.lengths.split(":"))
        assert 1 <= lo <= hi
    except (ValueError, AssertionError):
        p.error(f"--lengths: expected LO:HI with 1 <= LO <= HI, got {a.lengths!r}")

    import torch

    from bench import shapes
    from bench.train_speed import source_sha256, start_run

    rid, gpu, vers = start_run(torch.device(a.device))
    out_file = Path(a.out).resolve()
    out_file.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="minilora-job-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(work / "hf"),
           **({} if a.cold_bytecode else  # one run's cache can serve the next: PYTHONPYCACHEPREFIX set already
              {"PYTHONPYCACHEPREFIX": os.environ.get("PYTHONPYCACHEPREFIX") or str(work / "bytecode")})}
    if a.device == "cpu":  # trl's SFTTrainer computes its loss in Triton kernels; on a CPU, Triton's interpreter
        env["TRITON_INTERPRET"] = "1"
    rows = []
    try:
        folder = shapes.checkpoint_folder(a.checkpoint, work, a.shape, device=a.device)
        records, tokens = work / "records.jsonl", work / "tokens.jsonl"
        write_records(records, a.examples, lo, hi)
        ex = tokenize_records(records, folder, SEEDS["max_seq_len"])
        if len(ex) != a.examples:
            raise SystemExit(f"{len(ex)} of {a.examples} records became examples; lower --lengths' HI")
        tokens.write_text("".join(json.dumps(r) + "\n" for r in ex))
        if not a.cold_bytecode:
            seconds = warm_bytecode(env, [a.baseline])
            print(f"bytecode of every package on sys.path compiled in {seconds:.1f} s", flush=True)
        want = expected_counts(ex)
        print(f"{len(ex)} examples, {want['real_tokens']:,} tokens, {want['label_tokens']:,} label tokens", flush=True)
        for i, stack in enumerate(stacks):
            row = {"run_id": rid, "gpu": gpu, "shape": a.shape, "stack": stack, "run": stacks[:i].count(stack) + 1,
                   "examples": len(ex), "lengths": [lo, hi], "expected": want, **SEEDS}
            row.update(run_stack(stack, a, folder, records, tokens, work, env, i))
            seen = {k: row.get(k) for k in want}
            if "error" not in row and seen != want:
                row["error"] = f"trained on other tokens than the records hold: saw {seen}, expected {want}"
            row["versions"] = vers if not stack.startswith("baseline") else {
                **vers, "minilora": f"baseline {a.baseline}", "minilora_source_sha256": source_sha256(a.baseline)}
            rows.append(row)
            with open(out_file, "a") as f:  # row by row: a later stack's failure loses nothing
                f.write(json.dumps(row) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        name = f"{r['stack']}#{r['run']}"
        print(f"{a.shape} {name:>20}: " + (r["error"] if "error" in r else
              f"adapter at {r['adapter_s']:.1f} s, first step at {r['first_step_s']:.1f} s, "
              f"{r.get('examples_per_s', 0):.1f} ex/s, {r.get('real_tokens_per_s', 0):,.0f} real tok/s, "
              f"peak {r['peak_gib']:.2f} GiB, loss {r['loss_first']} -> {r['loss_last']}"))
    print(f"appended to {out_file} (run_id {rid})")
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
