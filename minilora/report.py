"""What a run tells you at its end: the demo's accuracy and a sample answer before and after, the loss
plot, and, when the GPU ran out of memory, which changes need less (exit code 3). train.py calls them;
a `cfg` here is its TrainConfig.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import data as D


# ----------------------------------------------------------------------------- demo report and plot

def demo_report(model, tok, records) -> dict:
    """Exact-match accuracy of greedy answers on the held-out demo questions, and one sample."""
    from .demo import final_answer
    from .generate import generate, model_eos_ids

    prompts = [tok.encode(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True),
                          add_special_tokens=False) for r in records]
    outs = generate(model, prompts, max_new_tokens=48, eos_ids=model_eos_ids(tok.folder, tok),
                    pad_id=D.pad_id_for(tok))
    texts = [tok.decode(o, skip_special_tokens=True) for o in outs]
    correct = [final_answer(t) == r["answer"] for t, r in zip(texts, records)]
    return {"accuracy": sum(correct) / len(correct), "n": len(correct),
            "question": records[0]["messages"][0]["content"], "sample": texts[0], "expected": records[0]["answer"]}


def print_demo_summary(report: dict):
    """The demo's last words: held-out accuracy and eval loss before -> after, and one answer both times."""
    b, a = report["before"], report["after"]
    print("\n" + "=" * 72)
    print(f"held-out exact match: {b['accuracy']:.0%} -> {a['accuracy']:.0%}  ({a['n']} questions never trained on)")
    print(f"eval loss:            {report['eval_loss_before']:.3f} -> {report['eval_loss_after']:.3f}")
    print(f"question: {a['question']}   (expected: {a['expected']})")
    print(f"--- before ---\n{b['sample'].strip()}\n--- after ---\n{a['sample'].strip()}")
    print("=" * 72)


def plot_losses(out: Path):
    """loss.png: train loss per step and eval loss, if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for split, style in (("train", "-"), ("eval", "o--")):
        pts = [(r["step"], r["loss"]) for r in rows if r.get("split") == split]
        if pts:
            ax.plot(*zip(*pts), style, label=split)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over label tokens)")
    ax.set_title(f"minilora: {out.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out / ".loss.png.tmp"
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out / "loss.png")
    plt.close(fig)


# ----------------------------------------------------------------------------- out of memory

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
        lines.append("    --cuda-graphs off   the CUDA graphs' memory pool and their padding (up to 12.5% longer "
                     "rows) go; measured ~0.6-0.8 GiB less, and slower on small models")
    lines.append(f"    --max-seq-len {max(8, seq // 2)}   activations grow with the tokens per batch; longer examples "
                 "are truncated (or --truncation drop); this one needs a new run")
    lines.append(f"  kept: {kept}; continue from it with --resume." if kept else "  no checkpoint was written yet.")
    return "\n".join(lines)
