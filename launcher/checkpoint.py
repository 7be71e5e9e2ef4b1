"""Checkpoints: DeepSpeed's own files plus a completeness marker, keep-last-K, and resume.

Layout under `RUN_DIR/checkpoints/`:
    step00000120/                 one DeepSpeed tag (engine.save_checkpoint on all ranks)
        rng_rank0000.pt ...       each rank's RNG states (dropout and dither must continue exactly)
        COMPLETE.json             written by rank 0 after every rank has finished writing
    step00000120_universal/       made on demand when resuming on another world size (ZeRO ≥ 1)

A tag without COMPLETE.json is an interrupted save and is never resumed from, so a process killed
during a save leaves the previous checkpoint loadable. DeepSpeed's own `latest` file is not used
for that reason (rank 0 writes it before the other ranks have necessarily finished).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE.json"
_TAG = re.compile(r"^step(\d{8})$")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags with a completeness marker, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(tags)


def read_marker(ckpt_dir: Path, tag: str) -> dict[str, Any]:
    return json.loads((ckpt_dir / tag / MARKER).read_text())


def resolve_resume(resume: str | None, ckpt_dir: Path) -> tuple[Path, str] | None:
    """`auto` → newest complete tag in ckpt_dir (None if there is none); a path → that tag."""
    if not resume:
        return None
    if resume == "auto":
        tags = complete_tags(ckpt_dir)
        return (ckpt_dir, tags[-1]) if tags else None
    path = Path(resume)
    if (path / MARKER).is_file():
        return path.parent, path.name
    if path.is_dir() and complete_tags(path):
        return path, complete_tags(path)[-1]
    if (path / "checkpoints").is_dir() and complete_tags(path / "checkpoints"):
        return path / "checkpoints", complete_tags(path / "checkpoints")[-1]
    raise CheckpointError(
        f"--resume {resume}: no complete checkpoint there (expected a tag folder holding {MARKER}, "
        "a checkpoints folder or a run directory)"
    )


def _rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, client_state: dict[str, Any], marker: dict[str, Any], keep_last: int,
         protect: set[str] = frozenset()) -> str:
    """Save on all ranks; rank 0 marks the tag complete and prunes old ones. Returns the tag."""
    tag = tag_for(engine.global_steps)
    rank = dist.get_rank()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    torch.save(_rng_state(), ckpt_dir / tag / f"rng_rank{rank:04d}.pt")
    dist.barrier()  # every rank's files are on disk before the tag is declared complete
    if rank == 0:
        tmp = ckpt_dir / tag / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=1))
        os.replace(tmp, ckpt_dir / tag / MARKER)
        keep = set(complete_tags(ckpt_dir)[-keep_last:]) | set(protect)
        for old in complete_tags(ckpt_dir):
            if old not in keep:
                shutil.rmtree(ckpt_dir / old, ignore_errors=True)
                shutil.rmtree(ckpt_dir / f"{old}_universal", ignore_errors=True)
    dist.barrier()
    return tag


def restore_rng(ckpt_dir: Path, tag: str, rank: int) -> bool:
    path = ckpt_dir / tag / f"rng_rank{rank:04d}.pt"
    if not path.is_file():
        return False  # another world size: those ranks did not exist; the data cursor still is exact
    _set_rng_state(torch.load(path, weights_only=False))
    return True


def ensure_universal(ckpt_dir: Path, tag: str, zero_stage: int) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0 only; idempotent)."""
    out = ckpt_dir / f"{tag}_universal"
    if (out / tag / MARKER).is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(ckpt_dir / tag), "--output_folder", str(out / tag)]
    if zero_stage < 3:
        cmd.append("--inject_missing_state")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(
            f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    # DeepSpeed's universal loader reads the tag from this file.
    (out / "latest_universal").write_text(tag)
    shutil.copy(ckpt_dir / tag / MARKER, out / tag / MARKER)
    return out
