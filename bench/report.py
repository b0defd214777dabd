"""Turn the benchmark's JSON lines into the tables in bench/README.md and a bar chart.

    python bench/report.py                      # the newest run in bench/results/train_speed.jsonl
    python bench/report.py --run-id 20261123T101500-3fa2c1

Writes the train_speed table between `<!-- bench-table -->` and `<!-- /bench-table -->`
in the README, the max_context table (if that file has rows) between
`<!-- max-context-table -->` and `<!-- /max-context-table -->`, and
bench/results/train_speed.png: tokens/s and peak memory per shape, one bar per stack.
Every figure printed comes from the file; nothing is typed in by hand.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent
STACK_ORDER = ("minilora-graphs", "minilora", "minilora-fast-graphs", "minilora-fast", "minilora-lean-graphs", "minilora-lean", "minilora-padfree", "peft", "peft-fast", "unsloth")
COLORS = {"minilora-graphs": "#0b2f4f", "minilora": "#2b7bba", "minilora-fast": "#1b4f7a", "minilora-fast-graphs": "#123a5c", "minilora-lean-graphs": "#5a93c8", "minilora-lean": "#7fb3e0",
          "minilora-padfree": "#9ecae1", "peft": "#e08a2c", "peft-fast": "#b8651a", "unsloth": "#3a9e5c"}
MODES = {"minilora": "minilora: --cuda-graphs off", "minilora-graphs": "minilora-graphs: each micro-batch replayed "
         "from a CUDA graph, the trainer's default on a GPU", "minilora-fast": "minilora-fast: no checkpointing",
         "minilora-fast-graphs": "minilora-fast-graphs: no checkpointing, CUDA graphs (the trainer's fast mode on a GPU)",
         "minilora-lean": "minilora-lean: layer inputs and the embedding table in host memory",
         "minilora-padfree": "minilora-padfree: rows end to end, no padding",
         "minilora-lean-graphs": "minilora-lean-graphs: --offload with CUDA graphs (the trainer's lean mode on a GPU)",
         "peft-fast": "peft-fast: peft without checkpointing"}


def read_run(path, run_id: str | None = None) -> tuple[str, list[dict]]:
    """The rows of run `run_id`, or of the newest run (the last line's), in file order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results yet; run bench/train_speed.py (or bench/max_context.py) first.")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON line ({e.msg}).") from None
    if not rows:
        raise ValueError(f"{path}: no rows.")
    run_id = run_id or rows[-1]["run_id"]
    picked = [r for r in rows if r.get("run_id") == run_id]
    if not picked:
        ids = sorted({r.get("run_id") for r in rows})
        raise ValueError(f"{path}: no rows with run_id {run_id!r}; it has {', '.join(map(str, ids[-5:]))}.")
    return run_id, picked


def _order(rows):
    return sorted(rows, key=lambda r: STACK_ORDER.index(r["stack"]) if r["stack"] in STACK_ORDER else 99)


def _shapes(rows):
    return list(dict.fromkeys(r["shape"] for r in rows))


def _num(x, fmt="{:,.0f}", none="n/a"):
    return none if x is None else fmt.format(x)


def _peak(r):
    """Peak GPU memory allocated; on the CPU the process's peak RSS stands in (marked)."""
    if r.get("peak_allocated_gib") is not None:
        return r["peak_allocated_gib"], ""
    if r.get("peak_rss_gib") is not None:
        return r["peak_rss_gib"], " (RSS)"
    return None, ""


def _ratio_line(rows) -> str:
    lines = []
    ran = {r["stack"] for r in rows}
    for mine in (r for r in rows if r["stack"].startswith("minilora") and not r.get("error")):
        parts = []
        for peer in ("peft", "unsloth") + (("peft-fast",) if "peft-fast" in ran else ()):
            v = mine.get(f"vs_{peer.replace('-', '_')}")
            if v:
                mem = f", {v['peak_allocated']:.2f}x the peak memory" if v.get("peak_allocated") else ""
                parts.append(f"**{mine['stack']} / {peer}: {v['tokens_per_s']:.2f}x the tokens/s{mem}**")
            else:
                parts.append(f"{mine['stack']} / {peer}: no comparison (one of them did not run)")
        lines.append("; ".join(parts) + ".")
    return "\n\n".join(lines)


def speed_table(run_id: str, rows: list[dict]) -> str:
    first = rows[0]
    v = first.get("versions") or {}
    where = first.get("gpu") or "CPU (functional check only: tiny shape, no speed claims)"
    out = [f"Run `{run_id}` on **{where}**, {first.get('time', '')[:10]}; matmul rate measured in the run "
           f"(the MFU denominator): {_num(first.get('matmul_tflops'), '{:.3g}')} TFLOP/s. Versions: "
           + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".", ""]
    for shape in _shapes(rows):
        rs = _order([r for r in rows if r["shape"] == shape])
        r0 = rs[0]
        modes = "; ".join(MODES[r["stack"]] for r in rs if r["stack"] in MODES)
        out += [f"**{shape}**: batch {r0['batch']} x {r0['seq']} tokens, LoRA r={r0['rank']} alpha={r0.get('alpha')} "
                f"on all 7 projections, gradient checkpointing {r0['checkpointing']} ({modes}), "
                f"median of {r0.get('steps')} steps after {r0.get('warmup')} warm-up.", "",
                "| stack | tokens/s | step (s) | peak allocated (GiB) | peak reserved (GiB) | loss first -> last "
                "| MFU | load (s) | load peak (GiB) | first loss matches minilora |",
                "|---|---:|---:|---:|---:|---|---:|---:|---:|---|"]
        for r in rs:
            if r.get("error"):
                out.append(f"| {r['stack']} | {r['error']} |  |  |  |  |  |  |  |  |")
                continue
            peak, tag = _peak(r)
            match = {True: "yes", False: "**NO**", None: "n/a"}[r.get("loss_match")]
            if r.get("loss_rel_diff") is not None and r["stack"] != "minilora":
                match += f" ({100 * r['loss_rel_diff']:.3f}%)"
            keep = f" (--keep-activations {r['keep_activations']})" if r.get("keep_activations") else ""
            out.append(f"| {r['stack']}{keep} | {_num(r['tokens_per_s'])} | {_num(r['step_time_s_median'], '{:.3f}')} "
                       f"| {_num(peak, '{:.2f}')}{tag} | {_num(r.get('peak_reserved_gib'), '{:.2f}')} "
                       f"| {r['loss_first']:.4f} -> {r['loss_last']:.4f} | {_num(r.get('mfu'), '{:.1%}')} "
                       f"| {_num(r.get('load_time_s'), '{:.1f}')} | {_num(r.get('load_peak_gib'), '{:.2f}')} "
                       f"| {match} |")
        out += ["", _ratio_line(rs), ""]
    return "\n".join(out).rstrip() + "\n"


def context_table(run_id: str, rows: list[dict]) -> str:
    r0 = rows[0]
    cap = f", capped to {r0['gpu_mem_gib']:g} GiB" if r0.get("gpu_mem_gib") else ""
    how = (f"probed at {', '.join(f'{n:,}' for n in r0['at'])} tokens in that order" if r0.get("at") else
           f"searched in [{r0['lo']}, {r0['hi']}] to within {r0['step']} tokens")
    out = [f"Run `{run_id}` on **{r0.get('gpu') or 'CPU'}**{cap}: the longest sequence (batch 1, one full training "
           f"step) {how}, LoRA r={r0['rank']}, gradient checkpointing {r0['checkpointing']}.", "",
           "| shape | stack | longest sequence | probes: tokens (peak GiB, seconds) | note |", "|---|---|---:|---|---|"]
    for r in _order(rows):
        if r.get("error"):
            longest = "n/a"
        elif r.get("max_seq") is None:
            longest = "none fits"
        else:
            longest = f"{r['max_seq']:,}" + (" (the largest tried)" if r.get("capped") else "")
        probes = "; ".join(f"{p['seq']:,} {'fits' if p['ok'] else 'does not fit'} ({p.get('peak_gib', '?')}, "
                           f"{p.get('seconds', '?')})" for p in r.get("probes") or [])
        note = r.get("error") or "; ".join(r.get("non_oom_failures") or [])
        out.append(f"| {r['shape']} | {r['stack']} | {longest} | {probes} | {note} |")
    return "\n".join(out) + "\n"


def trainer_table(rows: list[dict]) -> str:
    """trainer_speed.py's rows, one table per run: `python -m minilora.train` per mode on variable-length,
    prompt-masked data."""
    out = []
    for run_id in dict.fromkeys(r["run_id"] for r in rows):
        rs = [r for r in rows if r["run_id"] == run_id]
        r0 = rs[0]
        out += [f"Run `{run_id}` on **{r0.get('gpu') or 'CPU'}**, {r0['shape']}: examples of {r0['lengths'][0]}-"
                f"{r0['lengths'][1]} tokens (a third prompt, masked), batch {r0['batch_size']} x {r0['grad_accum']} "
                f"micro-batches, {r0['steps']} steps, the first {r0['skip']} left out.", "",
                "| mode (flags) | label tokens/s | vs eager | median step (s) | peak allocated (GiB) | last loss |",
                "|---|---:|---:|---:|---:|---:|"]
        for r in rs:
            mode = f"{r['mode']} ({' '.join(r['flags']) or 'defaults'})"
            if r.get("error"):
                out.append(f"| {mode} | {r['error']} |  |  |  |  |")
                continue
            out.append(f"| {mode} | {_num(r['label_tokens_per_s'])} | {_num(r.get('vs_eager'), '{:.2f}x')} "
                       f"| {r['step_s_median']:.3f} | {r['peak_allocated_gib']:.2f} "
                       f"| {_num(r.get('loss_last'), '{:.4f}')} |")
        out.append("")
    return "\n".join(out)


def replace_between(text: str, name: str, body: str, where: Path) -> str:
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"{where}: the markers {begin} and {end} are missing; add them where the table should go.")
    return text[: i + len(begin)] + "\n" + body + text[j:]


def chart(run_id: str, rows: list[dict], png: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape_names = _shapes(rows)
    stack_names = [s for s in STACK_ORDER if any(r["stack"] == s and not r.get("error") for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(stack_names))
    rss = any(_peak(r)[1] for r in rows)
    panels = [("tokens/s (higher is better)", lambda r: r.get("tokens_per_s"), "{:,.0f}"),
              (f"peak {'RSS' if rss else 'allocated'} GiB (lower is better)", lambda r: _peak(r)[0], "{:.2f}")]
    for ax, (title, value, fmt) in zip(axes, panels):
        for k, stack in enumerate(stack_names):
            xs, ys = [], []
            for x, shape in enumerate(shape_names):
                r = next((r for r in rows if r["shape"] == shape and r["stack"] == stack and not r.get("error")), None)
                if r is not None and value(r) is not None:
                    xs.append(x + (k - (len(stack_names) - 1) / 2) * width)
                    ys.append(value(r))
            bars = ax.bar(xs, ys, width, label=stack, color=COLORS.get(stack))
            ax.bar_label(bars, [fmt.format(y) for y in ys], fontsize=7, padding=2)
        ax.set_xticks(range(len(shape_names)), shape_names)
        ax.set_xlim(-0.6, len(shape_names) - 0.4)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    if stack_names:
        axes[0].legend(fontsize=8)
    r0 = rows[0]
    fig.suptitle(f"QLoRA training, batch {r0['batch']} x {r0['seq']}, r={r0['rank']}, "
                 f"{r0.get('gpu') or 'CPU'} (run {run_id})", fontsize=10)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    tmp = png.with_name("." + png.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, png)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default=str(HERE / "results" / "train_speed.jsonl"))
    p.add_argument("--max-context", default=str(HERE / "results" / "max_context.jsonl"),
                   help="max_context.py's results; skipped if the file does not exist")
    p.add_argument("--run-id", default=None,
                   help="which train_speed run(s), comma-separated, one table each (default: the newest)")
    p.add_argument("--trainer", default=str(HERE / "results" / "trainer_speed.jsonl"),
                   help="trainer_speed.py's results, every run in the file; skipped if the file does not exist")
    p.add_argument("--readme", default=str(HERE / "README.md"))
    p.add_argument("--png", default=str(HERE / "results" / "train_speed.png"))
    a = p.parse_args(argv)
    readme = Path(a.readme)
    runs = [read_run(a.results, r) for r in (a.run_id.split(",") if a.run_id else [None])]
    tables = "\n".join(speed_table(run_id, rows) for run_id, rows in runs)
    text = replace_between(readme.read_text(), "bench-table", tables, readme)
    run_id, rows = ",".join(r for r, _ in runs), [row for _, rs in runs for row in rs]
    if Path(a.max_context).is_file():
        ctx_id, ctx_rows = read_run(a.max_context)
        text = replace_between(text, "max-context-table", context_table(ctx_id, ctx_rows), readme)
    if Path(a.trainer).is_file():
        trainer_rows = [json.loads(line) for line in Path(a.trainer).read_text().splitlines() if line.strip()]
        text = replace_between(text, "trainer-table", trainer_table(trainer_rows), readme)
    readme.write_text(text)
    chart(run_id, rows, Path(a.png))
    print(f"wrote the tables of run {run_id} into {readme} and the chart to {a.png}")


if __name__ == "__main__":
    main()
