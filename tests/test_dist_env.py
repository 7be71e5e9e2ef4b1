"""Ranks come from whichever launcher started us; SLURM variables map when RANK is absent."""

import pytest

from launcher.dist_env import EnvError, read_dist_env, slurm_tasks_per_node


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
