"""validate(): every bad line in one report, skip_bad, resampling, the header cache, the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import DataError, PairIndex, validate
from data.validate import main

RATE = 48000
REPO = Path(__file__).resolve().parents[1]


def tone(path: Path, seconds: float, rate: int = RATE) -> None:
    n = int(round(seconds * rate))
    sf.write(path, 0.1 * np.sin(np.arange(n) * 0.05), rate, subtype="PCM_16")


@pytest.fixture
def corpus(tmp_path):
    tone(tmp_path / "good_n.wav", 1.0)
    tone(tmp_path / "good_c.wav", 1.0)
    (tmp_path / "corrupt.wav").write_bytes(b"this is not audio" * 50)
    (tmp_path / "zero_bytes.wav").write_bytes(b"")
    sf.write(tmp_path / "no_frames.wav", np.zeros(0), RATE)
    tone(tmp_path / "n16.wav", 1.0, 16000)
    tone(tmp_path / "c16.wav", 1.0, 16000)
    tone(tmp_path / "long.wav", 1.5)
    lines = [
        "# header comment",  # 1
        "good_n.wav good_c.wav",  # 2 good, no duration
        "missing.wav good_c.wav 1.0",  # 3 missing
        "good_n.wav corrupt.wav",  # 4 corrupt
        "zero_bytes.wav good_c.wav",  # 5 empty file
        "good_n.wav no_frames.wav",  # 6 empty audio
        "n16.wav c16.wav",  # 7 wrong rate (both files)
        "good_n.wav long.wav",  # 8 length mismatch
        "just_one_field.wav",  # 9 malformed
        "good_n.wav good_c.wav soon",  # 10 malformed duration
        "gone_n.wav gone_c.wav",  # 11 both missing: one bad line, two problems
        "n16.wav good_c.wav 1.0",  # 12 wrong rate; fine when resampling (same length in seconds)
        "good_n.wav good_c.wav 2.5",  # 13 good, duration from the list
    ]
    lst = tmp_path / "train.lst"
    lst.write_text("\n".join(lines) + "\n")
    return lst


def test_report_lists_every_bad_line(corpus, tmp_path):
    with pytest.raises(DataError) as err:
        validate([corpus], cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert message.startswith("10 bad line(s)")
    expected = {
        3: ("missing.wav", "missing"),
        4: ("corrupt.wav", "unreadable or corrupt"),
        5: ("zero_bytes.wav", "empty"),
        6: ("no_frames.wav", "empty"),
        7: ("n16.wav", "sample rate 16000 Hz, expected 48000 Hz"),
        8: ("good_n.wav", "length mismatch with clean"),
        9: ("just_one_field.wav", "found 1 field"),
        10: ("soon", "is not a finite number"),
        11: ("gone_c.wav", "missing"),
        12: ("n16.wav", "sample rate 16000 Hz"),
    }
    for line, (path, reason) in expected.items():
        hits = [m for m in message.splitlines() if m.startswith(f"{corpus}:{line}: ")]
        assert any(path in m and reason in m for m in hits), (line, hits)
    assert f"{corpus}:7: {corpus.parent}/c16.wav: sample rate" in message
    assert f"{corpus}:11: {corpus.parent}/gone_n.wav: missing" in message
    for good in (1, 2, 13):
        assert f"{corpus}:{good}:" not in message


def test_skip_bad_keeps_the_good_pairs_and_counts_the_rest(corpus, tmp_path):
    index, report = validate([corpus], skip_bad=True, cache_dir=tmp_path / "cache")
    assert [index.where(i) for i in range(len(index))] == [f"{corpus}:2", f"{corpus}:13"]
    assert report.skipped == report.num_bad == 10 and report.num_kept == 2 and not report.ok
    assert report.counts() == {"malformed": 2, "missing": 3, "unreadable": 1, "empty": 2, "sample rate": 3, "length mismatch": 1}
    assert index.duration_seconds(0) == 1.0  # filled in from the header
    assert index.duration_seconds(1) == 2.5  # the list's own value
    assert "10 bad line(s) of 12" in report.summary() and "2 pairs kept" in report.summary()


def test_resampling_accepts_other_rates_in_time_not_frames(corpus, tmp_path):
    index, report = validate([corpus], resample=True, skip_bad=True, cache_dir=tmp_path / "cache")
    assert [index.where(i) for i in range(len(index))] == [f"{corpus}:{n}" for n in (2, 7, 12, 13)]
    assert "sample rate" not in report.counts()


def test_header_cache_makes_the_second_pass_stat_only(corpus, tmp_path):
    _, first = validate([corpus], skip_bad=True)  # default cache: next to the list
    assert first.cache_path == f"{corpus}.headers.sqlite" and Path(first.cache_path).exists()
    assert first.cache_hits == 0 and first.header_reads == 7
    _, second = validate([corpus], skip_bad=True)
    assert second.cache_hits == 6 and second.header_reads == 1  # only the corrupt file is read again
    os.utime(corpus.parent / "long.wav", ns=(10**9, 10**9))  # a changed file is read again
    _, third = validate([corpus], skip_bad=True)
    assert third.cache_hits == 5 and third.header_reads == 2
    _, uncached = validate([corpus], skip_bad=True, use_cache=False, num_threads=1)
    assert uncached.cache_path is None and uncached.header_reads == 7


def test_an_unwritable_cache_is_a_note_not_a_failure(corpus, tmp_path):
    blocker = tmp_path / "file_not_folder"
    blocker.write_text("")
    _, report = validate([corpus], skip_bad=True, cache_dir=blocker / "sub")
    assert report.cache_path is None and "unusable" in report.notes[0]


def test_empty_lists_and_all_bad(tmp_path):
    empty = tmp_path / "empty.lst"
    empty.write_text("# nothing here\n\n")
    with pytest.raises(DataError, match="no pairs in this list"):
        validate([empty], cache_dir=tmp_path)
    with pytest.raises(DataError, match="no usable pairs"):
        validate([empty], skip_bad=True, cache_dir=tmp_path)


def test_cli_exit_codes(corpus, tmp_path, capsys):
    cache = ["--cache_dir", str(tmp_path / "cache")]
    assert main([str(corpus), *cache]) == 1
    err = capsys.readouterr().err
    assert f"{corpus}:3:" in err and "10 bad line(s)" in err
    assert main([str(corpus), "--skip_bad", *cache]) == 0
    assert "10 bad line(s) of 12" in capsys.readouterr().out
    good = tmp_path / "good.lst"
    good.write_text("good_n.wav good_c.wav\n")
    done = subprocess.run([sys.executable, "-m", "data.validate", str(good), *cache], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "all 1 lines good" in done.stdout and "torch" not in done.stderr
    bad = subprocess.run([sys.executable, "-m", "data.validate", str(corpus), *cache], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 1 and f"{corpus}:4:" in bad.stderr


def test_validating_a_parsed_index_with_malformed_lines(corpus, tmp_path):
    index = PairIndex.from_lists([corpus], strict=False)
    kept, report = validate(index, skip_bad=True, cache_dir=tmp_path)
    assert len(kept) == 2 and report.counts()["malformed"] == 2 and len(kept.malformed) == 0
