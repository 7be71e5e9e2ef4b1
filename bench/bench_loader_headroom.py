"""Loader headroom: audio-seconds/s the data pipeline delivers against what the training step consumes, and
the data-wait share of step time in the demo run.

    .venv/bin/python -m data.demo runs/demo_corpus        # once
    .venv/bin/python bench/bench_loader_headroom.py [--repeats 3] [--out bench/results/loader_headroom.json]

Loader set-ups, named by workers and whether the background prefetch thread (data/loader.py
ThreadPrefetcher, at the recipe's data.loader_nice) takes the batches: "0" (reading in the rank), "1", "2"
(worker processes), "0+thread" (the demo recipe's) and "1+thread".

1. Delivery: one rank's loader as the demo recipe builds it (CropDataset over the demo corpus, 1 s crops,
   CursorSampler micro-batch 4 of 2 ranks, build_loader, prefetch 2) in each set-up, drained as fast as
   possible: audio-seconds per second (one audio-second = one second of a noisy/clean pair), median over
   --repeats. Two such loaders at once (one per rank, as in training) too.
2. Consumption: the demo run itself: `deepspeed --num_gpus 2 launcher/train.py --ds_config
   ds_configs/bs4.json --config recipes/demo_cpu.yaml` (12 epochs, validation on, the recipe's log
   interval, a fresh run directory), then from its metrics.jsonl: audio_s_per_s_per_gpu (what one rank's
   training consumes) and data_wait_share (the time the loop spent waiting for its next batch over the
   logging interval). The first interval (start-up, first batches) is reported separately.
3. The floor under the wait: two processes each pulling micro-batches from their own loader while spinning
   on the CPU for the demo's measured compute time per micro-batch in between (as two training ranks on
   two cores would), measuring the time spent getting each batch: the data-wait share a set-up costs even
   when the loader has all the time it needs.

Headroom = delivery (each of two loaders) / consumption (one rank's training).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import demo_loader, machine  # noqa: E402

TRAIN_LIST = "runs/demo_corpus/train.lst"
MICRO, WORLD, ACCUM = 4, 2, 2
SEGMENT_SECONDS = 1.0


SETUPS = {"0": (0, False), "1": (1, False), "2": (2, False), "0+thread": (0, True), "1+thread": (1, True)}


def _loader(rank: int, setup: str, epoch: int):
    workers, thread = SETUPS[setup]
    loader, sampler = demo_loader(rank, WORLD, MICRO, ACCUM, epoch, num_workers=workers, persistent_workers=False,
                                  prefetch_factor=2, **({} if thread else {"thread_prefetch": 0}))
    return loader, len(sampler)


def delivery(rank: int, setup: str, epoch: int, queue=None) -> tuple[float, float]:
    """(audio-seconds/s after the first batch, seconds to the first batch) over one epoch of this rank."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    loader, batches = _loader(rank, setup, epoch)
    it = iter(loader)
    next(it)
    first = time.perf_counter()
    seen = 0
    for noisy, _ in it:
        seen += noisy.shape[0]
    rate = seen * SEGMENT_SECONDS / (time.perf_counter() - first)
    if queue is not None:
        queue.put((rate, first - start))
    return rate, first - start


def _spin(seconds: float) -> None:
    """Keep this thread's core busy for `seconds` the way a training step does: a stream of small torch ops,
    each releasing the GIL while it computes (a pure-Python loop would hold it and starve a loading thread)."""
    import torch

    a = torch.rand(96, 96)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        torch.mm(a, a)


def consumer(rank: int, setup: str, compute_s: float, epoch: int, queue) -> None:
    """Pull one epoch of micro-batches, spinning compute_s on the CPU after each; time spent in next()."""
    import torch

    torch.set_num_threads(1)
    loader, _ = _loader(rank, setup, epoch)
    it = iter(loader)
    next(it)  # start-up is not steady state
    _spin(compute_s)
    waits = []
    while True:
        t = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            break
        waits.append(time.perf_counter() - t)
        _spin(compute_s)
    queue.put({"rank": rank, "median_wait_s": statistics.median(waits), "mean_wait_s": statistics.fmean(waits),
               "share": sum(waits) / (sum(waits) + compute_s * len(waits)), "batches": len(waits)})


def run_parallel(target, args_per_rank: list[tuple]) -> list:
    # fork, as a training rank's DataLoader forks its workers: under spawn the children (and so their
    # loader workers) would start by spawning, which here made one worker 5x slower than in training.
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, queue)) for a in args_per_rank]
    for p in procs:
        p.start()
    out = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return out


def demo_run(port: int, run_dir: Path) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(port),
           "launcher/train.py", "--ds_config", "ds_configs/bs4.json", "--config", "recipes/demo_cpu.yaml",
           "--run_dir", str(run_dir), "train.progress_bar=false"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"demo run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - t
    train = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if r.get("kind") == "train"]
    first, rest = train[0], train[1:]
    return {
        "command": " ".join(cmd[0:1]).replace(str(ROOT) + "/", "") + " " + " ".join(cmd[1:]),
        "wall_s": wall, "intervals": len(train),
        "first_interval": {k: first[k] for k in ("step", "data_wait_share", "audio_s_per_s_per_gpu", "samples_per_s")},
        "data_wait_share_median": statistics.median(r["data_wait_share"] for r in rest),
        "data_wait_share_mean": statistics.fmean(r["data_wait_share"] for r in rest),
        "data_wait_share_max": max(r["data_wait_share"] for r in rest),
        "audio_s_per_s_per_gpu_median": statistics.median(r["audio_s_per_s_per_gpu"] for r in rest),
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rest),
        "per_interval": [{k: r[k] for k in ("step", "epoch", "data_wait_share", "audio_s_per_s_per_gpu")}
                         for r in train],
    }




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--demo_runs", type=int, default=2, help="demo trainings to read data_wait_share from")
    ap.add_argument("--port", type=int, default=29790)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not (ROOT / TRAIN_LIST).is_file():
        raise SystemExit(f"{TRAIN_LIST} is missing: run `.venv/bin/python -m data.demo runs/demo_corpus` first")

    result: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "repeats": args.repeats,
                    "settings": {"segment_seconds": SEGMENT_SECONDS, "micro_batch": MICRO, "world": WORLD}}
    # 1. delivery, alone and two at once
    alone: dict[str, list] = {}
    pair: dict[str, list] = {}
    for r in range(args.repeats):
        for setup in SETUPS:
            alone.setdefault(setup, []).append(run_parallel(delivery, [(0, setup, r)])[0])
            both = run_parallel(delivery, [(0, setup, r), (1, setup, r)])
            pair.setdefault(setup, []).append(min(x[0] for x in both))
    result["delivery_audio_s_per_s"] = {
        w: {"one_loader": statistics.median(x[0] for x in v), "first_batch_s": statistics.median(x[1] for x in v),
            "each_of_two_loaders": statistics.median(pair[w])} for w, v in alone.items()}
    for w, d in result["delivery_audio_s_per_s"].items():
        print(f"delivery, {w}: {d['one_loader']:.0f} audio-s/s alone, {d['each_of_two_loaders']:.0f} each "
              f"when two loaders run (first batch after {d['first_batch_s']:.2f} s)", flush=True)

    # 2. consumption and the wait share, from the demo run's own metrics
    demos = []
    with tempfile.TemporaryDirectory(prefix="bench_headroom_") as tmp:
        for k in range(args.demo_runs):
            demos.append(demo_run(args.port + k, Path(tmp) / f"demo{k}"))
            d = demos[-1]
            print(f"demo run {k + 1}: data_wait_share median {100 * d['data_wait_share_median']:.2f} % "
                  f"(mean {100 * d['data_wait_share_mean']:.2f} %, max {100 * d['data_wait_share_max']:.2f} %, first "
                  f"interval {100 * d['first_interval']['data_wait_share']:.1f} %), consumes "
                  f"{d['audio_s_per_s_per_gpu_median']:.1f} audio-s/s per rank", flush=True)
    result["demo_runs"] = demos
    consumed = statistics.median(d["audio_s_per_s_per_gpu_median"] for d in demos)
    wait_share = statistics.median(d["data_wait_share_median"] for d in demos)
    result["consumed_audio_s_per_s_per_rank"] = consumed
    result["data_wait_share_median"] = wait_share
    result["headroom"] = {w: d["each_of_two_loaders"] / consumed for w, d in result["delivery_audio_s_per_s"].items()}

    # 3. the floor: time inside next() when the consumer computes for as long as a demo micro-batch takes
    compute_s = MICRO * SEGMENT_SECONDS / consumed
    floor = {}
    for setup in SETUPS:
        runs = [run_parallel(consumer, [(0, setup, compute_s, r), (1, setup, compute_s, r)])
                for r in range(args.repeats)]
        floor[setup] = {"share": statistics.median(max(x["share"] for x in run) for run in runs),
                        "median_wait_ms": 1e3 * statistics.median(max(x["median_wait_s"] for x in run) for run in runs)}
        print(f"next() in set-up {setup} while two consumers spin {1e3 * compute_s:.0f} ms per micro-batch: "
              f"{floor[setup]['median_wait_ms']:.2f} ms median, share {100 * floor[setup]['share']:.2f} %", flush=True)
    result["wait_floor"] = {"compute_s_per_micro_batch": compute_s, **floor}
    result["goal"] = "data_wait_share <= 2 %"

    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"loader headroom, demo recipe (1 s crops, micro-batch 4, 2 ranks) — {result['machine']}")
    t.add_column("measure")
    t.add_column("value", justify="right")
    for w, d in result["delivery_audio_s_per_s"].items():
        t.add_row(f"delivered, set-up {w}, each of two loaders", f"{d['each_of_two_loaders']:.0f} audio-s/s")
    t.add_row("consumed by one rank's training (demo run)", f"{consumed:.1f} audio-s/s")
    for w, h in result["headroom"].items():
        t.add_row(f"headroom, set-up {w}", f"{h:.1f}×")
    t.add_row("data_wait_share in the demo run (median of intervals)", f"{100 * wait_share:.2f} %")
    for w, f in floor.items():
        t.add_row(f"wait floor, set-up {w}", f"{100 * f['share']:.2f} %")
    Console().print(t)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
