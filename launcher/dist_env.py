"""Who am I in the job: ranks and world read from the environment of any launcher.

`deepspeed`, `torchrun` and `srun` each describe a process differently. This module is the one
place that reads them: RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT (deepspeed, torchrun),
or, when RANK is absent, SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (srun one task per rank). The
global rank drives the process group and the data sampler.

Which GPU a rank uses is `pick_cuda_device`: the node-local rank only names a device when the
task sees all of the node's GPUs. SLURM's GPU binding (`--gpus-per-task`, `--gpu-bind`) shows
each task only its own, and `deepspeed_hostfile` makes DeepSpeed's launcher keep the GPUs SLURM
allocated instead of numbering them from 0.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


class EnvError(RuntimeError):
    """The environment does not describe a usable distributed job."""


def _int(env: Mapping[str, str], key: str) -> int | None:
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

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1 or self.source != "single"

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

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
    rank = _int(env, "RANK")
    if rank is not None:
        world = _int(env, "WORLD_SIZE")
        if world is None:
            raise EnvError("RANK is set but WORLD_SIZE is not: launch with deepspeed, torchrun or srun")
        local_rank = _int(env, "LOCAL_RANK")
        if local_rank is None:
            local_rank = local_rank_arg if local_rank_arg is not None else 0
        # torchrun sets LOCAL_WORLD_SIZE, deepspeed's launcher LOCAL_SIZE.
        local_world = _int(env, "LOCAL_WORLD_SIZE") or _int(env, "LOCAL_SIZE")
        if local_world is None and "SLURM_NTASKS_PER_NODE" in env:
            local_world = slurm_tasks_per_node(env["SLURM_NTASKS_PER_NODE"])[0]
        if local_world is None:
            local_world = world
        source = "torch"
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank = _int(env, "SLURM_PROCID")
        world = _int(env, "SLURM_NTASKS")
        local_rank = _int(env, "SLURM_LOCALID") or 0
        per_node = slurm_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", str(world)))
        if len(set(per_node)) != 1:
            raise EnvError(
                f"SLURM gave unequal tasks per node ({env.get('SLURM_TASKS_PER_NODE')}); the plan needs "
                "the same number of ranks on every node: use --ntasks-per-node"
            )
        local_world = per_node[0]
        source = "slurm"
    else:
        return DistEnv(0, 0, 1, 1, 1, env.get("MASTER_ADDR"), _int(env, "MASTER_PORT"), "single")
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
        master_port=_int(env, "MASTER_PORT"),
        source=source,
    )


def release_shm_segment_name(rank: int) -> None:
    """Unlink this rank's /dev/shm segment of DeepSpeed's CPU all-reduce once every rank has mapped it.

    With all ranks on one host, deepspeed.init_distributed creates a 66 MB shared-memory segment per rank,
    named after the user, MASTER_ADDR, MASTER_PORT and the rank, and never removes it: every run on a new port
    left world × 66 MB of RAM behind in /dev/shm until reboot (here 324 of them, 21 GB, until the OOM killer
    stepped in). Call it after a collective that follows deepspeed.init_distributed, when every rank has
    opened every peer's segment: the mappings stay valid, only the name goes, so nothing is left even if
    the run is killed afterwards.
    """
    name = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    name.unlink(missing_ok=True)


def visible_devices(environ: Mapping[str, str]) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES as a list of entries (ordinals, GPU-/MIG- UUIDs); None when unset (all)."""
    value = environ.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [entry.strip() for entry in value.split(",") if entry.strip()]


def _id_list(environ: Mapping[str, str], key: str) -> list[str] | None:
    value = environ.get(key, "").strip()
    return [entry.strip() for entry in value.split(",") if entry.strip()] if value else None


def in_slurm_step(environ: Mapping[str, str]) -> bool:
    """Inside an srun step (a rank, or a launcher srun started), not the batch shell."""
    return "SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ


def _gpu_count(value: str) -> int:
    """SLURM's GPU request per node: '8', 'a100:8', 'gpu:a100:8', '4(x2)', or several types: 'a100:2,v100:2'."""
    try:
        return sum(int(part.split(":")[-1].split("(")[0]) for part in value.split(","))
    except ValueError:
        raise EnvError(f"cannot read a GPU count from SLURM_GPUS_PER_NODE={value!r}") from None


def slurm_gpus_on_node(environ: Mapping[str, str]) -> int | None:
    """GPUs this process was given on its node by SLURM; None outside SLURM or where SLURM does not say.

    In an srun step: the step's GPUs (SLURM_GPUS_ON_NODE, or SLURM_STEP_GPUS; a task bound to one GPU
    still counts the step's), 0 for a step without GPUs. In the batch shell: the job's request
    (SLURM_GPUS_PER_NODE), else SLURM_GPUS_ON_NODE/SLURM_JOB_GPUS. Never SLURM_JOB_GPUS inside a step:
    an --exclusive job holds all of a node's GPUs there even when it asked for none.
    """
    if "SLURM_JOB_ID" not in environ:
        return None
    if in_slurm_step(environ):
        on_node = _int(environ, "SLURM_GPUS_ON_NODE")
        return on_node if on_node is not None else len(_id_list(environ, "SLURM_STEP_GPUS") or [])
    if environ.get("SLURM_GPUS_PER_NODE", "").strip():
        return _gpu_count(environ["SLURM_GPUS_PER_NODE"])
    on_node = _int(environ, "SLURM_GPUS_ON_NODE")
    if on_node is not None:
        return on_node
    ids = _id_list(environ, "SLURM_JOB_GPUS")
    return len(ids) if ids is not None else None


@dataclass(frozen=True)
class CudaDevice:
    index: int  # the ordinal in this process: cuda:<index>
    why: str  # one line for the log: what the task sees and why this one

    def export(self) -> dict[str, str]:
        """DeepSpeed reads LOCAL_RANK as the device ordinal (deepspeed.comm.get_local_rank "= GPU device
        ID"; comm/torch.py passes device_id=cuda:LOCAL_RANK to init_process_group; the engine calls
        set_device(LOCAL_RANK)), so LOCAL_RANK must name the device chosen here, not the node-local rank."""
        return {"LOCAL_RANK": str(self.index)}


def pick_cuda_device(environ: Mapping[str, str], visible_count: int) -> CudaDevice:
    """This rank's CUDA ordinal, from what the task sees (`visible_count`: torch.cuda.device_count()).

    - The task sees at least as many GPUs as ranks run on its node (srun's default binding, the
      deepspeed launcher, torchrun): the node-local rank picks one.
    - The task sees one GPU that was given to it alone (srun --gpus-per-task=1, --gpu-bind=single:1,
      map_gpu, closest with one GPU per domain): cuda:0, whatever the local rank.
    - CUDA_VISIBLE_DEVICES unset but SLURM lists the task's GPUs (SLURM_STEP_GPUS in a step,
      SLURM_JOB_GPUS in the batch shell, GPU_DEVICE_ORDINAL): the task sees the whole node, so SLURM's
      numbers are the ordinals.
    Anything else (a device shared by ranks, a subset the task cannot tell its own in, entries CUDA
    does not find) raises EnvError naming the rank, what it sees and what to change.
    """
    dist = read_dist_env(environ)
    local, per_node = dist.local_rank, dist.local_world_size
    who = f"rank {dist.rank} (local rank {local} of {per_node} on this node)"
    listed = visible_devices(environ)
    shown = ("CUDA_VISIBLE_DEVICES unset" if listed is None
             else f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r}")
    one_each = ("give each task its own GPU (srun --gpus-per-task=1 or --gpu-bind=single:1) or every task all of "
                "the node's GPUs (--gpu-bind=none)")
    if visible_count == 0:
        raise EnvError(f"{who} sees no CUDA device ({shown}): check the job's GPU request and nvidia-smi on this node")
    if listed is not None and len(listed) != visible_count:
        raise EnvError(
            f"{who}: {shown} names {len(listed)} device(s) but CUDA finds {visible_count} (CUDA ignores every entry "
            "from the first one it does not know): name only GPUs this node has, or leave CUDA_VISIBLE_DEVICES "
            "to the launcher"
        )
    slurm_gpus = slurm_gpus_on_node(environ)
    if slurm_gpus is not None and 0 < slurm_gpus < per_node:
        raise EnvError(
            f"{who}: SLURM gave this node {slurm_gpus} GPU(s) for {per_node} ranks, so ranks would share a GPU: "
            f"start one rank per GPU (--ntasks-per-node={slurm_gpus}) or ask for {per_node} GPUs per node"
        )
    if listed is None and "SLURM_JOB_ID" in environ:
        keys = ("SLURM_STEP_GPUS" if in_slurm_step(environ) else "SLURM_JOB_GPUS", "GPU_DEVICE_ORDINAL")
        ids = next((found for key in keys if (found := _id_list(environ, key)) is not None), None)
        if ids is not None:
            mine = ids[0] if len(ids) == 1 else (ids[local] if len(ids) >= per_node else None)
            if mine is None or not mine.isdigit() or int(mine) >= visible_count:
                raise EnvError(
                    f"{who}: CUDA_VISIBLE_DEVICES is unset, so the task sees all {visible_count} GPU(s) of the node, "
                    f"but SLURM lists {','.join(ids)} for it, which does not name one GPU per rank: {one_each}"
                )
            return CudaDevice(int(mine), f"cuda:{mine}: GPU {mine} of the node, as SLURM lists it ({','.join(ids)}; "
                                         f"{shown})")
    if visible_count >= per_node:
        return CudaDevice(local, f"cuda:{local}: the local rank's GPU among the {visible_count} this task sees ({shown})")
    if listed is None:
        raise EnvError(
            f"{who}: this node has {visible_count} GPU(s) ({shown}) for {per_node} ranks, so ranks would share a GPU: "
            f"start at most {visible_count} rank(s) per node"
        )
    if visible_count == 1:
        return CudaDevice(0, f"cuda:0: the one GPU bound to this task ({shown}, SLURM_STEP_GPUS="
                             f"{environ.get('SLURM_STEP_GPUS', 'unset')})")
    raise EnvError(
        f"{who} sees {visible_count} GPU(s) ({shown}) while {per_node} ranks run on this node, so it cannot tell which "
        f"one is its own: {one_each}"
    )


def deepspeed_hostfile(hosts: list[str], node_index: int, ranks_per_node: int,
                       environ: Mapping[str, str]) -> tuple[str, str | None]:
    """The hostfile and --include for one node's `deepspeed --no_ssh --node_rank=node_index` in a SLURM step.

    DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES from the hostfile's slots (0..slots-1) or --include,
    ignoring the step's own CUDA_VISIBLE_DEVICES: on a node shared with another job it would hand the
    ranks that job's GPUs. So when SLURM's GPUs are not 0..n-1, this node's entry names them with
    --include (the other nodes keep their slot counts, which is all this node's launcher reads of them).
    """
    lines = [f"{host} slots={ranks_per_node}" for host in hosts]
    if not slurm_gpus_on_node(environ):  # no GPUs: CPU ranks
        return "\n".join(lines) + "\n", None
    # Without CUDA_VISIBLE_DEVICES the step sees the whole node and SLURM's numbers are the ordinals.
    key = "CUDA_VISIBLE_DEVICES" if "CUDA_VISIBLE_DEVICES" in environ else "SLURM_STEP_GPUS"
    listed = _id_list(environ, key) or []
    seen = f"{key}={environ.get(key, '')!r}"
    where = f"node {node_index} ({hosts[node_index]})"
    if len(listed) != ranks_per_node:
        raise EnvError(f"{where}: SLURM gave this step {len(listed)} GPU(s) ({seen}) for {ranks_per_node} rank(s) "
                       "per node: start one rank per GPU")
    if not all(entry.isdigit() for entry in listed):
        raise EnvError(f"{where}: {seen} names GPUs by UUID, and DeepSpeed's launcher takes device numbers only: "
                       "use LAUNCH_MODE=srun")
    ids = [int(entry) for entry in listed]
    if ids == list(range(ranks_per_node)):
        return "\n".join(lines) + "\n", None
    lines[node_index] = f"{hosts[node_index]} slots={max(ids) + 1}"
    include = "@".join(f"{host}:{','.join(map(str, ids))}" if i == node_index else host
                       for i, host in enumerate(hosts))
    return "\n".join(lines) + "\n", include


def main(argv: list[str] | None = None) -> int:
    """`python -m launcher.dist_env deepspeed-hostfile PATH`: what slurm/launch.sh runs on each node."""
    p = argparse.ArgumentParser(prog="python -m launcher.dist_env")
    p.add_argument("command", choices=["deepspeed-hostfile"])
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
