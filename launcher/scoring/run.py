"""One rank's share of an evaluation, merged on rank 0, and the files it leaves: metrics.csv and summary.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from launcher.scoring.batches import SAMPLE_RATE_HZ, assign_batches, plan_batches
from launcher.scoring.pairs import Pairs
from launcher.scoring.results import gather_rows, summarize, write_csv
from launcher.scoring.score import enhance_and_score


@dataclass(frozen=True)
class ScoreSettings:
    batch_size: int  # files per forward pass (one pass), or windows per forward pass (files over 20 s)
    metric_workers: int  # metric processes per rank (0: in the rank)
    groups: tuple[str, ...]  # metric groups (launcher/scoring/results.py GROUPS)
    resample: bool = False


def score_share(model, pairs: Pairs, settings: ScoreSettings, device, rank: int, world_size: int,
                say: Callable[[str], None]) -> tuple[list[dict] | None, float]:
    """This rank's batches enhanced and scored; every rank's rows (with their paths) on rank 0 in row order (None
    on the others), and the seconds this rank took. `say` gets a progress line every 10 s."""
    items = pairs.items
    samples = [i.samples for i in items]
    batches = plan_batches(samples, settings.batch_size)
    mine = [batches[b] for b in assign_batches(batches, samples, world_size)[rank]]
    total = sum(len(b) for b in mine)
    t0 = time.perf_counter()
    last = [t0]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 10 or done == total:
            last[0] = now
            say(f"[evaluate] rank {rank}: {done}/{total} pairs of its share, {done / (now - t0):.2f} pairs/s")

    rows = enhance_and_score(model, items, mine, device=device, batch_size=settings.batch_size,
                             metric_workers=settings.metric_workers, groups=settings.groups,
                             resample=settings.resample, progress=progress)
    seconds = time.perf_counter() - t0
    paths = {i.row: (i.noisy, i.clean, i.samples / SAMPLE_RATE_HZ) for i in items}
    for r in rows:
        r["noisy"], r["clean"], r["seconds"] = paths[r["row"]]
    merged = gather_rows(rows, world_size)
    return (None if merged is None else sorted(merged + pairs.skipped, key=lambda r: r["row"])), seconds


def write_results(out_dir: Path, merged: Sequence[dict], pairs: Pairs, groups: Sequence[str], seconds: float,
                  about: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """DIR/metrics.csv (a row per pair) and DIR/summary.json (`about`, the counts and the means); the means."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_csv(out_dir / "metrics.csv", merged, groups)
    summary = summarize(merged, groups)
    evaluated = len(pairs.items)
    record = {**about, "pairs": len(merged), "evaluated": evaluated, "skipped_bad_lines": len(pairs.skipped),
              "malformed_lines": len(pairs.index.malformed),
              "pairs_with_notes": sum(1 for r in merged if r.get("notes")), "seconds": round(seconds, 3),
              "pairs_per_s": round(evaluated / seconds, 3) if seconds > 0 else None, "metrics": summary}
    # The keys in the order they always had.
    order = ["checkpoint", "model", "lists", "pairs", "evaluated", "skipped_bad_lines", "malformed_lines",
             "pairs_with_notes", "world_size", "device", "metric_workers", "batch_size", "seconds", "pairs_per_s",
             "metrics"]
    record = {k: record[k] for k in order if k in record} | record
    (out_dir / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    return summary
