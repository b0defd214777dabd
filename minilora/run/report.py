"""What a run tells you at its end: the demo's accuracy and a sample answer before and after, and the loss
plot (loss.png). train.py calls them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


from .. import data as D


def demo_report(model, tok, records) -> dict:
    """Exact-match accuracy of greedy answers on the held-out demo questions, and one sample."""
    from ..demo import final_answer
    from ..generate import generate, model_eos_ids

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
