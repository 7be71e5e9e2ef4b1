"""Train MossFormer2 48 kHz with DeepSpeed.

    deepspeed --num_gpus 2 launcher/train.py --ds_config ds_configs/bs12.json --config recipes/train_48k.yaml

Also under torchrun or srun (one task per rank); `--dry_run` prints the plan card and starts nothing. The run:
resolve config → plan → process group + preflight → data → model → engine → resume → loop
(launcher/training/launch.py, launcher/training/setup.py, launcher/training/trainer.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `deepspeed launcher/train.py` puts launcher/ itself first on sys.path; the packages live one up.
_HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == _HERE:
    sys.path[0] = str(_HERE.parent)

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from launcher.plan.request import add_plan_arguments  # noqa: E402
from launcher.training.launch import launch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ds_config", required=True, help="DeepSpeed preset(s), e.g. ds_configs/bs12.json[+ds_configs/zero3.json]")
    p.add_argument("--config", default=None, help="YAML recipe (defaults < recipe < overrides)")
    p.add_argument("--dry_run", action="store_true", help="print the plan and exit before any process group starts")
    p.add_argument("--resume", default=None, help="auto (newest complete checkpoint of the run, if any) or a path")
    p.add_argument("--run_dir", default=None, help="shortcut for train.run_dir=…")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by `deepspeed`
    add_plan_arguments(p)
    p.add_argument("overrides", nargs="*", metavar="SECTION.KEY=VALUE", help="override any recipe key")
    return p.parse_intermixed_args(argv)  # overrides may come before and after options


def main(argv: list[str] | None = None) -> int:
    return launch(parse_args(argv))


if __name__ == "__main__":
    code = main()
    # Leave without the interpreter's finalization. Every file is closed and every rank has passed the final
    # barrier by now; what finalization would still do is destroy torch's and DeepSpeed's C++ objects in no
    # particular order, and gloo threads that outlive the Python objects they hold then abort the process
    # ("terminate called without an active exception", exit -6 after a successful run: 3 times in about 100
    # 2-rank CPU runs here, with an explicit destroy_process_group or without; pytorch/pytorch#38228 and
    # #190489 describe the mechanism). A -6 would also hide the preemption exit code 75 from SLURM.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
