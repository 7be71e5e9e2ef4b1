"""``python -m data.demo OUT_DIR``: write the synthetic 48 kHz demo corpus and its lists for dynamic mixing
(see :mod:`data.demo_corpus`)."""

from __future__ import annotations

import argparse
import sys
import time

from .demo_corpus import MIXING_LISTS, make_demo_corpus
from .errors import DataError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.demo", description=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--num_train", type=int, default=200, help="training pairs (default 200)")
    parser.add_argument("--num_valid", type=int, default=20, help="validation pairs (default 20)")
    parser.add_argument("--seconds", type=float, default=2.5, help="mean file length; each is 0.8-1.2 x this (default 2.5)")
    parser.add_argument("--espeak", action="store_true", help="espeak-ng speech instead of synthetic harmonic speech")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        paths = make_demo_corpus(args.out_dir, args.seed, args.num_train, args.num_valid, args.seconds, args.espeak)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"demo corpus in {paths['dir']} ({time.perf_counter() - start:.1f} s): train {paths['train']}, valid {paths['valid']}")
    print("dynamic mixing lists: " + ", ".join(paths[name].name for name in MIXING_LISTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
