"""Launcher overhead: samples/s of our training loop against a minimal DeepSpeed loop and plain PyTorch DDP.

    .venv/bin/python -m data.demo runs/demo_corpus        # once
    .venv/bin/python bench/bench_overhead.py [--rounds 3] [--steps 48] [--log_interval 4] [--warmup 8] \\
        [--profile] [--out bench/results/overhead.json]

Three 2-rank CPU runs (DS_ACCELERATOR=cpu, OMP_NUM_THREADS=1), all on the tiny preset, micro-batch 4,
accumulation 2, fp32, Adam, 1 s crops of the demo corpus, features computed inside the step:

- ours:    `deepspeed --num_gpus 2 launcher/train.py --ds_config ds_configs/bs4.json --config
           recipes/demo_cpu.yaml train.max_steps=N train.log_interval_steps=K data.valid_list=none
           train.progress_bar=false` (ZeRO 0: the preset names no stage), reading its crops from the WAV
           files as training does; per-step time from the timestamps of its metrics.jsonl records (the wall
           time of a logging interval divided by its steps, so the logging itself, data loading and
           everything else the loop does is inside), and its own samples_per_s alongside. K defaults to 4:
           a logging interval like a user's (our default is 10, the demo's 5), where logging every step
           would time the logging more than the loop;
- ds_loop: the same engine settings (the rendered bs4.json preset) in a hand-written loop of
           engine(features) → mask_loss → engine.backward → engine.step, under the same `deepspeed`
           launcher, with the demo corpus decoded and normalised into memory first and random crops cut
           from it (no DataLoader);
- ddp:     `torchrun`, DistributedDataParallel, torch.optim.Adam (same betas/eps/lr), gradient clipping
           at 10 like the preset, accumulation with no_sync, the same in-memory crops.

Contenders run alternately, round after round (the order rotates each round). In each run the first
--warmup optimizer steps are dropped; a run's throughput is the median over its remaining steps (steps that
cross an epoch boundary of ours, where it checkpoints, are dropped too and counted separately); the
result per contender is the median over rounds, and the ratios are computed per round (side by side) and
their median is reported. Alongside: the fastest tenth of the steps (other users of a shared machine only
ever slow a step down), and the CPU time of the whole process tree (launcher, ranks, loader workers)
per sample, sampled every 50 ms and cut at the same step boundaries: it measures the work a loop does
and hardly moves when other processes take the cores, which on a shared 2-core machine moves wall-clock
throughput by ±30 % from run to run.

--profile adds the variants that locate ours' overhead: ours with a loader worker process
(data.num_workers=1), ours without the background prefetch thread (data.thread_prefetch=0), ours logging
every step (train.log_interval_steps=1: a JSONL record, TensorBoard scalars and a log line each step); the
minimal loop with (a) what launcher/train.py adds for its bookkeeping (launcher/training/nonfinite.py's StepWindow: loss
sums kept on the device per micro-batch, and per optimizer step the plain optimizer's gradient norm and one
all-reduce, then optimizer_step), (b) our data pipeline with the demo recipe's data settings (CropDataset +
CursorSampler + build_loader + ThreadPrefetcher) instead of in-memory crops.

--baseline_tree PATH adds `ours_baseline`: launcher/train.py of another checkout (e.g. /work/main, to
measure a change side by side), run from its own snapshot with the same arguments and corpus.

All runs execute in a snapshot of the working tree (launcher/, model/, data/, ds_configs/, recipes/,
bench/) copied when the benchmark starts, so that edits made meanwhile (others work in this tree) cannot
change what one contender runs against another; the JSON records the snapshot's file hashes.

Worker mode (what the launchers start): `bench_overhead.py --worker ds|ddp --steps N --result FILE`.
"""

from __future__ import annotations

import argparse
import json
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

BIN = Path(sys.executable).parent
PRESET = "tiny"
MICRO, ACCUM = 4, 2
SEGMENT_SECONDS = 1.0
RATE = 48000
DS_SPEC = "ds_configs/bs4.json"
RECIPE = "recipes/demo_cpu.yaml"
TRAIN_LIST = "runs/demo_corpus/train.lst"
LR = 2e-3  # the demo recipe's peak LR at its global batch of 16 (speed does not depend on it)


# ---- workers -------------------------------------------------------------------------------------

class InMemoryCrops:
    """The demo corpus decoded and normalised once; random same-window crops of noisy and clean."""

    def __init__(self, list_path: str, segment_seconds: float, seed: int) -> None:
        import numpy as np
        import soundfile as sf

        from data.audio import normalize_level

        base = Path(list_path).parent
        self.pairs = []
        for line in Path(list_path).read_text().splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            noisy_path, clean_path = line.split()[:2]
            noisy = sf.read(base / noisy_path, dtype="float32", always_2d=True)[0][:, 0]
            clean = sf.read(base / clean_path, dtype="float32", always_2d=True)[0][:, 0]
            n = min(noisy.size, clean.size)
            self.pairs.append((normalize_level(noisy[:n]), normalize_level(clean[:n])))
        self.length = int(round(segment_seconds * RATE))
        self.rng = np.random.default_rng(seed)
        self.np = np

    def batch(self, size: int):
        import torch

        np, L = self.np, self.length
        noisy, clean = np.zeros((size, L), np.float32), np.zeros((size, L), np.float32)
        for row, i in enumerate(self.rng.integers(0, len(self.pairs), size)):
            a, b = self.pairs[i]
            start = int(self.rng.integers(0, a.size - L + 1)) if a.size > L else 0
            w = min(L, a.size - start)
            noisy[row, :w], clean[row, :w] = a[start:start + w], b[start:start + w]
        return torch.from_numpy(noisy), torch.from_numpy(clean)


class OurLoader:
    """The training path's data pipeline with the demo recipe's data settings, as an endless batch source."""

    def __init__(self, rank: int, world: int) -> None:
        self.loader, self.sampler = demo_loader(rank, world, MICRO, ACCUM)
        self.it = iter(self.loader)

    def batch(self, size: int):
        try:
            noisy, clean = next(self.it)
        except StopIteration:
            self.sampler.set_epoch(self.sampler.epoch + 1)
            self.it = iter(self.loader)
            noisy, clean = next(self.it)
        self.sampler.advance(1)
        return noisy, clean


def _source(kind: str, rank: int, world: int):
    return OurLoader(rank, world) if kind == "loader" else InMemoryCrops(TRAIN_LIST, SEGMENT_SECONDS, seed=rank)


class StepClock:
    """Per-optimizer-step wall times and end stamps of a worker loop; rank 0 writes them for the driver."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.stamps: list[float] = []
        self.t = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.times.append(now - self.t)
        self.stamps.append(time.time())
        self.t = now

    def write(self, rank: int, path: str, samples_per_step: int) -> None:
        if rank == 0:
            Path(path).write_text(json.dumps({"step_s": self.times, "stamps": self.stamps,
                                              "samples_per_step": samples_per_step}))


def worker_ds(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from launcher.dist.group import release_shm_segment_name
    from launcher.plan.ds_config import load_preset
    from launcher.training.nonfinite import StepWindow, optimizer_step
    from model import build_model, compute_features, mask_loss

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.barrier()  # every rank has mapped every peer's /dev/shm segment: their names can go
    release_shm_segment_name(rank)
    cfg = load_preset(DS_SPEC)
    cfg.update({"train_batch_size": MICRO * ACCUM * world, "train_micro_batch_size_per_gpu": MICRO,
                "gradient_accumulation_steps": ACCUM})
    cfg["optimizer"]["params"]["lr"] = LR
    torch.manual_seed(777)
    model = build_model(PRESET)
    torch.manual_seed(777 + 1000 * (rank + 1))
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                          if p.requires_grad], config=cfg)
    source = _source(args.data, rank, world)
    window = StepWindow(engine, torch.device("cpu")) if args.flags else None
    clock = StepClock()
    for _ in range(args.steps):
        for _ in range(ACCUM):
            noisy, clean = source.batch(MICRO)
            loss = mask_loss(engine(compute_features(noisy, dither=1.0)), noisy, clean)
            if window is not None:  # what launcher/train.py adds: device-side loss sums per micro-batch ...
                window.add(loss)
            engine.backward(loss)
            if window is not None and engine.is_gradient_accumulation_boundary():
                # ... and per step the gradient norm (plain optimizer) and one all-reduce of the window
                optimizer_step(engine, window.reduce(stop_requested=False))
            else:
                engine.step()
        clock.tick()
    clock.write(rank, args.result, MICRO * ACCUM * world)
    dist.barrier()
    dist.destroy_process_group()


def worker_ddp(args: argparse.Namespace) -> None:
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from launcher.plan.ds_config import load_preset
    from model import build_model, compute_features, mask_loss

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    opt_params = load_preset(DS_SPEC)["optimizer"]["params"]
    clip = load_preset(DS_SPEC)["gradient_clipping"]
    torch.manual_seed(777)
    model = build_model(PRESET)
    torch.manual_seed(777 + 1000 * (rank + 1))
    ddp = DistributedDataParallel(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=LR, betas=tuple(opt_params["betas"]), eps=opt_params["eps"], weight_decay=0.0)
    source = _source(args.data, rank, world)
    clock = StepClock()
    for _ in range(args.steps):
        for i in range(ACCUM):
            noisy, clean = source.batch(MICRO)
            with ddp.no_sync() if i < ACCUM - 1 else nullcontext():
                loss = mask_loss(ddp(compute_features(noisy, dither=1.0)), noisy, clean) / ACCUM
                loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick()
    clock.write(rank, args.result, MICRO * ACCUM * world)
    dist.destroy_process_group()


# ---- driver --------------------------------------------------------------------------------------

def _env() -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


SNAPSHOT_DIRS = ("launcher", "model", "data", "ds_configs", "recipes", "bench")


def snapshot(dest: Path, tree: Path = ROOT) -> dict[str, str]:
    """Copy the code of tree the runs use into dest (the demo corpus is linked); {file: sha256} of what was copied."""
    import hashlib
    import shutil

    hashes = {}
    for name in SNAPSHOT_DIRS:
        shutil.copytree(tree / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
        for f in sorted((dest / name).rglob("*.py")):
            hashes[str(f.relative_to(dest))] = hashlib.sha256(f.read_bytes()).hexdigest()[:16]
    (dest / "runs").mkdir()
    (dest / "runs" / "demo_corpus").symlink_to(ROOT / "runs" / "demo_corpus")
    return hashes


CWD = ROOT  # where the runs execute: the snapshot once main() has made it
BASELINE_CWD: Path | None = None  # --baseline_tree's snapshot
LOAD_START = os.getloadavg()  # the machine's load when the benchmark started (recorded with the results)


def _run(cmd: list[str], timeout: float, cwd: Path | None = None) -> tuple[float, list[tuple[float, float]]]:
    """(wall seconds, [(time.time(), CPU seconds used so far by the whole process tree)]) of one run.

    The CPU time of the launcher, the ranks and their loader workers is sampled every 50 ms: unlike wall
    time it barely grows when other users' processes take the cores, so CPU-seconds per step compares the
    work each loop does even on a busy machine."""
    import threading

    import psutil

    start = time.perf_counter()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=cwd or CWD, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        finished: dict[int, float] = {}  # CPU of processes seen before, kept when they exit
        while not done.is_set():
            total = 0.0
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for p in procs:
                try:
                    c = p.cpu_times()
                    finished[p.pid] = c.user + c.system
                except psutil.Error:
                    pass
            total = sum(finished.values())
            samples.append((time.time(), total))
            done.wait(0.05)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        done.set()
        thread.join()
    if rc != 0:
        log.seek(0)
        raise SystemExit(f"failed ({rc}): {' '.join(cmd)}\n{log.read()[-5000:]}")
    return time.perf_counter() - start, samples


def _cpu_at(samples: list[tuple[float, float]], t: float) -> float:
    """CPU seconds of the process tree at wall time t, interpolated between samples."""
    import bisect

    times = [x for x, _ in samples]
    i = bisect.bisect_left(times, t)
    if i == 0:
        return samples[0][1]
    if i >= len(samples):
        return samples[-1][1]
    (t0, c0), (t1, c1) = samples[i - 1], samples[i]
    return c0 + (c1 - c0) * (t - t0) / (t1 - t0) if t1 > t0 else c1


def cpu_per_step(samples: list[tuple[float, float]], stamps: list[tuple[int, float, float]]) -> list[tuple[int, float]]:
    """[(step, CPU seconds of the whole tree during that step)] for (step, start time, end time) windows."""
    return [(step, _cpu_at(samples, end) - _cpu_at(samples, start)) for step, start, end in stamps]


def run_ours(steps: int, port: int, tmp: Path, extra: list[str], log_interval: int, cwd: Path | None = None) -> dict:
    """One run of launcher/train.py (of the snapshot in cwd, by default this tree's); its step times come from
    the metrics.jsonl records, one per logging interval (the time of an interval divided by its steps)."""
    run_dir = tmp / f"ours_{port}"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), "launcher/train.py",
           "--ds_config", DS_SPEC, "--config", RECIPE, "--run_dir", str(run_dir), f"train.max_steps={steps}",
           f"train.log_interval_steps={log_interval}", "data.valid_list=none", "train.progress_bar=false", *extra]
    wall, samples = _run(cmd, timeout=600, cwd=cwd)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("kind") == "train"]
    step_s, crossing, reported, waits, windows, sizes = [], [], [], [], [], []
    for prev, cur in zip(train, train[1:]):
        n = cur["step"] - prev["step"]
        per_step = (cur["time"] - prev["time"]) / n
        if cur["epoch"] != prev["epoch"]:  # the interval holds an epoch end (and its checkpoint)
            crossing.append((cur["step"], per_step))
            continue
        step_s.append((cur["step"], per_step))
        windows.append((cur["step"], prev["time"], cur["time"]))
        sizes.append(n)
    for r in train:
        reported.append((r["step"], r["samples_per_s"]))
        waits.append((r["step"], r["data_wait_share"]))
    cpu = [(step, c / n) for (step, c), n in zip(cpu_per_step(samples, windows), sizes)]
    return {"step_s": step_s, "epoch_crossing_step_s": crossing, "reported_samples_per_s": reported,
            "data_wait_share": waits, "samples_per_step": 16, "wall_s": wall, "cpu_step_s": cpu}


def run_worker(kind: str, steps: int, port: int, tmp: Path, flags: bool, data: str) -> dict:
    result = tmp / f"{kind}_{port}.json"
    script = ["bench/bench_overhead.py", "--worker", kind, "--steps", str(steps), "--result", str(result),
              "--data", data] + (["--flags"] if flags else [])
    if kind == "ds":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(port), *script]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), *script]
    wall, samples = _run(cmd, timeout=600)
    out = json.loads(result.read_text())
    stamps = out["stamps"]
    windows = [(k + 1, stamps[k - 1], stamps[k]) for k in range(1, len(stamps))]
    return {"step_s": list(enumerate(out["step_s"], start=1)), "samples_per_step": out["samples_per_step"],
            "wall_s": wall, "cpu_step_s": cpu_per_step(samples, windows)}


def throughput(run: dict, warmup: int, quantile: float = 0.5) -> float:
    """samples/s at the median (or another quantile) of the optimizer-step times after warm-up."""
    times = sorted(s for step, s in run["step_s"] if step > warmup)
    if not times:
        raise SystemExit(f"no steps left after {warmup} warm-up steps; raise --steps")
    t = statistics.median(times) if quantile == 0.5 else times[min(len(times) - 1, int(quantile * len(times)))]
    return run["samples_per_step"] / t




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=("ds", "ddp"), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--flags", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--data", choices=("memory", "loader"), default="memory", help=argparse.SUPPRESS)
    ap.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # passed by `deepspeed`
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per run")
    ap.add_argument("--log_interval", type=int, default=4,
                    help="ours' train.log_interval_steps: its step times are per logging interval")
    ap.add_argument("--warmup", type=int, default=8, help="optimizer steps dropped at the start of each run")
    ap.add_argument("--profile", action="store_true", help="also the variants that locate the overhead")
    ap.add_argument("--port", type=int, default=29740, help="first master port (one per run, counting up)")
    ap.add_argument("--baseline_tree", type=Path, default=None,
                    help="another checkout (e.g. the main branch's): its launcher/train.py runs as `ours_baseline`, "
                         "side by side with this tree's")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.worker == "ds":
        worker_ds(args)
        return 0
    if args.worker == "ddp":
        worker_ddp(args)
        return 0
    if not Path(TRAIN_LIST).is_absolute() and not (ROOT / TRAIN_LIST).is_file():
        raise SystemExit(f"{TRAIN_LIST} is missing: run `.venv/bin/python -m data.demo runs/demo_corpus` first")

    contenders = {
        "ours": lambda port, tmp: run_ours(args.steps, port, tmp, [], args.log_interval),
        "ds_loop": lambda port, tmp: run_worker("ds", args.steps, port, tmp, False, "memory"),
        "ddp": lambda port, tmp: run_worker("ddp", args.steps, port, tmp, False, "memory"),
    }
    if args.baseline_tree:
        contenders["ours_baseline"] = lambda port, tmp: run_ours(args.steps, port, tmp, [], args.log_interval,
                                                                 cwd=BASELINE_CWD)
    if args.profile:
        contenders.update({
            "ours_workers1": lambda port, tmp: run_ours(args.steps, port, tmp, ["data.num_workers=1"], args.log_interval),
            "ours_no_thread": lambda port, tmp: run_ours(args.steps, port, tmp, ["data.thread_prefetch=0"], args.log_interval),
            "ours_log_every_step": lambda port, tmp: run_ours(args.steps, port, tmp, [], 1),
            "ds_loop_flags": lambda port, tmp: run_worker("ds", args.steps, port, tmp, True, "memory"),
            "ds_loop_loader": lambda port, tmp: run_worker("ds", args.steps, port, tmp, False, "loader"),
        })
    names = list(contenders)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    port = args.port
    global CWD, BASELINE_CWD
    with tempfile.TemporaryDirectory(prefix="bench_overhead_") as tmpdir:
        tmp = Path(tmpdir)
        CWD = tmp / "tree"
        code_hashes = snapshot(CWD)
        if args.baseline_tree:
            BASELINE_CWD = tmp / "baseline"
            code_hashes["baseline"] = snapshot(BASELINE_CWD, args.baseline_tree)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                run = contenders[name](port, tmp)
                port += 1
                run["samples_per_s"] = throughput(run, args.warmup)
                # The fastest tenth of the steps: less sensitive to other users of a shared machine,
                # which only ever slow a step down.
                run["samples_per_s_p10"] = throughput(run, args.warmup, 0.1)
                cpu = [c for step, c in run["cpu_step_s"] if step > args.warmup]
                run["cpu_s_per_sample"] = statistics.median(cpu) / run["samples_per_step"]
                runs[name].append(run)
                print(f"round {r + 1}/{args.rounds} {name:15s} {run['samples_per_s']:7.2f} samples/s, "
                      f"{1e3 * run['cpu_s_per_sample']:6.1f} CPU-ms/sample (run wall {run['wall_s']:.1f} s)", flush=True)
                # Written after every run: a benchmark killed half-way keeps what it measured.
                result = summarize(runs, args, code_hashes, complete=False)
                if args.out:
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(result, indent=1))
    result = summarize(runs, args, code_hashes, complete=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


def summarize(runs: dict[str, list[dict]], args: argparse.Namespace, code_hashes: dict, complete: bool) -> dict:
    names = [n for n in runs if runs[n]]
    med = {n: statistics.median(run["samples_per_s"] for run in runs[n]) for n in names}
    med_p10 = {n: statistics.median(run["samples_per_s_p10"] for run in runs[n]) for n in names}
    med_cpu = {n: statistics.median(run["cpu_s_per_sample"] for run in runs[n]) for n in names}

    def ratio(a: str, b: str) -> dict:
        pairs = list(zip(runs[a], runs[b]))  # round by round
        per_round = [x["samples_per_s"] / y["samples_per_s"] for x, y in pairs]
        per_round_p10 = [x["samples_per_s_p10"] / y["samples_per_s_p10"] for x, y in pairs]
        # CPU: the work per sample, inverted so that above 1 means `a` does less work than `b`
        per_round_cpu = [y["cpu_s_per_sample"] / x["cpu_s_per_sample"] for x, y in pairs]
        return {"median_of_round_ratios": statistics.median(per_round), "per_round": per_round,
                "ratio_of_medians": med[a] / med[b],
                "p10_median_of_round_ratios": statistics.median(per_round_p10), "p10_per_round": per_round_p10,
                "cpu_median_of_round_ratios": statistics.median(per_round_cpu), "cpu_per_round": per_round_cpu}

    wanted = [("ours", "ds_loop"), ("ours", "ddp"), ("ours", "ours_baseline"), ("ours_baseline", "ds_loop"),
              ("ds_loop", "ddp"), ("ds_loop_flags", "ds_loop"),
              ("ds_loop_loader", "ds_loop"), ("ours", "ds_loop_loader"), ("ours", "ours_workers1"),
              ("ours", "ours_no_thread"), ("ours_log_every_step", "ds_loop"), ("ours", "ours_log_every_step")]
    ratios = {f"{a}_vs_{b}": ratio(a, b) for a, b in wanted if runs.get(a) and runs.get(b)}
    ours_extra = {}
    for name in [n for n in names if n.startswith("ours")]:
        reported = [v for run in runs[name] for step, v in run["reported_samples_per_s"] if step > args.warmup]
        waits = [v for run in runs[name] for step, v in run["data_wait_share"] if step > args.warmup]
        crossing = [s for run in runs[name] for _, s in run["epoch_crossing_step_s"]]
        ours_extra[name] = {"median_reported_samples_per_s": statistics.median(reported),
                            "median_data_wait_share": statistics.median(waits),
                            "epoch_crossing_step_s_median": statistics.median(crossing) if crossing else None}
    if complete:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"training-loop throughput, 2 CPU ranks, tiny preset, {MICRO}×{ACCUM}×2, "
                            f"medians of {args.rounds} rounds")
        for col in ("loop", "samples/s", "× ds_loop", "× ddp", "fastest-10% samples/s", "CPU-ms/sample",
                    "ds_loop ÷ this", "ddp ÷ this"):
            table.add_column(col, justify="right")
        for n in names:
            table.add_row(n, f"{med[n]:.2f}", f"{med[n] / med['ds_loop']:.3f}", f"{med[n] / med['ddp']:.3f}",
                          f"{med_p10[n]:.2f}", f"{1e3 * med_cpu[n]:.1f}", f"{med_cpu['ds_loop'] / med_cpu[n]:.3f}",
                          f"{med_cpu['ddp'] / med_cpu[n]:.3f}")
        Console(width=max(Console().width, 140)).print(table)
        for k, v in ratios.items():
            print(f"{k:28s} wall: median of per-round ratios {v['median_of_round_ratios']:.3f} "
                  f"(rounds {', '.join(f'{x:.2f}' for x in v['per_round'])}); fastest-10% "
                  f"{v['p10_median_of_round_ratios']:.3f}; CPU work {v['cpu_median_of_round_ratios']:.3f} "
                  f"(rounds {', '.join(f'{x:.3f}' for x in v['cpu_per_round'])})")
        for k, v in ours_extra.items():
            print(f"{k}: its own samples_per_s median {v['median_reported_samples_per_s']:.2f}, data-wait share "
                  f"median {100 * v['median_data_wait_share']:.1f} %, epoch-crossing step "
                  f"{v['epoch_crossing_step_s_median']} s")
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "load_avg_start_now": [LOAD_START, os.getloadavg()],
            "complete": complete, "rounds": args.rounds,
            "steps": args.steps, "warmup": args.warmup, "log_interval": args.log_interval,
            "code_sha256": code_hashes,
            "median_samples_per_s": med, "p10_samples_per_s": med_p10, "median_cpu_s_per_sample": med_cpu,
            "ratios": ratios, "ours": ours_extra, "goals": {"ours_vs_ds_loop": ">= 0.97", "ours_vs_ddp": ">= 0.95"},
            "runs": {n: [{"samples_per_s": r["samples_per_s"], "samples_per_s_p10": r["samples_per_s_p10"],
                          "cpu_s_per_sample": r["cpu_s_per_sample"], "cpu_step_s": [c for _, c in r["cpu_step_s"]],
                          "samples_per_step": r["samples_per_step"], "wall_s": r["wall_s"],
                          "step_s": [s for _, s in r["step_s"]]} for r in runs[n]] for n in names}}


if __name__ == "__main__":
    sys.exit(main())
