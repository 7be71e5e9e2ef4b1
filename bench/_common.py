"""What the benchmark scripts share: the machine a result came from, and the demo run's data pipeline."""

from __future__ import annotations

import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO_RECIPE = ROOT / "recipes" / "demo_cpu.yaml"
DEMO_TRAIN_LIST = ROOT / "runs" / "demo_corpus" / "train.lst"


def machine() -> str:
    """CPU model, core count, OS and Python: recorded with every result, since results are per machine."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}")


def demo_loader(rank: int, world: int, micro: int, accumulation: int, epoch: int = 0, **overrides):
    """(batches, sampler) of one rank as launcher/train.py builds them for the demo recipe: its data settings
    (``overrides`` replace any of build_loader's), crops of the demo corpus, its seed."""
    from data import CropDataset, CursorSampler, PairIndex, build_loader
    from launcher.config import load_config

    cfg = load_config(DEMO_RECIPE)
    d = cfg.data
    dataset = CropDataset(PairIndex.from_lists([DEMO_TRAIN_LIST]), segment_seconds=d.segment_seconds,
                          seed=cfg.train.seed)
    sampler = CursorSampler(len(dataset), micro, rank, world, seed=cfg.train.seed,
                            epoch_quantum=micro * accumulation * world)
    sampler.set_epoch(epoch)
    settings = dict(num_workers=d.num_workers, pin_memory=False, persistent_workers=d.persistent_workers,
                    prefetch_factor=d.prefetch_factor, nice=d.loader_nice, thread_prefetch=d.thread_prefetch)
    return build_loader(dataset, sampler, **{**settings, **overrides}), sampler
