"""Data-pipeline benchmark (not a test): index scale, loader throughput, partial vs whole-file reads, header cache.

    .venv/bin/python bench/bench_data.py --out runs/bench_data.json

1. A generated list of ``--lines`` pairs (default 10 million, durations in the list): parse + format check
   (PairIndex.from_lists), then one rank's sampler epoch at several world sizes, each in a fresh process so
   its peak RSS is its own. Per-rank memory is the index plus that rank's share of the permutation.
2. audio-seconds per second delivered by build_loader(CropDataset) with 0, 1 and 2 workers on 60 s files
   (4 s crops; one audio-second = one second of a noisy/clean pair), and the same loader over a dataset that
   reads whole files and then crops (what the reference does).
3. One 4 s crop read with seek+read against the whole 60 s file read then sliced.
4. validate() on many small files without and then with the header cache.

All timings are medians over ``--repeats`` runs, on a warm page cache (files just written).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

from data import CropDataset, CursorSampler, PairIndex, build_loader  # noqa: E402
from data.validation import validate  # noqa: E402
from data.audio import read_window  # noqa: E402

RATE = 48000

_INDEX_CHILD = r"""
import json, sys, time
import numpy as np
from data.index import PairIndex
from data.sampler import CursorSampler
def status_mb(key):  # VmHWM: peak RSS of this process image (ru_maxrss would carry the parent's peak across exec)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
hwm_mb = lambda: status_mb("VmHWM")
path, worlds = sys.argv[1], [int(w) for w in sys.argv[2].split(",")]
base = hwm_mb()
t = time.perf_counter()
index = PairIndex.from_lists([path])
load_s = time.perf_counter() - t
after_load = hwm_mb()
rss_load = status_mb("VmRSS")
out = {"pairs": len(index), "load_s": load_s, "index_mb": index.nbytes / 1e6, "rss_base_mb": base,
       "rss_after_load_mb": after_load, "rss_now_after_load_mb": rss_load, "hours": float(np.nansum(index.durations, dtype=np.float64) / 3600), "shard": {}}
for world in worlds:
    sampler = CursorSampler(len(index), micro_batch_size=4, rank=world - 1, world_size=world, seed=777, epoch_quantum=4 * world * 2)
    t = time.perf_counter()
    sampler.set_epoch(1)
    first = next(iter(sampler))
    shard_s = time.perf_counter() - t
    index.pair(first[0][0])
    out["shard"][world] = {"seconds": shard_s, "batches": len(sampler)}
out["rss_peak_mb"] = hwm_mb()
print(json.dumps(out))
"""


def median(values):
    return float(statistics.median(values))


def write_big_list(path: Path, lines: int) -> float:
    """``noisy/spkXXXX/utt_XXXXXXXXX.wav clean/... 3.52`` lines, written in 1M-line blocks."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for first in range(0, lines, 1_000_000):
            ids = range(first, min(lines, first + 1_000_000))
            durations = rng.uniform(1.0, 20.0, len(ids))
            f.write("".join(f"noisy/spk{i % 5000:04d}/utt_{i:09d}.wav clean/spk{i % 5000:04d}/utt_{i:09d}.wav {d:.2f}\n"
                            for i, d in zip(ids, durations)))
    return time.perf_counter() - start


def bench_index(workdir: Path, lines: int, repeats: int, worlds: list[int]) -> dict:
    path = workdir / f"big_{lines}.lst"
    made = 0.0
    if not path.exists():
        made = write_big_list(path, lines)
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", _INDEX_CHILD, str(path), ",".join(map(str, worlds))],
                              cwd=REPO, capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout))
    return {
        "lines": lines,
        "list_mb": path.stat().st_size / 1e6,
        "write_list_s": made,
        "load_s": median([r["load_s"] for r in runs]),
        "index_mb": runs[0]["index_mb"],
        "rss_base_mb": median([r["rss_base_mb"] for r in runs]),
        "rss_after_load_mb": median([r["rss_after_load_mb"] for r in runs]),
        "rss_now_after_load_mb": median([r["rss_now_after_load_mb"] for r in runs]),
        "rss_peak_mb": median([r["rss_peak_mb"] for r in runs]),
        "shard_s": {w: median([r["shard"][str(w)]["seconds"] for r in runs]) for w in worlds},
        "batches_per_rank": {w: runs[0]["shard"][str(w)]["batches"] for w in worlds},
        "hours": runs[0]["hours"],
    }


class WholeFileCrops(CropDataset):
    """The reference's way: decode both whole files, then cut the crop (same offsets as CropDataset)."""

    def read_pair(self, i, epoch):
        from data.audio import crop_offset

        noisy_path, clean_path = self.index.pair(i)
        noisy = sf.read(noisy_path, dtype="float32", always_2d=True)[0][:, 0]
        clean = sf.read(clean_path, dtype="float32", always_2d=True)[0][:, 0]
        n, L = min(noisy.size, clean.size), self.segment_samples
        start = crop_offset(self.seed, epoch, i, n - L) if n > L else 0
        return noisy[start : start + L].copy(), clean[start : start + L].copy()


def make_long_files(folder: Path, pairs: int, seconds: float) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    lst = folder / "long.lst"
    lines = []
    for k in range(pairs):
        n, c = folder / f"n{k}.wav", folder / f"c{k}.wav"
        if not (n.exists() and c.exists()):
            x = (rng.standard_normal(int(seconds * RATE)) * 0.05).astype(np.float32)
            sf.write(n, x, RATE, subtype="PCM_16")
            sf.write(c, x * 0.5, RATE, subtype="PCM_16")
        lines.append(f"{n.name} {c.name} {seconds}\n")
    lst.write_text("".join(lines) * 64)  # each file listed 64 times: distinct entries, so distinct crops
    return lst


def loader_rate(dataset, num_workers: int, batches: int, micro: int, epoch: int) -> tuple[float, float]:
    """(audio-seconds/s in steady state, seconds to the first batch): workers start once per run, not per batch."""
    sampler = CursorSampler(len(dataset), micro, 0, 1, seed=epoch)
    sampler.set_epoch(epoch)
    if len(sampler) < batches + 1:
        raise SystemExit(f"the list has {len(sampler)} batches; need {batches + 1}")
    start = time.perf_counter()
    loader = build_loader(dataset, sampler, num_workers=num_workers, prefetch_factor=4)
    it = iter(loader)
    next(it)
    first = time.perf_counter()
    seen = 0
    for _ in range(batches):
        noisy, _ = next(it)
        seen += noisy.shape[0]
    elapsed = time.perf_counter() - first
    del it, loader
    return seen * dataset.segment_seconds / elapsed, first - start


def bench_loader(workdir: Path, repeats: int, pairs: int, batches: int) -> dict:
    lst = make_long_files(workdir / "long60", pairs, 60.0)
    index = PairIndex.from_lists([lst])
    partial = CropDataset(index, segment_seconds=4.0)
    whole = WholeFileCrops(index, segment_seconds=4.0)
    out: dict = {"pairs": pairs, "file_seconds": 60.0, "segment_seconds": 4.0, "micro_batch": 4, "batches": batches}
    for name, dataset in (("partial", partial), ("whole", whole)):
        for workers in (0, 1, 2):
            runs = [loader_rate(dataset, workers, batches, 4, epoch=r) for r in range(repeats)]
            out[f"{name}_w{workers}"] = median([r for r, _ in runs])
            out[f"{name}_w{workers}_first_batch_s"] = median([f for _, f in runs])
    # one crop: seek + read 4 s against read all 60 s, then slice
    rng = np.random.default_rng(2)
    t_part, t_whole = [], []
    L = 4 * RATE
    for r in range(repeats * 20):
        path = str(workdir / "long60" / f"n{r % pairs}.wav")
        start = int(rng.integers(0, 56 * RATE))
        t = time.perf_counter()
        with sf.SoundFile(path) as f:
            a = read_window(f, start, L, RATE)
        t_part.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = sf.read(path, dtype="float32")[0][start : start + L]
        t_whole.append(time.perf_counter() - t)
        assert np.array_equal(a, b)
    out["crop_partial_ms"] = median(t_part) * 1e3
    out["crop_whole_ms"] = median(t_whole) * 1e3
    return out


def bench_validate(workdir: Path, pairs: int, repeats: int) -> dict:
    folder = workdir / f"small{pairs}"
    folder.mkdir(parents=True, exist_ok=True)
    lst = folder / "small.lst"
    if not lst.exists():
        x = np.zeros(4800, dtype=np.float32)
        for k in range(pairs):
            sf.write(folder / f"n{k}.wav", x, RATE, subtype="PCM_16")
            sf.write(folder / f"c{k}.wav", x, RATE, subtype="PCM_16")
        lst.write_text("".join(f"n{k}.wav c{k}.wav\n" for k in range(pairs)))
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            cold.append(validate([lst], cache_dir=cache)[1].seconds)
            warm.append(validate([lst], cache_dir=cache)[1].seconds)
    return {"pairs": pairs, "files": 2 * pairs, "uncached_s": median(cold), "cached_s": median(warm)}




def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", default="1,8,64,512", help="world sizes for the sharding timing")
    parser.add_argument("--long_pairs", type=int, default=8, help="pairs of 60 s files for the loader")
    parser.add_argument("--batches", type=int, default=40, help="micro-batches (of 4 crops) per loader measurement")
    parser.add_argument("--validate_pairs", type=int, default=2000)
    parser.add_argument("--workdir", default=None, help="keep generated files here (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--parts", default="index,loader,validate", help="comma-separated subset to run")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench_data_")
    workdir = Path(args.workdir or tmp.name)
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "repeats": args.repeats}
    try:
        parts = set(args.parts.split(","))
        if "index" in parts:
            console.print(f"index: {args.lines:,} lines ...")
            results["index"] = bench_index(workdir, args.lines, args.repeats, [int(w) for w in args.worlds.split(",")])
        if "loader" in parts:
            console.print("loader on 60 s files ...")
            results["loader"] = bench_loader(workdir, args.repeats, args.long_pairs, args.batches)
        if "validate" in parts:
            console.print("validation and header cache ...")
            results["validate"] = bench_validate(workdir, args.validate_pairs, args.repeats)
    finally:
        if tmp is not None:
            tmp.cleanup()

    table = Table(title=f"data pipeline, medians of {args.repeats} — {results['machine']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("note")
    if "index" in results:
        r = results["index"]
        table.add_row("list lines / size", f"{r['lines']:,}", f"{r['list_mb']:.0f} MB on disk, {r['hours']:,.0f} h listed")
        table.add_row("load + format check", f"{r['load_s']:.2f} s", f"{r['lines'] / r['load_s'] / 1e6:.1f} M lines/s")
        table.add_row("index arrays", f"{r['index_mb']:.0f} MB", f"{r['index_mb'] * 1e6 / r['lines']:.0f} B/pair")
        table.add_row("peak RSS during load", f"{r['rss_after_load_mb']:.0f} MB",
                      f"process baseline {r['rss_base_mb']:.0f} MB; {r['rss_now_after_load_mb']:.0f} MB once loaded")
        table.add_row("peak RSS after sharding", f"{r['rss_peak_mb']:.0f} MB", "one rank, all world sizes below")
        for w, s in r["shard_s"].items():
            table.add_row(f"shard epoch, world {w}", f"{s:.2f} s", f"{r['batches_per_rank'][w]:,} micro-batches/rank")
    r = results.get("loader", {})
    for workers in (0, 1, 2) if r else ():
        p, w = r[f"partial_w{workers}"], r[f"whole_w{workers}"]
        first = r[f"partial_w{workers}_first_batch_s"]
        table.add_row(f"loader, {workers} worker(s)", f"{p:.0f} audio-s/s",
                      f"whole-file reads: {w:.0f} audio-s/s ({p / w:.1f}x); first batch after {first:.2f} s")
    if r:
        table.add_row("one 4 s crop of a 60 s file", f"{r['crop_partial_ms']:.2f} ms",
                      f"whole file then slice: {r['crop_whole_ms']:.2f} ms ({r['crop_whole_ms'] / r['crop_partial_ms']:.1f}x)")
    v = results.get("validate")
    if v:
        table.add_row(f"validate {v['files']:,} files", f"{v['uncached_s']:.2f} s",
                      f"with header cache: {v['cached_s']:.2f} s ({v['uncached_s'] / v['cached_s']:.1f}x)")
    console.print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
        console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
