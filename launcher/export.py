"""Export a training run's weights as a reference-compatible checkpoint.

    python -m launcher.export RUN_DIR OUT.pt [--tag step00001200]

Reads the newest complete checkpoint (or --tag) of any ZeRO stage and precision on the CPU — no GPU, no
process group — and writes `{'model': state_dict}` with `mossformer.` keys, as ClearerVoice's loader expects:
the optimizer's fp32 master weights (launcher/checkpoint/export.py says how, per stage and precision).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU work: before anything imports deepspeed

from launcher.checkpoint.export import ExportError, export_run  # noqa: E402


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
