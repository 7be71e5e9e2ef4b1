"""A job that was given GPUs must not train on the CPU without a word (launcher/dist/preflight.py)."""

import pytest
import torch

from launcher.dist.env import DistEnv
from launcher.dist.preflight import PreflightError, check_accelerator, select_device

# A task of `sbatch --gpus-per-node=1 ...` as srun starts it (SLURM 22.05).
SLURM_GPU_TASK = {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
                  "SLURM_TASKS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "1", "SLURM_GPUS_PER_NODE": "1",
                  "SLURM_STEP_GPUS": "0", "CUDA_VISIBLE_DEVICES": "0"}
CUDA_TORCH = ("2.14.1+cu130", "13.0")
CPU_TORCH = ("2.14.1+cpu", None)


@pytest.mark.parametrize("case, environ, accelerator, torch_build, devices, words", [
    # DS_ACCELERATOR=cpu exported from the submitting shell (sbatch --export=ALL): DeepSpeed takes the CPU.
    ("stray DS_ACCELERATOR", {**SLURM_GPU_TASK, "DS_ACCELERATOR": "cpu"}, "cpu", CUDA_TORCH, 1,
     r"SLURM gave this node 1 GPU\(s\) \(SLURM_GPUS_ON_NODE=1\), but this rank would train on the CPU: "
     r"DS_ACCELERATOR=cpu is set in the environment.*--gpus-per-node=0"),
    # A CPU-only torch: DeepSpeed's detection falls back to the CPU accelerator.
    ("CPU-only torch", SLURM_GPU_TASK, "cpu", CPU_TORCH, 0, r"would train on the CPU: torch 2.14.1\+cpu is a CPU-only build"),
    # The same with DS_ACCELERATOR=cuda (as slurm/train_48k.sbatch sets it for GPU jobs).
    ("CPU-only torch, cuda asked", {**SLURM_GPU_TASK, "DS_ACCELERATOR": "cuda"}, "cuda", CPU_TORCH, 0,
     r"cannot use them: torch 2.14.1\+cpu is a CPU-only build"),
    # A CUDA torch that finds no device (driver, or a GPU that is gone).
    ("no device", SLURM_GPU_TASK, "cpu", CUDA_TORCH, 0,
     r"finds no CUDA device \(CUDA_VISIBLE_DEVICES=0\)"),
    # SLURM only lists the GPUs.
    ("job GPUs listed", {"SLURM_JOB_ID": "9", "SLURM_JOB_GPUS": "0,1", "DS_ACCELERATOR": "cpu"}, "cpu", CUDA_TORCH, 2,
     r"SLURM gave this node 2 GPU\(s\).*DS_ACCELERATOR=cpu"),
    # Outside SLURM, DS_ACCELERATOR=cuda is the one who says GPUs.
    ("cuda asked, none found", {"DS_ACCELERATOR": "cuda"}, "cuda", CUDA_TORCH, 0,
     r"DS_ACCELERATOR=cuda asks for GPUs, but this rank cannot use them: .*finds no CUDA device"),
])
def test_gpus_given_but_not_used_are_refused(case, environ, accelerator, torch_build, devices, words):
    with pytest.raises(PreflightError, match=words):
        check_accelerator(environ, accelerator, *torch_build, devices)


@pytest.mark.parametrize("case, environ, accelerator, torch_build, devices", [
    ("GPU job on CUDA", SLURM_GPU_TASK, "cuda", CUDA_TORCH, 1),
    ("GPU job, DS_ACCELERATOR=cuda", {**SLURM_GPU_TASK, "DS_ACCELERATOR": "cuda"}, "cuda", CUDA_TORCH, 1),
    # The sbatch CPU branch and the tests: no GPUs asked for, CPU on purpose.
    ("CPU job", {"SLURM_JOB_ID": "9", "SLURM_GPUS_ON_NODE": "0", "DS_ACCELERATOR": "cpu"}, "cpu", CUDA_TORCH, 0),
    ("CPU job, no GPU variables", {"SLURM_JOB_ID": "9", "DS_ACCELERATOR": "cpu"}, "cpu", CPU_TORCH, 0),
    # An --exclusive CPU job that landed on a GPU node: the job holds the node's GPUs, its ranks' step none.
    ("CPU job on a GPU node", {"SLURM_JOB_ID": "9", "SLURM_STEP_ID": "0", "SLURM_GPUS_PER_NODE": "0",
                               "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7", "DS_ACCELERATOR": "cpu"}, "cpu", CUDA_TORCH, 8),
    ("laptop", {"DS_ACCELERATOR": "cpu"}, "cpu", CUDA_TORCH, 0),
    ("workstation", {}, "cuda", CUDA_TORCH, 2),
])
def test_consistent_accelerators_pass(case, environ, accelerator, torch_build, devices):
    check_accelerator(environ, accelerator, *torch_build, devices)


def test_select_device_refuses_a_gpu_job_on_this_cpu_machine():
    """The real wrapper with this process's torch and DeepSpeed (CPU accelerator, no CUDA device here)."""
    env = DistEnv(0, 0, 1, 1, 1, None, None, "slurm")
    environ = {**SLURM_GPU_TASK, "DS_ACCELERATOR": "cpu"}
    with pytest.raises(PreflightError, match=r"^preflight on \S+: SLURM gave this node 1 GPU"):
        select_device(env, environ)
    assert environ["DS_ACCELERATOR"] == "cpu" and "LOCAL_RANK" not in environ


def test_select_device_on_the_cpu():
    environ = {"DS_ACCELERATOR": "cpu", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert select_device(DistEnv(1, 1, 2, 2, 1, None, None, "torch"), environ) == torch.device("cpu")
    assert environ["LOCAL_RANK"] == "1"
