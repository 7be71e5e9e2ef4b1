"""The demo corpus: deterministic, SNR 0-15 dB, idempotent, valid, usable end to end."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data import CropDataset, CursorSampler, PairIndex, build_loader, make_demo_corpus, validate
from data.demo import main

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(seed=11, num_train=14, num_valid=2, seconds=1.0)  # 16 pairs: written by 2 processes


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.suffix in (".wav", ".lst")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return make_demo_corpus(out, **SMALL)


def test_same_seed_same_bytes_other_seed_other_audio(demo, tmp_path):
    again = make_demo_corpus(tmp_path / "again", **SMALL, num_workers=1)  # one process: same result as a pool
    assert digest(demo["dir"]) == digest(again["dir"])
    other = make_demo_corpus(tmp_path / "other", **{**SMALL, "seed": 12})
    assert digest(other["dir"])["train/clean/0000.wav"] != digest(demo["dir"])["train/clean/0000.wav"]


def test_lists_snr_and_format(demo):
    train = PairIndex.from_lists([demo["train"]])
    valid = PairIndex.from_lists([demo["valid"]])
    assert len(train) == 14 and len(valid) == 2
    for index in (train, valid):
        for i in range(len(index)):
            noisy, rate = sf.read(index.noisy(i))
            clean, _ = sf.read(index.clean(i))
            info = sf.info(index.noisy(i))
            assert rate == 48000 and info.subtype == "PCM_16" and noisy.shape == clean.shape
            assert abs(noisy.size / rate - index.duration_seconds(i)) < 1e-5
            assert 0.8 - 1e-3 <= index.duration_seconds(i) <= 1.2 + 1e-3
            snr = 10 * np.log10(np.sum(clean**2) / np.sum((noisy - clean) ** 2))
            assert -0.05 <= snr <= 15.05, snr
            assert np.abs(noisy).max() < 1.0
            assert np.mean(np.abs(clean) < 1e-4) > 0.05  # pauses in the speech


def test_second_call_is_a_no_op_and_a_damaged_corpus_is_rebuilt(demo):
    wav = demo["dir"] / "train" / "clean" / "0001.wav"
    before = wav.stat().st_mtime_ns
    make_demo_corpus(demo["dir"], **SMALL)
    assert wav.stat().st_mtime_ns == before
    good = wav.read_bytes()
    wav.write_bytes(good[:100])
    make_demo_corpus(demo["dir"], **SMALL)
    assert wav.read_bytes() == good


def test_valid_and_loadable(demo):
    index, report = validate([demo["train"], demo["valid"]])
    assert report.ok and len(index) == 16
    dataset = CropDataset(index, segment_seconds=0.5)
    batches = list(build_loader(dataset, CursorSampler(len(index), 4, 0, 1), num_workers=0))
    assert len(batches) == 4 and batches[0][0].shape == (4, 24000)


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path / "cli"), "--seed", "3", "--num_train", "2", "--num_valid", "1", "--seconds", "0.5"]) == 0
    assert "train.lst" in capsys.readouterr().out
    assert (tmp_path / "cli" / "valid.lst").read_text().count(".wav") == 2
    done = subprocess.run([sys.executable, "-m", "data.demo", str(tmp_path / "cli"), "--seed", "3", "--num_train", "2",
                           "--num_valid", "1", "--seconds", "0.5"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(__import__("shutil").which("espeak-ng") is not None, reason="espeak-ng is installed")
def test_espeak_requested_but_missing_is_a_clear_error(tmp_path):
    from data import DataError

    with pytest.raises(DataError, match="espeak-ng"):
        make_demo_corpus(tmp_path, use_espeak=True, **SMALL)
