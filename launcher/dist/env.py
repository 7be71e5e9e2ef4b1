"""Who am I in the job: ranks and world read from the environment of any launcher.

`deepspeed`, `torchrun` and `srun` each describe a process differently. This module is the one
place that reads them: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (deepspeed, torchrun),
or, when RANK is absent, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun one task per rank). The
global rank drives the process group and the data sampler. Which GPU a rank uses is
launcher/dist/gpu.py; how the process group starts, launcher/dist/group.py.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from typing import Mapping


class EnvError(RuntimeError):
    """The environment does not describe a usable distributed job."""


def env_int(env: Mapping[str, str], key: str) -> int | None:
    """An integer environment variable; None when unset or empty; EnvError when not an integer."""
    value = env.get(key)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise EnvError(f"environment variable {key}={value!r} is not an integer") from None


def slurm_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed per-node counts, e.g. '2(x3),1' → [2, 2, 2, 1]."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise EnvError(f"cannot parse SLURM task count {value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int
    master_addr: str | None
    master_port: int | None
    source: str  # which launcher's variables were read: "torch", "slurm" or "single"

    def export(self) -> dict[str, str]:
        """The torch.distributed variables this environment implies (for env:// rendezvous)."""
        out = {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
        }
        if self.master_addr:
            out["MASTER_ADDR"] = self.master_addr
        if self.master_port:
            out["MASTER_PORT"] = str(self.master_port)
        return out


def read_dist_env(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistEnv:
    """Read the job's shape; `local_rank_arg` is the `--local_rank` the deepspeed launcher passes."""
    env = os.environ if env is None else env
    rank = env_int(env, "RANK")
    if rank is not None:
        world = env_int(env, "WORLD_SIZE")
        if world is None:
            raise EnvError("RANK is set but WORLD_SIZE is not: launch with deepspeed, torchrun or srun")
        local_rank = env_int(env, "LOCAL_RANK")
        if local_rank is None:
            local_rank = local_rank_arg if local_rank_arg is not None else 0
        # torchrun sets LOCAL_WORLD_SIZE, deepspeed's launcher LOCAL_SIZE.
        local_world = env_int(env, "LOCAL_WORLD_SIZE") or env_int(env, "LOCAL_SIZE")
        if local_world is None and "SLURM_NTASKS_PER_NODE" in env:
            local_world = slurm_tasks_per_node(env["SLURM_NTASKS_PER_NODE"])[0]
        if local_world is None:
            local_world = world
        source = "torch"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank = env_int(env, "SLURM_PROCID")
        world = env_int(env, "SLURM_NTASKS")
        local_rank = env_int(env, "SLURM_LOCALID") or 0
        per_node = slurm_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", str(world)))
        if len(set(per_node)) != 1:
            raise EnvError(
                f"SLURM gave unequal tasks per node ({env.get('SLURM_TASKS_PER_NODE')}); the plan needs "
                "the same number of ranks on every node: use --ntasks-per-node"
            )
        local_world = per_node[0]
        source = "slurm"
    else:
        return DistEnv(0, 0, 1, 1, 1, env.get("MASTER_ADDR"), env_int(env, "MASTER_PORT"), "single")
    assert rank is not None and world is not None
    if not 0 <= rank < world:
        raise EnvError(f"rank {rank} is outside the world of {world} processes")
    if world % local_world:
        raise EnvError(
            f"world size {world} is not a whole number of nodes of {local_world} ranks each; "
            "launch the same number of ranks on every node"
        )
    return DistEnv(
        rank=rank,
        local_rank=local_rank,
        world_size=world,
        local_world_size=local_world,
        num_nodes=world // local_world,
        master_addr=env.get("MASTER_ADDR"),
        master_port=env_int(env, "MASTER_PORT"),
        source=source,
    )


_WORLD_SOURCES = {"torch": "the launcher (deepspeed or torchrun: WORLD_SIZE, LOCAL_WORLD_SIZE)",
                  "slurm": "the launcher (srun: SLURM_NTASKS, SLURM_NTASKS_PER_NODE)"}


def world_source(env: DistEnv) -> str:
    """Where the world of `env` came from, in words for the plan card."""
    return _WORLD_SOURCES.get(env.source, "a single process")


# How long ranks other than 0 wait before exiting on a refusal, so that rank 0's message gets out (see refuse).
REFUSAL_GRACE_S = 5.0


def refuse(rank: int, error: Exception | str) -> int:
    """Every rank stops before the process group with the same verdict; rank 0 says why (exit status 2). The others
    wait a moment first: DeepSpeed's launcher kills every rank as soon as one exits non-zero, which could cut rank 0
    off before it has printed the reason when it reaches the same verdict a little later (slower imports on a busy
    node)."""
    if rank == 0:
        print(f"error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(REFUSAL_GRACE_S)
    return 2
