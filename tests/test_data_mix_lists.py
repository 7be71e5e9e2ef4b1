"""Mixing lists: every bad input in one report before training, skip_bad, the caches, digests for resume,
the card's corpus summary, and the demo corpus's mixing lists."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import (CorpusStats, DataError, FileIndex, MixingConfig, MixingDataset, compare_records, corpus_summary,
                  list_digests, make_demo_corpus, mixing_record, validate_mixing)

RATE = 48000


def wav(folder: Path, name: str, x, rate: int = RATE, subtype: str = "FLOAT") -> str:
    sf.write(folder / name, np.asarray(x, dtype=np.float32), rate, subtype=subtype)
    return name


def noise(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return 0.05 * np.random.default_rng(seed).standard_normal(int(seconds * rate))


@pytest.fixture
def lists(tmp_path):
    d = tmp_path
    wav(d, "c_good.wav", noise(1.0, seed=1), subtype="PCM_16")
    wav(d, "c16.wav", noise(1.0, 16000), 16000)
    (d / "corrupt.wav").write_bytes(b"not audio at all" * 40)
    (d / "zero.wav").write_bytes(b"")
    sf.write(d / "no_frames.wav", np.zeros(0), RATE)
    wav(d, "n_good.wav", noise(2.0, seed=2))
    wav(d, "n_silent.wav", np.zeros(RATE))
    wav(d, "n_quiet.wav", 1e-5 * noise(1.0))  # -106 dBFS: below silence_dbfs -60
    nan = noise(0.5)
    nan[100] = np.nan
    wav(d, "n_nan.wav", nan)
    wav(d, "n16.wav", noise(1.0, 16000), 16000)
    h = np.zeros(2000)
    h[40], h[41:] = 0.8, 0.01 * np.random.default_rng(4).standard_normal(1959)
    wav(d, "r_good.wav", h)
    wav(d, "r_zero.wav", np.zeros(2000))
    (d / "clean.lst").write_text("# clean speech\nc_good.wav 1.0\nmissing.wav\nc16.wav\ncorrupt.wav\nzero.wav\n"
                                 "no_frames.wav\nc_good.wav soon\na.wav b.wav c.wav\n")
    (d / "noise.lst").write_text("n_good.wav\nn_silent.wav\nn_quiet.wav\nn_nan.wav\nn16.wav\n")
    (d / "noise_bad.lst").write_text("n_silent.wav\n")  # nothing usable: empty after skipping
    (d / "rir.lst").write_text("r_good.wav\nr_zero.wav\n")
    (d / "pairs.lst").write_text("x.wav c_good.wav 1.0\n")
    return d


def cfg(d: Path, **over) -> MixingConfig:
    base = dict(clean_lists=[str(d / "clean.lst")], clean_pair_lists=[str(d / "pairs.lst")],
                noise_lists=[str(d / "noise.lst"), str(d / "noise_bad.lst")], rir_lists=[str(d / "rir.lst")])
    return MixingConfig(**{**base, **over})


def test_every_bad_input_in_one_report_before_training(lists):
    with pytest.raises(DataError) as err:
        validate_mixing(cfg(lists), cache_dir=lists / "cache")
    message = str(err.value)
    d = str(lists)
    expected = [
        f"clean.lst:3: {d}/missing.wav: missing: no such file",
        f"clean.lst:4: {d}/c16.wav: sample rate 16000 Hz, expected 48000 Hz (convert it, or resample: data.resample=true)",
        f"clean.lst:5: {d}/corrupt.wav: unreadable or corrupt",
        f"clean.lst:6: {d}/zero.wav: empty: file has 0 bytes",
        f"clean.lst:7: {d}/no_frames.wav: empty: header has 0 frames",
        "clean.lst:8: \"c_good.wav soon\": duration 'soon' is not a finite number >= 0",
        "clean.lst:9: \"a.wav b.wav c.wav\": expected 'path [duration]', found 3 fields",
        f"noise.lst:2: {d}/n_silent.wav: silent: RMS -inf dBFS (all zero) over the whole file, below mixing.silence_dbfs -60",
        f"noise.lst:3: {d}/n_quiet.wav: silent: RMS -126.0 dBFS over the whole file",
        f"noise.lst:4: {d}/n_nan.wav: non-finite samples (NaN or Inf) in the file",
        f"noise.lst:5: {d}/n16.wav: sample rate 16000 Hz",
        f"noise_bad.lst:1: {d}/n_silent.wav: silent",
        "noise_bad.lst: -: no usable noise file in this list",
        f"rir.lst:2: {d}/r_zero.wav: no energy: largest tap -inf dBFS (all zero) (below -100 dBFS)",
    ]
    for line in expected:
        assert line in message, f"{line!r} not in:\n{message}"
    assert "clean.lst:2:" not in message and "noise.lst:1:" not in message and "rir.lst:1:" not in message
    assert message.startswith("13 bad line(s) and 1 empty list(s) in the mixing lists (pass skip_bad")


def test_skip_bad_keeps_the_good_lines_but_not_an_empty_list(lists):
    with pytest.raises(DataError, match=r"a list with no usable line cannot be mixed from(.|\n)*noise_bad.lst: -: no usable noise file"):
        validate_mixing(cfg(lists), skip_bad=True, cache_dir=lists / "cache")
    corpus, report = validate_mixing(cfg(lists, noise_lists=[str(lists / "noise.lst")]), skip_bad=True,
                                     resample=True, cache_dir=lists / "cache")
    assert [len(c) for c in corpus.clean] == [2, 1]  # c_good and c16 (resampled); the pair list's clean column
    assert len(corpus.noises[0]) == 2 and len(corpus.rirs) == 1  # n_good, n16; r_good
    assert report.skipped == report.num_bad == 10 and report.kept == {"clean": 3, "noise": 2, "rir": 1}
    assert corpus.clean[0].durations.tolist() == [1.0, 1.0]  # from the list, then from the header
    ds = MixingDataset(corpus, cfg(lists, noise_lists=[str(lists / "noise.lst")]), segment_seconds=0.5, resample=True)
    assert all(np.isfinite(ds.mix(i, 0).noisy).all() for i in range(len(ds)))


def test_the_second_check_decodes_no_file(lists):
    config = cfg(lists, noise_lists=[str(lists / "noise.lst")])
    _, first = validate_mixing(config, skip_bad=True, resample=True, cache_dir=lists / "cache")
    _, second = validate_mixing(config, skip_bad=True, resample=True, cache_dir=lists / "cache")
    assert first.level_reads == 7 and first.header_reads > 0  # 5 noise files, 2 responses
    # Only corrupt.wav, which has no header to keep, is opened again; every level comes from the cache.
    assert second.header_reads == 1 and second.level_reads == 0 and second.level_hits == 7
    wav(lists, "n_good.wav", np.zeros(RATE))  # rewritten: the cached level must not be trusted
    with pytest.raises(DataError, match="noise.lst:1: .*n_good.wav: silent"):
        validate_mixing(config, resample=True, cache_dir=lists / "cache")


def test_file_index_reads_single_file_lists_and_the_clean_column_of_pair_lists(tmp_path):
    (tmp_path / "files.lst").write_text("# x\na.wav 1.5\n  b.wav\t# comment\n\nsub/c#2.wav\n")
    (tmp_path / "pairs.lst").write_text("n1.wav c1.wav 2.0\n/abs/n2.wav /abs/c2.wav\n")
    files = FileIndex.from_lists([tmp_path / "files.lst"])
    assert list(files) == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), str(tmp_path / "sub/c#2.wav")]
    assert files.where(2) == f"{tmp_path / 'files.lst'}:5" and files.durations[0] == 1.5 and math.isnan(files.durations[1])
    pairs = FileIndex.from_pair_lists([tmp_path / "pairs.lst"])
    assert list(pairs) == [str(tmp_path / "c1.wav"), "/abs/c2.wav"] and pairs.durations[0] == 2.0
    kept = pairs.subset(np.array([False, True]))
    assert list(kept) == ["/abs/c2.wav"] and kept.where(0).endswith("pairs.lst:2")
    with pytest.raises(DataError, match=r"files.lst:1: \"n.wav c.wav x\": expected 'path \[duration\]', found 3 fields"):
        (tmp_path / "files.lst").write_text("n.wav c.wav x\n")
        FileIndex.from_lists([tmp_path / "files.lst"])


def test_digests_refuse_changed_lists_and_settings_but_not_a_moved_corpus(tmp_path):
    made = make_demo_corpus(tmp_path / "demo", seed=3, num_train=12, num_valid=4, seconds=0.6)
    config = MixingConfig(clean_lists=[str(made["clean_train"])], noise_lists=[str(made["noise_train"])],
                          rir_lists=[str(made["rir_train"])])
    corpus, _ = validate_mixing(config)
    record = mixing_record(config, list_digests(corpus), seed=777, sample_rate_hz=RATE, segment_seconds=1.0)
    assert compare_records(record, mixing_record(config, list_digests(corpus), seed=777, sample_rate_hz=RATE,
                                                 segment_seconds=1.0)) == []
    # The corpus moved with its lists (relative paths): another path, the same record.
    shutil.copytree(tmp_path / "demo", tmp_path / "moved")
    moved = MixingConfig(clean_lists=[str(tmp_path / "moved/clean_train.lst")], noise_lists=[str(tmp_path / "moved/noise_train.lst")],
                         rir_lists=[str(tmp_path / "moved/rir_train.lst")])
    moved_corpus, _ = validate_mixing(moved)
    assert compare_records(record, mixing_record(moved, list_digests(moved_corpus), seed=777, sample_rate_hz=RATE,
                                                 segment_seconds=1.0)) == []
    # Settings that change the mixtures.
    snr = MixingConfig(**{**config.__dict__, "snr_db": (5.0, 10.0)})
    assert compare_records(record, mixing_record(snr, list_digests(corpus), seed=777, sample_rate_hz=RATE,
                                                 segment_seconds=1.0)) == ["setting snr_db: [0.0, 15.0] in the checkpoint, [5.0, 10.0] now"]
    # A line added to the noise list; a noise file gone (skipped: other lines used).
    noise_list = tmp_path / "moved/noise_train.lst"
    noise_list.write_text(noise_list.read_text() + "noise/train/0000.wav\n")
    changed, _ = validate_mixing(moved)
    diff = compare_records(record, mixing_record(moved, list_digests(changed), seed=777, sample_rate_hz=RATE, segment_seconds=1.0))
    assert diff == [f"noise list 1 {noise_list} (was {made['noise_train']}): its content changed (4 entries used then, 5 now)"]
    (tmp_path / "moved/rir/train/0001.wav").unlink()
    gone, _ = validate_mixing(moved, skip_bad=True)
    diff = compare_records(record, mixing_record(moved, list_digests(gone), seed=777, sample_rate_hz=RATE, segment_seconds=1.0))
    assert any(line.startswith("rir list 1") and "other lines are skipped now (4 entries used then, 3 now)" in line for line in diff), diff


def test_corpus_summary_for_the_card():
    config = MixingConfig(clean_lists=["c.lst"], noise_lists=["a.lst", "b.lst"], noise_weights=[3, 1], rir_lists=["r.lst"],
                          rir_probability=0.25, noise_sources=(1, 2), speech_level_dbfs=(-35, -15), premixed_share=0.2)
    stats = CorpusStats(clean_files=1000, clean_seconds=3600 * 5.5, noise_files=(300, 100), noise_seconds=(3600.0, 1800.0),
                        rir_files=40)
    card = corpus_summary(config, stats, mixtures_per_epoch=1000, premixed_per_epoch=250, premixed_pairs=800,
                          premixed_seconds=7200.0)
    assert card["line"] == (
        "dynamic: clean 5.50 h (1000 files) × noise 1.50 h (400 files in 2 list(s), weights 0.75/0.25), SNR 0 to 15 dB, "
        "speech -35 to -15 dBFS, 1-2 noise source(s), RIR 25% of mixtures (40 responses, dry target); 1000 mixtures per "
        "epoch + 250 pre-mixed pairs (20% of 1250) drawn from 800 pairs / 2.00 h")
    assert card["noise_hours"] == 1.5 and card["rir_share"] == 0.25 and card["noise_weights"] == [0.75, 0.25]
    unknown = corpus_summary(MixingConfig(clean_lists=["c.lst"], noise_lists=["a.lst"]),
                             CorpusStats(10, math.nan, (3,), (60.0,), 0), mixtures_per_epoch=10)
    assert unknown["line"].startswith("dynamic: clean ? h (10 files) × noise 0.02 h (3 files in 1 list(s)), SNR 0 to 15 dB, "
                                      "speech -25 dBFS, 1 noise source(s), no RIR")


def test_the_demo_corpus_writes_valid_deterministic_mixing_lists(tmp_path):
    small = dict(seed=5, num_train=16, num_valid=4, seconds=0.6)
    made = make_demo_corpus(tmp_path / "a", **small)
    again = make_demo_corpus(tmp_path / "b", **small, num_workers=1)
    for name in ("clean_train", "clean_valid", "noise_train", "noise_valid", "rir_train", "rir_valid"):
        assert made[name].read_bytes() == again[name].read_bytes()
    for sub in ("noise/train", "noise/valid", "rir/train", "rir/valid"):
        files = sorted((tmp_path / "a" / sub).glob("*.wav"))
        assert files and [f.read_bytes() for f in files] == [f.read_bytes() for f in sorted((tmp_path / "b" / sub).glob("*.wav"))]
    config = MixingConfig(clean_lists=[str(made["clean_train"])], noise_lists=[str(made["noise_train"])],
                          rir_lists=[str(made["rir_train"])], valid_clean_lists=[str(made["clean_valid"])],
                          valid_noise_lists=[str(made["noise_valid"])], valid_rir_lists=[str(made["rir_valid"])])
    train, report = validate_mixing(config)
    valid, _ = validate_mixing(config, "valid")
    assert report.ok and train.num_clean == 16 and valid.num_clean == 4
    assert len(train.noises[0]) == 4 and len(train.rirs) == 4 and len(valid.noises[0]) == 2 and len(valid.rirs) == 2
    short = [d for d in train.noises[0].durations if d < 1.0]
    assert short  # some noise is shorter than the demo's 1 s crops: the looping is exercised
    before = (tmp_path / "a" / "noise_train.lst").stat().st_mtime_ns
    make_demo_corpus(tmp_path / "a", **small)  # complete: nothing rewritten
    assert (tmp_path / "a" / "noise_train.lst").stat().st_mtime_ns == before
