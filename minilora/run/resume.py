"""Checkpoints and --resume: what a checkpoint holds, finding the newest, checking and restoring it, and
the output folder a run starts in.

Each checkpoint is one folder, checkpoints/step-N/, written atomically (atomic.py), holding everything a
resume needs: the adapter, the optimizer state, the fp16 loss scale, the random-number generators and the
position in the data. A kill loses only the steps after the newest one. --resume takes the newest
complete checkpoint, refuses it if the run's settings differ, puts it back and cuts metrics.jsonl back
to the rows it held, so the resumed losses equal those of a run never interrupted (tests/test_fault_kill.py).

A `cfg` below is config.py's TrainConfig, of which only the fields named are read.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import distributed as dp
from ..adapter import save_adapter
from ..atomic import atomic_dir, clean_leftovers
from ..checkpoint import unpickling_error
from ..lora import lora_state_dict


class ResumeError(ValueError):
    """This --output-dir cannot be started or resumed as asked: printed as one line, exit code 2 (as a bad flag)."""


@dataclass
class State:
    """Where training stands: what each checkpoint saves, and --resume puts back."""
    step: int = 0  # optimizer steps done
    position: int = 0  # examples taken so far: the epoch, and where in its order the next step starts
    metrics: dict = field(default_factory=lambda: {"bad_in_a_row": 0, "skipped": 0, "metrics_rows": 0})
    last_ckpt: Path | None = None  # the newest complete checkpoint
    # The rng state at the start of step `step + 1`. A Ctrl-C or out-of-memory inside a step saves this one,
    # not the current state, which that step's dropout has already advanced: the resume redoes the step.
    rng_next: dict | None = None


# ----------------------------------------------------------------------------- saving

def rng_state() -> dict:
    """The random generators' state (torch's, Python's, each GPU's): dropout draws from them."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(out: Path, step: int, model, optimizer, cfg, acfg, position: int, metrics_state: dict,
                    scaler=None, rng: dict | None = None, chat_template: str | None = None):
    """checkpoints/step-N/: adapter + optimizer + loss scaler + rng + data position, in one folder, written atomically.

    `rng` is the generators' state at the start of step N + 1 (default: now); `chat_template`: the one chat data
    trained with, kept beside the adapter (adapter.save_adapter).
    """
    with atomic_dir(out / "checkpoints" / f"step-{step:06d}") as tmp:
        save_adapter(model, tmp / "adapter", acfg, chat_template=chat_template)
        state = {"step": step, "position": position, "optimizer": optimizer.state_dict(), "rng": rng or rng_state(),
                 "config": asdict(cfg), "metrics": metrics_state, "scaler": scaler.state_dict() if scaler else {},
                 "world_size": dp.world()}  # the data position assumes this many ranks: resume needs as many
        torch.save(state, tmp / "trainer_state.pt")
    return out / "checkpoints" / f"step-{step:06d}"


# A full disk or a read-only folder surfaces as OSError from Python's writes, RuntimeError from
# torch.save ("file write failed") and SafetensorError from safetensors' Rust writer.
SAVE_ERRORS = (OSError, RuntimeError, SafetensorError)


def why(e: BaseException) -> str:
    """Why a save failed, in words: `No space left on device (path)`."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    return f"{type(e).__name__}: {e}"


def checkpoint(out: Path, state: State, model, optimizer, scaler, cfg, acfg, together: bool = True,
               chat_template: str | None = None) -> Path | None:
    """Save the state after `state.step`. A failed save (disk full, no permission) warns and training goes
    on: atomic_dir leaves the previous checkpoints as they were, and one lost save beats a lost run.

    Rank 0 writes; the weights and optimizer state are the same on every rank. `together`: every rank
    is here at the same step, and learns whether rank 0's save worked (so that all agree on the newest
    checkpoint); False when a rank stops alone (Ctrl-C, out of memory), where a collective could hang.
    """
    target = out / "checkpoints" / f"step-{state.step:06d}"
    if state.last_ckpt == target:  # already saved at this step (say, Ctrl-C right after a periodic save)
        return state.last_ckpt
    saved = None
    if dp.is_main():
        try:
            saved = save_checkpoint(out, state.step, model, optimizer, cfg, acfg, state.position, state.metrics,
                                    scaler, state.rng_next, chat_template)
        except SAVE_ERRORS as e:
            print(f"\nWARNING: could not save checkpoint {target}: {why(e)}. The newest complete checkpoint is "
                  f"{state.last_ckpt or 'none yet'}; training goes on.", file=sys.stderr, flush=True)
    if together and dp.world() > 1:  # rank 0's outcome, to every rank (and a barrier)
        saved = target if dp.all_reduce_sum(int(saved is not None)) else None
    if saved:
        state.last_ckpt = saved
    return saved


# ----------------------------------------------------------------------------- resuming

def newest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step.

    An unfinished save is `.step-N.tmp-*` (atomic_dir), which the pattern never matches;
    a folder without its two files (copied or deleted by hand) is passed over too.
    """
    folder = out / "checkpoints"
    found = [p for p in folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name)
             and (p / "trainer_state.pt").is_file() and (p / "adapter" / "adapter_model.safetensors").is_file()
             ] if folder.is_dir() else []
    return max(found, key=lambda p: int(p.name[5:]), default=None)


def read_trainer_state(ck: Path) -> dict:
    """trainer_state.pt, through torch's weights-only unpickler: tensors and plain containers, nothing
    that can run code, so a tampered file is refused. A torn or foreign file is an error naming it."""
    try:
        return torch.load(ck / "trainer_state.pt", weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"cannot resume from {ck}: its trainer_state.pt is unreadable ({unpickling_error(e)}). "
                         "Move that folder away to resume from the checkpoint before it.") from None


RESUME_MUST_MATCH = ("model", "data", "template", "r", "alpha", "targets", "rslora", "no_4bit", "quant_type",
                     "seed", "max_seq_len", "group_by_length", "chat_template", "empty_think", "last_turn_only")


def check_resume(saved: dict, cfg, where: Path):
    """Refuse settings that would make the saved state meaningless, naming each difference."""
    # A setting newer than the checkpoint (say chat_template) had its default when the checkpoint was written.
    was = {k: saved.get(k, type(cfg).__dataclass_fields__[k].default) for k in RESUME_MUST_MATCH}
    diffs = [f"{k}: checkpoint {was[k]!r}, now {getattr(cfg, k)!r}" for k in RESUME_MUST_MATCH
             if was[k] != getattr(cfg, k)]
    # The data position counts examples, so another split of the same effective batch (say 1 x 8 after
    # running out of memory at 2 x 4) resumes at the same place; the losses then match only in expectation.
    if saved.get("batch_size", 0) * saved.get("grad_accum", 0) != cfg.batch_size * cfg.grad_accum:
        diffs.append(f"effective batch (batch_size x grad_accum): checkpoint {saved.get('batch_size')} x "
                     f"{saved.get('grad_accum')}, now {cfg.batch_size} x {cfg.grad_accum}")
    if diffs:
        raise ResumeError(f"cannot resume from {where}: the run's settings differ ({'; '.join(diffs)}).")


def restore(state: dict, ck: Path, model, optimizer, scaler):
    """Put a checkpoint's LoRA weights, optimizer, loss scale and rng back."""
    own = lora_state_dict(model)
    for k, v in load_file(ck / "adapter" / "adapter_model.safetensors").items():
        own[k.removeprefix("base_model.model.")].copy_(v)
    try:
        optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:  # torch: "loaded state dict contains a parameter group that doesn't match the size..."
        raise ResumeError(f"cannot resume from {ck}: its optimizer state does not fit this run's parameters ({e}). "
                          "It was saved by a minilora that kept one optimizer entry per LoRA factor, before they "
                          "were joined into one tensor (speed/flat_optimizer.py). Its adapter is still good: "
                          "start a new run, or resume with the minilora that wrote it.") from None
    if state.get("scaler") and scaler.is_enabled():  # {} when saved without fp16
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])


def start(out: Path, resume: tuple[Path, dict] | None, model, optimizer, scaler) -> State:
    """Where the run starts: step 0, or a checkpoint put back (--resume); metrics.jsonl is cut back to the rows
    it held when that checkpoint was saved."""
    state, rows = State(), 0
    if resume:
        ck, saved = resume
        restore(saved, ck, model, optimizer, scaler)
        state.step, state.position, state.last_ckpt = saved["step"], saved["position"], ck
        state.metrics.update(saved["metrics"])
        rows = saved["metrics"].get("metrics_rows")
        print(f"resumed from {ck} at step {state.step}")
    if dp.is_main():
        state.metrics["metrics_rows"] = rewind_metrics(out / "metrics.jsonl", state.step, rows)
    return state


def rewind_metrics(path: Path, step: int, rows: int | None) -> int:
    """Cut metrics.jsonl back to what it held when the checkpoint at `step` was saved; returns its row count.

    A run killed after its last checkpoint logged steps that the resumed run does again: kept,
    they would be two rows per step. `rows` is the count the checkpoint recorded (older
    checkpoints lack it; then rows of later steps go). A line torn by the kill goes too.
    """
    if not path.exists():
        return 0
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if (rows is not None and len(kept) >= rows) or row.get("step", 0) > step:
            break
        kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
    return len(kept)


# ----------------------------------------------------------------------------- the output folder

RUN_FILES = {"metrics.jsonl", "checkpoints", "adapter", "loss.png", "report.json"}  # what a run writes there


def is_run_file(name: str) -> bool:
    """A name a run writes in its folder, or a leftover of one (`.adapter.tmp-*`, `.loss.png.tmp`: atomic.py)."""
    return re.sub(r"\.(tmp|old)(-.*)?$", "", name.lstrip(".")) in RUN_FILES


def check_output(cfg) -> Path:
    """--output-dir, checked before anything loads; nothing is written or deleted yet (`clear_output` does that, once
    the new run has loaded). A finished run is replaced only with --overwrite, an unfinished one is continued
    (--resume) or replaced (--overwrite), never mixed with a new one; and --overwrite replaces a run, never a folder
    that holds anything else."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ResumeError(f"--output-dir {out} is a file; give a folder (it is made if missing).")
    finished = (out / "adapter" / "adapter_config.json").is_file()
    started = newest_checkpoint(out) is not None or (out / "metrics.jsonl").exists()
    if cfg.overwrite and out.exists():
        others = sorted(p.name for p in out.iterdir() if not is_run_file(p.name))
        if others:
            raise ResumeError(f"--overwrite replaces a minilora run, but {out} holds other files too ("
                              f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}); choose another "
                              "--output-dir, or move them out.")
    elif cfg.resume and not started:
        raise ResumeError(f"--resume: {out} has no checkpoint to resume from.")
    elif not cfg.resume and finished:
        raise ResumeError(f"{out} already holds a finished run; pass --overwrite to replace it or choose another --output-dir.")
    elif not cfg.resume and started:
        raise ResumeError(f"{out} holds an unfinished run; pass --resume to continue it or --overwrite to start over.")
    return out


def clear_output(cfg, out: Path) -> None:
    """Make the output folder ready for the run's first write: with --overwrite, the old run's files deleted (only
    those: `check_output` refused a folder with others). Called once the new run's data and model have loaded, so a
    run that fails before that leaves the old one as it was."""
    if cfg.overwrite and out.is_dir() and dp.is_main():  # the other ranks wait at train.py's barrier
        for p in out.iterdir():
            if is_run_file(p.name) and p.is_dir():
                shutil.rmtree(p)
            elif is_run_file(p.name):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)


def find_resume(cfg, out: Path) -> tuple[Path, dict] | None:
    """With --resume: the newest complete checkpoint and its trainer state, or None where the run stopped before
    its first save. A mismatched resume is refused here, before anything slow."""
    if not cfg.resume:
        return None
    if dp.is_main():
        for line in clean_leftovers(out / "checkpoints") + clean_leftovers(out):
            print(line)
    ck = newest_checkpoint(out)
    if ck is None:
        print(f"--resume: {out} has no complete checkpoint yet (stopped before the first save); starting at step 0")
        return None
    state = read_trainer_state(ck)
    check_resume(state["config"], cfg, ck)
    saved_world, world = state.get("world_size", 1), dp.world()
    if saved_world != world:
        raise ResumeError(f"cannot resume from {ck}: it was written by {saved_world} rank(s), this run has "
                          f"{world}. Resume with torchrun --nproc_per_node {saved_world}, or start over.")
    return ck, state
