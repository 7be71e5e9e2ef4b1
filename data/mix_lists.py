"""The lists dynamic mixing reads (clean speech, noise, room impulse responses): parsing, checking before
training, digests for resume, and the corpus summary for the plan card.

Checking works like :func:`data.validate` for pair lists: every bad line of every list in one report,
``list:line: path: reason``, before any process group starts, or skipped and counted with ``skip_bad``.
Headers go through the same SQLite header cache. Noise and impulse-response files are also decoded once
(whole files, in blocks) to find silent noise and impulse responses without energy; those levels are
cached in the same SQLite file, keyed on the file's identity like the headers, so a second check of the
same corpus only stats the files.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import soundfile as sf

from .audio import describe_error
from .errors import DataError
from .index import FileIndex, PairIndex
from .mixing_config import MixingConfig
from .validation import Header, Problem, _headers, _open_cache, _parallel, _stat

ROLES = ("clean", "noise", "rir")
# An impulse response whose largest tap is below this has no usable energy (a 16-bit file's smallest step
# is -90 dBFS; measured responses peak far above it).
RIR_MIN_PEAK_DBFS = -100.0
_BLOCK_FRAMES = 1 << 18


@dataclass(frozen=True)
class MixingCorpus:
    """The parsed (and, after :func:`validate_mixing`, checked) lists of one split.

    ``clean`` joins ``clean_lists`` and the clean column of ``clean_pair_lists`` (in that order);
    ``noises`` holds one index per noise list, in the order of ``MixingConfig.noise_lists`` (their weights);
    ``rirs`` is None without impulse responses. Durations are NaN where neither the list nor a check gave one.
    """

    clean: tuple[FileIndex, ...]
    noises: tuple[FileIndex, ...]
    rirs: FileIndex | None

    @property
    def num_clean(self) -> int:
        return sum(len(c) for c in self.clean)

    def stats(self) -> "CorpusStats":
        def seconds(index: FileIndex) -> float:
            return float(np.sum(index.durations, dtype=np.float64))  # NaN when any is unknown

        return CorpusStats(
            clean_files=self.num_clean,
            clean_seconds=sum(seconds(c) for c in self.clean),
            noise_files=tuple(len(n) for n in self.noises),
            noise_seconds=tuple(seconds(n) for n in self.noises),
            rir_files=len(self.rirs) if self.rirs is not None else 0,
        )


def load_mixing_lists(config: MixingConfig, split: str = "train", *, strict: bool = True) -> MixingCorpus:
    """Parse the lists of ``split`` without opening any audio file (the dry run's count of mixtures).

    ``strict`` as in :meth:`data.PairIndex.from_lists`: a malformed line raises a DataError naming it.
    """
    lists = config.lists(split)
    if not (lists["clean"] or lists["clean_pairs"]):
        raise DataError(f"mixing: no clean lists for {split}")
    clean = []
    if lists["clean"]:
        clean.append(FileIndex.from_lists(lists["clean"], strict=strict))
    if lists["clean_pairs"]:
        clean.append(FileIndex.from_pair_lists(lists["clean_pairs"], strict=strict))
    noises = tuple(FileIndex.from_lists([p], strict=strict) for p in lists["noise"])
    rirs = FileIndex.from_lists(lists["rir"], strict=strict) if lists["rir"] else None
    return MixingCorpus(tuple(clean), noises, rirs)


class Levels(NamedTuple):
    """What decoding a whole noise or impulse-response file found (first channel, file's own rate)."""

    rms_dbfs: float
    peak_dbfs: float
    finite: bool
    direct_index: int  # the largest tap's position (an impulse response's direct path)
    error: str | None = None


@dataclass
class MixingReport:
    """The outcome of :func:`validate_mixing`; ``str(report)`` lists every problem, then a summary line."""

    split: str
    problems: list[Problem] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # per role: entry lines checked + malformed lines
    bad: dict[str, int] = field(default_factory=dict)  # per role: bad lines (each once)
    kept: dict[str, int] = field(default_factory=dict)
    seconds_kept: dict[str, float] = field(default_factory=dict)
    skipped: int = 0
    header_reads: int = 0
    cache_hits: int = 0
    level_reads: int = 0
    level_hits: int = 0
    cache_path: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def num_bad(self) -> int:
        return sum(self.bad.values())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.problems:
            out[p.kind] = out.get(p.kind, 0) + 1
        return out

    def summary(self) -> str:
        parts = []
        for role in ROLES:
            if role in self.lines:
                hours = self.seconds_kept.get(role, 0.0) / 3600
                parts.append(f"{role} {self.kept.get(role, 0)} of {self.lines[role]} good ({hours:.2f} h)")
        head = f"mixing lists ({self.split}): " + ", ".join(parts)
        if self.problems:
            kinds = ", ".join(f"{n} {k}" for k, n in self.counts().items())
            head += f"; {self.num_bad} bad line(s) ({kinds})" + ("; skipped" if self.skipped else "")
        cache = f"; cache {self.cache_path}" if self.cache_path else "; no cache"
        return (f"{head}; headers: {self.header_reads} read, {self.cache_hits} cached; levels: {self.level_reads} "
                f"decoded, {self.level_hits} cached{cache}; {self.seconds:.1f} s")

    def __str__(self) -> str:
        return "\n".join([str(p) for p in self.problems] + [f"note: {n}" for n in self.notes] + [self.summary()])


def validate_mixing(
    config: MixingConfig,
    split: str = "train",
    sample_rate_hz: int = 48000,
    resample: bool = False,
    skip_bad: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    num_threads: int | None = None,
    *,
    fallback_cache_dirs: Sequence[str | os.PathLike[str]] = (),
    use_cache: bool = True,
) -> tuple[MixingCorpus, MixingReport]:
    """Check every line of the mixing lists of ``split``; returns (corpus of the good entries, report).

    Found, per line: malformed lines, missing, unreadable or corrupt files, empty files (0 bytes or 0 frames),
    a sample rate other than ``sample_rate_hz`` (unless ``resample``: then the file is resampled when read),
    a noise file whose RMS is below ``config.silence_dbfs`` ("silent noise"), an impulse response whose
    largest tap is below -100 dBFS ("rir without energy"), non-finite samples (float files) in noise or
    impulse responses. Per list: a list with no usable line, after skipping ("no entries") — an error even
    with ``skip_bad``, since its weight (or its files) could not be honoured.

    ``skip_bad=False``: any problem raises a DataError whose message is the whole report.
    ``skip_bad=True``: bad lines are left out and counted in ``report.skipped``. Durations missing from the
    lists are filled in from the headers. Cache placement as in :func:`data.validate`.
    """
    start = time.perf_counter()
    corpus = load_mixing_lists(config, split, strict=False)
    report = MixingReport(split)
    roles: list[tuple[str, FileIndex]] = [("clean", c) for c in corpus.clean]
    roles += [("noise", n) for n in corpus.noises]
    if corpus.rirs is not None:
        roles.append(("rir", corpus.rirs))
    workers = num_threads or min(32, 4 * (os.cpu_count() or 1))
    cache = _open_cache(corpus.clean[0], cache_dir, fallback_cache_dirs, report.notes) if use_cache else None
    levels_cache = None
    if cache is not None:
        report.cache_path = str(cache.path)
        try:
            levels_cache = _LevelCache(str(cache.path))
        except sqlite3.Error as exc:
            report.notes.append(f"level cache in {cache.path} unusable ({exc}); decoding noise and RIR files uncached")
    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    kept: list[FileIndex] = []
    try:
        for role, index in roles:
            kept.append(_check_index(role, index, config, sample_rate_hz, resample, pool, workers, cache, levels_cache, report))
            if cache is not None and cache.failure:
                report.notes.append(cache.failure)
                cache.close()
                cache = None
    finally:
        if pool is not None:
            pool.shutdown()
        if cache is not None:
            cache.close()
        if levels_cache is not None:
            levels_cache.close()
    n_clean, n_noise = len(corpus.clean), len(corpus.noises)
    result = MixingCorpus(tuple(kept[:n_clean]), tuple(kept[n_clean:n_clean + n_noise]),
                          kept[n_clean + n_noise] if corpus.rirs is not None else None)
    report.skipped = report.num_bad if skip_bad else 0
    report.seconds = time.perf_counter() - start
    empty = [p for p in report.problems if p.kind == "no entries"]
    if report.problems and (not skip_bad or empty):
        why = "a list with no usable line cannot be mixed from" if skip_bad else "pass skip_bad to skip bad lines"
        raise DataError(f"{report.num_bad} bad line(s) and {len(empty)} empty list(s) in the mixing lists "
                        f"({why}):\n{report}")
    return result, report


def _check_index(role, index: FileIndex, config, rate, resample, pool, workers, cache, levels_cache, report,
                 chunk: int = 20_000) -> FileIndex:
    problems: list[Problem] = []
    for list_id, line_no, text, reason in index.malformed_details():
        problems.append(Problem(list_id, line_no, f"{index.lists[list_id].display}:{line_no}", text, reason, "malformed"))
    bad = np.zeros(len(index), dtype=bool)
    durations = index.durations.copy()
    # In chunks, as data.validate does: paths of millions of lines are never all held at once.
    for s in range(0, len(index), chunk):
        e = min(len(index), s + chunk)
        paths = [index.path(i) for i in range(s, e)]
        unique = list(dict.fromkeys(paths))
        headers = _headers(unique, pool, workers, cache, report)
        found = {path: _header_problem(headers[path], rate, resample) for path in unique}
        if role in ("noise", "rir"):
            todo = [p for p in unique if found[p] is None]
            levels = _levels(todo, pool, workers, levels_cache, report)
            for path in todo:
                found[path] = _level_problem(role, levels[path], config)
        for k, path in enumerate(paths):
            i = s + k
            problem = found[path]
            if problem is not None:
                bad[i] = True
                problems.append(Problem(index.list_id(i), index.line_number(i), index.where(i), path, *problem))
            elif np.isnan(durations[i]):
                h = headers[path]
                durations[i] = h.frames / h.samplerate
    kept = index.with_durations(durations).subset(~bad)
    for list_id, count in enumerate(kept.entries_per_list()):
        if count == 0:
            problems.append(Problem(list_id, 0, index.lists[list_id].display, "-",
                                    f"no usable {role} file in this list", "no entries"))
    problems.sort(key=lambda p: (p.list_id, p.line_no))
    report.problems.extend(problems)
    report.lines[role] = report.lines.get(role, 0) + len(index) + len(index.malformed)
    report.bad[role] = report.bad.get(role, 0) + int(bad.sum()) + len(index.malformed)
    report.kept[role] = report.kept.get(role, 0) + len(kept)
    report.seconds_kept[role] = report.seconds_kept.get(role, 0.0) + float(np.nansum(kept.durations, dtype=np.float64))
    return kept


def _header_problem(h: Header, rate: int, resample: bool) -> tuple[str, str] | None:
    if h.error is not None:
        return h.error, h.kind or "unreadable"
    if h.frames <= 0:
        return "empty: header has 0 frames", "empty"
    if h.samplerate != rate and not resample:
        return (f"sample rate {h.samplerate} Hz, expected {rate} Hz (convert it, or resample: data.resample=true)",
                "sample rate")
    return None


def _level_problem(role: str, lv: Levels, config: MixingConfig) -> tuple[str, str] | None:
    if lv.error is not None:
        return f"unreadable or corrupt: {lv.error}", "unreadable"
    if not lv.finite:
        return "non-finite samples (NaN or Inf) in the file", "non-finite"
    if role == "noise" and lv.rms_dbfs < config.silence_dbfs:
        return (f"silent: RMS {_db(lv.rms_dbfs)} over the whole file, below mixing.silence_dbfs "
                f"{config.silence_dbfs:g}", "silent noise")
    if role == "rir" and lv.peak_dbfs < RIR_MIN_PEAK_DBFS:
        return f"no energy: largest tap {_db(lv.peak_dbfs)} (below {RIR_MIN_PEAK_DBFS:g} dBFS)", "rir without energy"
    return None


def _db(value: float) -> str:
    return "-inf dBFS (all zero)" if value == -math.inf else f"{value:.1f} dBFS"


def read_levels(path: str) -> Levels:
    """Decode the whole file in blocks (first channel): RMS, peak, finiteness and the largest tap's index."""
    try:
        with sf.SoundFile(path) as f:
            energy, peak, peak_at, finite, seen = 0.0, 0.0, 0, True, 0
            while True:
                x = f.read(_BLOCK_FRAMES, dtype="float32", always_2d=True)[:, 0]
                if x.size == 0:
                    break
                if not np.isfinite(x).all():
                    finite = False
                    x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
                a = np.abs(x)
                k = int(a.argmax())
                if a[k] > peak:
                    peak, peak_at = float(a[k]), seen + k
                x64 = x.astype(np.float64)
                energy += float(np.dot(x64, x64))
                seen += x.size
    except Exception as exc:  # libsndfile's errors name no path: describe_error gives the reason
        return Levels(-math.inf, -math.inf, True, 0, describe_error(exc, path))
    rms = 10 * math.log10(energy / seen) if seen and energy > 0 else -math.inf
    return Levels(rms, 20 * math.log10(peak) if peak > 0 else -math.inf, finite, peak_at)


def _levels(paths: list[str], pool, workers: int, cache: "_LevelCache | None", report: MixingReport) -> dict[str, Levels]:
    stats = dict(zip(paths, _parallel(_stat, paths, pool, workers)))
    ids = {p: s for p, s in stats.items() if not isinstance(s, Header)}
    found = cache.lookup(ids) if cache is not None else {}
    report.level_hits += len(found)
    todo = [p for p in paths if p not in found]
    read = dict(zip(todo, _parallel(read_levels, todo, pool, workers)))
    report.level_reads += len(todo)
    if cache is not None:
        cache.store([(p, *ids[p], *lv[:4]) for p, lv in read.items() if lv.error is None and p in ids])
        if cache.failure:
            report.notes.append(cache.failure)
    return {**found, **read}


class _LevelCache:
    """SQLite table next to the header cache: file identity -> Levels (decoding noise files is the slow part)."""

    _TABLE = "file_levels_v1"  # a new layout gets a new name; an old table is left alone

    def __init__(self, path: str) -> None:
        self.path = path
        self.failure: str | None = None
        self.conn = sqlite3.connect(path, timeout=120)
        try:
            self.conn.execute(
                f"CREATE TABLE IF NOT EXISTS {self._TABLE} (path TEXT PRIMARY KEY, size INTEGER NOT NULL,"
                " mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, inode INTEGER NOT NULL, rms_dbfs REAL NOT NULL,"
                " peak_dbfs REAL NOT NULL, finite INTEGER NOT NULL, direct_index INTEGER NOT NULL) WITHOUT ROWID"
            )
            self.conn.commit()
        except sqlite3.Error:
            self.conn.close()
            raise

    def lookup(self, ids: dict[str, tuple[int, int, int, int]]) -> dict[str, Levels]:
        found: dict[str, Levels] = {}
        paths = list(ids)
        try:
            for k in range(0, len(paths), 500):
                batch = paths[k : k + 500]
                rows = self.conn.execute(
                    f"SELECT path, size, mtime_ns, ctime_ns, inode, rms_dbfs, peak_dbfs, finite, direct_index FROM {self._TABLE} "
                    f"WHERE path IN ({','.join('?' * len(batch))})", batch)
                for path, size, mtime_ns, ctime_ns, inode, rms, peak, finite, direct in rows:
                    if ids[path] == (size, mtime_ns, ctime_ns, inode):
                        found[path] = Levels(_from_sql(rms), _from_sql(peak), bool(finite), int(direct))
        except sqlite3.Error as exc:
            self.failure = f"level cache {self.path} failed ({exc}); decoding without it"
            return {}
        return found

    def store(self, rows: list[tuple]) -> None:
        if not rows or self.failure:
            return
        rows = [(*r[:5], _to_sql(r[5]), _to_sql(r[6]), int(r[7]), int(r[8])) for r in rows]
        try:
            self.conn.executemany(f"INSERT OR REPLACE INTO {self._TABLE} VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            self.conn.commit()
        except sqlite3.Error as exc:
            self.failure = f"level cache {self.path} failed ({exc}); decoding without it"

    def close(self) -> None:
        self.conn.close()


def _to_sql(x: float) -> float:
    return -1e300 if x == -math.inf else x  # SQLite REAL holds -inf, but not every driver returns it as such


def _from_sql(x: float) -> float:
    return -math.inf if x <= -1e299 else x


def list_digests(corpus: MixingCorpus) -> list[dict[str, Any]]:
    """One record per list file: role, path as given, SHA-256 of its bytes, entries kept and which ones.

    ``kept_sha256`` hashes the (list, line) numbers of the entries in use, so the same list read with another
    set of lines skipped (a file went missing) differs too. Audio contents are not hashed (that would read
    the corpus); relative paths keep the digest when a corpus folder moves with its lists.
    """
    out = []
    groups = [("clean", c) for c in corpus.clean] + [("noise", n) for n in corpus.noises]
    if corpus.rirs is not None:
        groups.append(("rir", corpus.rirs))
    for role, index in groups:
        out += index_digests(role if index.column == 0 else "clean (pair lists)", index)
    return out


def index_digests(role: str, index: FileIndex | PairIndex) -> list[dict[str, Any]]:
    """The records of :func:`list_digests` for the lists of one index (a FileIndex, or the PairIndex of the
    pre-mixed pairs a mixing recipe also trains on), each under ``role``."""
    out = []
    per_list = index.entries_per_list()
    for list_id, lf in enumerate(index.lists):
        h = hashlib.sha256()
        with open(lf.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        lines = np.ascontiguousarray(index.line_numbers[index.list_ids == list_id], dtype="<i8")
        out.append({"role": role, "list": lf.display, "sha256": h.hexdigest(), "entries": int(per_list[list_id]),
                    "kept_sha256": hashlib.sha256(lines.tobytes()).hexdigest()})
    return out


def mixing_record(config: MixingConfig, digests: list[dict[str, Any]], *, seed: int, sample_rate_hz: int,
                  segment_seconds: float) -> dict[str, Any]:
    """What a run directory and ``metrics.jsonl`` keep about its mixing, and what a resume compares.

    Pure: the settings that change training mixtures (with the seed, rate and segment length; list paths are
    not settings here, their contents are), the list digests of :func:`list_digests`, and one ``digest``
    over both.
    """
    settings = {**config.training_settings(), "seed": seed, "sample_rate_hz": sample_rate_hz,
                "segment_seconds": float(segment_seconds)}
    # The paths as typed stay out of the digest: a list reached by another path is the same list.
    contents = [[r["role"], r["sha256"], r["kept_sha256"]] for r in digests]
    digest = hashlib.sha256(json.dumps({"settings": settings, "lists": contents}, sort_keys=True).encode()).hexdigest()
    return {"settings": settings, "lists": digests, "digest": digest}


def compare_records(saved: dict[str, Any], current: dict[str, Any], *, kept: bool = True) -> list[str]:
    """What differs between a checkpoint's mixing record and this run's, one line each; [] when the same.

    Pure. The trainer refuses a resume when this is not empty, unless ``mixing.allow_changed_lists``.
    ``kept=False`` leaves out which lines are in use (``kept_sha256``): for a record made from lists parsed but
    not yet checked with ``skip_bad``, where the lines that checking will skip are not known yet.
    """
    if kept and saved.get("digest") == current.get("digest"):
        return []
    out = []
    a, b = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            out.append(f"setting {key}: {a.get(key, '(absent)')!r} in the checkpoint, {b.get(key, '(absent)')!r} now")
    # Lists are compared by role and position (their order sets the index space and the noise weights), not by
    # the path as typed: the same list reached through another path, or a corpus moved with it, is the same.
    def by_role(records):
        out: dict[str, list] = {}
        for r in records:
            out.setdefault(r["role"], []).append(r)
        return out

    ra, rb = by_role(saved.get("lists", [])), by_role(current.get("lists", []))
    for role in sorted(set(ra) | set(rb)):
        la, lb = ra.get(role, []), rb.get(role, [])
        if len(la) != len(lb):
            out.append(f"{role} lists: {len(la)} in the checkpoint ({', '.join(r['list'] for r in la) or 'none'}), "
                       f"{len(lb)} now ({', '.join(r['list'] for r in lb) or 'none'})")
            continue
        for k, (a_, b_) in enumerate(zip(la, lb)):
            name = b_["list"] if a_["list"] == b_["list"] else f"{b_['list']} (was {a_['list']})"
            if a_["sha256"] != b_["sha256"]:
                out.append(f"{role} list {k + 1} {name}: its content changed ({a_['entries']} entries used then, "
                           f"{b_['entries']} now)")
            elif kept and a_["kept_sha256"] != b_["kept_sha256"]:
                out.append(f"{role} list {k + 1} {name}: other lines are skipped now ({a_['entries']} entries used "
                           f"then, {b_['entries']} now): a file went missing or bad, or skip_bad changed")
    if out or not kept:
        return out
    return ["the mixing record's digest differs (record written by another version?)"]


@dataclass(frozen=True)
class CorpusStats:
    """The numbers the card's corpus line is made of (from :meth:`MixingCorpus.stats`)."""

    clean_files: int
    clean_seconds: float
    noise_files: tuple[int, ...]
    noise_seconds: tuple[float, ...]
    rir_files: int


def corpus_summary(config: MixingConfig, stats: CorpusStats, *, mixtures_per_epoch: int, premixed_per_epoch: int = 0,
                   premixed_pairs: int = 0, premixed_seconds: float = math.nan) -> dict[str, Any]:
    """The plan card's "trained on" facts for dynamic mixing, as numbers and as one ``line``. Pure.

    Hours are NaN (shown as "? h") where a list lacks durations and no check has read the headers yet.
    """
    noise_seconds = sum(stats.noise_seconds)
    rir_share = config.rir_probability if stats.rir_files else 0.0
    out = {
        "kind": "dynamic",
        "clean_files": stats.clean_files, "clean_hours": stats.clean_seconds / 3600,
        "noise_files": sum(stats.noise_files), "noise_hours": noise_seconds / 3600,
        "noise_lists": len(stats.noise_files), "noise_weights": list(config.weights()),
        "snr_db": list(config.snr_db), "speech_level_dbfs": list(config.speech_level_dbfs),
        "noise_sources": list(config.noise_sources), "rir_files": stats.rir_files, "rir_share": rir_share,
        "target": config.target if rir_share else "dry",
        "mixtures_per_epoch": mixtures_per_epoch, "premixed_per_epoch": premixed_per_epoch,
        "premixed_pairs": premixed_pairs, "premixed_hours": premixed_seconds / 3600,
    }

    def hours(seconds: float) -> str:
        return "? h" if math.isnan(seconds) else f"{seconds / 3600:.2f} h"

    weights = "" if len(stats.noise_files) < 2 else ", weights " + "/".join(f"{w:.2f}" for w in config.weights())
    lo, hi = config.snr_db
    level_lo, level_hi = config.speech_level_dbfs
    level = f"{level_lo:g} dBFS" if level_lo == level_hi else f"{level_lo:g} to {level_hi:g} dBFS"
    src_lo, src_hi = config.noise_sources
    sources = f"{src_lo}" if src_lo == src_hi else f"{src_lo}-{src_hi}"
    rir = (f"RIR {rir_share:.0%} of mixtures ({stats.rir_files} responses, {out['target']} target)" if rir_share
           else "no RIR")
    line = (f"dynamic: clean {hours(stats.clean_seconds)} ({stats.clean_files} files) × noise {hours(noise_seconds)} "
            f"({sum(stats.noise_files)} files in {len(stats.noise_files)} list(s){weights}), SNR {lo:g} to {hi:g} dB, "
            f"speech {level}, {sources} noise source(s), {rir}; {mixtures_per_epoch} mixtures per epoch")
    if premixed_per_epoch:
        total = premixed_per_epoch + mixtures_per_epoch
        line += (f" + {premixed_per_epoch} pre-mixed pairs ({premixed_per_epoch / total:.0%} of {total}) drawn from "
                 f"{premixed_pairs} pairs / {hours(premixed_seconds)}")
    out["line"] = line
    return out
