"""Faults in the middle of training, and what each one does (README.md, "What happens when…").

    fault                        what happens                                               exit code
    Ctrl-C or SIGTERM            the last completed step is saved                           130
    out of memory                it is saved; the message lists changes that need less      3
    a CUDA graph fails to record it is saved; go on with --cuda-graphs off --resume         1
    a non-finite loss or norm    that update is skipped and logged; --max-bad-steps of
                                 them in a row save the weights and stop the run            1

Whatever stops a run, nothing already trained is lost: each checkpoint is one folder written atomically
(atomic.py), holding everything --resume needs (run/resume.py). tests/test_fault_*.py cause each fault.
A `cfg` here is config.py's TrainConfig.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss stays non-finite); the last good checkpoint is kept. Exit code 1."""
    exit_code = 1


class OutOfMemory(TrainingStopped):
    """The GPU ran out of memory during training; the message says what would fit. Exit code 3."""
    exit_code = 3


def stop(fault: BaseException, cfg, step: int, last_ckpt: Path | None, save, longest: int | None, device,
         graphs: bool):
    """End the run after `fault` broke off step `step + 1`: save the last completed step (`save(together=False)`:
    the other ranks may be mid-step, so no collective), and raise what says so. Called outside the `except`
    block that caught the fault, so that the failed step's tensors are freed already."""
    if isinstance(fault, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (mapped in train.py's __main__)
        if step == (int(last_ckpt.name[5:]) if last_ckpt else 0):
            print(f"\ninterrupted after step {step}: nothing new to save" + (f"; {last_ckpt} holds it" if step else ""))
            raise SystemExit(130)
        ck = save(together=False)  # each rank was interrupted at its own point
        print(f"\ninterrupted after step {step}: " + (f"saved {ck}; continue with --resume" if ck else
                                                     f"the newest complete checkpoint is {last_ckpt}"))
        raise SystemExit(130)
    if isinstance(fault, torch.OutOfMemoryError):
        message = str(fault).strip().splitlines()[0] if str(fault).strip() else "out of memory"
        if device.type == "cuda":
            torch.cuda.empty_cache()
        ck = save(together=False) if step > 0 else None
        raise OutOfMemory(oom_advice(cfg, step, message, longest, device, ck or last_ckpt, graphs=graphs))
    # a CUDA graph recording failed: a micro-batch length seen for the first time, maybe hundreds of steps in
    ck = save(together=False) if step > 0 else None
    raise TrainingStopped(f"{fault}. " + (f"Saved {ck}; continue" if ck else "Start again") +
                          " without CUDA graphs: --cuda-graphs off" + (" --resume." if ck else "."))


def bad_step(cfg, counts: dict, step: int, loss: float, gnorm: float, scaler, params, save, last_ckpt, bar):
    """Count a skipped step (`counts`: the run's bad_in_a_row and skipped); the --max-bad-steps-th in a row saves
    the weights and stops the run (exit 1)."""
    # An fp16 overflow (finite loss, inf gradient) is the scaler's to handle: it has just halved its
    # scale and the next step usually fits, so it counts as bad only once the scale is below 1.
    overflow = scaler.is_enabled() and math.isfinite(loss) and scaler.get_scale() >= 1
    counts["skipped"] += 1
    counts["bad_in_a_row"] += 0 if overflow else 1
    n = counts["bad_in_a_row"]
    print(f"\nstep {step}: {'fp16 overflow' if overflow else 'non-finite'} loss {loss} / grad norm "
          f"{gnorm}: update skipped ({n} in a row, --max-bad-steps {cfg.max_bad_steps})",
          file=sys.stderr, flush=True)
    if n >= cfg.max_bad_steps:
        # Skipped steps change nothing, so these are still the weights of step `step - n`: save
        # them (unless they are non-finite themselves); older checkpoints stay as they are.
        ck = save() if all(bool(torch.isfinite(p).all()) for p in params) else None
        bar.close()
        raise TrainingStopped(
            f"{n} steps in a row had a non-finite loss or gradient (steps {step - n + 1}-{step}), so "
            f"training stopped. Skipped steps change nothing: the weights are those of step {step - n}"
            + (f", saved as {ck}" if ck else f"; the newest complete checkpoint is {last_ckpt}")
            + f". Look at the data of these steps; or lower --lr (now {cfg.lr:g}) and start over with "
              "--overwrite, or go on from here with --resume.")


def oom_advice(cfg, step: int, error: str, longest: int | None, device, kept: Path | None,
               graphs: bool = False) -> str:
    """The out-of-memory message: what ran, how much memory it took, and changes that need less, with numbers."""
    B, G, L = cfg.batch_size, cfg.grad_accum, cfg.max_seq_len
    mem = "peak GPU memory: not measured on " + device.type
    if device.type == "cuda":
        mem = (f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB of "
               f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.1f} GiB")
    seq = min(L, longest or L)
    lines = [f"out of memory in step {step + 1} ({error}).",
             f"  now: --batch-size {B} --grad-accum {G} --max-seq-len {L}"
             + (f" (longest batch here: {longest} tokens{', padded for the CUDA graphs' if graphs else ''})"
                if longest else "")
             + f", gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}; {mem}.",
             "  each of these needs less memory:"]
    if B > 1:
        lines.append(f"    --batch-size {B // 2} --grad-accum {G * 2}   the same effective batch of {B * G} in "
                     "half-size pieces: about half the activation memory; --resume accepts it")
    if not cfg.gradient_checkpointing:
        lines.append("    --gradient-checkpointing   keep one tensor per layer and recompute the rest in backward "
                     "(~1/3 slower)")
    if cfg.keep_activations:
        lines.append(f"    --keep-activations {cfg.keep_activations // 2}   recompute more layers: each one "
                     "recomputed instead of kept frees one layer's activations")
    if not cfg.offload:
        lines.append("    --offload   lean mode: the checkpointed layer inputs and the embedding table live in "
                     "host memory")
    if graphs:
        lines.append("    --cuda-graphs off   the CUDA graphs' memory pool and their padding go; measured ~0.6-0.8 "
                     "GiB less, and slower on small models")
    lines.append(f"    --max-seq-len {max(8, seq // 2)}   activations grow with the tokens per batch; longer examples "
                 "are truncated (or --truncation drop); this one needs a new run")
    lines.append(f"  kept: {kept}; continue from it with --resume." if kept else "  no checkpoint was written yet.")
    return "\n".join(lines)
