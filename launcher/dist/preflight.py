"""Checks before training that turn would-be hangs into messages saying what to fix.

- `check_world`: the world the launcher (and SLURM) gives is the world the plan assumes.
- `check_accelerator` / `select_device`: a job that SLURM gave GPUs trains on them (not on the CPU
  because of a stray DS_ACCELERATOR=cpu or a CPU-only torch), and each rank takes its own GPU.
- `check_run_dir`: the run directory can be written (rank 0 creates it).
- `check_head_reachable`: a non-zero rank can open a TCP connection to MASTER_ADDR:MASTER_PORT,
  retried for a bounded time, before any process group waits on it.
- `check_rendezvous`: after the process group exists, every rank answers a barrier within a timeout
  (gloo's monitored barrier names the ranks that did not) and a tiny all-reduce adds up to the world.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, MutableMapping

from launcher.dist.env import DistEnv, EnvError, slurm_tasks_per_node
from launcher.dist.gpu import in_slurm_step, pick_cuda_device, slurm_gpus_on_node

if TYPE_CHECKING:
    import torch


class PreflightError(RuntimeError):
    pass


def check_world(env: DistEnv, environ: Mapping[str, str], requested_nodes: int | None = None,
                requested_gpus_per_node: int | None = None) -> None:
    """Refuse a world that disagrees with SLURM's allocation or with explicit --num_nodes/--num_gpus."""
    problems = []
    if requested_nodes is not None and requested_nodes != env.num_nodes:
        problems.append(f"--num_nodes {requested_nodes} was given but the launcher started {env.num_nodes} node(s)")
    if requested_gpus_per_node is not None and requested_gpus_per_node != env.local_world_size:
        problems.append(
            f"--num_gpus {requested_gpus_per_node} was given but the launcher started {env.local_world_size} "
            "rank(s) per node"
        )
    if "SLURM_JOB_ID" in environ and env.source != "single":
        # Inside an srun step SLURM_NNODES is the step's node count and SLURM_JOB_NUM_NODES the job's;
        # in the batch shell both are the job's.
        nnodes = environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES")
        if nnodes and int(nnodes) != env.num_nodes:
            problems.append(
                f"SLURM allocated {nnodes} node(s) but the job runs {env.world_size} rank(s) as "
                f"{env.num_nodes} node(s) × {env.local_world_size}: start exactly one rank per GPU on every node "
                "(srun --ntasks-per-node=GPUS, or one deepspeed launcher per node with slots=GPUS)"
            )
        job_nodes = environ.get("SLURM_JOB_NUM_NODES")
        if job_nodes and int(job_nodes) > env.num_nodes and not (nnodes and int(nnodes) != env.num_nodes):
            problems.append(
                f"the job holds {job_nodes} node(s) but its ranks run on {env.num_nodes}: start the step on all of "
                f"them (srun --nodes={job_nodes}), or ask sbatch for {env.num_nodes}"
            )
        gpus = environ.get("SLURM_GPUS_PER_NODE") or environ.get("SLURM_GPUS_ON_NODE")
        if gpus:
            per_node = int(gpus.split(":")[-1].split("(")[0])
            if per_node > 0 and per_node != env.local_world_size:
                problems.append(
                    f"SLURM gives {per_node} GPU(s) per node but {env.local_world_size} rank(s) run per node: "
                    f"set --ntasks-per-node={per_node} (srun mode) or slots={per_node} (deepspeed mode); "
                    "slurm/train_48k.sbatch starts one rank per GPU unless RANKS_PER_NODE says otherwise"
                )
        if env.source == "slurm" and "SLURM_NTASKS" in environ and int(environ["SLURM_NTASKS"]) != env.world_size:
            problems.append(f"SLURM_NTASKS={environ['SLURM_NTASKS']} but WORLD_SIZE={env.world_size}")
        tpn = environ.get("SLURM_TASKS_PER_NODE")
        if env.source == "slurm" and tpn and len(set(slurm_tasks_per_node(tpn))) != 1:
            problems.append(f"SLURM_TASKS_PER_NODE={tpn}: every node must run the same number of ranks")
    if problems:
        raise PreflightError("preflight: the world does not match the plan:\n  - " + "\n  - ".join(problems))


def check_accelerator(environ: Mapping[str, str], accelerator: str, torch_version: str, torch_cuda: str | None,
                      cuda_devices: int) -> None:
    """Refuse a rank whose DeepSpeed accelerator contradicts the GPUs it was given, before any process group.

    `accelerator`: DeepSpeed's choice (get_accelerator().device_name()); `torch_cuda`: torch.version.cuda
    (None for a CPU-only build); `cuda_devices`: torch.cuda.device_count(). GPUs are expected when SLURM
    gave this node some (SLURM_GPUS_ON_NODE, SLURM_STEP_GPUS, SLURM_JOB_GPUS) or DS_ACCELERATOR=cuda says so.
    """
    slurm_gpus = slurm_gpus_on_node(environ) or 0
    requested = environ.get("DS_ACCELERATOR", "").strip()
    if slurm_gpus:
        keys = (("SLURM_GPUS_ON_NODE", "SLURM_STEP_GPUS") if in_slurm_step(environ)
                else ("SLURM_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS"))
        shown = next((f" ({key}={environ[key]})" for key in keys if environ.get(key)), "")
        given = f"SLURM gave this node {slurm_gpus} GPU(s){shown}"
    elif requested == "cuda":
        given = "DS_ACCELERATOR=cuda asks for GPUs"
    else:
        return
    if requested and requested != "cuda":
        why = (f"DS_ACCELERATOR={requested} is set in the environment (sbatch --export=ALL passes the submitting "
               "shell's); unset it, or submit with --export=ALL,DS_ACCELERATOR=cuda")
    elif torch_cuda is None:
        why = f"torch {torch_version} is a CPU-only build: install a CUDA build of torch on this node"
    elif cuda_devices == 0:
        why = (f"torch {torch_version} (CUDA {torch_cuda}) finds no CUDA device (CUDA_VISIBLE_DEVICES="
               f"{environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): check nvidia-smi and the driver on this node")
    elif accelerator != "cuda":
        why = f"DeepSpeed picked its {accelerator} accelerator although torch finds {cuda_devices} CUDA device(s)"
    else:
        return
    outcome = "this rank would train on the CPU" if accelerator == "cpu" else "this rank cannot use them"
    fix = " To train on the CPU on purpose, ask SLURM for no GPUs (--gpus-per-node=0)." if slurm_gpus else ""
    raise PreflightError(f"{given}, but {outcome}: {why}.{fix}")


def select_device(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> torch.device:
    """Check the accelerator, pick this rank's device and export LOCAL_RANK for DeepSpeed; a torch.device.

    Call before deepspeed.init_distributed: DeepSpeed binds the process group to cuda:LOCAL_RANK.
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    cuda_devices = torch.cuda.device_count() if torch.version.cuda else 0
    try:
        check_accelerator(environ, accelerator, torch.__version__, torch.version.cuda, cuda_devices)
        if accelerator != "cuda":
            return torch.device(accelerator)
        device = pick_cuda_device(environ, cuda_devices)
    except (PreflightError, EnvError) as e:
        raise PreflightError(f"preflight on {socket.gethostname()}: {e}") from None
    environ.update(device.export())
    torch.cuda.set_device(device.index)
    print(f"[device] rank {env.rank} on {socket.gethostname()}: {device.why}", flush=True)
    return torch.device("cuda", device.index)


def check_run_dir(run_dir: Path, create: bool) -> None:
    try:
        if create:
            run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_probe_{os.getpid()}_{socket.gethostname()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PreflightError(
            f"preflight: run directory {run_dir} is not writable from {socket.gethostname()}: {e.strerror}; "
            "set train.run_dir (or RUN_DIR) to a folder on a shared, writable file system"
        ) from None


def check_head_reachable(env: DistEnv, timeout_s: float) -> None:
    """Non-zero ranks wait (bounded) until the head node's rendezvous port accepts connections."""
    if env.rank == 0 or not env.master_addr or not env.master_port:
        return
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((env.master_addr, env.master_port), timeout=5):
                return
        except OSError as e:
            last = e.strerror or str(e)
            time.sleep(0.5)
    raise PreflightError(
        f"preflight: rank {env.rank} on {socket.gethostname()} cannot reach the head node "
        f"{env.master_addr}:{env.master_port} after {timeout_s:.0f} s ({last}); check MASTER_ADDR/MASTER_PORT, "
        "that rank 0 started, and that the port is open between nodes"
    )


def check_rendezvous(timeout_s: float) -> None:
    """Every rank answers within timeout_s, and an all-reduce of ones equals the world size."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    # A gloo side group: monitored_barrier reports missing ranks instead of hanging (NCCL cannot).
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
    try:
        dist.monitored_barrier(group=group, timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    except RuntimeError as e:
        raise PreflightError(f"preflight: not every rank reached the head node within {timeout_s:.0f} s: {e}") from None
    ones = torch.ones(1)
    dist.all_reduce(ones, group=group)
    if int(ones.item()) != world:
        raise PreflightError(f"preflight: all-reduce over {world} ranks gave {int(ones.item())}")
    dist.destroy_process_group(group)
