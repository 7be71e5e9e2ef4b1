"""Loss curves of several runs against samples seen, in one PNG (and PESQ/STOI/SI-SDR/DNSMOS when the runs
evaluated during training).

    python -m launcher.report runs/story_bs4 runs/story_bs12 --out story.png

Samples seen (not steps) is the x-axis because runs with different batch plans take different
numbers of steps for the same data: two plans with the same global batch should overlap here.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from launcher.training.curves import draw


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=Path("runs/report.png"))
    args = p.parse_args(argv)
    try:
        out = draw(args.run_dirs, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
