"""Ranks come from whichever launcher started us; SLURM variables map when RANK is absent."""

import pytest

from launcher.dist.env import EnvError, read_dist_env, slurm_tasks_per_node
from launcher.dist.gpu import deepspeed_hostfile, pick_cuda_device, slurm_gpus_on_node


def test_torch_launcher_variables():
    env = read_dist_env({"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
                         "MASTER_ADDR": "n1", "MASTER_PORT": "29600"})
    assert (env.rank, env.local_rank, env.world_size, env.num_nodes, env.local_world_size) == (5, 1, 8, 2, 4)
    assert env.master_addr == "n1" and env.master_port == 29600 and env.source == "torch"


def test_deepspeed_local_size_and_local_rank_argument():
    env = read_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}, local_rank_arg=1)
    assert env.local_rank == 1 and env.num_nodes == 1


def test_slurm_mapping_uses_global_rank_not_local():
    env = read_dist_env({"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
                         "SLURM_TASKS_PER_NODE": "2(x2)", "MASTER_ADDR": "node1", "MASTER_PORT": "12345"})
    assert (env.rank, env.local_rank, env.world_size, env.num_nodes, env.source) == (3, 1, 4, 2, "slurm")
    assert env.export()["RANK"] == "3" and env.export()["LOCAL_RANK"] == "1"


def test_rank_wins_over_slurm():
    env = read_dist_env({"RANK": "0", "WORLD_SIZE": "1", "SLURM_PROCID": "7", "SLURM_NTASKS": "8"})
    assert env.rank == 0 and env.world_size == 1


def test_single_process():
    env = read_dist_env({})
    assert env.source == "single" and env.world_size == 1


@pytest.mark.parametrize("environ, words", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x'"),
    ({"RANK": "4", "WORLD_SIZE": "2"}, "outside"),
    ({"RANK": "0", "WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "2"}, "whole number of nodes"),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_TASKS_PER_NODE": "2,1"}, "unequal"),
])
def test_bad_environments(environ, words):
    with pytest.raises(EnvError, match=words):
        read_dist_env(environ)


def test_slurm_task_counts():
    assert slurm_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm_tasks_per_node("4") == [4]


# Each rank's CUDA device, from the environment its launcher gives it. The SLURM environments are those
# that srun 22.05 gave the tasks of a 2-node job with 2 GPUs per node (tests/clusters/slurm_local.sh),
# task 3 = local rank 1 on the second node, as `env` printed them.
SRUN_TASK3 = {"SLURM_JOB_ID": "2", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
              "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_GPUS_ON_NODE": "2", "SLURM_GPUS_PER_NODE": "2",
              "SLURM_JOB_GPUS": "0,1", "MASTER_ADDR": "gpu1", "MASTER_PORT": "20002"}


@pytest.mark.parametrize("case, environ, visible, index", [
    # srun's default binding: every task sees the node's GPUs; the local rank picks one.
    ("srun default", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_STEP_GPUS": "0,1"}, 2, 1),
    # --gpus-per-task=1 and --gpu-bind=single:1: the task sees only its own GPU, as its device 0.
    ("srun --gpus-per-task=1", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "1", "SLURM_STEP_GPUS": "1",
                                "GPU_DEVICE_ORDINAL": "1"}, 1, 0),
    ("srun --gpu-bind=single:1", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "1", "SLURM_STEP_GPUS": "1"}, 1, 0),
    # --gpu-bind=map_gpu:1,0: local rank 1 is bound to GPU 0, still its only device.
    ("srun --gpu-bind=map_gpu:1,0", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_GPUS": "0"}, 1, 0),
    # --gpu-bind=closest where every GPU is close to every core: like the default.
    ("srun --gpu-bind=closest, one domain", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "0,1"}, 2, 1),
    # --gpu-bind=closest on a node of 8 GPUs in 2 NUMA domains with 2 tasks: each sees its domain's 4 GPUs.
    ("srun --gpu-bind=closest, 1 task per domain",
     {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "1(x4)",
      "SLURM_LOCALID": "0"}, 4, 0),
    # After main() exported the torch variables for srun: the same answer.
    ("srun, exported", {**SRUN_TASK3, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                        "CUDA_VISIBLE_DEVICES": "1"}, 1, 0),
    # DeepSpeed's launcher sets CUDA_VISIBLE_DEVICES from its slots (here SLURM's GPUs 2,3) and LOCAL_RANK.
    ("deepspeed launcher", {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_SIZE": "2",
                            "CROSS_RANK": "1", "CUDA_VISIBLE_DEVICES": "2,3"}, 2, 1),
    ("torchrun", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 2, 1),
    # torchrun with fewer ranks than GPUs: ranks take the first ones.
    ("torchrun, spare GPUs", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 8, 1),
    # GPUs named by UUID (MIG slices, or sites that pin by UUID).
    ("UUIDs", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
               "CUDA_VISIBLE_DEVICES": "GPU-6a1f9c2e-0b51-4f0e-a1f4-8c1d2e3f4a5b,GPU-0c7e4b1d-92aa-4c3e-b5d6-7e8f9a0b1c2d"},
     2, 1),
    ("one MIG UUID per task", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "MIG-5c4f1c02-6e0d-5c9b-8a7e-0123456789ab"}, 1, 0),
    # No CUDA_VISIBLE_DEVICES (a site that does not set it): SLURM's numbers are the ordinals.
    ("SLURM_STEP_GPUS only, bound", {**SRUN_TASK3, "SLURM_STEP_GPUS": "5", "SLURM_GPUS_ON_NODE": "2"}, 8, 5),
    # torchrun in the batch shell of a job that asked for GPUs 4,5 (no srun step).
    ("SLURM_JOB_GPUS only, batch shell", {k: v for k, v in SRUN_TASK3.items() if k != "SLURM_STEP_ID"}
     | {"SLURM_JOB_GPUS": "4,5"}, 8, 5),
    ("single process", {}, 1, 0),
])
def test_pick_cuda_device(case, environ, visible, index):
    device = pick_cuda_device(environ, visible)
    assert device.index == index, device
    assert device.export() == {"LOCAL_RANK": str(index)}
    assert f"cuda:{index}" in device.why


def test_bound_task_no_longer_names_a_device_it_cannot_see():
    """The bug: with --gpus-per-task=1, LOCAL_RANK=SLURM_LOCALID=1 named cuda:1 in a task that sees one GPU."""
    environ = {**SRUN_TASK3, "RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
               "CUDA_VISIBLE_DEVICES": "1"}
    assert read_dist_env(environ).local_rank == 1
    assert pick_cuda_device(environ, 1).export()["LOCAL_RANK"] == "0"


@pytest.mark.parametrize("case, environ, visible, words", [
    # DeepSpeed's runner started 2 slots on a machine with 1 GPU.
    ("mismatch", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_SIZE": "2", "CUDA_VISIBLE_DEVICES": "0,1"},
     1, r"rank 1 \(local rank 1 of 2 on this node\): CUDA_VISIBLE_DEVICES='0,1' names 2 device\(s\) but CUDA finds 1"),
    ("torchrun sharing the only GPU", {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 1,
     r"rank 1 .*this node has 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES unset\) for 2 ranks.*at most 1 rank"),
    ("closest, 4 GPUs for 4 tasks of 8",
     {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_GPUS_ON_NODE": "8", "SLURM_TASKS_PER_NODE": "8(x2)",
      "SLURM_NTASKS": "16", "SLURM_PROCID": "9"}, 4,
     r"rank 9 \(local rank 1 of 8 on this node\) sees 4 GPU\(s\) \(CUDA_VISIBLE_DEVICES='0,1,2,3'\).*cannot tell"
     r".*--gpus-per-task=1"),
    ("fewer GPUs than ranks", {**SRUN_TASK3, "SLURM_GPUS_ON_NODE": "1", "CUDA_VISIBLE_DEVICES": "0"}, 1,
     r"SLURM gave this node 1 GPU\(s\) for 2 ranks.*--ntasks-per-node=1"),
    ("no device", {**SRUN_TASK3, "CUDA_VISIBLE_DEVICES": ""}, 0, r"rank 3 .*sees no CUDA device"),
    ("SLURM ids out of range", {**SRUN_TASK3, "SLURM_STEP_GPUS": "9"}, 2, r"SLURM lists 9"),
])
def test_impossible_device_mappings_are_refused(case, environ, visible, words):
    with pytest.raises(EnvError, match=words):
        pick_cuda_device(environ, visible)


def _deepspeed_world(hostfile: str, include: str | None, node: int, tmp_path) -> tuple[list[int], int]:
    """What DeepSpeed's own runner makes of a hostfile and --include: this node's GPU ids and the world size."""
    from deepspeed.launcher.runner import fetch_hostfile, parse_inclusion_exclusion

    path = tmp_path / "hostfile"
    path.write_text(hostfile)
    resources = parse_inclusion_exclusion(fetch_hostfile(str(path)), include or "", "")
    return list(resources.values())[node], sum(len(ids) for ids in resources.values())


GPU_STEP = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "2"}


@pytest.mark.parametrize("node, environ, ids", [
    (0, {**GPU_STEP, "CUDA_VISIBLE_DEVICES": "2,3"}, [2, 3]),  # another job holds GPUs 0 and 1
    (1, {**GPU_STEP, "CUDA_VISIBLE_DEVICES": "6,4"}, [4, 6]),  # DeepSpeed sorts them; the set is what counts
    (1, {**GPU_STEP, "CUDA_VISIBLE_DEVICES": "0,1"}, [0, 1]),
    (0, {**GPU_STEP, "SLURM_STEP_GPUS": "4,5"}, [4, 5]),  # no CUDA_VISIBLE_DEVICES: SLURM's numbers
])
def test_deepspeed_hostfile_keeps_slurms_gpus(node, environ, ids, tmp_path):
    hostfile, include = deepspeed_hostfile(["gpu1", "gpu2"], node, 2, environ)
    assert _deepspeed_world(hostfile, include, node, tmp_path) == (ids, 4)
    if ids == [0, 1]:
        assert include is None and hostfile == "gpu1 slots=2\ngpu2 slots=2\n"


@pytest.mark.parametrize("environ", [
    {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "CUDA_VISIBLE_DEVICES": "3"},  # a stray value from the shell
    # An --exclusive job that asked for no GPUs on a GPU node: the job holds them all, the step none.
    {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "0", "SLURM_GPUS_PER_NODE": "0", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"},
])
def test_deepspeed_hostfile_without_gpus_is_one_slot_per_rank(environ):
    hostfile, include = deepspeed_hostfile(["node1", "node2"], 1, 1, environ)
    assert (hostfile, include) == ("node1 slots=1\nnode2 slots=1\n", None)


@pytest.mark.parametrize("environ, gpus", [
    ({}, None),
    # Steps as srun 22.05 starts them: with GPUs, bound to one of them, without any.
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "2", "SLURM_STEP_GPUS": "0,1"}, 2),
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "2", "SLURM_STEP_GPUS": "1"}, 2),
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_STEP_GPUS": "0,1"}, 2),
    ({"SLURM_JOB_ID": "5", "SLURM_STEP_ID": "0", "SLURM_GPUS_PER_NODE": "0", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}, 0),
    # Batch shells of --exclusive jobs on 8-GPU nodes: SLURM_GPUS_ON_NODE is 8 whatever was asked for.
    ({"SLURM_JOB_ID": "5", "SLURM_GPUS_PER_NODE": "0", "SLURM_GPUS_ON_NODE": "8", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}, 0),
    ({"SLURM_JOB_ID": "5", "SLURM_GPUS_PER_NODE": "gpu:a100:2", "SLURM_GPUS_ON_NODE": "8"}, 2),
    ({"SLURM_JOB_ID": "5", "SLURM_GPUS_ON_NODE": "8"}, 8),
    ({"SLURM_JOB_ID": "5", "SLURM_JOB_GPUS": "2,3"}, 2),
    ({"SLURM_JOB_ID": "5"}, None),
])
def test_slurm_gpus_on_node(environ, gpus):
    assert slurm_gpus_on_node(environ) == gpus


@pytest.mark.parametrize("environ, words", [
    ({**GPU_STEP, "CUDA_VISIBLE_DEVICES": "GPU-6a1f9c2e,GPU-0c7e4b1d"}, "by UUID.*LAUNCH_MODE=srun"),
    ({**GPU_STEP, "CUDA_VISIBLE_DEVICES": "0,1,2"}, r"node 0 \(gpu1\): SLURM gave this step 3 GPU\(s\).*2 rank"),
])
def test_deepspeed_hostfile_refuses(environ, words):
    with pytest.raises(EnvError, match=words):
        deepspeed_hostfile(["gpu1", "gpu2"], 0, 2, environ)


def test_deepspeed_hostfile_command_line(tmp_path, monkeypatch, capsys):
    """What slurm/launch.sh runs: the hostfile is written, --include printed."""
    from launcher.hostfile import main

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_GPUS_ON_NODE", "2")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert main([str(tmp_path / "hf"), "--hosts", "gpu1,gpu2", "--node_index", "1",
                 "--ranks_per_node", "2"]) == 0
    assert capsys.readouterr().out == "--include=gpu1@gpu2:2,3\n"
    assert (tmp_path / "hf").read_text() == "gpu1 slots=2\ngpu2 slots=4\n"
