"""Dry run wall time against `python -c "import torch"`, side by side, medians over repeats.

    .venv/bin/python bench/bench_plan.py [--repeats 7] [--out bench/results/plan.json]

Goal: the dry run (`python -m launcher.plan --ds_config ds_configs/bs12.json --effec_batch_size 24`)
takes at most 0.25× the time of importing torch. Runs alternate so machine noise hits both alike.
`dry_run_mission` is the issue's line as a new user types it (no recipe: the built-in defaults).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {
    "dry_run": [sys.executable, "-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json",
                "--config", "recipes/train_48k.yaml", "--effec_batch_size", "24", "--num_nodes", "4",
                "--num_gpus", "8"],
    "dry_run_json": [sys.executable, "-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json",
                     "--config", "recipes/train_48k.yaml", "--effec_batch_size", "24", "--json"],
    "dry_run_mission": [sys.executable, "-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json",
                        "--num_nodes", "2", "--num_gpus", "8"],
    "import_torch": [sys.executable, "-c", "import torch"],
}


def time_once(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    for cmd in COMMANDS.values():  # warm the page cache
        time_once(cmd)
    samples: dict[str, list[float]] = {k: [] for k in COMMANDS}
    for _ in range(args.repeats):
        for name, cmd in COMMANDS.items():
            samples[name].append(time_once(cmd))
    med = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "median_s": med,
        "ratio_dry_run_vs_import_torch": med["dry_run"] / med["import_torch"],
        "ratio_dry_run_json_vs_import_torch": med["dry_run_json"] / med["import_torch"],
        "ratio_dry_run_mission_vs_import_torch": med["dry_run_mission"] / med["import_torch"],
        "goal": "<= 0.25",
        "repeats": args.repeats,
    }
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Dry run vs import torch (medians)")
    for col in ("command", "median s", "× import torch"):
        table.add_column(col)
    for name, value in med.items():
        table.add_row(name, f"{value:.3f}", f"{value / med['import_torch']:.3f}")
    Console().print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
