"""Rows and what is made of them: the metric columns, the means and improvements, metrics.csv and the table, and
every rank's rows merged on rank 0 in list order."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any, Sequence

from launcher.scoring.score import DECIMALS

GROUPS = ("pesq", "stoi", "si_sdr", "dnsmos")


class EvaluateError(RuntimeError):
    """Bad input to an evaluation (arguments, lists, output folders); the message says what and how to fix it."""


def parse_groups(text: str) -> tuple[str, ...]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in GROUPS]
    if unknown or not names:
        raise EvaluateError(f"--metrics {text!r}: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")
    return tuple(g for g in GROUPS if g in names)


def metric_columns(groups: Sequence[str], with_noisy: bool = True) -> list[str]:
    from model.metrics import METRIC_GROUPS, NOISY_SUFFIX

    names = [n for g in GROUPS if g in groups for n in METRIC_GROUPS[g]]
    return names + ([n + NOISY_SUFFIX for n in names] if with_noisy else [])


def summarize(rows: Sequence[dict], groups: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per metric: mean of the enhanced values, of the input's, and the mean improvement over the pairs where
    both are defined, with the number of pairs behind each."""
    from model.metrics import NOISY_SUFFIX

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), DECIMALS) if values else None

    out = {}
    for name in metric_columns(groups, with_noisy=False):
        enhanced = [r[name] for r in rows if r.get(name) is not None]
        noisy = [r[name + NOISY_SUFFIX] for r in rows if r.get(name + NOISY_SUFFIX) is not None]
        both = [r[name] - r[name + NOISY_SUFFIX] for r in rows
                if r.get(name) is not None and r.get(name + NOISY_SUFFIX) is not None]
        out[name] = {"enhanced": mean(enhanced), "noisy": mean(noisy), "improvement": mean(both),
                     "pairs": len(enhanced), "pairs_noisy": len(noisy), "pairs_both": len(both)}
    return out


def write_csv(path: Path, rows: Sequence[dict], groups: Sequence[str]) -> None:
    columns = ["noisy", "clean", "enhanced", "seconds", *metric_columns(groups), "notes"]
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([_cell(r.get(c), 3 if c == "seconds" else DECIMALS) for c in columns])
    os.replace(tmp, path)


def _cell(value: Any, decimals: int) -> str:
    if value is None:
        return ""
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


def print_table(summary: dict[str, dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = {"pesq_wb": "PESQ-WB", "stoi": "STOI", "estoi": "ESTOI", "si_sdr": "SI-SDR (dB)",
              "dnsmos_sig": "DNSMOS SIG", "dnsmos_bak": "DNSMOS BAK", "dnsmos_ovrl": "DNSMOS OVRL"}
    table = Table(title=title)
    for header in ("metric", "enhanced", "noisy input", "improvement", "pairs"):
        table.add_column(header, justify="left" if header == "metric" else "right")

    def fmt(v: float | None, sign: str = "") -> str:
        return "-" if v is None else f"{v:{sign}.3f}"

    for name, s in summary.items():
        table.add_row(labels.get(name, name), fmt(s["enhanced"]), fmt(s["noisy"]), fmt(s["improvement"], "+"),
                      f"{s['pairs']}" + (f" ({s['pairs_both']} both)" if s["pairs_both"] != s["pairs"] else ""))
    Console(highlight=False).print(table)


def gather_rows(rows: list[dict], world_size: int) -> list[dict] | None:
    """Every rank's rows on rank 0, in row order (None on the other ranks)."""
    if world_size == 1:
        return sorted(rows, key=lambda r: r["row"])
    import torch.distributed as dist

    everything = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(rows, everything, dst=0)
    if everything is None:
        return None
    return sorted((r for part in everything for r in part), key=lambda r: r["row"])
