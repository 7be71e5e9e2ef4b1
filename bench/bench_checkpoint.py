"""What checkpoint integrity costs: a save and a resume of the full model with and without it.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 .venv/bin/python bench/bench_checkpoint.py [--repeats 5] \\
        [--dir /var/tmp/bench_checkpoint] [--out bench/results/checkpoint.json]

One process (a world of 1, gloo), the full model (mossformer2_se_48k, 55,262,154 parameters), ZeRO 0,
fp32, Adam (ds_configs/bs4.json), after one optimizer step so that Adam's moments exist: the checkpoint
is the real ~663 MB `mp_rank_00_model_states.pt` plus our RNG file. Contenders, alternating, repeated:

- save, DeepSpeed only: `engine.save_checkpoint` and the RNG file (what launcher/checkpoint/store.py wrote
  before the marker listed files);
- save, ours: `launcher.checkpoint.save` (free-space check, the same two writes, CRC-32 of each file read
  back from the page cache, fsync of each file and of the folder, the marker written atomically);
- resume, DeepSpeed only: `engine.load_checkpoint`;
- resume, ours: `launcher.checkpoint.verify` (sizes and CRC-32 of every file) then `engine.load_checkpoint`.

Resumes run twice: from a cold page cache (the files evicted with posix_fadvise after `sync`: a restart
on another node, the case that matters) and from a warm one (right after the save). Every timed save
starts with no dirty pages (`sync` before, untimed), so one save's writeback is not billed to the next.
Also timed alone: the CRC-32 of the saved files (warm cache) and their fsync.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine  # noqa: E402

PRESET = "mossformer2_se_48k"


def _init() -> None:
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed.init_distributed(dist_backend="gloo")


def _engine():
    import deepspeed
    import torch

    from launcher.plan.ds_config import load_preset
    from model import build_model, compute_features, mask_loss

    cfg = load_preset("ds_configs/bs4.json")
    cfg.update({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    cfg["optimizer"]["params"]["lr"] = 1e-4
    torch.manual_seed(0)
    model = build_model(PRESET)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    noisy = torch.randn(1, 12000)  # 0.25 s: enough for one step that creates Adam's moments
    engine.backward(mask_loss(engine(compute_features(noisy, dither=0.0)), noisy, noisy * 0.5))
    engine.step()
    return engine


def _evict(tag_dir: Path) -> None:
    os.sync()
    for f in tag_dir.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp/bench_checkpoint"),
                    help="where the checkpoints go: a real disk (not a tmpfs) for meaningful fsync and cold reads")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from launcher.checkpoint import integrity, marker as markers, resume, store

    load_start = os.getloadavg()
    _init()
    engine = _engine()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    marker = {"step": 1, "world_size": 1, "zero_stage": 0, "global_batch": 1, "preset": PRESET, "state": {}}
    times: dict[str, list[float]] = {k: [] for k in ("save_ds", "save_ours", "crc32", "fsync", "resume_ds_cold",
                                                     "resume_ours_cold", "resume_ds_warm", "resume_ours_warm")}
    plain, ours = args.dir / "plain", args.dir / "ours"
    tag = markers.tag_for(engine.global_steps)
    size, files = 0, []
    for r in range(args.repeats):
        for name in (("save_ds", "save_ours") if r % 2 == 0 else ("save_ours", "save_ds")):
            folder = plain if name == "save_ds" else ours
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            os.sync()
            t = time.perf_counter()
            if name == "save_ds":
                engine.save_checkpoint(str(folder), tag=tag, client_state={}, save_latest=False)
                torch.save(store._rng_state(), folder / tag / "rng_rank0000.pt")
                times[name].append(time.perf_counter() - t)
                # The two parts of ours, alone, on the files just written (warm, still dirty).
                files = sorted((folder / tag).iterdir())
                size = sum(f.stat().st_size for f in files)
                t = time.perf_counter()
                for f in files:
                    integrity.file_record(f, f.parent)
                times["crc32"].append(time.perf_counter() - t)
                t = time.perf_counter()
                for f in files:
                    with open(f, "rb") as handle:
                        os.fsync(handle.fileno())
                times["fsync"].append(time.perf_counter() - t)
            else:
                store.save(engine, folder, {}, marker, keep_last=1)
                times[name].append(time.perf_counter() - t)
        for cache in ("warm", "cold"):
            for name in ((f"resume_ds_{cache}", f"resume_ours_{cache}") if r % 2 == 0 else
                         (f"resume_ours_{cache}", f"resume_ds_{cache}")):
                if cache == "cold":
                    _evict(ours / tag)
                t = time.perf_counter()
                if name.startswith("resume_ours"):
                    problem = resume.verify(ours, tag, markers.read_marker(ours, tag))
                    assert problem is None, problem
                path, _ = engine.load_checkpoint(str(ours), tag=tag, load_optimizer_states=True,
                                                 load_lr_scheduler_states=False)
                assert path is not None
                times[name].append(time.perf_counter() - t)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = {
        "save": med["save_ours"] / med["save_ds"],
        "resume_cold": med["resume_ours_cold"] / med["resume_ds_cold"],
        "resume_warm": med["resume_ours_warm"] / med["resume_ds_warm"],
    }
    print(f"checkpoint: {size / 1e6:.0f} MB in {len(files)} files; CRC-32 {size / med['crc32'] / 1e9:.2f} GB/s "
          f"(warm), fsync {med['fsync']:.2f} s")
    for k, v in med.items():
        print(f"  {k:18s} median {v:6.2f} s  (runs: {', '.join(f'{x:.2f}' for x in times[k])})")
    for k, v in ratios.items():
        print(f"  {k:12s} ours ÷ DeepSpeed only: {v:.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                                        "load_avg_start_end": [load_start, os.getloadavg()], "bytes": size, "repeats": args.repeats,
                                        "median_s": med, "runs_s": times, "ratios": ratios}, indent=1))
        print(f"wrote {args.out}")
    shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
