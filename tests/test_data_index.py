"""List-file parsing: PairIndex.from_lists against a line-by-line model of the format."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data import DataError, PairIndex


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return path


def test_relative_absolute_comments_blanks_and_durations(tmp_path):
    lst = write(
        tmp_path / "lists" / "train.lst",
        "# a comment line\n"
        "\n"
        "noisy/a.wav clean/a.wav 1.5\n"
        "   \t \n"
        "/abs/n.wav\t../c.wav   # trailing comment\n"
        "take#2.wav ref.wav 3  # '#' inside a path is part of it\r\n"
        "last.wav last_clean.wav",  # no final newline
    )
    index = PairIndex.from_lists([lst])
    assert len(index) == 4
    folder = str(tmp_path / "lists")
    assert index.pair(0) == (f"{folder}/noisy/a.wav", f"{folder}/clean/a.wav")
    assert index.noisy(1) == "/abs/n.wav" and index.clean(1) == f"{folder}/../c.wav"
    assert index.noisy(2) == f"{folder}/take#2.wav"
    assert index.clean(3) == f"{folder}/last_clean.wav"
    assert [index.where(i) for i in range(4)] == [f"{lst}:3", f"{lst}:5", f"{lst}:6", f"{lst}:7"]
    assert index.duration_seconds(0) == 1.5 and index.duration_seconds(2) == 3.0
    assert np.isnan(index.duration_seconds(1)) and np.isnan(index.duration_seconds(3))
    assert index.durations.dtype == np.float32


def test_malformed_lines_are_all_named(tmp_path):
    lst = write(tmp_path / "bad.lst", "a.wav b.wav\nonly_one.wav\na b c d\nx.wav y.wav soon\nx.wav y.wav -2\nx.wav y.wav inf\n")
    with pytest.raises(DataError) as err:
        PairIndex.from_lists([lst])
    message = str(err.value)
    for line in (2, 3, 4, 5, 6):
        assert f"{lst}:{line}:" in message
    assert f"{lst}:1:" not in message
    assert "found 1 field" in message and "found 4 fields" in message and "'soon'" in message
    index = PairIndex.from_lists([lst], strict=False)
    assert len(index) == 1 and len(index.malformed) == 5


def test_several_lists_and_missing_list(tmp_path):
    a = write(tmp_path / "a" / "one.lst", "n1.wav c1.wav 1\n")
    b = write(tmp_path / "b" / "two.lst", "n2.wav c2.wav\nn3.wav c3.wav 2\n")
    index = PairIndex.from_lists([a, b])
    assert len(index) == 3
    assert index.noisy(1) == str(tmp_path / "b" / "n2.wav")
    assert index.where(2) == f"{b}:2" and index.list_id(2) == 1
    with pytest.raises(DataError, match="list file not found"):
        PairIndex.from_lists([a, tmp_path / "nope.lst"])


def test_pickles_small_and_detects_a_rewritten_list(tmp_path):
    lst = write(tmp_path / "t.lst", "".join(f"n{i}.wav c{i}.wav {i}\n" for i in range(1000)))
    index = PairIndex.from_lists([lst])
    blob = pickle.dumps(index)
    assert len(blob) < 20_000  # arrays only, no per-line objects
    again = pickle.loads(blob)
    assert again.pair(999) == index.pair(999)
    assert index.subset(np.arange(1000) % 2 == 1).pair(0) == index.pair(1)
    write(lst, "changed.wav c.wav\n")
    os.utime(lst, ns=(1, 1))
    with pytest.raises(DataError, match="changed after it was parsed"):
        index.pair(0)


def test_long_lines_across_chunks(tmp_path):
    long = "d/" * 3000 + "n.wav"
    lst = write(tmp_path / "t.lst", f"{long} c.wav 1\nx.wav y.wav\n")
    index = PairIndex.from_lists([lst], chunk_bytes=64)
    assert len(index) == 2 and index.noisy(0).endswith(long) and index.where(1).endswith(":2")


_SAFE = st.text(alphabet="abcXYZ019_-.#/é", min_size=1, max_size=12).filter(lambda s: not s.startswith("#"))
_SPACE = st.text(alphabet=" \t", min_size=1, max_size=3)
_OPT_SPACE = st.text(alphabet=" \t", max_size=3)


@st.composite
def _line(draw):
    """(text, expectation) where expectation is None (skipped), ('pair', n, c, d) or ('bad', code)."""
    kind = draw(st.sampled_from(["pair", "pair", "pair", "blank", "comment", "few", "many", "bad_duration"]))
    lead, trail = draw(_OPT_SPACE), draw(_OPT_SPACE)
    comment = draw(st.one_of(st.just(""), st.text(alphabet="ab #\t", max_size=8).map(lambda s: "#" + s)))
    if comment:
        trail = trail or " "
    if kind == "blank":
        return lead + trail, None
    if kind == "comment":
        return lead + "#" + draw(st.text(alphabet="ab #\t", max_size=10)), None
    paths = [draw(st.one_of(_SAFE, _SAFE.map(lambda s: "/" + s))) for _ in range(4)]
    seps = [draw(_SPACE) for _ in range(4)]
    if kind == "pair":
        duration = draw(st.one_of(st.none(), st.floats(0, 1e5, allow_nan=False, allow_infinity=False)))
        fmt = draw(st.sampled_from(["{:g}", "{:.3f}", "{!r}", "{:.2e}"]))
        fields = paths[:2] + ([] if duration is None else [fmt.format(duration)])
        text = lead + "".join(f + s for f, s in zip(fields, seps))[: -len(seps[len(fields) - 1])] + trail + comment
        value = None if duration is None else float(np.float32(float(fmt.format(duration))))
        return text, ("pair", paths[0], paths[1], value)
    if kind == "few":
        return lead + paths[0] + trail + comment, ("bad", 1)
    if kind == "many":
        return lead + " ".join(paths) + trail + comment, ("bad", 1)
    token = draw(st.sampled_from(["-1", "nan", "inf", "1.2.3", "x", "1e999"]))
    return lead + f"{paths[0]} {paths[1]} {token}" + trail + comment, ("bad", 2)


@settings(max_examples=150, deadline=None)
@given(lines=st.lists(_line(), max_size=25), crlf=st.booleans(), final_newline=st.booleans(),
       chunk_bytes=st.sampled_from([16, 61, 1 << 20]))
def test_parser_matches_line_by_line_model(lines, crlf, final_newline, chunk_bytes):
    end = "\r\n" if crlf else "\n"
    text = end.join(t for t, _ in lines) + (end if final_newline and lines else "")
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(tmp) / "sub" / "x.lst"
        write(lst, text)
        index = PairIndex.from_lists([lst], strict=False, chunk_bytes=chunk_bytes)
        folder = str(lst.parent)
        want_pairs = [(n, e) for n, e in enumerate(lines, 1) if e[1] is not None and e[1][0] == "pair"]
        want_bad = [(n, e[1][1]) for n, e in enumerate(lines, 1) if e[1] is not None and e[1][0] == "bad"]
        assert len(index) == len(want_pairs)
        for i, (line_no, (_, (_, noisy, clean, duration))) in enumerate(want_pairs):
            resolve = lambda p: p if p.startswith("/") else os.path.join(folder, p)  # noqa: E731
            assert index.pair(i) == (resolve(noisy), resolve(clean))
            assert index.where(i) == f"{lst}:{line_no}"
            got = index.duration_seconds(i)
            assert (np.isnan(got) and duration is None) or got == duration
        assert list(zip(index.malformed.line_no.tolist(), index.malformed.code.tolist())) == want_bad
        if want_bad:
            with pytest.raises(DataError):
                PairIndex.from_lists([lst])
