"""Saving checkpoints: DeepSpeed's files plus each rank's RNG states, checksummed and synced, then the marker;
retention, interrupted saves, RNG restore and the universal format for another world size.

See launcher/checkpoint/marker.py for the layout and launcher/checkpoint/integrity.py for the checksums. A save
never leaves a marker that vouches for files that are not all on disk: the space is checked first, every rank
syncs what it wrote, and only then does rank 0 write COMPLETE.json.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from launcher.checkpoint.integrity import CHECKSUM, check_file, file_record, sizes_match
from launcher.checkpoint.marker import (MARKER, TAG_PATTERN, AllRanksStop, CheckpointError, checkpoint_bytes,
                                        complete_tags, human_bytes, read_marker, tag_for)


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
    tag = tag_for(engine.global_steps)
    _make_room(engine, ckpt_dir, tag)
    _test_pause("save:before_write", engine.global_steps)
    written = _write_deepspeed_files(engine, ckpt_dir, tag, client_state)
    _test_pause("save:before_marker", engine.global_steps)
    gathered = _gather_records(engine, ckpt_dir, tag, written)
    errors: list[str] = []
    if gathered is not None:  # rank 0
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


def remark(ckpt_dir: Path, tag: str, marker: dict[str, Any], keep_last: int, protect: Iterable[str] = (),
           rejected: Iterable[str] = ()) -> str:
    """All ranks: a new marker for a tag this process saved at this very step (no optimizer step since). Returns it.

    An epoch's end follows the interval save of its last step: the engine's tensors and every rank's RNG state are
    still those of that save (validation draws no random numbers and changes no weight); only what the marker holds
    beside them moved on (the sampler at the next epoch, the plateau rule, the best tag). Rewriting the marker alone,
    atomically and with the same file list, spares writing the same files again and the moment in which a save,
    deleting the old tag first, leaves no complete checkpoint of this step (a kill or a full disk there cost the
    steps since the previous checkpoint). A failure leaves the old marker, which still vouches for its files.
    """
    errors: list[str] = []
    if dist.get_rank() == 0:
        try:
            old = read_marker(ckpt_dir, tag)
            _write_json_atomic(ckpt_dir / tag / MARKER, {**marker, "checksum": old["checksum"], "files": old["files"]})
        except (OSError, ValueError, KeyError) as e:
            full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
            errors.append(f"rewriting the marker of checkpoint {tag} in {ckpt_dir} failed"
                          f"{' (the disk or a quota is full)' if full else ''}: {type(e).__name__}: {e}. "
                          f"{_after_failure(ckpt_dir)}")
        else:
            _prune(ckpt_dir, keep_last, set(protect) | {tag}, set(rejected))
    errors = _broadcast(errors)
    if errors:
        raise AllRanksStop(errors[0])
    return tag


def _test_pause(point: str, step: int) -> None:
    if os.environ.get("MF2_TEST_FAULT"):  # the tests' fault injection, never loaded otherwise
        from launcher.testing.faults import pause

        pause(point, step, dist.get_rank())


def _make_room(engine, ckpt_dir: Path, tag: str) -> None:
    """All ranks: stop alike (nothing written) when the disk is short; an old folder of this tag is deleted."""
    problem = None
    if dist.get_rank() == 0:
        problem = _space_problem(ckpt_dir, tag, expected_bytes(engine, ckpt_dir, dist.get_world_size()))
        if problem is None and (ckpt_dir / tag).exists():
            # The old files and marker go first, so that a save interrupted now cannot leave the old marker
            # vouching for a mix of old and new files.
            _delete_tag(ckpt_dir, tag)
    problem = _broadcast(problem)
    if problem:
        raise AllRanksStop(problem)


def _write_deepspeed_files(engine, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> list[Path]:
    """engine.save_checkpoint; the files this rank wrote."""
    written: list[Path] = []
    with _recording_writes(engine, written):
        try:
            engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        except Exception as e:
            if _in_collective(e):
                raise CheckpointError(f"saving checkpoint {tag}: another rank stopped during the save (its message "
                                      f"says why; here: {str(e).strip()[:200]}). {_after_failure(ckpt_dir)}") from e
            raise CheckpointError(_write_failed(engine, ckpt_dir, tag, e)) from e
    return written


def _gather_records(engine, ckpt_dir: Path, tag: str, written: list[Path]) -> list[Any] | None:
    """Each rank writes its RNG file, checksums and syncs its files; rank 0 gets every rank's (records, error)
    (None on the other ranks). Also the point where every rank has finished writing."""
    rank, tag_dir = dist.get_rank(), ckpt_dir / tag
    records, error = [], None
    try:
        rng_path = tag_dir / f"rng_rank{rank:04d}.pt"
        torch.save(_rng_state(), rng_path)
        inside = [p for p in written if os.path.realpath(p).startswith(os.path.realpath(tag_dir) + os.sep)]
        records = [file_record(p, tag_dir, sync=True) for p in [*inside, rng_path]]
    except (OSError, RuntimeError) as e:
        error = _write_failed(engine, ckpt_dir, tag, e)
    gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
    try:
        dist.gather_object((records, error), gathered, dst=0)
    except RuntimeError as e:
        raise CheckpointError(f"saving checkpoint {tag}: another rank stopped during the save ({e}); "
                              f"no marker was written. {_after_failure(ckpt_dir)}") from e
    return gathered


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
        if TAG_PATTERN.match(name) and path.is_dir():
            incomplete = not (path / MARKER).is_file()
        elif name.endswith("_universal") and TAG_PATTERN.match(name[: -len("_universal")]) and path.is_dir():
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


def ensure_universal(ckpt_dir: Path, tag: str, zero_stage: int,
                     deferred: Callable[[], ContextManager] = contextlib.nullcontext) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (rank 0 only; idempotent).

    The converter runs under `deferred` (the preemption's: srun signals every process of the step, and a converter
    killed by a preemption notice would otherwise fail the conversion).

    A conversion that fails for want of disk space says nothing about the checkpoint, which verified: that is an
    AllRanksStop naming the space (the run must stop, not pass over good checkpoints); any other failure is a
    CheckpointError, the checkpoint's own (resume then tries the next one).
    """
    out = ckpt_dir / f"{tag}_universal"
    if _copy_verifies(out, tag):
        return out
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(ckpt_dir / tag), "--output_folder", str(out / tag)]
    if zero_stage < 3:
        cmd.append("--inject_missing_state")
    with deferred():
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(out, ignore_errors=True)  # a partial copy only takes space
        space = _conversion_space_problem(ckpt_dir, tag)
        if space:
            raise AllRanksStop(space)
        if proc.returncode < 0:  # killed (the kernel's OOM killer, an operator): the conversion's fate, not the tag's
            raise AllRanksStop(f"converting {ckpt_dir / tag} to a universal checkpoint (to resume on another world "
                               f"size) was killed by signal {-proc.returncode}; the checkpoint itself verified and is "
                               "intact. Rerun with --resume auto (on a node with more memory if the kernel killed it).")
        raise CheckpointError(
            f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    # DeepSpeed's universal loader reads the tag from this file.
    (out / "latest_universal").write_text(tag)
    # The copy is checkpoint files like any other: its marker lists them with their checksums (synced first, as a
    # save does), so that a copy changed since (bit rot, a torn write) is made again from the intact source instead
    # of being loaded.
    copy = out / tag
    records = [file_record(p, copy, sync=True) for p in sorted(copy.rglob("*")) if p.is_file()]
    _sync_dir(copy)
    _write_json_atomic(copy / MARKER, {**read_marker(ckpt_dir, tag), "checksum": CHECKSUM, "files": records})
    return out


def _copy_verifies(out: Path, tag: str) -> bool:
    """A universal copy made and marked complete, whose files all match their sizes and checksums. (A copy of the
    former layout carries its source's marker, whose files it does not hold: it is made again.)"""
    try:
        files = read_marker(out, tag).get("files")
    except (OSError, ValueError):
        return False
    return bool(files) and all(check_file(out / tag, f) is None for f in files)


def _conversion_space_problem(ckpt_dir: Path, tag: str) -> str | None:
    """Why a conversion could not have succeeded for space, or None: the universal copy takes about the source's size
    (the same tensors, one file per parameter and state)."""
    free = _free_bytes(ckpt_dir)
    with contextlib.suppress(OSError, ValueError):
        needed = checkpoint_bytes(read_marker(ckpt_dir, tag))
        if free is not None and needed and free < needed:
            return (f"converting {ckpt_dir / tag} to a universal checkpoint (to resume on another world size) ran out "
                    f"of space: {human_bytes(free)} free in {ckpt_dir}, the copy needs about {human_bytes(needed)}. "
                    "The checkpoint itself verified and is intact. Free space there, then rerun with --resume auto.")
    return None
