"""Which GPU each rank takes, and the GPUs SLURM gave a node.

Which GPU a rank uses is `pick_cuda_device`: the node-local rank only names a device when the
task sees all of the node's GPUs. SLURM's GPU binding (`--gpus-per-task`, `--gpu-bind`) shows
each task only its own, and `deepspeed_hostfile` makes DeepSpeed's launcher keep the GPUs SLURM
allocated instead of numbering them from 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from launcher.dist.env import EnvError, env_int, read_dist_env


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
        on_node = env_int(environ, "SLURM_GPUS_ON_NODE")
        return on_node if on_node is not None else len(_id_list(environ, "SLURM_STEP_GPUS") or [])
    if environ.get("SLURM_GPUS_PER_NODE", "").strip():
        return _gpu_count(environ["SLURM_GPUS_PER_NODE"])
    on_node = env_int(environ, "SLURM_GPUS_ON_NODE")
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
