"""Checkpoints: DeepSpeed's own files plus a completeness marker that lists and checksums them; resume.

Layout under `RUN_DIR/checkpoints/`:
    step00000120/                 one DeepSpeed tag (engine.save_checkpoint on all ranks)
        rng_rank0000.pt ...       each rank's RNG states (dropout and dither must continue exactly)
        COMPLETE.json             written by rank 0 once every rank has written, checksummed and synced
                                  its files: it lists every file of the tag with its size and CRC-32
    step00000120_universal/       made on demand when resuming on another world size (ZeRO ≥ 1)

A tag without COMPLETE.json is an interrupted save (a kill, a full disk): it never counts and is
removed on the next start. DeepSpeed's own `latest` file is not used (rank 0 writes it before the
other ranks have necessarily finished). A tag whose files no longer match its marker (a bad disk, an
interrupted copy) does not verify: `--resume auto` then falls back to the next newest that does.

The checksum is zlib's CRC-32, the fastest in Python's standard library here (6 GB/s in 16 MiB chunks
against 1.2 for SHA-1, 0.7 for BLAKE2b; BENCHMARKS.md §8): it exists to catch truncation, bit rot and
torn copies, not tampering, and CRC-32 detects every burst error up to 32 bits. Each rank checksums
the files it wrote itself, right after writing them (they are still in its page cache), and syncs them
to disk before the marker is written, so a marker never outlives the data it vouches for. On resume
the ranks verify a share of the files each.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import os
import random
import re
import shutil
import subprocess
import sys
import traceback
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

MARKER = "COMPLETE.json"
CHECKSUM = "crc32"
_TAG = re.compile(r"^step(\d{8})$")
_CHUNK_BYTES = 16 << 20


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
    tags = [p.name for p in ckpt_dir.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
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
    hint = " (it holds no COMPLETE.json: an interrupted save?)" if _TAG.match(path.name) and path.is_dir() else ""
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


# ---- files, sizes and checksums --------------------------------------------------------------------

def file_record(path: Path, root: Path, sync: bool = False) -> dict[str, Any]:
    """{"path" (relative to root), "bytes", "crc32"} of one file; with sync, also flushed to disk."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)  # zlib releases the GIL: ranks' other threads keep running
            size += n
        if sync:
            os.fsync(f.fileno())
    return {"path": os.path.relpath(os.path.realpath(path), os.path.realpath(root)), "bytes": size,
            CHECKSUM: f"{crc:08x}"}


def check_file(root: Path, record: dict[str, Any], checksum: bool = True) -> str | None:
    """None if the file matches its record, else what is wrong (naming the file)."""
    path = root / record["path"]
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return f"{path}: missing"
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    if size != record["bytes"]:
        return f"{path}: {size} bytes, the marker records {record['bytes']} (truncated or overwritten)"
    if not checksum:
        return None
    try:
        found = file_record(path, root)[CHECKSUM]
    except OSError as e:
        return f"{path}: unreadable ({e.strerror or e})"
    if found != record[CHECKSUM]:
        return f"{path}: {CHECKSUM} {found}, the marker records {record[CHECKSUM]} (the file's content changed)"
    return None


def checkpoint_bytes(marker: dict[str, Any]) -> int | None:
    files = marker.get("files")
    return sum(f["bytes"] for f in files) if files else None


def share(records: list[dict[str, Any]], rank: int, world: int) -> list[dict[str, Any]]:
    """This rank's part of the files: largest first, each to the least-loaded rank, so verifying them is spread."""
    load = [(0, r) for r in range(world)]
    mine = []
    for record in sorted(records, key=lambda r: (-r["bytes"], r["path"])):
        total, owner = heapq.heappop(load)
        heapq.heappush(load, (total + record["bytes"], owner))
        if owner == rank:
            mine.append(record)
    return mine


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


def sizes_match(ckpt_dir: Path, tag: str) -> bool:
    """Cheap (no file is read): the marker parses and every file it lists has its recorded size."""
    try:
        files = read_marker(ckpt_dir, tag).get("files") or []
    except (OSError, ValueError):
        return False
    return all(check_file(ckpt_dir / tag, f, checksum=False) is None for f in files)


# ---- space ------------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def expected_bytes(engine, ckpt_dir: Path, world_size: int) -> tuple[int, str]:
    """(bytes the next checkpoint will take, where that number comes from).

    The newest complete checkpoint of the same world size and ZeRO stage has the same files; without one,
    an estimate from the parameter count: the module's weights in the model's dtype, Adam's two fp32
    moments and, where DeepSpeed keeps one (ZeRO ≥ 1, bf16/fp16), the fp32 master copy.
    """
    stage = engine.zero_optimization_stage()
    for tag in reversed(complete_tags(ckpt_dir)):
        with contextlib.suppress(OSError, ValueError):
            marker = read_marker(ckpt_dir, tag)
            size = checkpoint_bytes(marker)
            if size and marker.get("world_size") == world_size and marker.get("zero_stage") == stage:
                return size, f"the size of {tag}"
    params = [p for p in engine.module.parameters()]
    numel = sum(getattr(p, "ds_numel", p.numel()) for p in params)
    weight_bytes = params[0].element_size() if params else 4
    master = 4 if engine.optimizer is not engine.basic_optimizer else 0
    return numel * (weight_bytes + 8 + master), "estimated from the parameter count"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) if folder.is_dir() else 0


def _space_problem(ckpt_dir: Path, tag: str, needed: tuple[int, str]) -> str | None:
    free = _free_bytes(ckpt_dir)
    # An old folder of the same tag (a run resumed from an older checkpoint saves this step again) is replaced.
    reclaimable = _folder_bytes(ckpt_dir / tag)
    if free is None or free + reclaimable >= needed[0]:
        return None
    return (f"not enough space for checkpoint {tag} in {ckpt_dir}: {human_bytes(free)} free, it needs about "
            f"{human_bytes(needed[0])} ({needed[1]}); nothing was written. {_after_failure(ckpt_dir)}")


def _after_failure(ckpt_dir: Path) -> str:
    tags = complete_tags(ckpt_dir)
    kept = (f"the newest complete checkpoint, {ckpt_dir / tags[-1]}, is intact" if tags
            else "no complete checkpoint exists yet")
    return (f"Stopping: {kept}. Free space there (or lower train.keep_last), then rerun with --resume auto; an "
            "interrupted tag is removed on the next start.")


def _write_failed(engine, ckpt_dir: Path, tag: str, error: BaseException) -> str:
    needed = expected_bytes(engine, ckpt_dir, dist.get_world_size())
    free = _free_bytes(ckpt_dir)
    # torch.save reports a full disk as "unexpected pos" or "file write failed", without an errno.
    full = (isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)) or \
        (free is not None and free < max(needed[0] // 100, 64 << 20))
    what = "the disk or a quota is full" if full else "a write failed"
    space = f"{human_bytes(free)} free" if free is not None else "free space unknown"
    return (f"saving checkpoint {tag} into {ckpt_dir} failed on rank {dist.get_rank()} ({what}): "
            f"{type(error).__name__}: {str(error).strip()[:300]}; {ckpt_dir} has {space}, a checkpoint needs about "
            f"{human_bytes(needed[0])} ({needed[1]}). {_after_failure(ckpt_dir)}")


# ---- save -------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _recording_writes(engine, written: list[Path]) -> Iterator[None]:
    """Record every file DeepSpeed's checkpoint engine writes in this process."""
    ce = engine.checkpoint_engine
    own = "save" in vars(ce)
    original = ce.save

    def save(state_dict, path):
        original(state_dict, path)
        written.append(Path(path))

    ce.save = save
    try:
        yield
    finally:
        if own:
            ce.save = original
        else:
            del ce.save


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _sync_dir(path.parent)


def _sync_dir(folder: Path) -> None:
    # The rename is durable only once its folder is synced; not every file system can open a folder.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _broadcast(value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save(engine, ckpt_dir: Path, client_state: dict[str, Any], marker: dict[str, Any], keep_last: int,
         protect: Iterable[str] = (), rejected: Iterable[str] = ()) -> str:
    """Save on all ranks; rank 0 marks the tag complete and prunes old ones. Returns the tag.

    Every rank stops alike with a CheckpointError when the disk is short before the save (nothing is
    written) or when a rank's write failed after DeepSpeed returned; a rank whose write fails inside
    DeepSpeed's save raises at once (the others may be inside DeepSpeed's collectives) and the job ends.
    Either way no marker is written, so the previous complete checkpoint stays the newest.
    """
    from launcher.faults import test_pause

    tag = tag_for(engine.global_steps)
    rank, world = dist.get_rank(), dist.get_world_size()
    problem = None
    if rank == 0:
        problem = _space_problem(ckpt_dir, tag, expected_bytes(engine, ckpt_dir, world))
        if problem is None and (ckpt_dir / tag).exists():
            # The old files and marker go first, so that a save interrupted now cannot leave the old marker
            # vouching for a mix of old and new files.
            _delete_tag(ckpt_dir, tag)
    problem = _broadcast(problem)
    if problem:
        raise AllRanksStop(problem)
    test_pause("save:before_write", engine.global_steps, rank)
    written: list[Path] = []
    with _recording_writes(engine, written):
        try:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:
            if _in_collective(e):
                raise CheckpointError(f"saving checkpoint {tag}: another rank stopped during the save (its message "
                                      f"says why; here: {str(e).strip()[:200]}). {_after_failure(ckpt_dir)}") from e
            raise CheckpointError(_write_failed(engine, ckpt_dir, tag, e)) from e
    test_pause("save:before_marker", engine.global_steps, rank)
    tag_dir = ckpt_dir / tag
    records, error = [], None
    try:
        rng_path = tag_dir / f"rng_rank{rank:04d}.pt"
        torch.save(_rng_state(), rng_path)
        inside = [p for p in written if os.path.realpath(p).startswith(os.path.realpath(tag_dir) + os.sep)]
        records = [file_record(p, tag_dir, sync=True) for p in [*inside, rng_path]]
    except (OSError, RuntimeError) as e:
        error = _write_failed(engine, ckpt_dir, tag, e)
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    try:
        # Also the point where every rank has finished writing.
        dist.gather_object((records, error), gathered, dst=0)
    except RuntimeError as e:
        raise CheckpointError(f"saving checkpoint {tag}: another rank stopped during the save ({e}); "
                              f"no marker was written. {_after_failure(ckpt_dir)}") from e
    errors: list[str] = []
    if rank == 0:
        errors = [err for _, err in gathered if err]
        if not errors:
            try:
                _mark_complete(ckpt_dir, tag, [r for recs, _ in gathered for r in recs], marker)
            except OSError as e:
                errors.append(_write_failed(engine, ckpt_dir, tag, e))
            else:
                _prune(ckpt_dir, keep_last, set(protect) | {tag}, set(rejected))
    errors = _broadcast(errors)
    if errors:
        raise AllRanksStop(errors[0])
    return tag


def _in_collective(error: BaseException) -> bool:
    """Whether the error came out of a torch.distributed call (a peer died) rather than this rank's own write."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and f"{os.sep}distributed{os.sep}" in frames[-1].filename


def _mark_complete(ckpt_dir: Path, tag: str, records: list[dict[str, Any]], marker: dict[str, Any]) -> None:
    tag_dir = ckpt_dir / tag
    listed = {r["path"] for r in records}
    # Whatever DeepSpeed wrote outside its checkpoint engine's save() is covered too.
    for path in sorted(p for p in tag_dir.rglob("*") if p.is_file()):
        if str(path.relative_to(tag_dir)) not in listed:
            records.append(file_record(path, tag_dir, sync=True))
    _sync_dir(tag_dir)
    _write_json_atomic(tag_dir / MARKER, {**marker, "checksum": CHECKSUM,
                                          "files": sorted(records, key=lambda r: r["path"])})


def _prune(ckpt_dir: Path, keep_last: int, keep: set[str], rejected: set[str]) -> None:
    """Keep the newest keep_last checkpoints that verify (by size: no file is read) and `keep`; delete the rest.

    Tags that failed verification at resume (`rejected`) count for nothing and go, so a run never deletes
    its last good checkpoint to make room for bad ones.
    """
    tags = complete_tags(ckpt_dir)
    good = [t for t in tags if t in keep or (t not in rejected and sizes_match(ckpt_dir, t))]
    keep = keep | set(good[-keep_last:])
    for old in tags:
        if old not in keep:
            _delete_tag(ckpt_dir, old)


def _delete_tag(ckpt_dir: Path, tag: str) -> None:
    # The marker first: a deletion cut short by a kill leaves an incomplete tag, never a complete-looking one.
    (ckpt_dir / tag / MARKER).unlink(missing_ok=True)
    shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)


def remove_incomplete(ckpt_dir: Path) -> list[tuple[str, int]]:
    """Rank 0 at start: delete interrupted saves (tags without a marker). Returns [(name, bytes freed)]."""
    removed = []
    if not ckpt_dir.is_dir():
        return removed
    for path in sorted(ckpt_dir.iterdir()):
        name = path.name
        if _TAG.match(name) and path.is_dir():
            incomplete = not (path / MARKER).is_file()
        elif name.endswith("_universal") and _TAG.match(name[: -len("_universal")]) and path.is_dir():
            incomplete = not (path / name[: -len("_universal")] / MARKER).is_file()
        else:
            continue
        if incomplete:
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            shutil.rmtree(path, ignore_errors=True)
            removed.append((name, size))
    return removed


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
