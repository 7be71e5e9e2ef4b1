"""Which checkpoint a run continues from: candidates newest first, each verified by all ranks before it is offered.

A tag whose files no longer match its marker (a bad disk, an interrupted copy) does not verify:
`--resume auto` then falls back to the next newest that does; `--resume PATH` to it is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from launcher.checkpoint.integrity import check_file, share
from launcher.checkpoint.marker import MARKER, ResumeRefused, read_marker, resume_candidates


class ResumeTargets:
    """The checkpoints a `--resume` may continue from, newest first, each verified before it is offered.

    All ranks call `next` together (verification is collective). A tag that cannot be used is reported
    through `report(ckpt_dir, tag, reason)` and passed over; with `--resume` naming one tag, or once no
    candidate is left, ResumeRefused says why. A fallback must have the global batch of the plan (the
    planner planned with the newest tag's); the newest one with another is refused with the fix.
    """

    def __init__(self, resume: str | None, ckpt_dir: Path, global_batch: int,
                 report: Callable[[Path, str, str], None]) -> None:
        self.resume, self.global_batch, self.report = resume, global_batch, report
        self.own_dir = ckpt_dir.resolve()
        self.candidates, self.fallback = resume_candidates(resume, ckpt_dir)
        self.tried = 0
        self.rejected: set[str] = set()
        self.reasons: list[str] = []

    def next(self, usable: Callable[[dict[str, Any]], str | None] | None = None) -> tuple[Path, str, dict] | None:
        """(ckpt_dir, tag, marker) of the next checkpoint that verifies (and that `usable` accepts: None means yes);
        None when there was none to begin with."""
        while self.candidates:
            ckpt_dir, tag = self.candidates.pop(0)
            self.tried += 1
            try:
                marker = read_marker(ckpt_dir, tag)
            except (OSError, ValueError) as e:
                self.reject(ckpt_dir, tag, f"{ckpt_dir / tag / MARKER} cannot be read ({e})")
                continue
            batch = marker.get("global_batch")
            if batch != self.global_batch:
                if self.tried == 1:
                    # The plan holds the global batch of the checkpoint resolve_resume found before the process
                    # group started: this one differs, so the checkpoints changed in between.
                    raise ResumeRefused(
                        f"resume: {ckpt_dir / tag} has a global batch of {batch} but the plan holds "
                        f"{self.global_batch}, from the checkpoint found when planning; the checkpoints changed "
                        "since: start the run again")
                self.reject(ckpt_dir, tag, f"it was trained with a global batch of {batch}, this plan has "
                                           f"{self.global_batch}")
                continue
            problem = (usable(marker) if usable else None) or verify(ckpt_dir, tag, marker)
            if problem is None:
                return ckpt_dir, tag, marker
            self.reject(ckpt_dir, tag, problem)
        if self.tried:
            raise ResumeRefused(f"--resume {self.resume}: no checkpoint can be used ({'; '.join(self.reasons)}); "
                                "move the bad ones away to start afresh")
        return None

    def reject(self, ckpt_dir: Path, tag: str, reason: str) -> None:
        if not self.fallback:
            raise ResumeRefused(f"--resume {self.resume}: {reason}")
        if ckpt_dir.resolve() == self.own_dir:  # what this run's retention must not count as good
            self.rejected.add(tag)
        self.reasons.append(f"{tag}: {reason}")
        self.report(ckpt_dir, tag, reason)


def verify(ckpt_dir: Path, tag: str, marker: dict[str, Any]) -> str | None:
    """All ranks: None if every file of the tag matches the marker, else the first problem found.

    Each rank reads its share of the files (see `share`); one all-gather of the verdicts follows. A
    marker written before checksums existed lists no files: such a tag is taken as it is.
    """
    files = marker.get("files")
    problems: list[str] = []
    if files is not None:
        for record in share(files, dist.get_rank(), dist.get_world_size()):
            problem = check_file(ckpt_dir / tag, record)
            if problem:
                problems.append(problem)
                break
    gathered: list[list[str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems)
    found = [p for ranks in gathered for p in ranks]
    return found[0] if found else None
