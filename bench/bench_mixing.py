"""Dynamic-mixing benchmark (not a test): audio-seconds mixed per second per core, and the loader's headroom
against what one GPU consumes at the project's goal.

    .venv/bin/python bench/bench_mixing.py [--repeats 3] [--out bench/results/mixing.json]

A generated corpus (48 kHz 16-bit: 16 clean files of 10 s of synthetic speech, 12 noise files of 20 s and 4
of 2 s, 16 synthetic impulse responses of 0.2-1.0 s; written once into --workdir), 4 s segments:

1. Per core: one process, one torch thread, ``--items`` mixtures per variant per round, the variants
   alternating, CPU time (process_time) per mixture, median over rounds; audio-s/s per core = 4 s / CPU
   seconds per mixture. Variants: ``premixed`` (CropDataset reading a pre-mixed pair: the baseline), ``mix``
   (1 noise source, no RIR), ``mix_3src``, ``mix_short`` (every noise shorter than the crop: looped),
   ``mix_rir`` (an impulse response on every mixture, dry target), ``mix_rir_early``, ``mix_rir_half``
   (rir_probability 0.5). For ``mix`` and ``mix_rir`` the share of the time spent opening and reading files
   is measured too (the part no device can take over).
2. FFT length: the reverberation's convolution at the exact length fftconvolve would use and at
   data.mixing.conv_length's, over 24 impulse-response lengths drawn in 0.2-1.5 s, alternating.
3. Delivery: build_loader with the production recipe's loader settings (recipes/train_48k.yaml and the
   data section's defaults: 4 workers, prefetch_factor 2, prefetch thread 2) at the goal's micro-batch of
   12, drained for ``--batches`` batches after the first: audio-s/s delivered (wall clock: bounded by what
   the machine's other users leave), and the CPU seconds the whole loader spends per audio-second (workers
   and prefetch thread; a pass of 2 batches subtracted, so that worker start-up is left out as persistent
   workers leave it out), whose inverse times the worker count is what those workers deliver on as many
   free cores: the capacity compared with the goal's 12 × 4 s per 0.10 s = 480 audio-s/s per GPU. Also 2
   workers.
4. Batched (the device alternative's arithmetic, run on the CPU): the reverberation and noise addition of a
   micro-batch of 12 in one fftconvolve/add_noise call on padded tensors, per mixture, against item by item.

Headroom = capacity / 480. The machine, its load average before and after, and torch's thread count go
into the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

import data.mixing as mixing_module  # noqa: E402
from data import CropDataset, CursorSampler, MixingConfig, MixingDataset, PairIndex, build_loader, load_mixing_lists  # noqa: E402
from data.demo_corpus import synth_noise, synth_rir, synth_speech  # noqa: E402

RATE = 48000
SEGMENT_S = 4.0
GOAL_AUDIO_S_PER_S = 12 * 4.0 / 0.10  # batch 12 x 4 s per 0.10 s step, per GPU
PRODUCTION_LOADER = dict(num_workers=4, prefetch_factor=2, persistent_workers=True, thread_prefetch=2)
_CORPUS_VERSION = "3"


def make_corpus(folder: Path) -> Path:
    marker = folder / "corpus.done"
    if marker.exists() and marker.read_text() == _CORPUS_VERSION:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    clean = []
    for k in range(16):
        x = synth_speech(rng, 10 * RATE)
        sf.write(folder / f"clean{k}.wav", 0.1 * x / np.abs(x).max(), RATE, subtype="PCM_16")
        clean.append(f"clean{k}.wav")
    noise, short = [], []
    for k in range(16):
        seconds = 20.0 if k < 12 else 2.0
        x = synth_noise(rng, int(seconds * RATE))
        sf.write(folder / f"noise{k}.wav", 0.05 * x / np.abs(x).max(), RATE, subtype="PCM_16")
        (noise if k < 12 else short).append(f"noise{k}.wav")
    rirs = []
    for k in range(16):
        sf.write(folder / f"rir{k}.wav", synth_rir(np.random.default_rng([1, k])), RATE, subtype="PCM_24")
        rirs.append(f"rir{k}.wav")
    for name, files in (("clean", clean), ("noise", noise + short), ("short", short), ("rir", rirs)):
        (folder / f"{name}.lst").write_text("".join(f"{f}\n" for f in files))
    # The reading cost of a pre-mixed pair (each clean file as both sides), 64 times over for enough pairs.
    (folder / "pairs.lst").write_text("".join(f"{f} {f}\n" for f in clean) * 64)
    marker.write_text(_CORPUS_VERSION)
    return folder


def variants(folder: Path) -> dict:
    base = dict(clean_lists=[str(folder / "clean.lst")], noise_lists=[str(folder / "noise.lst")],
                rir_lists=[str(folder / "rir.lst")], rir_probability=0.0)
    specs = {
        "mix": {},
        "mix_3src": {"noise_sources": (3, 3)},
        "mix_short": {"noise_lists": [str(folder / "short.lst")]},
        "mix_rir": {"rir_probability": 1.0},
        "mix_rir_early": {"rir_probability": 1.0, "target": "early"},
        "mix_rir_half": {"rir_probability": 0.5},
    }
    out = {"premixed": CropDataset(PairIndex.from_lists([folder / "pairs.lst"]), segment_seconds=SEGMENT_S)}
    for name, over in specs.items():
        cfg = MixingConfig(**{**base, **over})
        out[name] = MixingDataset(load_mixing_lists(cfg), cfg, segment_seconds=SEGMENT_S, num_samples=4096)
    return out


class ReadClock:
    """Time spent inside data.mixing's _open and _read (file opening, seeking, decoding, resampling)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._open, self._read = mixing_module._open, mixing_module._read

    def __enter__(self) -> "ReadClock":
        clock = self

        def timed(fn):
            def wrapper(*args, **kwargs):
                t = time.process_time()
                try:
                    return fn(*args, **kwargs)
                finally:
                    clock.seconds += time.process_time() - t
            return wrapper

        mixing_module._open, mixing_module._read = timed(self._open), timed(self._read)
        return self

    def __exit__(self, *exc) -> None:
        mixing_module._open, mixing_module._read = self._open, self._read


def per_core(datasets: dict, items: int, repeats: int) -> dict:
    torch.set_num_threads(1)
    names = list(datasets)
    cpu = {n: [] for n in names}
    wall = {n: [] for n in names}
    for n in names:  # warm: page cache, first-call costs
        datasets[n][(0, 99)]
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            ds = datasets[n]
            c, w = time.process_time(), time.perf_counter()
            for i in range(items):
                ds[(i % len(ds), r)]
            cpu[n].append((time.process_time() - c) / items)
            wall[n].append((time.perf_counter() - w) / items)
    out = {}
    for n in names:
        c = statistics.median(cpu[n])
        out[n] = {"cpu_ms_per_mixture": 1000 * c, "wall_ms_per_mixture": 1000 * statistics.median(wall[n]),
                  "audio_s_per_s_per_core": SEGMENT_S / c}
    for n in ("mix", "mix_rir"):
        ds = datasets[n]
        with ReadClock() as clock:
            c = time.process_time()
            for i in range(items):
                ds[(i, 1000)]
            total = time.process_time() - c
        out[n]["read_share"] = clock.seconds / total
    return out


def fft_lengths(repeats: int) -> dict:
    import torchaudio.functional as AF

    torch.set_num_threads(1)
    rng = np.random.default_rng(3)
    lengths = rng.integers(int(0.2 * RATE), int(1.5 * RATE), 24)
    L = int(SEGMENT_S * RATE)
    raw, padded = [], []
    for m in lengths.tolist():
        h = torch.randn(m)
        x = torch.randn(L + m - 1)
        full = x.numel() + m - 1
        xp = torch.nn.functional.pad(x, (0, mixing_module.conv_length(full) - full))
        times = {"raw": [], "padded": []}
        for _ in range(repeats):
            for name, arg in (("raw", x), ("padded", xp)):
                t = time.perf_counter()
                AF.fftconvolve(arg, h)
                times[name].append(time.perf_counter() - t)
        raw.append(min(times["raw"]))
        padded.append(min(times["padded"]))
    ratios = [r / p for r, p in zip(raw, padded)]
    return {"lengths": len(lengths), "raw_ms_mean": 1000 * float(np.mean(raw)), "padded_ms_mean": 1000 * float(np.mean(padded)),
            "raw_ms_worst": 1000 * float(np.max(raw)), "padded_ms_worst": 1000 * float(np.max(padded)),
            "raw_over_padded_median": float(np.median(ratios)), "raw_over_padded_max": float(np.max(ratios))}


def _loader_pass(dataset, workers: int, batches: int, micro: int) -> tuple[float, float, float]:
    """(audio-seconds, wall seconds after the first batch, CPU seconds of the whole loader) over batches + 1."""
    import resource

    settings = {**PRODUCTION_LOADER, "num_workers": workers, "persistent_workers": False}
    sampler = CursorSampler(micro * (batches + 1), micro, 0, 1, seed=777)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    own = time.process_time()
    loader = build_loader(dataset, sampler, pin_memory=False, **settings)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    for _ in it:
        pass
    wall = time.perf_counter() - start
    del it, loader
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime) + (time.process_time() - own)
    return micro * (batches + 1) * SEGMENT_S, wall, cpu


def delivery(dataset, workers: int, batches: int, micro: int = 12) -> dict:
    """A loader with the production settings: wall delivery, and the CPU it costs per audio-second.

    Wall: audio-s/s delivered after the first batch (bounded by what else runs on the machine). CPU: the
    seconds the whole loader spends (its workers, reaped at the end of a pass, plus this process: prefetch
    thread and hand-over) per audio-second, taken as the difference between a pass of ``batches + 1`` and one
    of 2 batches, so that starting the workers (once per run with persistent workers) is left out; other
    users' load hardly moves it. ``workers`` free cores then deliver workers / that.
    """
    short_audio, _, short_cpu = _loader_pass(dataset, workers, 1, micro)
    audio, wall, cpu = _loader_pass(dataset, workers, batches, micro)
    cpu_per_audio_s = (cpu - short_cpu) / (audio - short_audio)
    return {"audio_s_per_s": (audio - micro * SEGMENT_S) / wall, "cpu_s_per_audio_s": cpu_per_audio_s,
            "startup_cpu_s": short_cpu - 2 * micro * SEGMENT_S * cpu_per_audio_s,
            "capacity_audio_s_per_s": workers / cpu_per_audio_s, "headroom": workers / cpu_per_audio_s / GOAL_AUDIO_S_PER_S}


def batched(datasets: dict, repeats: int, micro: int = 12) -> dict:
    """Reverberation + noise addition of a micro-batch in one call vs item by item (inputs prepared in memory)."""
    import torchaudio.functional as AF

    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    L = int(SEGMENT_S * RATE)
    rirs = [torch.from_numpy(synth_rir(np.random.default_rng([1, k])).astype(np.float32)) for k in range(micro)]
    m_max = max(h.numel() for h in rirs)
    xs = [torch.from_numpy(rng.standard_normal(L + h.numel() - 1).astype(np.float32)) for h in rirs]
    noise = torch.from_numpy(rng.standard_normal((micro, L)).astype(np.float32))
    snr = torch.full((micro,), 5.0)

    def one_by_one():
        for k, (x, h) in enumerate(zip(xs, rirs)):
            full = x.numel() + h.numel() - 1
            y = AF.fftconvolve(torch.nn.functional.pad(x, (0, mixing_module.conv_length(full) - full)), h)
            s = y[h.numel() - 1 : h.numel() - 1 + L]
            AF.add_noise(s[None], noise[k : k + 1], snr[k : k + 1])

    def all_at_once():
        X = torch.stack([torch.nn.functional.pad(x, (m_max - h.numel(), 0)) for x, h in zip(xs, rirs)])
        H = torch.stack([torch.nn.functional.pad(h, (0, m_max - h.numel())) for h in rirs])
        full = X.shape[1] + m_max - 1
        y = AF.fftconvolve(torch.nn.functional.pad(X, (0, mixing_module.conv_length(full) - full)), H)
        AF.add_noise(y[:, m_max - 1 : m_max - 1 + L], noise, snr)

    times = {"one_by_one": [], "batched": []}
    for _ in range(repeats):
        for name, fn in (("one_by_one", one_by_one), ("batched", all_at_once)):
            t = time.process_time()
            fn()
            times[name].append((time.process_time() - t) / micro)
    a, b = statistics.median(times["one_by_one"]), statistics.median(times["batched"])
    return {"one_by_one_ms_per_mixture": 1000 * a, "batched_ms_per_mixture": 1000 * b, "batched_over_one_by_one": b / a}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--items", type=int, default=24, help="mixtures per variant per round (part 1)")
    parser.add_argument("--batches", type=int, default=12, help="micro-batches of 12 drained per loader (part 3)")
    parser.add_argument("--workdir", default=None, help="where the corpus is written (default: a temporary folder)")
    parser.add_argument("--parts", default="core,fft,loader,batched")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        folder = make_corpus(Path(args.workdir or tmp) / "mix_bench_corpus")
        datasets = variants(folder)
        result = {"machine": machine(), "load_before": os.getloadavg(), "segment_seconds": SEGMENT_S,
                  "goal_audio_s_per_s_per_gpu": GOAL_AUDIO_S_PER_S, "production_loader": PRODUCTION_LOADER}
        if "core" in parts:
            result["per_core"] = per_core(datasets, args.items, args.repeats)
            print(f"{'variant':<15} {'CPU ms/mixture':>15} {'audio-s/s/core':>15} {'x goal per core':>16}  read share")
            for name, r in result["per_core"].items():
                share = f"{r['read_share']:.0%}" if "read_share" in r else ""
                print(f"{name:<15} {r['cpu_ms_per_mixture']:>15.1f} {r['audio_s_per_s_per_core']:>15.0f} "
                      f"{r['audio_s_per_s_per_core'] / GOAL_AUDIO_S_PER_S:>16.2f}  {share}")
        if "fft" in parts:
            result["fft_length"] = f = fft_lengths(args.repeats)
            print(f"convolution, 24 RIR lengths: exact length {f['raw_ms_mean']:.1f} ms mean ({f['raw_ms_worst']:.1f} worst), "
                  f"conv_length {f['padded_ms_mean']:.1f} ms ({f['padded_ms_worst']:.1f} worst); exact/padded median "
                  f"{f['raw_over_padded_median']:.2f}, max {f['raw_over_padded_max']:.1f}")
        if "loader" in parts:
            torch.set_num_threads(1)
            result["delivery"] = {}
            print(f"{'loader (production settings)':<34} {'wall audio-s/s':>14} {'CPU s/audio-s':>14} "
                  f"{'capacity of the workers':>24} {'headroom':>9}")
            for name in ("premixed", "mix", "mix_rir_half", "mix_rir"):
                for workers in (4, 2):
                    r = delivery(datasets[name], workers, args.batches)
                    result["delivery"][f"{name}/{workers}"] = r
                    print(f"{name + f', {workers} workers':<34} {r['audio_s_per_s']:>14.0f} {r['cpu_s_per_audio_s']:>14.5f} "
                          f"{r['capacity_audio_s_per_s']:>17.0f} on {workers} {r['headroom']:>8.2f}x")
        if "batched" in parts:
            result["batched"] = b = batched(datasets, args.repeats)
            print(f"reverberation + add_noise, micro-batch 12: one by one {b['one_by_one_ms_per_mixture']:.1f} ms/mixture, "
                  f"batched {b['batched_ms_per_mixture']:.1f} ({b['batched_over_one_by_one']:.2f}x)")
        result["load_after"] = os.getloadavg()
        result["torch_threads"] = torch.get_num_threads()
        print(f"load average {result['load_before'][0]:.1f} -> {result['load_after'][0]:.1f}; {result['machine']}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
