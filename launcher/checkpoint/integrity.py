"""File records of a checkpoint: size and CRC-32 of every file, and their checks. Torch-free.

The checksum is zlib's CRC-32, the fastest in Python's standard library here (6 GB/s in 16 MiB chunks
against 1.2 for SHA-1, 0.7 for BLAKE2b; BENCHMARKS.md §8): it exists to catch truncation, bit rot and
torn copies, not tampering, and CRC-32 detects every burst error up to 32 bits. Each rank checksums
the files it wrote itself, right after writing them (they are still in its page cache), and syncs them
to disk before the marker is written, so a marker never outlives the data it vouches for. On resume
the ranks verify a share of the files each (launcher/checkpoint/resume.py).
"""

from __future__ import annotations

import heapq
import os
import zlib
from pathlib import Path
from typing import Any

from launcher.checkpoint.marker import read_marker

CHECKSUM = "crc32"
_CHUNK_BYTES = 16 << 20


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


def sizes_match(ckpt_dir: Path, tag: str) -> bool:
    """Cheap (no file is read): the marker parses and every file it lists has its recorded size."""
    try:
        files = read_marker(ckpt_dir, tag).get("files") or []
    except (OSError, ValueError):
        return False
    return all(check_file(ckpt_dir / tag, f, checksum=False) is None for f in files)
