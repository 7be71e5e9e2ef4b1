"""Hot-path costs, before and after, side by side in one run (not a test): the depthwise convolutions' identity
tap and validation's loss and SI-SNR.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_hot_path.py --repeats 7 --out bench/results/hot_path.json

1. Identity taps. Each depthwise time convolution folds the residual into its centre tap. Before: the one-hot
   tap was built in every call (zeros, select, fill: 144 calls per forward of the full model); after: a
   non-persistent buffer of the module (model/network.py). "before" runs a copy of the same model with those
   buffers set to None, which takes the per-call path. Reported: ATen operators dispatched per forward (counted,
   device-independent: each is at least one kernel launch on a GPU) and forward time in eval mode, ours
   alternating before/after, medians over --repeats.
2. Validation. Before: launcher/train.py's loop called mask_loss once per item (two STFTs of one item each),
   then apply_mask (a third STFT, of the batch) and si_snr twice; after: model.validation_metrics (two STFTs
   of the batch). Batch 12 × 4 s at 48 kHz, alternating, medians over --repeats.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _common import machine  # noqa: E402
from model import apply_mask, build_model, mask_loss, num_frames, si_snr, validation_metrics  # noqa: E402


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _without_identity_taps(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose depthwise convolutions build their identity tap in every call (the old path)."""
    legacy = copy.deepcopy(model)
    for module in legacy.modules():
        if getattr(module, "identity_tap", None) is not None:
            module.identity_tap = None
    return legacy


def alternate(contenders: dict, repeats: int) -> dict:
    """Each contender once per repeat, in turn (after one warm-up each): medians and the after/before ratio."""
    for fn in contenders.values():
        fn()
    times = collections.defaultdict(list)
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    # Each repeat's pair ran back to back, under the same load: the median of their ratios is the robust number.
    pairs = [a / b for a, b in zip(times["after"], times["before"])]
    return {"before_median_s": med["before"], "after_median_s": med["after"],
            "ratio_after_before": statistics.median(pairs), "pair_ratios": pairs, "times_s": dict(times)}


def identity_taps(preset: str, batch: int, seconds: float, repeats: int) -> dict:
    torch.manual_seed(0)
    models = {"after": build_model(preset).eval()}
    models["before"] = _without_identity_taps(models["after"])
    x = torch.randn(batch, num_frames(int(seconds * 48000)), 180)

    def forward(model: torch.nn.Module):
        def run() -> None:
            with torch.no_grad():
                model(x)
        return run

    ops = {}
    for label in ("before", "after"):
        with torch.no_grad(), _CountOps() as counter:
            models[label](x)
        ops[label] = counter.count
    out = alternate({"before": forward(models["before"]), "after": forward(models["after"])}, repeats)
    return {"preset": preset, "batch": batch, "seconds": seconds, "ops_per_forward": ops, **out}


def validation(batch: int, seconds: float, repeats: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    samples = int(seconds * 48000)
    clean = torch.randn(batch, samples, generator=gen) * 0.1
    noisy = clean + torch.randn(batch, samples, generator=gen) * 0.05
    mask = torch.rand(batch, num_frames(samples), 961, generator=gen)

    def before() -> None:
        torch.stack([mask_loss(mask[i:i + 1], noisy[i:i + 1], clean[i:i + 1]) for i in range(batch)])
        si_snr(apply_mask(mask, noisy), clean)
        si_snr(noisy, clean)

    def after() -> None:
        validation_metrics(mask, noisy, clean)

    return {"batch": batch, "seconds": seconds, **alternate({"before": before, "after": after}, repeats)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "identity_taps": [], "validation": None}
    for preset, batch, seconds in (("tiny", 1, 1.0), ("mossformer2_se_48k", 1, 1.0)):
        r = identity_taps(preset, batch, seconds, args.repeats)
        result["identity_taps"].append(r)
        print(f"identity taps, {preset} batch {batch} × {seconds:g} s, eval forward: ATen ops {r['ops_per_forward']['before']}"
              f" → {r['ops_per_forward']['after']}; {r['before_median_s'] * 1e3:.2f} → {r['after_median_s'] * 1e3:.2f} ms"
              f" (after/before {r['ratio_after_before']:.3f})", flush=True)
    r = result["validation"] = validation(12, 4.0, args.repeats)
    print(f"validation metrics, batch 12 × 4 s: {r['before_median_s'] * 1e3:.1f} → {r['after_median_s'] * 1e3:.1f} ms "
          f"(after/before {r['ratio_after_before']:.3f})", flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
