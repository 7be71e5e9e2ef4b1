"""Loss curves of runs against samples seen, drawn from their metrics.jsonl (and PESQ/STOI/SI-SDR/DNSMOS panels
when the runs evaluated during training): what `python -m launcher.report` draws.

Samples seen (not steps) is the x-axis because runs with different batch plans take different
numbers of steps for the same data: two plans with the same global batch should overlap here.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (is this a run directory?)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # A resumed run appends; keep the last record for each (kind, step).
    latest: dict[tuple, dict] = {}
    for r in records:
        latest[(r.get("kind"), r.get("step"))] = r
    return sorted(latest.values(), key=lambda r: (r.get("step") or 0))


def label_for(run_dir: Path) -> str:
    plan_path = run_dir / "plan.json"
    if plan_path.is_file():
        plan = json.loads(plan_path.read_text())
        return (f"{run_dir.name}: {plan['micro_batch']}×{plan['accumulation_steps']}×{plan['world_size']}"
                f"={plan['global_batch']}, lr {plan['peak_lr']:.2g}")
    return run_dir.name


# The `eval` records of train.eval_interval_epochs (launcher/training/evaluation.py): one panel per metric.
EVAL_PANELS = (("pesq_wb", "PESQ-WB"), ("stoi", "STOI"), ("si_sdr", "SI-SDR (dB)"), ("dnsmos_ovrl", "DNSMOS OVRL"))


def draw(run_dirs: list[Path], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(run_dir, read_metrics(run_dir)) for run_dir in run_dirs]
    with_eval = any(r.get("kind") == "eval" for _, records in runs for r in records)
    rows = 2 if with_eval else 1
    fig = plt.figure(figsize=(14 if with_eval else 12, 4.5 * rows))
    axes = [fig.add_subplot(rows, 2, k + 1) for k in range(2)]
    eval_axes = [fig.add_subplot(rows, len(EVAL_PANELS), len(EVAL_PANELS) + k + 1)
                 for k in range(len(EVAL_PANELS))] if with_eval else []
    for run_dir, records in runs:
        label = label_for(run_dir)
        train = [r for r in records if r.get("kind") == "train"]
        valid = [r for r in records if r.get("kind") == "valid"]
        if train:
            line, = axes[0].plot([r["samples_seen"] for r in train], [r["loss"] for r in train], label=label)
            if valid:
                axes[0].plot([r["samples_seen"] for r in valid], [r["loss"] for r in valid], "o--",
                             color=line.get_color(), label=f"{run_dir.name} (valid)")
        if valid:
            axes[1].plot([r["samples_seen"] for r in valid], [r["si_snr_db"] for r in valid], "o-", label=label)
        evals = [r for r in records if r.get("kind") == "eval"]
        for ax, (key, _) in zip(eval_axes, EVAL_PANELS):
            points = [(r["samples_seen"], r[key]) for r in evals if r.get(key) is not None]
            if not points:
                continue
            line, = ax.plot(*zip(*points), "o-", label=run_dir.name)
            noisy = [r.get(f"{key}_noisy") for r in evals if r.get(f"{key}_noisy") is not None]
            if noisy:  # the input's score: what the model has to beat
                ax.axhline(noisy[-1], linestyle=":", color=line.get_color(), label=f"{run_dir.name} (noisy input)")
    axes[0].set(xlabel="samples seen", ylabel="mask loss", title="Mask loss")
    axes[1].set(xlabel="samples seen", ylabel="SI-SNR (dB)", title="Validation SI-SNR of the enhanced signal")
    for ax, (_, title) in zip(eval_axes, EVAL_PANELS):
        ax.set(xlabel="samples seen", title=title)
    if eval_axes:
        eval_axes[0].set_ylabel("whole validation files (train.eval_*)")
    for ax in [*axes, *eval_axes]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
