"""`deepspeed --hostfile HOSTFILE launcher/train.py ...` over DeepSpeed's default launcher, pdsh over ssh.

tests/clusters/ssh_local.sh starts an sshd of our own on 127.0.0.2 and 127.0.0.3 (two host names
that reach this machine) with a key it generates; DeepSpeed's runner then logs in to each "node"
through pdsh and starts one deepspeed.launcher.launch there, exactly as on a real cluster. What a
node's login shell lacks comes from the .deepspeed_env file the README describes.

Run alone: .venv/bin/python -m pytest tests/test_multinode_pdsh.py
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT, free_port, read_jsonl, train_env

pytestmark = [pytest.mark.slow, pytest.mark.ssh]

SCRIPT = ROOT / "tests" / "clusters" / "ssh_local.sh"
HOSTS = ("127.0.0.2", "127.0.0.3")
TIMEOUT_S = 900


def port_free_on(hosts: tuple[str, ...]) -> int:
    """A port that is free on every one of the hosts' addresses."""
    for _ in range(50):
        port = free_port()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no port free on all of {hosts}")


@pytest.fixture(scope="module")
def ssh_nodes(tmp_path_factory) -> dict:
    if os.geteuid() != 0:
        pytest.skip("sshd for the pdsh test needs root (it is started, and installed if missing, as root)")
    state = tmp_path_factory.mktemp("ssh")
    env = {**os.environ, "SSH_CI_DIR": str(state), "SSH_CI_PORT": str(port_free_on(HOSTS)),
           "SSH_CI_HOSTS": " ".join(HOSTS)}
    try:
        up = subprocess.run(["bash", str(SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=900)
        if up.returncode != 0:
            reason = (up.stderr.strip().splitlines() or ["?"])[-1]
            if "cannot install" in reason:
                pytest.skip(f"sshd/pdsh unavailable: {reason}")
            raise AssertionError(f"ssh_local.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        exports = dict(item.split("=", 1) for item in shlex.split(up.stdout.strip().removeprefix("export ")))
        # What every node's login shell lacks: the venv first on PATH (DeepSpeed's JIT build of its CPU
        # comm op calls ninja from there), the CPU accelerator, one thread per rank, the op cache.
        lines = [f"PATH={BIN}{os.pathsep}{os.environ['PATH']}", "DS_ACCELERATOR=cpu", "OMP_NUM_THREADS=1",
                 "MF2_RENDEZVOUS_TIMEOUT_S=300"]
        if "TORCH_EXTENSIONS_DIR" in os.environ:
            lines.append(f"TORCH_EXTENSIONS_DIR={os.environ['TORCH_EXTENSIONS_DIR']}")
        env_file = state / "deepspeed_env"
        env_file.write_text("\n".join(lines) + "\n")
        yield {"hostfile": Path(exports["SSH_CI_DIR"]) / "hostfile", "port": exports["SSH_CI_PORT"],
               "env": {"PDSH_SSH_ARGS_APPEND": exports["PDSH_SSH_ARGS_APPEND"], "DS_ENV_FILE": str(env_file)}}
    finally:
        subprocess.run(["bash", str(SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=120)


def run_hostfile(nodes: dict, *train_args: str) -> subprocess.CompletedProcess:
    """`deepspeed --hostfile ... launcher/train.py ARGS`, stopped through its own handler on a timeout."""
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(nodes["hostfile"]), "--ssh_port", nodes["port"],
           # DeepSpeed's own ssh probes bypass pdsh (no key, default known_hosts): skip them.
           "--no_ssh_check", "--master_addr", HOSTS[0], "--master_port", str(free_port()),
           "launcher/train.py", *train_args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=train_env(**nodes["env"]), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the runner then pkills the ranks on every node through pdsh
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"deepspeed --hostfile did not end within {TIMEOUT_S} s:\n{out[-6000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def test_two_nodes_over_pdsh_train(ssh_nodes, demo_corpus, tmp_path):
    run_dir = tmp_path / "run"
    res = run_hostfile(ssh_nodes, "--ds_config", "ds_configs/bs4.json", "--config", "recipes/demo_cpu.yaml",
                       "--run_dir", str(run_dir), f"data.train_list={demo_corpus['train_list']}",
                       f"data.valid_list={demo_corpus['valid_list']}", "train.max_steps=3",
                       "train.log_interval_steps=1", "train.progress_bar=false")
    assert res.returncode == 0, res.stdout[-6000:]
    # pdsh prefixes every line with the host it came from: one launcher per node, each its own node rank.
    for rank, host in enumerate(HOSTS):
        assert re.search(rf"^{re.escape(host)}: .*nnodes=2, num_local_procs=1, node_rank={rank}$", res.stdout,
                         re.M), res.stdout[-6000:]
    assert re.search(r"\b2 nodes\b", res.stdout), "the plan card shows the 2 nodes"
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["num_nodes"], plan["gpus_per_node"], plan["world_size"]) == (2, 1, 2)
    assert "world 2 (2×1)" in (run_dir / "command.txt").read_text()
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    assert steps == [1, 2, 3]


def test_refused_plan_ends_both_nodes_with_exit_2(ssh_nodes, demo_corpus, tmp_path):
    res = run_hostfile(ssh_nodes, "--ds_config", "ds_configs/base.json", "--config", "recipes/demo_cpu.yaml",
                       "--run_dir", str(tmp_path / "run"), f"data.train_list={demo_corpus['train_list']}",
                       "--batch_size", "12", "--accu_grad", "1", "--effec_batch_size", "8")
    assert res.returncode == 2, res.stdout[-6000:]
    for host in HOSTS:
        assert re.search(rf"pdsh@\S+: {re.escape(host)}: ssh exited with exit code 2", res.stdout), res.stdout[-6000:]
    assert re.search(rf"^{re.escape(HOSTS[0])}: error: effec_batch_size 8 is not a positive multiple of batch_size 12",
                     res.stdout, re.M), res.stdout[-6000:]
    assert not (tmp_path / "run").exists(), "refused before the run directory is made"
