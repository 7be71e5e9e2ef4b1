"""CropDataset crops, partial reads, levels, sample rates, errors; build_loader batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF

from data import CropDataset, CursorSampler, DataError, EvalSampler, PairIndex, build_loader
from data.audio import crop_offset, normalize_level, read_window

RATE = 48000


def wav(path: Path, x: np.ndarray, rate: int = RATE, subtype: str = "FLOAT") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, rate, subtype=subtype)
    return path.name


def listing(tmp_path: Path, pairs: list[tuple[str, str]], name: str = "pairs.lst") -> PairIndex:
    lst = tmp_path / name
    lst.write_text("".join(f"{n} {c}\n" for n, c in pairs))
    return PairIndex.from_lists([lst])


@pytest.fixture
def ramp_pair(tmp_path):
    """A clean signal and a noise ramp that encodes its own position: noisy - clean reveals the offset."""
    n = RATE * 3
    clean = (0.3 * np.sin(2 * np.pi * 220 * np.arange(n) / RATE)).astype(np.float32)
    noise = (np.arange(n) / n * 0.5).astype(np.float32)
    wav(tmp_path / "noisy.wav", clean + noise)
    wav(tmp_path / "clean.wav", clean)
    wav(tmp_path / "noise.wav", noise)
    return listing(tmp_path, [("noisy.wav", "clean.wav")]), clean, noise


def test_noisy_and_clean_come_from_the_same_window(ramp_pair):
    index, clean, noise = ramp_pair
    ds = CropDataset(index, segment_seconds=1.0, normalize=False)
    offsets = set()
    for epoch in range(6):
        noisy_crop, clean_crop = (t.numpy() for t in ds[(0, epoch)])
        assert noisy_crop.shape == clean_crop.shape == (RATE,) and noisy_crop.dtype == np.float32
        off = int(round(float(noisy_crop[0] - clean_crop[0]) / 0.5 * noise.size))
        np.testing.assert_allclose(noisy_crop - clean_crop, noise[off : off + RATE], atol=1e-6)
        np.testing.assert_array_equal(clean_crop, clean[off : off + RATE])
        assert off == crop_offset(777, epoch, 0, clean.size - RATE)
        offsets.add(off)
    assert len(offsets) == 6  # a different random crop each epoch


def test_crops_are_a_function_of_seed_epoch_and_index(ramp_pair):
    index, _, _ = ramp_pair
    a = CropDataset(index, segment_seconds=0.5, seed=5)
    b = CropDataset(index, segment_seconds=0.5, seed=5)  # e.g. the resumed run
    assert torch.equal(a[(0, 3)][0], b[(0, 3)][0])
    assert not torch.equal(a[(0, 3)][0], CropDataset(index, segment_seconds=0.5, seed=6)[(0, 3)][0])
    fixed = CropDataset(index, segment_seconds=0.5, seed=5, random_crop=False)
    assert torch.equal(fixed[(0, 0)][1], fixed[(0, 9)][1])
    assert torch.equal(fixed[0][1], fixed[(0, 1)][1])


@pytest.mark.parametrize("fmt, subtype", [("wav", "PCM_16"), ("flac", "PCM_24"), ("wav", "FLOAT")])
def test_partial_read_equals_the_same_slice_of_a_full_read(tmp_path, fmt, subtype):
    x = np.random.default_rng(1).uniform(-0.5, 0.5, (RATE * 2 + 17, 2))
    path = tmp_path / f"x.{fmt}"
    sf.write(path, x, RATE, subtype=subtype)
    full, _ = sf.read(path, dtype="float32", always_2d=True)
    with sf.SoundFile(path) as f:
        for start, count in [(0, 100), (12345, RATE), (full.shape[0] - 500, 500), (7, 1)]:
            np.testing.assert_array_equal(read_window(f, start, count, RATE), full[start : start + count, 0])


def test_short_pairs_are_zero_padded_and_first_channel_is_used(tmp_path):
    stereo = np.stack([np.full(RATE // 2, 0.25), np.full(RATE // 2, -0.75)], axis=1)
    wav(tmp_path / "n.wav", stereo)
    wav(tmp_path / "c.wav", stereo * 0.5)
    ds = CropDataset(listing(tmp_path, [("n.wav", "c.wav")]), segment_seconds=1.0, normalize=False)
    noisy, clean = ds[(0, 0)]
    assert noisy.shape == (RATE,)
    assert torch.all(noisy[: RATE // 2] == 0.25) and torch.all(noisy[RATE // 2 :] == 0)
    assert torch.all(clean[: RATE // 2] == 0.125)


def test_level_normalisation_matches_the_reference_rule(tmp_path):
    rng = np.random.default_rng(2)
    speech = rng.standard_normal(RATE * 2) * np.repeat(rng.uniform(0, 0.2, 40), RATE // 20)
    wav(tmp_path / "n.wav", speech * 0.01)
    wav(tmp_path / "c.wav", np.zeros(RATE * 2))
    ds = CropDataset(listing(tmp_path, [("n.wav", "c.wav")]), segment_seconds=1.0)
    noisy, clean = (t.numpy() for t in ds[(0, 1)])
    power = noisy.astype(np.float64) ** 2
    active_db = 10 * np.log10(power[power > power.mean()].mean())
    assert abs(active_db - -25.0) < 0.01
    assert np.all(clean == 0)  # silence stays silence: no NaN from 0/0
    raw = CropDataset(ds.index, segment_seconds=1.0, normalize=False)[(0, 1)][0].numpy()
    reference = raw / ((raw**2).mean() ** 0.5 + 1e-6) * 10 ** (-25 / 20)
    reference = reference * 10 ** (-25 / 20) / ((reference**2)[reference**2 > (reference**2).mean()].mean() ** 0.5 + 1e-6)
    np.testing.assert_allclose(noisy, reference, rtol=1e-4)
    np.testing.assert_allclose(normalize_level(raw), noisy)


def test_wrong_rate_is_refused_unless_resampling(tmp_path):
    x = (0.2 * np.sin(2 * np.pi * 300 * np.arange(16000 * 3) / 16000)).astype(np.float32)
    wav(tmp_path / "n16.wav", x, rate=16000)
    wav(tmp_path / "c16.wav", x * 0.5, rate=16000)
    index = listing(tmp_path, [("n16.wav", "c16.wav")])
    with pytest.raises(DataError, match=r"pairs.lst:1: .*n16.wav: sample rate 16000 Hz, expected 48000 Hz"):
        CropDataset(index, segment_seconds=1.0)[(0, 0)]
    ds = CropDataset(index, segment_seconds=1.0, resample=True, normalize=False)
    noisy, clean = (t.numpy() for t in ds[(0, 2)])
    assert noisy.shape == clean.shape == (RATE,)
    full = AF.resample(torch.from_numpy(x), 16000, RATE).numpy()
    off = crop_offset(777, 2, 0, 3 * RATE - RATE)
    np.testing.assert_allclose(noisy, full[off : off + RATE], atol=1e-5)
    np.testing.assert_allclose(clean, 0.5 * full[off : off + RATE], atol=1e-5)
    wav(tmp_path / "c48.wav", full)  # noisy at 16 kHz, clean at 48 kHz: still the same window
    mixed = CropDataset(listing(tmp_path, [("n16.wav", "c48.wav")], "mixed.lst"), 1.0, resample=True, normalize=False)
    noisy, clean = (t.numpy() for t in mixed[(0, 5)])
    np.testing.assert_allclose(noisy, clean, atol=1e-5)


def test_read_errors_name_the_file_and_line(tmp_path):
    wav(tmp_path / "ok.wav", np.zeros(RATE))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage" * 10)
    index = listing(tmp_path, [("ok.wav", "ok.wav"), ("ok.wav", "corrupt.wav"), ("gone.wav", "ok.wav")])
    ds = CropDataset(index, segment_seconds=0.5)
    with pytest.raises(DataError, match=r"pairs.lst:2: .*corrupt.wav: cannot open"):
        ds[(1, 0)]
    with pytest.raises(DataError, match=r"pairs.lst:3: .*gone.wav: file not found"):
        ds[(2, 0)]
    loader = build_loader(ds, [[(0, 0), (1, 0)], [(0, 0)]], num_workers=1, persistent_workers=False)
    batches = iter(loader)
    with pytest.raises(DataError, match=r"pairs.lst:2: .*corrupt.wav"):  # from inside a worker process
        next(batches)
    assert len(list(batches)) == 1  # drained: torch then stops its worker at once (else ~5 s at teardown)


def test_loader_batches_are_the_same_with_and_without_workers(tmp_path):
    rng = np.random.default_rng(3)
    pairs = []
    for k in range(6):
        x = rng.uniform(-0.3, 0.3, int(RATE * rng.uniform(0.3, 0.9))).astype(np.float32)
        pairs.append((wav(tmp_path / f"n{k}.wav", x, subtype="PCM_16"), wav(tmp_path / f"c{k}.wav", x / 2, subtype="PCM_16")))
    ds = CropDataset(listing(tmp_path, pairs), segment_seconds=0.5)
    batches = {}
    for workers in (0, 2):
        sampler = CursorSampler(len(ds), micro_batch_size=2, rank=1, world_size=2, seed=4)
        sampler.set_epoch(1)
        batches[workers] = list(build_loader(ds, sampler, num_workers=workers))
    assert len(batches[0]) == 1
    for (n0, c0), (n2, c2) in zip(batches[0], batches[2], strict=True):
        assert n0.shape == c0.shape == (2, RATE // 2) and n0.dtype == torch.float32
        assert torch.equal(n0, n2) and torch.equal(c0, c2)
    eval_loader = build_loader(CropDataset(ds.index, 0.5, random_crop=False), EvalSampler(len(ds), 4, 3, 4), num_workers=0)
    (noisy, clean, weight), = list(eval_loader)
    assert noisy.shape == (2, RATE // 2) and weight.tolist() == [1.0, 0.0]
