"""The process group, started in one place for training and evaluation.

Every rank first gets the env:// variables torch.distributed reads (`rendezvous_env`), then a bounded wait for
the head node's port (launcher/dist/preflight.py), then the group with the collective timeout below:
DeepSpeed's for training (`start_deepspeed_group`, which also builds DeepSpeed's CPU comm op and checks that
every rank answers), torch's for evaluation (`start_group`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Callable, ContextManager, MutableMapping

from launcher.dist.env import DistEnv, EnvError
from launcher.dist.preflight import check_head_reachable, check_rendezvous

RENDEZVOUS_TIMEOUT_S = float(os.environ.get("MF2_RENDEZVOUS_TIMEOUT_S", "300"))
# Collectives may legitimately wait long (rank 0 validating a large corpus while the others wait).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("MF2_COLLECTIVE_TIMEOUT_S", "1800"))


def rendezvous_env(env: DistEnv, environ: MutableMapping[str, str] = os.environ) -> DistEnv:
    """Export the env:// variables of `env` into `environ`; returns the environment as the process group sees it.

    A single process (no launcher) becomes a world of one on 127.0.0.1: DeepSpeed would otherwise fall back to
    MPI discovery and fail obscurely without mpi4py. srun sets only SLURM_*: RANK, WORLD_SIZE, ... are exported
    from them, and MASTER_ADDR and MASTER_PORT must be set (EnvError otherwise). deepspeed and torchrun set
    everything themselves.
    """
    if env.source == "single":
        env = DistEnv(0, 0, 1, 1, 1, "127.0.0.1", int(environ.get("MASTER_PORT", "29500")), "single")
        environ.update(env.export())
    elif env.source == "slurm":
        if not env.master_addr or not env.master_port:
            raise EnvError("under srun, export MASTER_ADDR (the first host of the job) and MASTER_PORT before "
                           "launching (slurm/train_48k.sbatch does)")
        environ.update(env.export())
    return env


def start_deepspeed_group(env: DistEnv, hold_signals: Callable[[], ContextManager]) -> None:
    """deepspeed.init_distributed on DeepSpeed's accelerator's backend, with a bounded rendezvous.

    `hold_signals`: a context in which preemption notices wait (launcher/training/preempt.py), so that the
    compiler DeepSpeed may start here is not killed by them.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() == "cpu":
        # DeepSpeed JIT-compiles its CPU comm op before it opens the rendezvous (~50 s the first
        # time, cached after): build it first so that the bounded wait below measures the network only.
        from deepspeed.comm.torch import build_shm_op

        with hold_signals():
            build_shm_op()
    check_head_reachable(env, RENDEZVOUS_TIMEOUT_S)
    deepspeed.init_distributed(dist_backend=accel.communication_backend_name(),
                               timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    check_rendezvous(RENDEZVOUS_TIMEOUT_S)
    if accel.device_name() == "cpu":
        release_shm_segment_name(env.rank)


def start_group(env: DistEnv, backend: str) -> None:
    """torch.distributed's process group for `env` (evaluation: no DeepSpeed engine), with a bounded rendezvous."""
    import torch.distributed as dist

    check_head_reachable(env, RENDEZVOUS_TIMEOUT_S)
    # Ranks wait for each other at the end (the slowest share) and while rank 0 validates the lists.
    dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def close_group() -> None:
    """Every rank passes a barrier, then the group is destroyed explicitly, as PyTorch asks (NCCL especially)."""
    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()


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
