"""The hostfile of one node's DeepSpeed launcher in a SLURM step: what slurm/launch.sh runs on each node.

    python -m launcher.hostfile PATH --hosts h1,h2 --node_index I --ranks_per_node G

Writes PATH (one `host slots=G` line per node) and prints `--include=...` when SLURM's GPUs on this node are not
0..G-1 (launcher/dist/gpu.py `deepspeed_hostfile`). Exit status 2 with the reason when the step's GPUs do not fit.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from launcher.dist.env import EnvError
from launcher.dist.gpu import deepspeed_hostfile


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launcher.hostfile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="the hostfile to write; stdout gets the --include argument, if one is needed")
    p.add_argument("--hosts", required=True, help="the job's hosts, comma-separated, in node order")
    p.add_argument("--node_index", type=int, required=True)
    p.add_argument("--ranks_per_node", type=int, required=True)
    args = p.parse_args(argv)
    try:
        text, include = deepspeed_hostfile(args.hosts.split(","), args.node_index, args.ranks_per_node, os.environ)
    except EnvError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    Path(args.path).write_text(text)
    if include:
        print(f"--include={include}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
