"""Dynamic mixing: SNR as drawn, a pure function of (seed, epoch, index) at any world size, worker count and
resume; silent crops, full scale, short noise, reverberation, pre-mixed shares."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data import (CropDataset, CursorSampler, DataError, EvalSampler, JoinedDataset, MixingConfig, MixingDataset,
                  PairIndex, build_loader, epoch_layout, flag_counts, load_mixing_lists, mixing_training_set)
from data.demo_corpus import synth_noise, synth_rir, synth_speech
from data.mixing import (CLIPPED, NOISE_DROPPED, PEAK_SCALED, REVERBERANT, SILENT_CLEAN, Draws,
                         loop_with_crossfade)

RATE = 48000
SEGMENT = 0.5


def wav(path: Path, x: np.ndarray, rate: int = RATE, subtype: str = "FLOAT") -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.asarray(x, dtype=np.float32), rate, subtype=subtype)
    return path.name


def write_list(path: Path, names: list[str]) -> str:
    path.write_text("".join(f"{n}\n" for n in names))
    return str(path)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """Clean speech of several lengths (one shorter than a crop), two noise lists (one file shorter than a
    crop), impulse responses (synthetic, and a pure delayed tap), a silent clean file in a list of its own."""
    d = tmp_path_factory.mktemp("mix")
    rng = np.random.default_rng(5)
    clean = []
    for k, seconds in enumerate((0.3, 0.8, 1.2, 2.0, 0.6, 1.5, 0.9, 1.1)):
        x = synth_speech(rng, int(seconds * RATE))
        clean.append(wav(d / f"c{k}.wav", 0.1 * x / np.abs(x).max(), subtype="PCM_16"))
    write_list(d / "clean.lst", clean)
    noise_a = [wav(d / f"na{k}.wav", 0.05 * synth_noise(rng, int(s * RATE))) for k, s in enumerate((2.0, 0.2, 1.0))]
    noise_b = [wav(d / f"nb{k}.wav", 0.05 * synth_noise(rng, int(s * RATE))) for k, s in enumerate((1.5, 0.7))]
    write_list(d / "noise_a.lst", noise_a)
    write_list(d / "noise_b.lst", noise_b)
    delta = np.zeros(500)
    delta[123] = 0.7
    rirs = [wav(d / f"r{k}.wav", synth_rir(np.random.default_rng([9, k]))) for k in range(3)] + [wav(d / "delta.wav", delta)]
    write_list(d / "rir.lst", rirs)
    write_list(d / "delta.lst", ["delta.wav"])
    write_list(d / "silent.lst", [wav(d / "silent.wav", np.zeros(RATE))])
    return d


def config(d: Path, **over) -> MixingConfig:
    base = dict(clean_lists=[str(d / "clean.lst")], noise_lists=[str(d / "noise_a.lst"), str(d / "noise_b.lst")],
                noise_weights=[0.7, 0.3], rir_lists=[str(d / "rir.lst")], rir_probability=0.5, noise_sources=(1, 3),
                snr_db=(-5.0, 20.0))
    return MixingConfig(**{**base, **over})


def dataset(cfg: MixingConfig, **kw) -> MixingDataset:
    return MixingDataset(load_mixing_lists(cfg), cfg, segment_seconds=SEGMENT, **kw)


def snr_of(m) -> float:
    s, n = m.speech.astype(np.float64), m.noise.astype(np.float64)
    return 10 * math.log10(np.dot(s, s) / np.dot(n, n))


@pytest.mark.parametrize("over", [
    {},
    {"target": "early", "short_noise": "pad", "rir_probability": 1.0},
    {"target": "reverberant", "noise_sources": (2, 2), "crossfade_ms": 0.0},
    {"speech_level_dbfs": (-12.0, -3.0), "snr_db": (-5.0, 0.0)},  # loud: the peak policy acts on most
    {"rir_lists": [], "renormalize": True},
])
def test_each_mixture_has_the_drawn_snr_measured_on_the_signals_as_mixed(corpus_dir, over):
    ds = dataset(config(corpus_dir, **over))
    scaled = 0
    for epoch in (0, 3):
        for i in range(len(ds)):
            m = ds.mix(i, epoch)
            assert abs(snr_of(m) - m.snr_db) < 0.1, (i, epoch, snr_of(m), m.snr_db)
            assert -5.0 <= m.snr_db <= 20.0
            take = m.valid_samples
            before = m.noisy / np.float32(m.noisy_gain)
            np.testing.assert_allclose(before[:take], (m.speech + m.noise)[:take], atol=2e-6)
            assert not m.noisy[take:].any() and not m.clean[take:].any()  # zero padding of short clean files
            assert np.isfinite(m.noisy).all() and np.isfinite(m.clean).all()
            assert (m.rir_where is not None) == bool(m.flags & REVERBERANT)
            if not over.get("renormalize"):
                assert np.abs(m.noisy).max() <= 0.99 + 1e-6 and np.abs(m.clean).max() <= 0.99 + 1e-6
            scaled += bool(m.flags & PEAK_SCALED)
    if "speech_level_dbfs" in over:
        assert scaled > len(ds)  # most were over full scale, and each says so


def test_speech_level_and_noise_weights_follow_the_settings(corpus_dir):
    ds = dataset(config(corpus_dir, rir_lists=[], noise_sources=(1, 1), speech_level_dbfs=(-30.0, -20.0)), num_samples=400)
    lists = []
    for i in range(len(ds)):
        m = ds.mix(i, 0)
        assert -30.0 <= m.speech_level_dbfs < -20.0
        active = m.speech[: m.valid_samples]
        rms = np.sqrt(np.mean(active**2))
        loud = active[np.abs(active) > rms]  # the reference's active-level rule
        assert abs(20 * np.log10(np.sqrt(np.mean(loud**2))) - m.speech_level_dbfs) < 0.05
        lists.append("noise_a" in m.noise_where[0])
    assert 0.62 < np.mean(lists) < 0.78  # weights 0.7 / 0.3


def mixtures_seen(ds, world: int, workers: int, epochs=(0, 1), micro=2, quantum=12) -> dict:
    """{(sample, epoch): digest of (noisy, clean)} over every rank of a world, read through build_loader."""
    seen = {}
    for rank in range(world):
        sampler = CursorSampler(len(ds), micro, rank, world, seed=7, epoch_quantum=quantum)
        loader = build_loader(ds, sampler, num_workers=workers, persistent_workers=False)
        for epoch in epochs:
            sampler.set_epoch(epoch)
            for keys, (noisy, clean) in zip(iter(sampler), loader, strict=True):
                for k, key in enumerate(keys):
                    seen[key] = digest(noisy[k], clean[k])
    return seen


def digest(*tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def test_mixtures_are_the_same_at_any_world_size_and_worker_count(corpus_dir):
    ds = dataset(config(corpus_dir), num_samples=36)
    reference = mixtures_seen(ds, 1, 0)
    assert len(reference) == 72 and len(set(reference.values())) == 72  # every sample and epoch its own mixture
    for world, workers in ((2, 0), (3, 2), (2, 1)):
        assert mixtures_seen(ds, world, workers) == reference, (world, workers)
    # The same clean file in two epochs (and twice within an epoch) is mixed differently.
    assert reference[(0, 0)] != reference[(0, 1)] and ds.clean_file(0, 0) == ds.clean_file(8, 0)
    assert reference[(0, 0)] != reference[(8, 0)]


def test_resume_at_another_world_size_continues_with_the_same_mixtures(corpus_dir):
    ds = dataset(config(corpus_dir), num_samples=36)
    quantum = 12

    def run(samplers, steps=None):
        """Lock-step micro-batches on every rank (each through its own loader); returns key -> mixture digest."""
        out = {}
        loaders = [iter(build_loader(ds, s, num_workers=0)) for s in samplers]
        keys = [iter(s) for s in samplers]
        done = 0
        while steps is None or done < steps:
            try:
                batch = [(next(k), next(it)) for k, it in zip(keys, loaders)]
            except StopIteration:
                break
            for key_list, (noisy, clean) in batch:
                out.update({key: digest(noisy[j], clean[j]) for j, key in enumerate(key_list)})
            for s in samplers:
                s.advance()
            done += 1
        return out

    whole = [CursorSampler(len(ds), 2, r, 2, seed=7, epoch_quantum=quantum) for r in range(2)]
    for s in whole:
        s.set_epoch(1)
    uninterrupted = run(whole)

    first = [CursorSampler(len(ds), 2, r, 3, seed=7, epoch_quantum=quantum) for r in range(3)]
    for s in first:
        s.set_epoch(1)
    before = run(first, steps=2)  # one optimizer step at world 3: 12 samples
    state = first[0].state_dict()  # "killed" here; the checkpoint holds the cursor
    for world in (1, 2):
        resumed = [CursorSampler(len(ds), 2, r, world, seed=7, epoch_quantum=quantum) for r in range(world)]
        for s in resumed:
            s.load_state_dict(state)
        after = run(resumed)
        assert not set(before) & set(after)
        assert {**before, **after} == uninterrupted, world


def test_validation_mixtures_are_fixed_across_epochs(corpus_dir):
    cfg = config(corpus_dir)
    fixed = dataset(cfg, fixed=True)
    train = dataset(cfg)
    sampler = EvalSampler(len(fixed), 3, 0, 1)
    epochs = []
    for epoch in (0, 1, 5):
        items = [fixed[(i, epoch, w)] for batch in sampler for i, _, w in batch]
        epochs.append([digest(noisy, clean) for noisy, clean, _ in items])
    assert epochs[0] == epochs[1] == epochs[2]
    assert epochs[0] != [digest(*train[(i, 0)]) for i in range(len(train))]  # its own stream, not epoch 0's


def test_a_silent_clean_crop_is_noise_alone_counted_never_nan(corpus_dir):
    cfg = config(corpus_dir, clean_lists=[str(corpus_dir / "silent.lst")], rir_probability=1.0, renormalize=True)
    ds = MixingDataset(load_mixing_lists(cfg), cfg, segment_seconds=SEGMENT, return_flags=True, num_samples=6)
    for i in range(len(ds)):
        m = ds.mix(i, 2)
        assert m.flags & SILENT_CLEAN
        assert not m.clean.any() and np.isfinite(m.noisy).all()
        assert abs(10 * np.log10(np.mean(m.noise.astype(np.float64) ** 2)) - (m.speech_level_dbfs - m.snr_db)) < 0.05
    batches = list(build_loader(ds, CursorSampler(len(ds), 3, 0, 1), num_workers=0))
    assert sum(flag_counts(flags)["silent_clean"] for _, _, flags in batches) == 6


def test_a_silent_noise_crop_is_drawn_again_then_dropped_and_counted(tmp_path, corpus_dir):
    quiet = np.zeros(RATE)
    quiet[: RATE // 10] = 0.05 * np.random.default_rng(1).standard_normal(RATE // 10)  # noise only in its first 0.1 s
    write_list(tmp_path / "gappy.lst", [wav(tmp_path / "gappy.wav", quiet)])
    cfg = config(corpus_dir, noise_lists=[str(tmp_path / "gappy.lst")], noise_weights=[], rir_lists=[], noise_sources=(2, 2))
    ds = dataset(cfg, num_samples=40)
    dropped = 0
    for i in range(len(ds)):
        m = ds.mix(i, 0)
        assert np.isfinite(m.noisy).all()
        if m.flags & NOISE_DROPPED:
            dropped += 1
            assert len(m.noise_where) < 2
        if m.noise_where:
            assert abs(snr_of(m) - m.snr_db) < 0.1
    assert 0 < dropped < len(ds)


def test_full_scale_is_never_clipped_silently(corpus_dir):
    loud = dict(speech_level_dbfs=(-6.0, -6.0), snr_db=(-5.0, -5.0), rir_lists=[])
    scaled = dataset(config(corpus_dir, **loud))
    clipped = dataset(config(corpus_dir, **loud, peak_policy="clip", max_peak=0.9))
    quiet = dataset(config(corpus_dir, rir_lists=[], speech_level_dbfs=(-40.0, -40.0), snr_db=(20.0, 20.0)))
    for i in range(len(scaled)):
        s, c, q = scaled.mix(i, 0), clipped.mix(i, 0), quiet.mix(i, 0)
        assert s.flags & PEAK_SCALED and s.peak_gain < 1 and np.abs(s.noisy).max() == pytest.approx(0.99, abs=1e-6)
        assert abs(snr_of(s) - s.snr_db) < 0.1  # lowered together: the SNR holds
        assert c.flags & CLIPPED and c.clipped_samples > 0 and np.abs(c.noisy).max() == pytest.approx(0.9, abs=1e-6)
        assert np.abs(c.clean).max() <= 0.9 + 1e-6  # the target is never clipped
        assert not q.flags & (PEAK_SCALED | CLIPPED) and q.peak_gain == 1.0 and q.clipped_samples == 0


def test_short_noise_is_looped_with_equal_power_crossfades_not_clicks():
    rng = np.random.default_rng(2)
    white = torch.from_numpy(rng.standard_normal(2400).astype(np.float32))  # 50 ms
    c = 480
    looped = loop_with_crossfade(white, 1000, RATE * 2, c).numpy()
    assert looped.shape == (RATE * 2,)
    # Power in the middle of each join, averaged over the joins, equals the file's: no 3 dB dip, no bump.
    period = 2400 - c
    mids = [1400 - c // 2 + j * period for j in range(5, 35)]  # first join at 1400 - c/2 (middle of its fade)
    power = np.mean([np.mean(looped[m - 60 : m + 60] ** 2) for m in mids])
    assert abs(10 * np.log10(power / np.mean(white.numpy() ** 2))) < 0.5
    # A sine whose period does not divide the file: a hard loop jumps, the crossfaded one stays smooth.
    t = np.arange(2400) / RATE
    sine = torch.from_numpy(np.sin(2 * np.pi * 437 * t).astype(np.float32))
    step = 2 * np.pi * 437 / RATE  # the largest sample-to-sample change of the sine itself
    assert np.abs(np.diff(loop_with_crossfade(sine, 0, RATE, 0).numpy())).max() > 10 * step
    assert np.abs(np.diff(loop_with_crossfade(sine, 0, RATE, c).numpy())).max() < 1.5 * step


def test_the_dry_target_is_the_direct_path_aligned_with_the_mixture(corpus_dir):
    cfg = config(corpus_dir, rir_lists=[str(corpus_dir / "delta.lst")], rir_probability=1.0)
    for target in ("dry", "reverberant", "early"):
        ds = dataset(MixingConfig(**{**cfg.__dict__, "target": target}))
        for i in range(len(ds)):
            m = ds.mix(i, 0)
            np.testing.assert_allclose(m.clean, m.speech, atol=1e-6)  # a pure delayed tap: all three agree
    # Real responses: the dry target is the clean crop delayed by the direct path's index (the same crop
    # without a response, same draws) and scaled; the reverberant target is the speech in the mixture.
    with_rir = config(corpus_dir, rir_probability=1.0)
    wet, dry = dataset(with_rir), dataset(config(corpus_dir, rir_probability=0.0))
    reverberant = dataset(MixingConfig(**{**with_rir.__dict__, "target": "reverberant"}))
    for i in range(len(wet)):
        m, plain = wet.mix(i, 0), dry.mix(i, 0)
        h = sf.read(m.rir_where.split(": ")[1], dtype="float32")[0]
        d, take = int(np.abs(h).argmax()), m.valid_samples
        a, b = m.clean[d:take].astype(np.float64), plain.clean[: take - d].astype(np.float64)
        assert np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)) > 0.99999
        assert np.sign(np.dot(a, b)) == np.sign(h[d])
        r = reverberant.mix(i, 0)
        np.testing.assert_allclose(r.clean, r.speech, atol=1e-7)


def test_a_pure_function_of_seed_epoch_and_index():
    a, b = Draws(777, 3, 10), Draws(777, 3, 10)
    assert [a.bits(s, k) for s in range(12) for k in range(3)] == [b.bits(s, k) for s in range(12) for k in range(3)]
    assert Draws(777, 4, 10).bits(1) != a.bits(1) and Draws(778, 3, 10).bits(1) != a.bits(1)
    assert Draws(777, None, 10).bits(1) != a.bits(1) and Draws(777, 3, 11).bits(1) != a.bits(1)
    u = [Draws(1, 0, i).uniform(4, -5.0, 20.0) for i in range(4000)]
    assert min(u) >= -5.0 and max(u) < 20.0 and abs(np.mean(u) - 7.5) < 0.5


def test_a_share_of_pre_mixed_pairs_under_one_sampler_index_space(tmp_path, corpus_dir):
    rng = np.random.default_rng(4)
    pairs = []
    for k in range(20):
        x = rng.uniform(-0.3, 0.3, RATE).astype(np.float32)
        pairs.append(f"{wav(tmp_path / f'pn{k}.wav', x)} {wav(tmp_path / f'pc{k}.wav', x / 2)}\n")
    (tmp_path / "pairs.lst").write_text("".join(pairs))
    crops = CropDataset(PairIndex.from_lists([tmp_path / "pairs.lst"]), segment_seconds=SEGMENT)
    cfg = config(corpus_dir, premixed_share=0.25, samples_per_epoch=24)
    joined, premixed, mixtures = mixing_training_set(cfg, load_mixing_lists(cfg), premixed=crops, segment_seconds=SEGMENT)
    assert (premixed, mixtures) == (8, 24) and len(joined) == 32 and isinstance(joined, JoinedDataset)
    per_epoch = {}
    for epoch in (0, 1, 2):
        for world in (1, 2):
            flags, items = [], set()
            for rank in range(world):
                sampler = CursorSampler(len(joined), 4, rank, world, seed=1)
                sampler.set_epoch(epoch)
                for batch in build_loader(joined, sampler, num_workers=0):
                    flags += batch[2].tolist()
                for keys in sampler:
                    items |= {joined.locate(j, e) for j, e in keys}
            assert flag_counts(flags)["premixed"] == 8  # exact per epoch
            per_epoch.setdefault(epoch, items)
            assert per_epoch[epoch] == items
    # Successive epochs move on through the pairs: epochs 0-2 use pairs 0-7, 8-15, then 16-19 and 0-3.
    assert sorted(i for p, i in per_epoch[1] if p == 0) == list(range(8, 16))
    assert sorted(i for p, i in per_epoch[2] if p == 0) == [0, 1, 2, 3, 16, 17, 18, 19]
    with pytest.raises(DataError, match=r"asks for 72 pre-mixed pairs per epoch, but data.train_list has 20; the largest share"):
        epoch_layout(24, 20, 0.75)


def test_a_file_at_another_rate_is_refused_or_resampled(tmp_path, corpus_dir):
    write_list(tmp_path / "n16.lst", [wav(tmp_path / "n16.wav", 0.05 * synth_noise(np.random.default_rng(3), 16000), 16000)])
    cfg = config(corpus_dir, noise_lists=[str(tmp_path / "n16.lst")], noise_weights=[], rir_lists=[])
    with pytest.raises(DataError, match=r"n16.lst:1: .*n16.wav: sample rate 16000 Hz, expected 48000 Hz"):
        dataset(cfg).mix(0, 0)
    m = dataset(cfg, resample=True).mix(1, 0)
    assert m.noisy.shape == (RATE // 2,) and abs(snr_of(m) - m.snr_db) < 0.1


def test_settings_are_checked_with_their_names():
    with pytest.raises(DataError) as err:
        MixingConfig(clean_lists=["c.lst"], noise_lists=["a.lst", "b.lst"], noise_weights=[1.0], snr_db=(15, 0),
                     target="wet", rir_probability=1.5, noise_sources=(0, 2))
    text = str(err.value)
    for part in ("mixing.noise_weights: 1 weight(s) for 2 noise list(s)", "mixing.snr_db: [15, 0] has low above high; write [0, 15]",
                 "mixing.target: 'wet' is not one of dry, early, reverberant", "mixing.rir_probability: 1.5",
                 "mixing.noise_sources: low 0 is below 1"):
        assert part in text, text
    with pytest.raises(DataError, match="mixing.noise_lists: empty"):
        MixingConfig(clean_lists=["c.lst"])
    with pytest.raises(DataError, match="unknown key.*snr_range; valid keys: clean_lists"):
        MixingConfig.from_mapping({"clean_lists": ["c.lst"], "noise_lists": ["n.lst"], "snr_range": [0, 5]})
    assert MixingConfig.from_mapping({"clean_lists": ["c.lst"], "noise_lists": ["n.lst"]}).clean_lists == ("c.lst",)
    assert not MixingConfig().enabled
