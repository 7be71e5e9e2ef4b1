"""Export a training run's weights as a reference-compatible checkpoint.

    python -m launcher.export RUN_DIR OUT.pt [--tag step00001200]

Reads the newest complete checkpoint (or --tag) of any ZeRO stage on the CPU — no GPU, no process
group — consolidates the fp32 weights, loads them strictly into a plain model of the run's preset
and writes `{'model': state_dict}` with `mossformer.` keys, as ClearerVoice's loader expects.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")


class ExportError(RuntimeError):
    pass


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict:
    """fp32 weights of one DeepSpeed tag, whatever its ZeRO stage."""
    import torch

    tag_dir = ckpt_dir / tag
    if glob.glob(str(tag_dir / "*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    # ZeRO stage 0 in fp32 keeps the whole module in the model-states file.
    files = sorted(glob.glob(str(tag_dir / "mp_rank_*_model_states.pt")))
    if not files:
        raise ExportError(f"{tag_dir}: no DeepSpeed model-states file found")
    module = torch.load(files[0], map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}


def export_run(run_dir: Path, out: Path, tag: str | None = None):
    from launcher.checkpoint import complete_tags, read_marker
    from model import build_model, export_reference_checkpoint

    ckpt_dir = run_dir / "checkpoints" if (run_dir / "checkpoints").is_dir() else run_dir
    tags = complete_tags(ckpt_dir)
    if not tags:
        raise ExportError(f"{run_dir}: no complete checkpoint (a folder stepNNNNNNNN holding COMPLETE.json)")
    if tag is None:
        tag = tags[-1]
    elif tag not in tags:
        raise ExportError(f"{run_dir}: no complete checkpoint {tag}; complete ones: {', '.join(tags)}")
    marker = read_marker(ckpt_dir, tag)
    model = build_model(marker["preset"])
    state = consolidated_state_dict(ckpt_dir, tag)
    result = model.load_state_dict(state, strict=True)
    del result
    export_reference_checkpoint(model, out)
    return model, tag, marker


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--tag", default=None)
    args = p.parse_args(argv)
    try:
        _, tag, marker = export_run(args.run_dir, args.out, args.tag)
    except (ExportError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.run_dir}/{tag} (step {marker['step']}, preset {marker['preset']}, "
          f"ZeRO {marker['zero_stage']}) → {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
