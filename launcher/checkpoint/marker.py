"""Checkpoint tags and their completeness markers: which checkpoints exist, which one `--resume` means. Torch-free.

Layout under `RUN_DIR/checkpoints/`:
    step00000120/                 one DeepSpeed tag (engine.save_checkpoint on all ranks)
        rng_rank0000.pt ...       each rank's RNG states (dropout and dither must continue exactly)
        COMPLETE.json             written by rank 0 once every rank has written, checksummed and synced
                                  its files: it lists every file of the tag with its size and CRC-32
    step00000120_universal/       made on demand when resuming on another world size (ZeRO ≥ 1)

A tag without COMPLETE.json is an interrupted save (a kill, a full disk): it never counts and is
removed on the next start. DeepSpeed's own `latest` file is not used (rank 0 writes it before the
other ranks have necessarily finished). The marker also holds what the run needs to continue: the
step, the epoch, the world size, the plan and the state of the sampler, the schedule and the counters.
Reading it needs no torch, so the planner reads a checkpoint's global batch and LR before any process
group starts (launcher/plan/request.py `checkpoint_hold`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

MARKER = "COMPLETE.json"
TAG_PATTERN = re.compile(r"^step(\d{8})$")


class CheckpointError(RuntimeError):
    pass


class AllRanksStop(CheckpointError):
    """Raised alike on every rank from a shared verdict, so rank 0 alone says why; the process exits exit_code."""

    exit_code = 1


class ResumeRefused(AllRanksStop):
    """`--resume` names no checkpoint that can be used."""

    exit_code = 2


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completeness marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_PATTERN.match(p.name) and (p / MARKER).is_file()]
    return sorted(tags)


def read_marker(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def resume_candidates(resume: str | None, ckpt_dir: Path) -> tuple[list[tuple[Path, str]], bool]:
    """(checkpoints to try, newest first; whether falling back to an older one is allowed).

    `auto` → every complete tag of ckpt_dir (none: an empty list, a fresh start). A path to a tag → that
    tag alone: the user named it, so a bad one is refused rather than replaced. A checkpoints folder or a
    run directory → its complete tags, like `auto`.
    """
    if not resume:
        return [], False
    if resume == "auto":
        return [(ckpt_dir, t) for t in reversed(complete_tags(ckpt_dir))], True
    path = Path(resume)
    if (path / MARKER).is_file():
        return [(path.parent, path.name)], False
    for folder in (path, path / "checkpoints"):
        if folder.is_dir() and complete_tags(folder):
            return [(folder, t) for t in reversed(complete_tags(folder))], True
    hint = " (it holds no COMPLETE.json: an interrupted save?)" if TAG_PATTERN.match(path.name) and path.is_dir() else ""
    raise ResumeRefused(
        f"--resume {resume}: no complete checkpoint there{hint}; expected a tag folder holding {MARKER}, "
        "a checkpoints folder or a run directory"
    )


def resolve_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """`auto` → the newest complete tag in ckpt_dir whose marker reads (None if there is none); a path → that tag.

    Cheap (no checkpoint file is read): it may run before the process group exists. The training then
    verifies the files too and may fall back further, but only to a tag with the same global batch.
    """
    candidates, fallback = resume_candidates(resume, ckpt_dir)
    for ckpt, tag in candidates:
        try:
            read_marker(ckpt, tag)
        except (OSError, ValueError) as e:
            if not fallback:
                raise ResumeRefused(f"--resume {resume}: {ckpt / tag / MARKER} cannot be read: {e}") from None
            continue
        return ckpt, tag
    return None


def checkpoint_bytes(marker: dict[str, Any]) -> int | None:
    files = marker.get("files")
    return sum(f["bytes"] for f in files) if files else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def run_checkpoint(path: Path) -> tuple[Path, str, str] | None:
    """(checkpoints folder, tag, which) for a tag folder, a checkpoints folder or a run directory; None otherwise.
    A run's best checkpoint (as recorded by its newest complete one) wins over its newest."""
    if (path / MARKER).is_file():
        return path.parent, path.name, "the checkpoint named"
    for ckpt_dir in (path, path / "checkpoints"):
        tags = complete_tags(ckpt_dir)
        if tags:
            best = (read_marker(ckpt_dir, tags[-1]).get("state") or {}).get("best_tag")
            return (ckpt_dir, best, "best checkpoint") if best in tags else (ckpt_dir, tags[-1],
                                                                             "newest complete checkpoint")
    return None
