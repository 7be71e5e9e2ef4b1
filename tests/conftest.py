"""Shared fixtures: the repo root, a demo corpus, free ports and a real `deepspeed` launch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# No GPU here: DeepSpeed's CPU accelerator with gloo, one thread per rank on two cores.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> dict:
    """The demo corpus the README's demo trains on, written once per test session."""
    from data.demo import make_demo_corpus

    out = tmp_path_factory.mktemp("demo_corpus")
    made = make_demo_corpus(out)
    return {"train_list": str(made["train"]), "valid_list": str(made["valid"]), "dir": str(made["dir"])}


def torch_extensions_dir() -> str:
    """Where torch builds (and finds) DeepSpeed's CPU op in this environment: its default, which follows XDG_CACHE_HOME."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accelerator = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    return os.path.join(get_default_build_root(), f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{accelerator}")


def train_env(**extra: str) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    if "XDG_CACHE_HOME" in extra:  # keep the op built once: a new cache home would build it again (~30 s)
        env.setdefault("TORCH_EXTENSIONS_DIR", torch_extensions_dir())
    # The venv's ninja builds DeepSpeed's op, as under `make`: mixing ninjas forces rebuilds.
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RANK", None)
    return env


def deepspeed_cmd(*train_args: str, nproc: int = 2, port: int | None = None) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(port or free_port()),
            "launcher/train.py", *train_args]


def run_deepspeed(*train_args: str, nproc: int = 2, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(deepspeed_cmd(*train_args, nproc=nproc), cwd=ROOT, env=train_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_dry_run(capsys, *argv: str) -> tuple[int, str, str]:
    """`python -m launcher.plan ARGV` in process: (exit code, stdout, stderr)."""
    from launcher.plan.cli import main

    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err
