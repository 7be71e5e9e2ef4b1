"""List files of noisy/clean pairs, and of single audio files, parsed into compact arrays.

Format, one pair a line (the reference recipe's ``.scp`` lists; :class:`PairIndex`)::

    noisy_path clean_path [duration_seconds]

or one file a line (clean speech, noise and room-impulse-response lists for mixing; :class:`FileIndex`)::

    path [duration_seconds]

Fields are separated by ASCII whitespace (spaces or tabs; ``\\r\\n`` line ends are fine). A field that starts
with ``#`` opens a comment that runs to the end of the line, so whole-line and trailing comments both work,
while a ``#`` inside a path (``take#2.wav``) stays part of the path. Blank lines are skipped. A relative path
resolves against the folder of the list file that holds it. A duration must parse as a number (Python's
``float`` rules), finite and >= 0; a missing duration is NaN until validation reads it from the file header.

Memory: the index keeps no Python object per line. Per pair it stores the byte offset of its line in the list
file, the line number, the list id and the duration: 14 bytes a pair while every list is under 4 GiB (18
otherwise), about 140 MB for 10 million pairs whatever the length of the paths. Paths are read back from the
list file on demand with ``os.pread`` (microseconds, far below the cost of reading the audio); the operating
system's page cache holds the list once for all ranks of a node. A list file changed after it was parsed is
detected (its size and mtime are checked on every read) and is an error rather than a silent mix-up.
Parsing is vectorised over 8 MiB chunks, so loading 10 million lines takes seconds and its transient memory
is bounded by the chunk size, not the list size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .errors import DataError

_SEPARATOR = np.zeros(256, dtype=bool)
_SEPARATOR[[9, 10, 11, 12, 13, 32]] = True  # exactly the bytes that bytes.split() splits on
_HASH = ord("#")
_MAX_DURATION_CHARS = 32
_MAX_LISTS = np.iinfo(np.uint16).max + 1

MALFORMED_FIELD_COUNT = 1
MALFORMED_DURATION = 2


@dataclass(frozen=True)
class ListFile:
    """One parsed list file. ``display`` is the path as the user gave it (used in messages)."""

    display: str
    path: str  # absolute
    folder: str  # absolute; relative audio paths resolve against it
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Malformed:
    """Malformed lines found while parsing, as arrays (one row per line), in list and line order."""

    list_id: np.ndarray  # uint16
    line_no: np.ndarray  # int64, 1-based
    offset: np.ndarray  # int64, byte offset of the line
    code: np.ndarray  # uint8: MALFORMED_FIELD_COUNT or MALFORMED_DURATION
    num_fields: np.ndarray  # int64

    def __len__(self) -> int:
        return int(self.list_id.size)

    @staticmethod
    def empty() -> "Malformed":
        return Malformed(
            np.zeros(0, np.uint16), np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.uint8), np.zeros(0, np.int64)
        )


def split_fields(line: bytes) -> list[bytes]:
    """The fields of one list line, comment removed (the same rule as the vectorised parser)."""
    fields = []
    for token in line.split():
        if token[:1] == b"#":
            break
        fields.append(token)
    return fields


def _scan_chunk(buf: bytes, final: bool, path_fields: int = 2) -> dict[str, np.ndarray] | None:
    """Parse whole lines in ``buf`` (which ends with a newline unless ``final``) without a per-line loop.

    A good line holds ``path_fields`` paths and an optional duration. Returns line-relative arrays:
    ``line_start`` for every line, ``ok_line``/``duration`` for good lines, ``bad_line``/``bad_code``/
    ``bad_fields`` for malformed ones.
    """
    arr = np.frombuffer(buf, dtype=np.uint8)
    n = arr.size
    if n == 0:
        return None
    newline = np.flatnonzero(arr == 10)
    num_lines = newline.size + (0 if arr[-1] == 10 else 1)
    line_start = np.empty(num_lines, dtype=np.int64)
    line_start[0] = 0
    line_start[1:] = newline[: num_lines - 1] + 1

    sep = _SEPARATOR[arr]
    body = ~sep
    before = np.empty(n, dtype=bool)
    before[0] = True
    before[1:] = sep[:-1]
    starts = np.flatnonzero(body & before)
    after = np.empty(n, dtype=bool)
    after[-1] = True
    after[:-1] = sep[1:]
    ends = np.flatnonzero(body & after) + 1
    del sep, body, before, after
    token_line = np.searchsorted(newline, starts)

    is_hash = arr[starts] == _HASH
    if is_hash.any():
        # A token is dropped when a '#'-token at or before it sits on the same line: token lines never
        # decrease, so a running maximum of "line of the last '#'-token" finds them.
        last_hash_line = np.maximum.accumulate(np.where(is_hash, token_line, -1))
        kept = last_hash_line != token_line
        starts, ends, token_line = starts[kept], ends[kept], token_line[kept]

    counts = np.bincount(token_line, minlength=num_lines)
    ok_line = np.flatnonzero((counts == path_fields) | (counts == path_fields + 1))
    first = np.searchsorted(token_line, ok_line)
    duration = np.full(ok_line.size, np.nan, dtype=np.float32)
    bad_duration = np.zeros(ok_line.size, dtype=bool)
    has_duration = counts[ok_line] == path_fields + 1
    if has_duration.any():
        field = first[has_duration] + path_fields
        values = _parse_durations(arr, starts[field], ends[field])
        duration[has_duration] = values
        bad_duration[has_duration] = ~(np.isfinite(values) & (values >= 0))

    field_count_bad = np.flatnonzero((counts != 0) & (counts != path_fields) & (counts != path_fields + 1))
    duration_bad = ok_line[bad_duration]
    bad_line = np.concatenate([field_count_bad, duration_bad])
    bad_code = np.concatenate(
        [np.full(field_count_bad.size, MALFORMED_FIELD_COUNT, np.uint8), np.full(duration_bad.size, MALFORMED_DURATION, np.uint8)]
    )
    order = np.argsort(bad_line, kind="stable")
    bad_line, bad_code = bad_line[order], bad_code[order]
    good = ~bad_duration
    return {
        "num_lines": np.int64(num_lines),
        "line_start": line_start,
        "ok_line": ok_line[good],
        "duration": duration[good],
        "bad_line": bad_line,
        "bad_code": bad_code,
        "bad_fields": counts[bad_line].astype(np.int64),
    }


def _parse_durations(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Numbers from byte spans, vectorised: gather the spans into a fixed-width bytes array, let numpy parse.

    Unparsable spans give NaN (so the caller's finiteness check rejects them).
    """
    width = ends - starts
    out = np.full(starts.size, np.nan, dtype=np.float32)
    short = width <= _MAX_DURATION_CHARS
    s, w = starts[short], width[short]
    if s.size == 0:
        return out
    max_width = int(w.max())
    columns = np.arange(max_width)
    chars = arr[np.minimum(s[:, None] + columns, arr.size - 1)]
    chars[columns >= w[:, None]] = 0
    text = chars.view(f"S{max_width}").ravel()
    try:
        values = text.astype(np.float64)
    except ValueError:
        values = np.array([_float_or_nan(t) for t in text], dtype=np.float64)
    with np.errstate(over="ignore"):
        out[short] = values.astype(np.float32)
    return out


def _float_or_nan(text: bytes) -> float:
    try:
        return float(text)
    except ValueError:
        return math.nan


def _parse_list(path: Path, chunk_bytes: int, path_fields: int = 2) -> tuple[ListFile, dict[str, np.ndarray]]:
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise DataError(f"list file not found: {path}") from None
    except OSError as exc:
        raise DataError(f"list file cannot be read: {path}: {exc}") from None
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("offset", "line_no", "duration", "bad_offset", "bad_line", "bad_code", "bad_fields")}
    with f:
        st = os.fstat(f.fileno())
        # Final dtypes chunk by chunk, so that joining the chunks is the only copy (a list has fewer lines
        # than bytes, so its size bounds both).
        offset_dtype = np.uint32 if st.st_size < 2**32 else np.int64
        line_dtype = np.int32 if st.st_size < 2**31 else np.int64
        base_offset = 0
        base_line = 0
        carry = b""
        while True:
            data = f.read(chunk_bytes)
            final = not data
            buf = carry + data if carry else data
            if not final:
                cut = buf.rfind(b"\n") + 1
                if cut == 0:  # one line longer than a chunk: keep reading until it ends
                    carry = buf
                    continue
                buf, carry = buf[:cut], buf[cut:]
            res = _scan_chunk(buf, final, path_fields)
            if res is not None:
                line_start = res["line_start"] + base_offset
                parts["offset"].append(line_start[res["ok_line"]].astype(offset_dtype))
                parts["line_no"].append((res["ok_line"] + base_line + 1).astype(line_dtype))
                parts["duration"].append(res["duration"])
                parts["bad_offset"].append(line_start[res["bad_line"]])
                parts["bad_line"].append(res["bad_line"] + base_line + 1)
                parts["bad_code"].append(res["bad_code"])
                parts["bad_fields"].append(res["bad_fields"])
                base_line += int(res["num_lines"])
            base_offset += len(buf)
            if final:
                break
    if base_offset != st.st_size:
        raise DataError(f"list file changed while it was read: {path} ({st.st_size} bytes at open, {base_offset} read)")
    absolute = os.path.abspath(path)
    info = ListFile(str(path), absolute, os.path.dirname(absolute), st.st_size, st.st_mtime_ns)
    dtypes = {"offset": offset_dtype, "line_no": line_dtype, "duration": np.float32, "bad_offset": np.int64,
              "bad_line": np.int64, "bad_code": np.uint8, "bad_fields": np.int64}
    arrays = {}
    for key, chunks in parts.items():
        arrays[key] = _join(chunks, dtypes[key])
        chunks.clear()  # free each key's chunks as soon as it is joined
    return info, arrays


def _join(chunks: list[np.ndarray], dtype) -> np.ndarray:
    if not chunks:
        return np.zeros(0, dtype)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class _ListIndex:
    """What every parsed list shares: compact per-line arrays, ``list:line`` locations, lines read on demand.

    Subclasses say how many path fields a line holds (``path_fields``) and what a line looks like
    (``line_format``, used in messages).
    """

    path_fields = 2
    line_format = "noisy clean [duration]"

    def __init__(
        self,
        lists: Sequence[ListFile],
        list_id: np.ndarray,
        line_no: np.ndarray,
        offset: np.ndarray,
        duration: np.ndarray,
        malformed: Malformed | None = None,
    ) -> None:
        self.lists = tuple(lists)
        self._list_id = list_id
        self._line_no = line_no
        self._offset = offset
        self._duration = duration
        self.malformed = malformed if malformed is not None else Malformed.empty()
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    @classmethod
    def _from_lists(cls, paths, strict: bool, chunk_bytes: int, **extra):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [Path(p) for p in paths]
        if not paths:
            raise DataError("no list files given")
        if len(paths) > _MAX_LISTS:
            raise DataError(f"{len(paths)} list files given; at most {_MAX_LISTS} are supported (concatenate them)")
        path_fields = extra.get("path_fields", cls.path_fields)
        infos, parsed = [], []
        for p in paths:
            info, arrays = _parse_list(p, chunk_bytes, path_fields)
            infos.append(info)
            parsed.append(arrays)
        counts = [a["offset"].size for a in parsed]
        list_id = np.repeat(np.arange(len(paths), dtype=np.uint16), counts)
        offset_dtype = np.result_type(*[a["offset"].dtype for a in parsed])
        line_dtype = np.result_type(*[a["line_no"].dtype for a in parsed])
        index = cls(
            infos,
            list_id,
            _join([a.pop("line_no") for a in parsed], line_dtype),
            _join([a.pop("offset") for a in parsed], offset_dtype),
            _join([a.pop("duration") for a in parsed], np.float32),
            Malformed(
                np.repeat(np.arange(len(paths), dtype=np.uint16), [a["bad_line"].size for a in parsed]),
                np.concatenate([a["bad_line"] for a in parsed]),
                np.concatenate([a["bad_offset"] for a in parsed]),
                np.concatenate([a["bad_code"] for a in parsed]),
                np.concatenate([a["bad_fields"] for a in parsed]),
            ),
            **extra,
        )
        if strict and len(index.malformed):
            lines = list(index.malformed_problems())
            raise DataError(f"{len(lines)} malformed line(s) in the list files:\n" + "\n".join(lines))
        return index

    def _extra(self) -> dict:
        """Constructor arguments beyond the arrays (kept by subset and with_durations)."""
        return {}

    def __len__(self) -> int:
        return int(self._offset.size)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._list_id, self._line_no, self._offset, self._duration))

    @property
    def durations(self) -> np.ndarray:
        """Durations in seconds, float32, NaN where unknown (read-only view)."""
        view = self._duration.view()
        view.flags.writeable = False
        return view

    def duration_seconds(self, i: int) -> float:
        return float(self._duration[i])

    def list_id(self, i: int) -> int:
        """Position in ``index.lists`` of the list file that holds entry ``i``."""
        return int(self._list_id[i])

    def entries_per_list(self) -> np.ndarray:
        return np.bincount(self._list_id, minlength=len(self.lists))

    def line_number(self, i: int) -> int:
        return int(self._line_no[i])

    @property
    def line_numbers(self) -> np.ndarray:
        """1-based line numbers of the entries, in index order (read-only view)."""
        view = self._line_no.view()
        view.flags.writeable = False
        return view

    @property
    def list_ids(self) -> np.ndarray:
        """Position in ``lists`` of each entry's list file (read-only view)."""
        view = self._list_id.view()
        view.flags.writeable = False
        return view

    def where(self, i: int) -> str:
        return f"{self.lists[int(self._list_id[i])].display}:{int(self._line_no[i])}"

    def _fields(self, i: int) -> list[bytes]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"entry {i} out of range for an index of {len(self)} entries")
        fields = split_fields(self._read_line(int(self._list_id[i]), int(self._offset[i])))
        if len(fields) not in (self.path_fields, self.path_fields + 1):
            raise DataError(f"{self.where(i)}: the list line no longer holds '{self.line_format}'; was the list rewritten?")
        return fields

    def subset(self, keep: np.ndarray):
        """A new index of the selected entries (boolean mask or integer positions), malformed lines dropped."""
        keep = np.asarray(keep)
        return type(self)(self.lists, self._list_id[keep], self._line_no[keep], self._offset[keep], self._duration[keep],
                          **self._extra())

    def with_durations(self, durations: np.ndarray):
        durations = np.asarray(durations, dtype=np.float32)
        if durations.shape != self._duration.shape:
            raise ValueError(f"expected {self._duration.shape} durations, got {durations.shape}")
        return type(self)(self.lists, self._list_id, self._line_no, self._offset, durations, self.malformed,
                          **self._extra())

    def malformed_problems(self) -> Iterator[str]:
        """``list:line: "text": reason`` for every malformed line."""
        for list_id, line_no, text, reason in self.malformed_details():
            yield f"{self.lists[list_id].display}:{line_no}: {text}: {reason}"

    def malformed_details(self) -> Iterator[tuple[int, int, str, str]]:
        m = self.malformed
        for k in range(len(m)):
            list_id = int(m.list_id[k])
            line = self._read_line(list_id, int(m.offset[k]))
            shown = line.decode("utf-8", errors="replace").strip()
            if len(shown) > 120:
                shown = shown[:117] + "..."
            if m.code[k] == MALFORMED_FIELD_COUNT:
                n = int(m.num_fields[k])
                reason = f"expected '{self.line_format}', found {n} field{'s' if n != 1 else ''}"
            else:
                fields = split_fields(line)
                value = fields[self.path_fields].decode("utf-8", errors="replace") if len(fields) > self.path_fields else "?"
                reason = f"duration {value!r} is not a finite number >= 0"
            yield list_id, int(m.line_no[k]), f'"{shown}"', reason

    def _fd(self, list_id: int) -> int:
        if self._pid != os.getpid():  # forked into a DataLoader worker: descriptors are not ours to share
            self._fds = {}
            self._pid = os.getpid()
        fd = self._fds.get(list_id)
        if fd is None:
            info = self.lists[list_id]
            try:
                fd = os.open(info.path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"list file cannot be reopened: {info.display}: {exc}") from None
            self._fds[list_id] = fd
        return fd

    def _read_line(self, list_id: int, offset: int) -> bytes:
        fd = self._fd(list_id)
        info = self.lists[list_id]
        st = os.fstat(fd)
        if st.st_size != info.size or st.st_mtime_ns != info.mtime_ns:
            raise DataError(
                f"list file changed after it was parsed: {info.display} (size {info.size} -> {st.st_size}); "
                "restart so that it is parsed again"
            )
        want = 512
        while True:
            buf = os.pread(fd, want, offset)
            end = buf.find(b"\n")
            if end >= 0:
                return buf[:end]
            if len(buf) < want:
                return buf
            want *= 4

    def close(self) -> None:
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = {}

    def __del__(self) -> None:
        try:
            if getattr(self, "_pid", None) == os.getpid():
                self.close()
        except Exception:  # interpreter shutdown: nothing left to tidy
            pass

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fds"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._fds = {}
        self._pid = os.getpid()


class PairIndex(_ListIndex):
    """Noisy/clean pairs from one or more list files, in compact arrays (see the module docstring).

    ``index.noisy(i)``, ``index.clean(i)`` and ``index.pair(i)`` return absolute (or list-relative resolved)
    paths; ``index.where(i)`` is ``"list:line"`` for messages; ``index.duration_seconds(i)`` is the duration
    from the list or from validation (NaN when neither gave one). Picklable at the cost of its arrays only.
    """

    @classmethod
    def from_lists(cls, paths: Iterable[str | os.PathLike[str]], *, strict: bool = True, chunk_bytes: int = 8 << 20) -> "PairIndex":
        """Parse list files into one index, in the given order.

        With ``strict=True`` any malformed line raises a DataError listing every malformed line as
        ``list:line: "text": reason``; with ``strict=False`` they are kept in ``index.malformed`` for
        :func:`data.validate` to report (and skip, with ``skip_bad``).
        """
        return cls._from_lists(paths, strict, chunk_bytes)

    def __repr__(self) -> str:
        return f"PairIndex({len(self)} pairs from {len(self.lists)} list(s), {len(self.malformed)} malformed line(s), {self.nbytes / 1e6:.1f} MB)"

    def pairs_per_list(self) -> np.ndarray:
        return self.entries_per_list()

    def pair(self, i: int) -> tuple[str, str]:
        """(noisy path, clean path) of pair ``i``: one read of its list line."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"pair {i} out of range for an index of {len(self)} pairs")
        fields = self._fields(i)
        folder = self.lists[int(self._list_id[i])].folder
        return _resolve(folder, fields[0]), _resolve(folder, fields[1])

    def noisy(self, i: int) -> str:
        return self.pair(i)[0]

    def clean(self, i: int) -> str:
        return self.pair(i)[1]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for i in range(len(self)):
            yield self.pair(i)


class FileIndex(_ListIndex):
    """Single audio files (clean speech, noise, room impulse responses) from list files, compactly.

    Two formats. ``FileIndex.from_lists``: one file a line, ``path [duration_seconds]``.
    ``FileIndex.from_pair_lists``: the reference's ``noisy clean [duration_seconds]`` pair lists, of which the
    clean column is used (so a corpus of pre-mixed pairs doubles as clean speech for mixing). Comments, blank
    lines, relative paths and durations follow the pair-list rules of the module docstring.
    ``index.path(i)`` is the file of entry ``i``; ``where(i)`` is ``"list:line"``.
    """

    def __init__(self, lists, list_id, line_no, offset, duration, malformed=None, *, path_fields: int = 1, column: int = 0) -> None:
        if path_fields not in (1, 2) or not 0 <= column < path_fields:
            raise ValueError(f"path_fields must be 1 or 2 and column one of its fields, got {path_fields}, {column}")
        super().__init__(lists, list_id, line_no, offset, duration, malformed)
        self.path_fields = path_fields
        self.column = column
        self.line_format = "path [duration]" if path_fields == 1 else "noisy clean [duration]"

    @classmethod
    def from_lists(cls, paths: Iterable[str | os.PathLike[str]], *, strict: bool = True, chunk_bytes: int = 8 << 20) -> "FileIndex":
        """Lists of one file a line (``path [duration]``); ``strict`` as in :meth:`PairIndex.from_lists`."""
        return cls._from_lists(paths, strict, chunk_bytes, path_fields=1, column=0)

    @classmethod
    def from_pair_lists(cls, paths: Iterable[str | os.PathLike[str]], *, strict: bool = True, chunk_bytes: int = 8 << 20) -> "FileIndex":
        """The clean column of ``noisy clean [duration]`` pair lists."""
        return cls._from_lists(paths, strict, chunk_bytes, path_fields=2, column=1)

    def _extra(self) -> dict:
        return {"path_fields": self.path_fields, "column": self.column}

    def __repr__(self) -> str:
        kind = "files" if self.path_fields == 1 else "clean files of pair lists"
        return f"FileIndex({len(self)} {kind} from {len(self.lists)} list(s), {len(self.malformed)} malformed line(s))"

    def path(self, i: int) -> str:
        """The audio file of entry ``i`` (resolved against its list's folder): one read of its list line."""
        return _resolve(self.lists[int(self._list_id[i])].folder, self._fields(i)[self.column])

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self.path(i)


def _resolve(folder: str, token: bytes) -> str:
    path = os.fsdecode(token)
    return path if os.path.isabs(path) else os.path.join(folder, path)
