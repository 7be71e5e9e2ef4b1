"""Model benchmark (not a test): our MossFormer2 against the reference implementation, side by side.

    .venv/bin/python bench/bench_model.py --reference /tmp/ref/pkg --out runs/bench_model.json

The reference is ClearerVoice-Studio's model code from the PyPI package ``clearvoice`` 0.1.2 (it needs only
torch, einops and rotary-embedding-torch; torchinfo, which it imports but never uses, is stubbed if absent):

    pip download clearvoice==0.1.2 --no-deps -d /tmp/ref
    python -m zipfile -e /tmp/ref/clearvoice-0.1.2-py3-none-any.whl /tmp/ref/pkg

``--reference`` is the directory that holds the ``clearvoice`` package folder. Only its
``clearvoice/models/mossformer2_se`` modules are imported (not the package's heavy ``__init__``).

For each case (preset, batch, 4 s of features = 496 frames by default) both models get identical weights
(the reference loads our state dict strictly), then:
- the largest absolute difference between the two masks in eval mode (the equivalence check),
- forward+backward time in train mode (dropout on, as in training) and eval-mode forward time, measured
  alternately ours/reference in each repeat so that both see the same machine load; medians (and minima)
  over ``--repeats``; ratio = ours / reference (below 1 is faster).

``--write-golden PATH`` also writes the regression fixture used by tests/test_model_network.py: a small
config's weights (randomly perturbed away from their init), an input and the reference's output.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import MossFormer2Config, build_model, num_frames  # noqa: E402
from model.config import PRESETS, resolve_config  # noqa: E402

# The golden fixture's config: every code path (two layers, three attention groups with padding, rotary
# on half the query/key dimensions) at a size whose weights fit in well under 1 MB.
GOLDEN_CONFIG = MossFormer2Config(model_dim=32, num_layers=2, group_size_frames=32, query_key_dim=16,
                                  rotary_dim=16, fsmn_inner_dim=16)
GOLDEN_FRAMES = 70


def import_reference(path: str) -> tuple[types.ModuleType, types.ModuleType]:
    """(mossformer2, mossformer2_block) modules of the reference, without running clearvoice/__init__."""
    root = Path(path) / "clearvoice"
    if not (root / "models" / "mossformer2_se" / "mossformer2.py").is_file():
        raise SystemExit(f"--reference {path}: no clearvoice/models/mossformer2_se/mossformer2.py there "
                         f"(see this script's docstring for how to get it)")
    for name, folder in (("clearvoice", root), ("clearvoice.models", root / "models")):
        if name not in sys.modules:
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
    try:
        importlib.import_module("torchinfo")
    except ImportError:
        sys.modules["torchinfo"] = types.SimpleNamespace(summary=None)
    base = "clearvoice.models.mossformer2_se."
    return importlib.import_module(base + "mossformer2"), importlib.import_module(base + "mossformer2_block")


class ReferenceModel(nn.Module):
    """The reference's TestNet at our config's sizes: fbank (B, T, 180) -> mask (B, T, 961)."""

    def __init__(self, cfg: MossFormer2Config, ref_net: types.ModuleType, ref_block: types.ModuleType) -> None:
        super().__init__()
        if cfg.rotary_dim != min(32, cfg.query_key_dim) or cfg.conv_kernel_frames != 17 \
                or cfg.fsmn_context_frames != 19 or cfg.num_speakers != 2:
            raise ValueError(f"the reference hard-codes rotary_dim=min(32, qk), kernels 17/39 and 2 speakers: {cfg}")
        self.mossformer = ref_net.MossFormer_MaskNet(in_channels=cfg.feature_dim, out_channels=cfg.model_dim,
                                                     out_channels_final=cfg.num_bins, num_blocks=cfg.num_layers)
        if cfg != PRESETS["mossformer2_se_48k"]:
            # MossFormer_MaskNet hard-codes these sizes; rebuild the blocks with ours.
            blocks = ref_block.MossformerBlock_GFSMN(
                dim=cfg.model_dim, depth=cfg.num_layers, group_size=cfg.group_size_frames,
                query_key_dim=cfg.query_key_dim, expansion_factor=cfg.expansion_factor, attn_dropout=cfg.dropout)
            blocks.fsmn = nn.ModuleList([ref_block.Gated_FSMN_Block(cfg.model_dim, inner_channels=cfg.fsmn_inner_dim)
                                         for _ in range(cfg.num_layers)])
            self.mossformer.mdl.intra_mdl.mossformerM = blocks

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        return self.mossformer(fbank.transpose(1, 2))


def paired_models(preset: str, refs, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours = build_model(preset)
    reference = ReferenceModel(ours.config, *refs)
    reference.load_state_dict(ours.state_dict(), strict=True)
    return ours, reference


def _fwd_bwd(model: nn.Module, x: torch.Tensor) -> None:
    model(x).float().square().mean().backward()
    for p in model.parameters():
        p.grad = None


def _fwd(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model(x)


def time_pair(ours: nn.Module, reference: nn.Module, x: torch.Tensor, step, train: bool, repeats: int) -> dict:
    for m in (ours, reference):
        m.train(train)
        step(m, x)  # warm-up: allocator, oneDNN primitive caches, rotary cache
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for _ in range(repeats):
        for name, m in (("ours", ours), ("reference", reference)):
            start = time.perf_counter()
            step(m, x)
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    return {"ours_median_s": med["ours"], "reference_median_s": med["reference"],
            "ratio_median": med["ours"] / med["reference"], "ours_min_s": low["ours"],
            "reference_min_s": low["reference"], "ratio_min": low["ours"] / low["reference"], "times_s": times}


def max_abs_diff(ours: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    ours.eval()
    reference.eval()
    with torch.no_grad():
        return float((ours(x) - reference(x)).abs().max())


def write_golden(path: Path, refs) -> None:
    torch.manual_seed(1234)
    ours = build_model(GOLDEN_CONFIG)
    with torch.no_grad():  # move every weight off its init value so that no term is trivially 0 or 1
        for name, value in ours.state_dict().items():
            if value.is_floating_point() and "freq" not in name:
                value.add_(torch.randn_like(value) * 0.1)
    reference = ReferenceModel(GOLDEN_CONFIG, *refs)
    reference.load_state_dict(ours.state_dict(), strict=True)
    reference.eval()
    fbank = torch.randn(1, GOLDEN_FRAMES, GOLDEN_CONFIG.feature_dim) * 3.0
    with torch.no_grad():
        mask = reference(fbank)
    fixture = {
        "about": "MossFormer2 golden regression fixture written by bench/bench_model.py --write-golden from "
                 "ClearerVoice's clearvoice 0.1.2 model code (eval mode, fp32); see that script",
        "config": GOLDEN_CONFIG.to_dict(),
        "state_dict": {k: v.clone() for k, v in ours.state_dict().items()},
        "fbank": fbank,
        "reference_mask": mask.clone(),  # a view of both speakers otherwise
        "torch_version": str(torch.__version__),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(fixture, path)
    print(f"wrote {path} ({path.stat().st_size / 1e3:.0f} kB); ours vs reference max abs diff "
          f"{max_abs_diff(ours, reference, fbank):.2e}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="directory holding the clearvoice package folder")
    p.add_argument("--cases", nargs="+", default=["mossformer2_se_48k:1", "tiny:4"],
                   help="PRESET:BATCH pairs (default: %(default)s)")
    p.add_argument("--seconds", type=float, default=4.0, help="input length (default 4 s = 496 frames)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--write-golden", type=Path, default=None, help="also write the test fixture here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    refs = import_reference(args.reference)
    if args.write_golden:
        write_golden(args.write_golden, refs)

    frames = num_frames(int(args.seconds * 48000))
    results = []
    for case in args.cases:
        preset, _, batch = case.partition(":")
        resolve_config(preset)
        batch = int(batch or 1)
        ours, reference = paired_models(preset, refs)
        torch.manual_seed(1)
        x = torch.randn(batch, frames, ours.config.feature_dim)
        row = {"preset": preset, "batch": batch, "frames": frames, "max_abs_diff": max_abs_diff(ours, reference, x)}
        row["fwd_bwd_train"] = time_pair(ours, reference, x, _fwd_bwd, True, args.repeats)
        row["fwd_eval"] = time_pair(ours, reference, x, _fwd, False, args.repeats)
        results.append(row)
        print(f"{preset} x{batch}: max |diff| {row['max_abs_diff']:.1e}, fwd+bwd ratio "
              f"{row['fwd_bwd_train']['ratio_median']:.2f}, fwd ratio {row['fwd_eval']['ratio_median']:.2f}",
              flush=True)
        del ours, reference

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    _print_table(results, machine, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "repeats": args.repeats, "results": results}, indent=2))
        print(f"wrote {args.out}")
    return 0


def _print_table(results: list[dict], machine: dict, repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"MossFormer2 ours vs reference: medians (min) over {repeats} repeats, "
                        f"{machine['torch_threads']} threads, {machine['processor']}")
    for col in ("preset", "batch x frames", "max |diff|", "fwd+bwd ours", "fwd+bwd ref", "ratio",
                "fwd ours", "fwd ref", "ratio"):
        table.add_column(col, justify="right")
    for r in results:
        tr, ev = r["fwd_bwd_train"], r["fwd_eval"]
        table.add_row(r["preset"], f"{r['batch']} x {r['frames']}", f"{r['max_abs_diff']:.1e}",
                      f"{tr['ours_median_s']:.3f} s", f"{tr['reference_median_s']:.3f} s",
                      f"{tr['ratio_median']:.2f} ({tr['ratio_min']:.2f})",
                      f"{ev['ours_median_s']:.3f} s", f"{ev['reference_median_s']:.3f} s",
                      f"{ev['ratio_median']:.2f} ({ev['ratio_min']:.2f})")
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
