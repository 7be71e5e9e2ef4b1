"""Checking a corpus up front from file headers: every bad line in one report, or skipped and counted.

Nothing is decoded: each audio file is stat'ed and its header opened (soundfile), in a thread pool because on
network file systems this is latency-bound. Headers are cached in SQLite, so a second validation of the same
corpus only stats the files. An entry counts only for the very file it was read from: same path, size,
mtime, inode and ctime. The inode and ctime tell a copy apart from the original (a cache copied to another
machine, or a corpus copied with its mtimes kept) and catch a file rewritten with its mtime restored, since
no one can set a ctime; a cache of an older layout is rebuilt. The cache never fails validation: a folder
that cannot hold it (a read-only corpus) makes it move to the fallback folders given, and any SQLite
error drops it for the rest of the run, with a note in the report.
"""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, NamedTuple, Sequence

import numpy as np
import soundfile as sf

from .audio import describe_error
from .errors import DataError
from .index import PairIndex

KINDS = ("malformed", "missing", "unreadable", "empty", "sample rate", "length mismatch", "no pairs")


class Header(NamedTuple):
    samplerate: int
    frames: int
    channels: int
    error: str | None = None  # reason the file is unusable, or None
    kind: str | None = None


@dataclass(frozen=True)
class Problem:
    """One bad line (or file of a line): ``list:line: path: reason``."""

    list_id: int
    line_no: int
    where: str
    path: str
    reason: str
    kind: str

    def __str__(self) -> str:
        return f"{self.where}: {self.path}: {self.reason}"


@dataclass
class ValidationReport:
    """The outcome of :func:`validate`. ``str(report)`` lists every problem, then a summary line."""

    lists: list[str]
    num_lines: int  # pair lines checked plus malformed lines
    num_bad: int  # bad lines, each counted once however many problems it has
    problems: list[Problem]
    skipped: int = 0  # bad lines left out of the returned index (skip_bad=True)
    num_kept: int = 0
    audio_seconds: float = 0.0  # of the pairs kept (noisy side)
    header_reads: int = 0
    cache_hits: int = 0
    cache_path: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return {k: out[k] for k in KINDS if k in out}

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in self.counts().items())
        lists = ", ".join(self.lists)
        if self.problems:
            head = f"{self.num_bad} bad line(s) of {self.num_lines} ({kinds})"
            head += f"; skipped, {self.num_kept} pairs kept" if self.skipped else ""
        else:
            head = f"all {self.num_lines} lines good"
        cache = f"; header cache {self.cache_path}" if self.cache_path else "; no header cache"
        return (
            f"{lists}: {head}; {self.audio_seconds / 3600:.2f} h of audio; headers: {self.header_reads} read, "
            f"{self.cache_hits} cached{cache}; {self.seconds:.1f} s"
        )

    def __str__(self) -> str:
        lines = [str(p) for p in self.problems]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(self.summary())
        return "\n".join(lines)


# PRAGMA user_version of a cache whose `file_headers` table has this layout; another version is rebuilt. Caches
# of the former layout (a `headers` table keyed on path, size and mtime) are ignored, and left for older code.
_CACHE_LAYOUT = 2
_Identity = tuple[int, int, int, int]  # size, mtime_ns, ctime_ns, inode


class _HeaderCache:
    """SQLite table of a file's identity (path, size, mtime, ctime, inode) -> (samplerate, frames, channels)."""

    _BATCH = 500

    def __init__(self, path: Path) -> None:
        self.path = path
        self.failure: str | None = None
        self.conn = sqlite3.connect(str(path), timeout=120)
        try:
            layout = self.conn.execute("PRAGMA user_version").fetchone()[0]  # a corrupt file raises here
            table = self.conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'file_headers'")
            if layout != _CACHE_LAYOUT or table.fetchone() is None:
                self.conn.executescript(
                    "DROP TABLE IF EXISTS file_headers;"
                    "CREATE TABLE file_headers (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,"
                    " ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, samplerate INTEGER NOT NULL,"
                    " frames INTEGER NOT NULL, channels INTEGER NOT NULL) WITHOUT ROWID;"
                    f"PRAGMA user_version = {_CACHE_LAYOUT};"
                )
            # Writable now, or refused now (a read-only folder or file) rather than half-way through validation.
            self.conn.execute("BEGIN IMMEDIATE")
            self.conn.rollback()
        except sqlite3.Error:
            self.conn.close()
            raise

    def lookup(self, stats: dict[str, _Identity]) -> dict[str, Header]:
        found: dict[str, Header] = {}
        paths = list(stats)
        try:
            for k in range(0, len(paths), self._BATCH):
                batch = paths[k : k + self._BATCH]
                rows = self.conn.execute(
                    "SELECT path, size, mtime_ns, ctime_ns, inode, samplerate, frames, channels FROM file_headers "
                    f"WHERE path IN ({','.join('?' * len(batch))})",
                    batch,
                )
                for path, size, mtime_ns, ctime_ns, inode, rate, frames, channels in rows:
                    if stats[path] == (size, mtime_ns, ctime_ns, inode):
                        found[path] = Header(rate, frames, channels)
        except sqlite3.Error as exc:
            self.failure = f"header cache {self.path} failed ({exc}); validating the rest without it"
            return {}
        return found

    def store(self, rows: list[tuple[str, int, int, int, int, int, int, int]]) -> None:
        if not rows:
            return
        try:
            self.conn.executemany("INSERT OR REPLACE INTO file_headers VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.conn.commit()
        except sqlite3.Error as exc:
            self.failure = f"header cache {self.path} failed ({exc}); validating the rest without it"

    def close(self) -> None:
        self.conn.close()


def _cache_candidates(index: PairIndex, cache_dir, fallback_cache_dirs) -> list[Path]:
    first = index.lists[0]
    if cache_dir is not None:
        wanted = [Path(cache_dir) / "audio_headers.sqlite"]
    else:
        wanted = [Path(first.folder) / f"{Path(first.path).name}.headers.sqlite"]
    # In a shared fallback folder the name must tell lists of the same name apart.
    key = hashlib.sha1(first.path.encode()).hexdigest()[:12]
    wanted += [Path(d) / f"{Path(first.path).name}.{key}.headers.sqlite" for d in fallback_cache_dirs or ()]
    return wanted


def _open_cache(index: PairIndex, cache_dir, fallback_cache_dirs, notes: list[str]) -> _HeaderCache | None:
    failed = []
    for path in _cache_candidates(index, cache_dir, fallback_cache_dirs):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # A cache that can be read but not written would leave every new header unsaved: move on instead.
            if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
                raise OSError(errno.EROFS, "read-only")
            cache = _open_or_rebuild(path)
        except (OSError, sqlite3.Error) as exc:
            failed.append(f"{path} ({exc.strerror if isinstance(exc, OSError) and exc.strerror else exc})")
            continue
        if failed:
            notes.append(f"header cache unusable at {'; '.join(failed)}: using {path}")
        return cache
    tail = "" if fallback_cache_dirs else " (pass a writable cache_dir or fallback folder)"
    notes.append(f"header cache unusable at {'; '.join(failed)}; validating without it{tail}")
    return None


def _open_or_rebuild(path: Path) -> _HeaderCache:
    try:
        return _HeaderCache(path)
    except sqlite3.DatabaseError as exc:
        if "not a database" not in str(exc).lower():
            raise
        path.unlink()  # cut short or overwritten: start it afresh
        return _HeaderCache(path)


def _stat(path: str) -> _Identity | Header:
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return Header(0, 0, 0, "missing: no such file", "missing")
    except OSError as exc:
        return Header(0, 0, 0, f"unreadable: {exc.strerror or exc}", "unreadable")
    if not stat.S_ISREG(st.st_mode):
        return Header(0, 0, 0, "unreadable: not a regular file", "unreadable")
    if st.st_size == 0:
        return Header(0, 0, 0, "empty: file has 0 bytes", "empty")
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _read_header(path: str) -> Header:
    try:
        with sf.SoundFile(path) as f:
            return Header(f.samplerate, f.frames, f.channels)
    except Exception as exc:  # libsndfile reports corrupt/unknown formats as LibsndfileError / RuntimeError
        reason = describe_error(exc, path)
        if reason == "file not found":  # deleted between stat and open
            return Header(0, 0, 0, "missing: no such file", "missing")
        return Header(0, 0, 0, f"unreadable or corrupt: {reason}", "unreadable")


def _parallel(fn: Callable, items: Sequence, pool: ThreadPoolExecutor | None, workers: int) -> list:
    """``[fn(x) for x in items]``, cut into a few slices per thread (a future per item costs more than a stat)."""
    if pool is None or len(items) < 64:
        return [fn(x) for x in items]
    size = max(16, -(-len(items) // (workers * 4)))
    slices = [items[k : k + size] for k in range(0, len(items), size)]
    out: list = []
    for part in pool.map(lambda s: [fn(x) for x in s], slices):
        out.extend(part)
    return out


def _headers(paths: list[str], pool, workers: int, cache: _HeaderCache | None, report: ValidationReport) -> dict[str, Header]:
    stats = dict(zip(paths, _parallel(_stat, paths, pool, workers)))
    result: dict[str, Header] = {p: s for p, s in stats.items() if isinstance(s, Header)}
    good = {p: s for p, s in stats.items() if not isinstance(s, Header)}
    cached = cache.lookup(good) if cache is not None else {}
    result.update(cached)
    report.cache_hits += len(cached)
    todo = [p for p in good if p not in cached]
    read = dict(zip(todo, _parallel(_read_header, todo, pool, workers)))
    report.header_reads += len(todo)
    result.update(read)
    if cache is not None:
        cache.store([(p, *good[p], h.samplerate, h.frames, h.channels) for p, h in read.items() if h.error is None])
    return result


def _check_pair(noisy: str, clean: str, hn: Header, hc: Header, rate: int, resample: bool) -> list[tuple[str, str, str]]:
    """(path, reason, kind) for each problem of one pair."""
    out = []
    for path, h in ((noisy, hn), (clean, hc)):
        if h.error is not None:
            out.append((path, h.error, h.kind))
        elif h.frames <= 0:
            out.append((path, "empty: header has 0 frames", "empty"))
        elif h.samplerate != rate and not resample:
            out.append((path, f"sample rate {h.samplerate} Hz, expected {rate} Hz (convert it, or resample: --resample / resample=True)", "sample rate"))
    if hn.error is None and hc.error is None and hn.frames > 0 and hc.frames > 0:
        if hn.samplerate == hc.samplerate:
            mismatch = hn.frames != hc.frames
        else:  # compare in time, within one sample of the coarser rate
            mismatch = abs(hn.frames / hn.samplerate - hc.frames / hc.samplerate) > 1.0 / min(hn.samplerate, hc.samplerate)
        if mismatch:
            out.append((
                noisy,
                f"length mismatch with clean {clean}: noisy {hn.frames} frames at {hn.samplerate} Hz "
                f"({hn.frames / hn.samplerate:.3f} s), clean {hc.frames} frames at {hc.samplerate} Hz "
                f"({hc.frames / hc.samplerate:.3f} s)",
                "length mismatch",
            ))
    return out


def validate(
    index: PairIndex | Iterable[str | os.PathLike[str]],
    sample_rate_hz: int = 48000,
    resample: bool = False,
    skip_bad: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    num_threads: int | None = None,
    *,
    fallback_cache_dirs: Sequence[str | os.PathLike[str]] = (),
    use_cache: bool = True,
    chunk_pairs: int = 20_000,
) -> tuple[PairIndex, ValidationReport]:
    """Check every pair from its file headers; returns (index of good pairs, report).

    ``index`` is a PairIndex (parse with ``strict=False`` so malformed lines reach the report) or list-file
    paths. Found: malformed lines, missing files, unreadable or corrupt files, empty files, a sample rate other
    than ``sample_rate_hz`` (unless ``resample``), noisy/clean length mismatch (equal frame counts at equal
    rates; within one sample of the coarser rate otherwise), lists without pairs.

    ``skip_bad=False``: any problem raises a DataError whose message is the full report (every problem as
    ``list:line: path: reason``, then counts). ``skip_bad=True``: bad lines are left out of the returned index
    and counted in ``report.skipped``; an index with no pair left is still an error.

    Durations missing from the lists are filled in from the noisy file's header. Headers are cached under
    ``cache_dir`` (``audio_headers.sqlite``) or, by default, next to the first list (``<list>.headers.sqlite``);
    where that cannot be written (a read-only corpus), in the first of ``fallback_cache_dirs`` that can
    (``<list>.<hash of its path>.headers.sqlite``); where none can, validation runs uncached. Either way the
    report's notes say so. ``num_threads``
    defaults to ``min(32, 4 x CPUs)``.
    """
    start = time.perf_counter()
    if not isinstance(index, PairIndex):
        index = PairIndex.from_lists(index, strict=False)  # a single path is accepted too
    report = ValidationReport(lists=[lf.display for lf in index.lists], num_lines=len(index) + len(index.malformed), num_bad=0, problems=[])
    for list_id, line_no, text, reason in index.malformed_details():
        where = f"{index.lists[list_id].display}:{line_no}"
        report.problems.append(Problem(list_id, line_no, where, text, reason, "malformed"))
    report.num_bad = len(report.problems)

    n = len(index)
    bad = np.zeros(n, dtype=bool)
    durations = index.durations.copy()
    workers = num_threads or min(32, 4 * (os.cpu_count() or 1))
    cache = _open_cache(index, cache_dir, fallback_cache_dirs, report.notes) if use_cache else None
    if cache is not None:
        report.cache_path = str(cache.path)
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        for s in range(0, n, chunk_pairs):
            e = min(n, s + chunk_pairs)
            pairs = [index.pair(i) for i in range(s, e)]
            paths = list(dict.fromkeys(p for pair in pairs for p in pair))
            headers = _headers(paths, pool, workers, cache, report)
            if cache is not None and cache.failure:
                report.notes.append(cache.failure)
                cache.close()
                cache = None
            for k, (noisy, clean) in enumerate(pairs):
                i = s + k
                hn = headers[noisy]
                found = _check_pair(noisy, clean, hn, headers[clean], sample_rate_hz, resample)
                if found:
                    bad[i] = True
                    where = index.where(i)
                    list_id, line_no = index.list_id(i), index.line_number(i)
                    report.problems.extend(Problem(list_id, line_no, where, p, r, kind) for p, r, kind in found)
                elif np.isnan(durations[i]):
                    durations[i] = hn.frames / hn.samplerate
    finally:
        if pool is not None:
            pool.shutdown()
        if cache is not None:
            cache.close()

    for list_id, count in enumerate(index.pairs_per_list()):
        if count == 0:
            report.problems.append(Problem(list_id, 0, index.lists[list_id].display, "-", "no pairs in this list", "no pairs"))

    report.problems.sort(key=lambda p: (p.list_id, p.line_no))
    report.num_bad += int(bad.sum())
    kept = index.with_durations(durations).subset(~bad)
    report.num_kept = len(kept)
    report.audio_seconds = float(np.nansum(kept.durations, dtype=np.float64))
    report.skipped = report.num_bad if skip_bad else 0
    report.seconds = time.perf_counter() - start
    if report.problems and not skip_bad:
        empty = report.counts().get("no pairs", 0)
        heading = f"{report.num_bad} bad line(s)" + (f" and {empty} list(s) without pairs" if empty else "")
        raise DataError(f"{heading} in the data lists (pass skip_bad to skip bad lines):\n{report}")
    if len(kept) == 0:
        raise DataError(f"no usable pairs in {', '.join(report.lists)}:\n{report}")
    return kept, report
