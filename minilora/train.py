"""`python -m minilora.train`: QLoRA supervised fine-tuning, one loop written out by hand.

With no arguments it runs the offline demo: SmolLM2-135M-Instruct learns to count days and months
forward with <think> reasoning (demo.py); it prints eval loss, accuracy and an answer before and after.

The loop, per optimizer step:
1. take `grad_accum` micro-batches and count their label tokens N (all of them, on the host);
2. for each micro-batch: loss_sum = sum of its token losses; backward(loss_sum / N);
3. clip the gradient norm (fp16: after unscaling), skip the step if the loss or the norm
   is not finite, step AdamW, set the lr.

Step 2 is the gradient-accumulation fix the peers made in late 2024: dividing each micro-batch
by its own token count and averaging the means weights a token in a short micro-batch more than
one in a long one, so batch 8 x accum 1 and batch 2 x accum 4 would train differently. Dividing
every micro-batch by the step's total N makes the accumulated gradient exactly the gradient of
the mean over all N tokens (tests/test_train.py checks it).

`train(cfg)` reads in the order a run goes: set-up, the loop, the finish. Around it: config.py (the
flags), speed/ (what makes the step fast, attached by `speed.configure`), run/ (checkpoints, faults,
the report), distributed.py (torchrun).
"""
from __future__ import annotations

import functools
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm

from . import data as D
from . import distributed as dp
from .adapter import adapter_config, save_adapter
from .checkpoint import default_dtype, load_model, pick_device, resolve_model
from . import STARTED, config, run_command, speed
from .config import TrainConfig, UsageError  # noqa: F401  (UsageError: what parse_config raises)
from .loss import IGNORE, causal_lm_loss
from .lora import apply_lora, count_parameters, describe_trainable
from .run.faults import TrainingStopped, bad_step, stop
from .run.report import demo_report, plot_losses, print_demo_summary
from .run.resume import SAVE_ERRORS, check_output, checkpoint, clear_output, find_resume, rng_state, start, why
from .tokenizer import Tokenizer


def train(cfg: TrainConfig) -> dict:
    """One training run: set up, train, finish. Returns the report (eval losses, the demo's accuracy)."""
    start_up = {"imports": time.perf_counter() - STARTED}  # seconds from launch to each point: report.json
    # ---- set-up, cheapest checks first: a mistake in the flags, the output folder or the data costs seconds
    device = dp.init(pick_device(cfg.device))  # under torchrun: join the other ranks (distributed.py)
    fast = speed.configure(cfg, device, dp.world())  # every speed choice, made (or refused) before anything loads
    if not dp.is_main():  # the other ranks would print the same lines again; their errors still go to stderr
        sys.stdout = open(os.devnull, "w")
    out = check_output(cfg)  # nothing is written there before the data and the model have loaded (clear_output)
    resume = find_resume(cfg, out)  # (checkpoint folder, its trainer state) or None; a mismatch stops here
    dp.barrier()  # rank 0 has cleaned the leftovers of a killed save
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model_path, demo = model_and_demo(cfg)
    tok = Tokenizer(model_path)
    train_set, evals, template = D.load_data(cfg, tok, demo)  # all of it, before the model takes any memory
    config_json = Path(model_path) / "config.json"  # (a folder without one is load_model's to report)
    if config_json.is_file():
        D.check_vocab(train_set + evals, tok, json.loads(config_json.read_text()).get("vocab_size"), str(config_json))
    # kept with each adapter, so that generate and merge prompt as training did: chat data's, or alpaca's or r1's
    chat_template = tok.chat_template if template == "chat" else D.prompt_template(template, tok)
    dp.check_same_everywhere(asdict(cfg), train_set)  # every rank: same flags, same data, or a clear stop
    pad_id = D.pad_id_for(tok)
    demo_eval = demo[1] if demo else None  # the demo's held-out questions: its accuracy before and after
    per_step = cfg.batch_size * cfg.grad_accum * dp.world()  # examples per optimizer step, all ranks together
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train_set) / per_step))
    if cfg.warmup_steps >= total_steps:  # lr rises by lr/warmup a step from 0: the run ends before it reaches --lr
        print(f"warning: --warmup-steps {cfg.warmup_steps} is not shorter than the run ({total_steps} step(s)): the "
              f"learning rate only reaches {lr_at(total_steps - 1, cfg, total_steps):.2e} of --lr {cfg.lr:.2e}; "
              "lower --warmup-steps", file=sys.stderr)
    mean_length = sum(len(e.input_ids) for e in train_set) / len(train_set)
    steps_left = total_steps - (resume[1]["step"] if resume else 0)  # a resumed run has only these to train
    run_tokens = round(steps_left * per_step * mean_length / dp.world())  # this process's: for --compile auto
    start_up["data"] = time.perf_counter() - STARTED

    # ---- the model: the 4-bit base, LoRA on --targets, the speed machinery; the optimizer
    model, params = build_model(cfg, model_path, device, fast, run_tokens)
    acfg = adapter_config(model, cfg.model or str(model_path), r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                          rslora=cfg.rslora)
    dtype = default_dtype(device)  # one dtype policy: base weights in `dtype`, LoRA in fp32, matmuls under autocast
    autocast = torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda")
    optimizer, scaler = make_optimizer(params, cfg), make_scaler(dtype, device)
    micro = fast.record(functools.partial(micro_step, model, autocast=autocast, loss=fast.loss, scaler=scaler),
                        params, scaler)  # one micro-batch's forward and backward; replayed from a CUDA graph maybe
    clear_output(cfg, out)  # --overwrite: the old run's files go only now, when the new run has loaded
    dp.barrier()
    state = start(out, resume, model, optimizer, scaler)  # step 0, or where the checkpoint left off
    lengths = [len(e.input_ids) for e in train_set] if cfg.group_by_length else None
    report = {"eval_loss_before": None, "start_up_s": start_up}  # report.json: what train() returns
    start_up["model"] = time.perf_counter() - STARTED

    save = functools.partial(checkpoint, out, state, model, optimizer, scaler, cfg, acfg, chat_template=chat_template)

    def log(row: dict):  # one row of metrics.jsonl; rank 0 writes it
        if dp.is_main():
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            state.metrics["metrics_rows"] += 1  # saved with each checkpoint: where a resume cuts the file back to

    size = cfg.batch_size * dp.world()  # micro-batches are drawn at this size, the same on every rank
    # each epoch's shuffle, made once (a step, and the row plan below, asks for it again)
    order = functools.lru_cache(maxsize=4)(functools.partial(D.epoch_order, len(train_set), cfg.seed,
                                                             lengths=lengths, batch=size))

    def step_examples(position: int):
        """The step's micro-batches from `position` of the data, and this rank's slice of them."""
        mbs = micro_batches(train_set, order, position, cfg.grad_accum, size)
        return mbs, rank_slice(mbs, dp.rank(), dp.world())

    def step_batches(position: int):
        """The step's micro-batches; this rank's slice of them on the device (padding-free: dealt into rows), and
        its label tokens."""
        mbs, mine = step_examples(position)
        return mbs, fast.make_batches(mine, pad_id), D.label_count([e for mb in mine for e in mb])

    # under CUDA graphs the rows take a few lengths, chosen once from the steps to come (padding_free.plan_lengths)
    fast.plan_rows(lambda i: [e for mb in step_examples(state.position + i * per_step)[1] for e in mb],
                   total_steps - state.step, max(len(e.input_ids) for e in train_set))

    def log_eval() -> float:  # the mean token loss over the eval examples now
        loss = evaluate(model, evals, cfg.batch_size, functools.partial(fast.make_batch, pad_id=pad_id,
                                                                        training=False), autocast, fast.loss)
        log({"step": state.step, "split": "eval", "loss": loss, "perplexity": math.exp(min(loss, 50))})
        return loss

    if state.step == 0:  # the model as it starts, for the report's "before -> after"
        if evals:
            print(f"eval loss before training ({len(evals)} examples): ", end="", flush=True)
            report["eval_loss_before"] = log_eval()
            print(f"{report['eval_loss_before']:.4f}")
        if demo_eval is not None:
            print(f"the demo's {len(demo_eval)} held-out questions, answered before training ...", flush=True)
            report["before"] = demo_report(model, tok, demo_eval)
        start_up["eval_before"] = time.perf_counter() - STARTED

    # ---- the loop
    bar = tqdm(total=total_steps, initial=state.step, desc="training", unit="step", dynamic_ncols=True,
               disable=not dp.is_main())
    batches, fault = [], None
    try:
        model.train()
        state.rng_next = rng_state()
        upcoming = None  # the next step's micro-batches, made while the GPU runs this one
        while state.step < total_steps:
            mbs, batches, labels = upcoming or step_batches(state.position)
            lr = lr_at(state.step, cfg, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()

            # The loss is divided by the label tokens of ALL ranks, so the ranks' losses and gradients add up
            # to the global mean and its gradient: N ranks x batch b train exactly as 1 rank x batch N*b.
            n_tokens = dp.all_reduce_sum(labels)
            loss, _ = train_step(model, batches, autocast, scaler, n_total=n_tokens, micro=micro)
            # The micro-batches are queued, not done: the host builds the next step's rows meanwhile (as nanoGPT
            # fetches its next batch during the forward), instead of leaving the GPU idle for them after the step.
            upcoming = step_batches(state.position + per_step) if state.step + 1 < total_steps else None
            loss = dp.all_reduce_sum(float(loss))  # waits for the GPU
            dp.all_reduce_grads(params, device)  # once per optimizer step, after every micro-batch
            scaler.unscale_(optimizer)  # fp16 only: clipping and the finiteness check need the true gradients
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf")).item()
            good = math.isfinite(loss) and math.isfinite(gnorm)
            if good:  # a skipped step leaves weights and optimizer state exactly as they were
                scaler.step(optimizer)  # = optimizer.step(): the scaler's own inf check agrees with `good`
            scaler.update()  # fp16: halve the scale after an overflow, grow it after a run of good steps
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()  # so that the step's time is the GPU's, not the time to queue its kernels
            dt = time.perf_counter() - t0

            state.step += 1
            start_up.setdefault("first_step", time.perf_counter() - STARTED)  # with compile and graph recordings
            state.position += per_step
            state.rng_next = rng_state()
            tokens = dp.all_reduce_sum(sum(b["input_ids"].numel() for b in batches))  # padding included
            mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", gnorm=f"{gnorm:.3f}", tok_s=f"{tokens / dt:,.0f}",
                            **({"mem": f"{mem:.1f}G"} if device.type == "cuda" else {}), refresh=False)
            bar.update(1)
            if state.step % cfg.log_every == 0 or state.step == total_steps or not good:
                log({"step": state.step, "split": "train", "lr": lr, "loss": loss if math.isfinite(loss) else None,
                     "grad_norm": gnorm if math.isfinite(gnorm) else None,  # NaN is not JSON: non-finite is null
                     "tokens_per_s": tokens / dt, "label_tokens": n_tokens, "step_s": dt, "peak_mem_gib": mem,
                     "real_tokens": sum(len(e.input_ids) for mb in mbs for e in mb),  # all ranks', no padding
                     "elapsed_s": time.perf_counter() - STARTED, "epoch": state.position / len(train_set),
                     "skipped": not good})
            if good:
                state.metrics["bad_in_a_row"] = 0
            else:  # the --max-bad-steps-th in a row saves and stops the run
                bad_step(cfg, state.metrics, state.step, loss, gnorm, scaler, params, save, state.last_ckpt, bar)
            if cfg.eval_every and state.step % cfg.eval_every == 0 and evals and state.step < total_steps:
                log_eval()
            if cfg.save_every and state.step % cfg.save_every == 0:
                save()
    except (KeyboardInterrupt, torch.OutOfMemoryError, speed.GraphRecordingError) as e:
        fault = e  # handled below, outside this block, so that the failed step's tensors are freed first
    bar.close()
    if fault is not None:  # save the last completed step, then stop with the fault's exit code (run/faults.py)
        longest = max((b["input_ids"].shape[1] for b in batches), default=None)
        batches = upcoming = None
        optimizer.zero_grad(set_to_none=True)
        stop(fault, cfg, state.step, state.last_ckpt, save, longest, device, graphs=fast.graphs)
    save()  # the state after the last step, before the eval below (a resume need not redo it)

    # ---- the finish: the eval loss and the demo's answers after training; then rank 0 writes the adapter, the
    # loss plot and report.json, and prints the summary
    if evals:
        report["eval_loss_after"] = log_eval()
    if demo_eval is not None:  # every rank generates: under --fsdp each forward needs all of them
        print(f"the demo's {len(demo_eval)} held-out questions, answered after training ...", flush=True)
        report["after"] = demo_report(model, tok, demo_eval)
    if not dp.is_main():
        dp.barrier()
        return report
    try:
        save_adapter(model, out / "adapter", acfg, chat_template=chat_template)
    except SAVE_ERRORS as e:
        last = state.last_ckpt
        kept = (f" Nothing is lost: {last}/adapter holds these same weights; make room and run again with "
                "--resume to write it." if last and last.name == f"step-{state.step:06d}" else
                f" The newest complete checkpoint is {last}." if last else "")
        raise TrainingStopped(f"could not write the adapter to {out / 'adapter'}: {why(e)}.{kept}") from None
    finally:
        dp.barrier()  # the other ranks exit once the adapter is written
    try:
        plot_losses(out)
    except OSError as e:
        print(f"WARNING: could not draw {out / 'loss.png'}: {why(e)}", file=sys.stderr)
    if demo_eval is not None:  # its summary has the eval loss too
        print_demo_summary(report)
    elif report.get("eval_loss_before") is not None:
        print(f"eval loss: {report['eval_loss_before']:.4f} -> {report['eval_loss_after']:.4f}")
    elif report.get("eval_loss_after") is not None:  # a resumed run: the loss before is in metrics.jsonl's first rows
        print(f"eval loss: {report['eval_loss_after']:.4f}")
    print(f"adapter saved to {out / 'adapter'}")
    if cfg.push_to_hub:
        from .export.hub import push_to_hub

        push_to_hub(out / "adapter", cfg.push_to_hub)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# ----------------------------------------------------------------------------- set-up

def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The command line (and --config's file) as a checked TrainConfig, the speed features' clashes included."""
    return config.parse_config(argv, checks=[speed.check])


def model_and_demo(cfg: TrainConfig) -> tuple[Path, tuple[list[dict], list[dict]] | None]:
    """The model folder (--model, or the demo model), and without --data the demo's (train, eval) records."""
    if cfg.model:
        model_path = resolve_model(cfg.model)
    else:
        from .demo import smollm2_folder

        if dp.is_main():  # rank 0 converts the demo model into the shared cache; the others then read it
            smollm2_folder()
        dp.barrier()
        model_path = smollm2_folder()
    if cfg.keep_activations:  # against the model's layer count now, not after minutes of loading
        config = Path(model_path) / "config.json"
        layers = json.loads(config.read_text()).get("num_hidden_layers", 0)
        speed.check_keep_activations(cfg.keep_activations, layers, str(config))
    if cfg.data:
        return model_path, None
    from .demo import demo_records

    return model_path, demo_records(cfg.seed)


def build_model(cfg: TrainConfig, model_path: Path, device: torch.device, fast: speed.Speed, run_tokens: int):
    """The base model (NF4 unless --no-4bit), LoRA on --targets, the speed choices attached (compile, under auto, if
    the run's `run_tokens` repay it); --fsdp shards it. Returns the model and what the optimizer steps."""
    mesh = dp.mesh(device) if cfg.fsdp else None
    model = load_model(model_path, device=device, dtype=default_dtype(device),
                       quantize=None if cfg.no_4bit else cfg.quant_type, trust_pickle=cfg.trust_pickle_files,
                       shard=(lambda q: dp.shard_nf4(q, mesh)) if mesh else None)
    apply_lora(model, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, rslora=cfg.rslora,
               targets=config.target_names(cfg.targets))
    if note := fast.fit_to_run(cfg, run_tokens, count_parameters(model)[1]):
        print(note)
    params = fast.attach(model)
    if mesh:
        dp.shard_root(model.model, mesh)  # the decoder stack: what training, eval and generation call
    print(describe_trainable(model))
    return model, params


def make_optimizer(params, cfg):
    # Every trainable tensor is a LoRA factor (a matrix, or speed/flat_optimizer.py's buffer of them), and all
    # get weight decay, as the HF Trainer gives every weight that is not a bias or a norm.
    if cfg.optim == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if cfg.optim == "paged_adamw8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)


def make_scaler(dtype: torch.dtype, device: torch.device) -> torch.amp.GradScaler:
    """Loss scaling for fp16 only: fp16's smallest normal is 6e-5, so small gradients underflow;
    bf16 and fp32 share fp32's exponent range and need none. A disabled scaler passes everything
    through (scale() returns the loss, step() is optimizer.step(), unscale_/update do nothing)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Linear warmup over `warmup_steps`, then linear or cosine decay to 0 at `total_steps`.

    `step` counts optimizer steps from 0. The curve is transformers' `get_*_schedule_with_warmup`
    (so the first warmup step has lr 0, as there), which trl users already tune for.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    if cfg.scheduler == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    if cfg.scheduler == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (1 - progress)


# ----------------------------------------------------------------------------- batches

def micro_batches(examples, epoch_order, start: int, count: int, batch_size: int):
    """`count` micro-batches of `batch_size` from position `start` of the data. Position p is the example
    `epoch_order(epoch=p // n)[p % n]`: a step that crosses an epoch's end goes on with the next epoch's shuffle, so
    each epoch draws each example once."""
    orders = {}

    def example(p: int):
        epoch, i = divmod(p, len(examples))
        if epoch not in orders:
            orders[epoch] = epoch_order(epoch=epoch)
        return examples[orders[epoch][i]]

    return [[example(start + b * batch_size + i) for i in range(batch_size)] for b in range(count)]


def rank_slice(mbs: list[list], rank: int, world: int) -> list[list]:
    """This rank's part of each micro-batch: rank r takes the r-th of `world` equal pieces.

    The step's micro-batches are drawn at batch_size x world, the same on every rank, so the
    ranks' pieces together are exactly what one process with batch world x batch_size would take.
    """
    return [mb[rank * len(mb) // world: (rank + 1) * len(mb) // world] for mb in mbs]


def label_tokens(batches: list[dict]) -> int:
    """Tokens that carry a loss: labels after the shift that are not IGNORE (prompt or padding)."""
    return sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)


# ----------------------------------------------------------------------------- forward and backward

def hidden_states(model, b: dict) -> torch.Tensor:
    """The decoder's output for a batch; a padding-free one brings its own positions and example bounds."""
    return model.model(b["input_ids"], b.get("positions"), b.get("documents"), inputs_embeds=b.get("inputs_embeds"))


def micro_step(model, batch: dict, inv_n, *, autocast, loss=causal_lm_loss, scaler=None) -> torch.Tensor:
    """Forward and backward of one micro-batch: returns its loss sum; the gradient of loss sum x inv_n (1/N, N the
    step's label tokens) is added into the LoRA factors' .grad. fp16: `scaler` scales the loss by S first, so small
    gradients do not flush to zero (S times too large until `scaler.unscale_`). speed/graphs.py records this."""
    with autocast:
        loss_sum, _ = loss(hidden_states(model, batch), model.lm_head.weight, batch["labels"])
    scaled = loss_sum * inv_n
    (scaler.scale(scaled) if scaler is not None else scaled).backward()
    return loss_sum.detach()


def train_step(model, batches: list[dict], autocast, scaler=None, n_total: int | None = None,
               micro=None) -> tuple[torch.Tensor, int]:
    """Forward and backward over one optimizer step's micro-batches; returns (loss sum / N, N), the loss a 0-dim
    tensor on the device.

    Every micro-batch's loss sum is divided by the SAME N, the label tokens of the whole step (`n_total`: of all
    ranks). `micro` runs one micro-batch (micro_step, or its CUDA-graph replay); the losses are summed on the
    device and nothing here waits for the GPU: the host queues the next micro-batch while the GPU still works,
    and the caller reads the loss (`float`) once it has queued what it can.
    """
    n_total = label_tokens(batches) if n_total is None else n_total
    micro = micro or functools.partial(micro_step, model, autocast=autocast, scaler=scaler)
    total = sum(micro(b, 1.0 / max(n_total, 1)) for b in batches)
    return total / max(n_total, 1), n_total


@torch.no_grad()
def evaluate(model, examples, batch_size: int, make_batch, autocast, loss=causal_lm_loss) -> float:
    """Mean token loss over the eval examples; `make_batch(examples)` puts a batch on the device."""
    was_training = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = make_batch(examples[i: i + batch_size])
        with autocast:
            s, c = loss(hidden_states(model, b), model.lm_head.weight, b["labels"])
        total, n = total + s.item(), n + c
    model.train(was_training)
    return total / max(n, 1)


# ----------------------------------------------------------------------------- the command

def main(argv=None):
    prog = "minilora.train"
    try:
        train(parse_config(argv))
    except (ValueError, OSError, KeyError) as e:  # bad flags, data, files: the user's to fix
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    except TrainingStopped as e:  # OutOfMemory included (exit code 3)
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code)
    except torch.OutOfMemoryError as e:  # outside the training loop: loading the model
        print(f"{prog}: error: out of memory before training started ({str(e).strip().splitlines()[0]}): the model "
              "does not fit; use 4-bit (drop --no-4bit), a smaller model, or a GPU with more memory.", file=sys.stderr)
        raise SystemExit(3)
    except KeyboardInterrupt:  # while loading or tokenizing, or a second Ctrl-C while saving
        print(f"{prog}: interrupted; nothing more was saved.", file=sys.stderr)
        raise SystemExit(130)
    finally:
        dp.teardown()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM saves a checkpoint too
    run_command(main)
