"""``python -m data.validate LIST [LIST...]``: check a corpus from its file headers before training.

Prints every bad line as ``list:line: path: reason`` and a summary. Exit status: 0 when every line is good;
1 when any line is bad — or, with ``--skip_bad``, only when no good pair is left (training with skip_bad
would then skip and count the bad lines, as this prints).
"""

from __future__ import annotations

import argparse
import sys

from .errors import DataError
from .validation import validate


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("lists", nargs="+", help="list files: 'noisy clean [duration]' per line")
    parser.add_argument("--skip_bad", action="store_true", help="report bad lines but exit 0 if good pairs remain")
    parser.add_argument("--resample", action="store_true", help="accept files at other sample rates (resampled when read)")
    parser.add_argument("--sample_rate_hz", type=int, default=48000)
    parser.add_argument("--cache_dir", default=None, help="folder for the header cache (default: next to the first list)")
    parser.add_argument("--no_cache", action="store_true", help="read every header, keep no cache")
    parser.add_argument("--num_threads", type=int, default=None, help="header-reading threads (default: min(32, 4 x CPUs))")
    args = parser.parse_args(argv)
    try:
        _, report = validate(
            args.lists,
            sample_rate_hz=args.sample_rate_hz,
            resample=args.resample,
            skip_bad=args.skip_bad,
            cache_dir=args.cache_dir,
            num_threads=args.num_threads,
            use_cache=not args.no_cache,
        )
    except DataError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
