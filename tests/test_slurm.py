"""slurm/train_48k.sbatch on a real SLURM cluster: emulated nodes on this machine.

tests/clusters/slurm_local.sh (installing Debian's slurm-wlm and munge where missing) brings up
slurmctld and one slurmd per node, each in its own UTS namespace, so `hostname` inside a job names
the node. Two kinds of node:
- node1, node2: 2 CPUs each (the size of this machine), no GPUs; jobs that ask for no GPUs run
  here, so the header's CPU example is tried on 2-CPU nodes as written;
- gpu1, gpu2: 16 CPUs and 8 fake GPUs each (GRES without devices: scheduling and
  CUDA_VISIBLE_DEVICES only, nothing of CUDA), so the production defaults (2 nodes × 8 GPUs) fit
  and can be planned; their ranks are refused by the accelerator preflight.
The nodes share this machine's file system, which stands in for a cluster's shared storage: every
job runs from the repository root and writes its run directory under a pytest tmp dir.

Run alone: .venv/bin/python -m pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, free_port, read_jsonl

pytestmark = pytest.mark.slurm

CLUSTER_SCRIPT = ROOT / "tests" / "clusters" / "slurm_local.sh"
SBATCH = "slurm/train_48k.sbatch"
DEMO = "recipes/demo_cpu.yaml"
JOB_TIMEOUT_S = 600
# A refused world must end the job this fast (the slowest case starts 6 Python processes on 2 cores).
PREFLIGHT_LIMIT_S = 60
# Pending reasons that no amount of waiting resolves on this cluster.
NEVER_STARTS = {"PartitionConfig", "BadConstraints", "PartitionNodeLimit", "ReqNodeNotAvail"}

TASK_LINE = re.compile(r"\[mf2-slurm\] task: (?:rank (\d+)/\d+ local \d+ |deepspeed launcher )node (\d+)/\d+ host (\S+)")
TIMINGS: dict[str, float] = {}


@dataclass
class Cluster:
    env: dict[str, str]  # the environment sbatch/scancel/scontrol run with
    up_s: float


@dataclass
class Job:
    job_id: int
    rc: int
    out: str
    err: str
    elapsed_s: float

    def show(self) -> str:
        return f"job {self.job_id} exit {self.rc}\n--- stdout (tail)\n{self.out[-5000:]}\n--- stderr (tail)\n{self.err[-5000:]}"


def free_port_block(count: int) -> int:
    """A base port whose next `count` ports are free (slurmd ports are base+1 ... base+count)."""
    for _ in range(100):
        base = free_port()
        if base + count >= 65535:
            continue
        try:
            for port in range(base + 1, base + count + 1):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster needs root (its daemons run as root; packages are installed if missing)")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    # Its own state folder and ports: several clusters (sessions, worktrees) can run side by side. Not
    # under pytest's tmp folders, which only their owner may enter: munged's socket must be reachable.
    state = Path(tempfile.mkdtemp(prefix="mf2-slurm-"))
    state.chmod(0o755)
    env.update(SLURM_CI_DIR=str(state), SLURM_CI_CTLD_PORT=str(free_port()),
               SLURM_CI_NODE_PORT_BASE=str(free_port_block(4)), SLURM_CI_NODES="2", SLURM_CI_CPUS="2",
               SLURM_CI_GPU_NODES="2", SLURM_CI_GPU_NODE_CPUS="16", SLURM_CI_GPU_NODE_GPUS="8")
    try:
        t0 = time.monotonic()
        up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=900)
        up_s = time.monotonic() - t0
        if up.returncode != 0:
            reason = (up.stderr.strip().splitlines() or ["?"])[-1]
            if "cannot install" in reason:
                pytest.skip(f"no local SLURM cluster: {reason}")
            raise AssertionError(f"slurm_local.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}")
        m = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
        assert m, f"slurm_local.sh up printed no SLURM_CONF:\n{up.stdout}"
        TIMINGS["cluster up"] = up_s
        job_env = {
            **env,
            "SLURM_CONF": m.group(1),
            # The job inherits PATH (sbatch --export=ALL): python3 and deepspeed are the venv's. Resolved,
            # so that python3 and the deepspeed script's interpreter are one path, as DeepSpeed's JIT op
            # cache needs (a venv reached through a link would otherwise build the op twice, in turn).
            "PATH": f"{(ROOT / '.venv' / 'bin').resolve()}{os.pathsep}{env.get('PATH', '')}",
            "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1",
            # Rank 1 waits this long for rank 0 to open the rendezvous port; on two busy cores rank 0's
            # start-up alone (imports, op load, data checks) has taken over a minute.
            "MF2_RENDEZVOUS_TIMEOUT_S": "300",
        }
        # DeepSpeed JIT-compiles its CPU comm op inside init_distributed, before rank 0 opens the
        # rendezvous port; its cache is shared with `make` and the other tests, which all put the venv's
        # ninja first on PATH as above (the venv's and the system's ninja hash commands differently).
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "RECIPE", "DS_CONFIG",
                    "RUN_DIR", "LAUNCH_MODE", "RANKS_PER_NODE", "EXTRA_ARGS", "PYTHON"):
            job_env.pop(key, None)
        # Build (or find) the op now, with the jobs' environment, not inside a job's rendezvous timeout.
        t0 = time.monotonic()
        warm = subprocess.run(
            ["python3", "-c",
             "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"],
            env=job_env, capture_output=True, text=True, timeout=900)
        assert warm.returncode == 0, f"building DeepSpeed's shm comm op failed:\n{warm.stderr[-3000:]}"
        TIMINGS["shm op build/load"] = time.monotonic() - t0
        yield Cluster(job_env, up_s)
    finally:
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "purge"], env=env, capture_output=True, text=True, timeout=300)
        print("\nslurm test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


def corpus_args(corpus: dict) -> str:
    train = corpus.get("train_list") or corpus["train"]
    valid = corpus.get("valid_list") or corpus["valid"]
    return f"data.train_list={train} data.valid_list={valid} train.progress_bar=false"


def settle(cluster: Cluster, timeout: float = 120) -> None:
    """Wait until no job is left and every node is idle: jobs ask for whole nodes (--exclusive), and one
    that finds node1/node2 still busy with the previous test's job would land on the GPU nodes."""
    def idle() -> bool:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=cluster.env, capture_output=True, text=True,
                               timeout=60).stdout.strip()
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=cluster.env, capture_output=True, text=True,
                                timeout=60).stdout.split()
        return not queue and states and all(state == "idle" for state in states)

    wait_for(idle, timeout, "an idle cluster")


def submit(cluster: Cluster, logs: Path, name: str, *sbatch_args: str, script: str | None = SBATCH,
           wrap: str | None = None, alone: bool = True, **env: str) -> subprocess.Popen:
    """`sbatch --wait` in the background; the first line it prints is the job id (--parsable).
    alone: on an idle cluster (see `settle`)."""
    if alone:
        settle(cluster)
    logs.mkdir(parents=True, exist_ok=True)
    cmd = ["sbatch", "--parsable", "--wait", f"--chdir={ROOT}", f"--job-name={name}",
           f"--output={logs}/%x-%j.out", f"--error={logs}/%x-%j.err", *sbatch_args]
    cmd += ["--wrap", wrap] if wrap is not None else [script]
    proc = subprocess.Popen(cmd, env={**cluster.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(30)
        raise AssertionError(f"sbatch refused the job: {proc.stderr.read()}")
    proc.job_id = int(line.split(";")[0])  # type: ignore[attr-defined]
    proc.logs, proc.name, proc.t0 = logs, name, time.monotonic()  # type: ignore[attr-defined]
    return proc


def read_logs(proc) -> tuple[str, str]:
    def text(suffix: str) -> str:
        path = proc.logs / f"{proc.name}-{proc.job_id}.{suffix}"
        return path.read_text(errors="replace") if path.exists() else ""

    return text("out"), text("err")


def squeue_state(cluster: Cluster, job_id: int) -> tuple[str, str]:
    """(state, reason) of a job still in the queue; ("", "") once it has left."""
    shown = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T %r"], env=cluster.env, capture_output=True,
                           text=True, timeout=60).stdout.split()
    return (shown[0], shown[1]) if len(shown) == 2 else ("", "")


def finish(cluster: Cluster, proc, timeout: float = JOB_TIMEOUT_S) -> Job:
    """Wait for the job; one that can never start (a request no node fits) fails at once, not at the timeout."""
    while True:
        try:
            rc = proc.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            state, reason = squeue_state(cluster, proc.job_id)
            late = time.monotonic() - proc.t0 > timeout
            if late or (state == "PENDING" and reason in NEVER_STARTS):
                subprocess.run(["scancel", str(proc.job_id)], env=cluster.env, timeout=60)
                proc.wait(60)
                out, err = read_logs(proc)
                why = f"did not end within {timeout:.0f} s" if late else f"can never start: PENDING, Reason={reason}"
                raise AssertionError(f"job {proc.job_id} {why}\n{out[-4000:]}\n{err[-4000:]}") from None
    elapsed = time.monotonic() - proc.t0
    out, err = read_logs(proc)
    return Job(proc.job_id, rc, out, err, elapsed)


def run(cluster: Cluster, logs: Path, name: str, *sbatch_args: str, alone: bool = True, **env: str) -> Job:
    job = finish(cluster, submit(cluster, logs, name, *sbatch_args, alone=alone, **env))
    TIMINGS[name] = job.elapsed_s
    return job


def wait_for(predicate, timeout: float, what: str, proc=None) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        if proc is not None and proc.poll() is not None:
            out, err = read_logs(proc)
            raise AssertionError(f"job {proc.job_id} ended (exit {proc.returncode}) before {what}\n{out[-4000:]}\n{err[-4000:]}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def train_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r["step"] for r in read_jsonl(path) if r.get("kind") == "train"]


def task_nodes(log: str) -> set[tuple[str, str]]:
    """(SLURM_NODEID, hostname) of every task the job started."""
    return {(m.group(2), m.group(3)) for m in TASK_LINE.finditer(log)}


def plan_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "plan.json").read_text())


def notify_after_two_steps(cluster: Cluster, proc, run_dir: Path) -> None:
    """Once training runs, send the preemption notice to the batch shell, as --signal=B:USR1 would."""
    wait_for(lambda: len(train_steps(run_dir)) >= 2, 300, "two optimizer steps", proc)
    sent = subprocess.run(["scancel", "--signal=USR1", "--batch", str(proc.job_id)], env=cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr


def saved_and_resumed(job: Job) -> tuple[str, str, int]:
    """The two runs' logs and the step the first one saved and the second resumed from."""
    first, _, second = job.out.partition("SLURM_RESTART_COUNT=1")
    assert "SLURM_RESTART_COUNT=0" in first and second, job.show()
    saved = re.search(r"\[preempt\] checkpoint saved at step (\d+)", first)
    assert saved, f"no preemption checkpoint in the first run\n{job.show()}"
    step = int(saved.group(1))
    assert re.search(rf"requeueing job {job.job_id} \(restart 1\)", first), job.show()
    assert re.search(rf"\[resume\] \S+step{step:08d}: step {step}\b", second), f"no resume from step {step}\n{job.show()}"
    assert "training finished" in second, job.show()
    return first, second, step


def launcher_plan(*args: str) -> subprocess.CompletedProcess:
    """`python -m launcher.plan ARGS`: the planner's verdict, to compare a job's with."""
    return subprocess.run([sys.executable, "-m", "launcher.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


def test_two_nodes_one_cpu_rank_each(cluster, demo_corpus, tmp_path):
    """The header's CPU example as written, on nodes of 2 CPUs (the demo recipe; a few steps)."""
    run_dir = tmp_path / "run"
    job = run(cluster, tmp_path / "logs", "mf2-two-nodes", "--nodes=2", "--gpus-per-node=0",
              f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir),
              EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps=4 train.log_interval_steps=1")
    assert job.rc == 0, job.show()
    nodes = task_nodes(job.out)
    assert nodes == {("0", "node1"), ("1", "node2")}, f"both nodes must take part: {nodes}\n{job.show()}"
    # Every CPU of the 2-CPU node goes to its one rank, with no CPU count written in the script.
    assert "SLURM_RESTART_COUNT=0" in job.out and "world 2, cpu, 2 CPU(s)/rank" in job.out, job.show()
    # The batch shell planned this allocation before any rank started.
    assert job.out.index("plan accepted") < job.out.index("[mf2-slurm] task:"), job.show()
    plan = plan_of(run_dir)
    assert plan["world_size"] == 2 and (plan["num_nodes"], plan["gpus_per_node"]) == (2, 1)
    assert "× 2 =" in job.out, "the plan card names the world of 2"
    assert "host node1 world 2 (2×1) via slurm" in (run_dir / "command.txt").read_text()
    assert train_steps(run_dir) == [1, 2, 3, 4]
    expected = json.loads(launcher_plan("--ds_config", "ds_configs/bs4.json", "--config", DEMO, "--num_nodes", "2",
                                        "--num_gpus", "1", "--json").stdout)
    keys = ("micro_batch", "accumulation_steps", "global_batch", "peak_lr")
    assert {k: plan[k] for k in keys} == {k: expected[k] for k in keys}


def _card_without_row(card: str, label: str) -> list[str]:
    """The lines of a rich plan card without one labelled row (and the lines it wraps onto)."""
    kept, current = [], None
    for line in card.splitlines():
        body = line[2:] if line.startswith("│ ") else ""
        if body[:1].strip():
            current = body.split("  ", 1)[0].strip()
        elif not body.strip():
            current = None
        if current != label:
            kept.append(line)
    return kept


def test_production_defaults_plan_as_launcher_plan_says(cluster, tmp_path):
    """`sbatch slurm/train_48k.sbatch` as written (2 nodes × 8 GPUs, bs4, recipes/train_48k.yaml) reaches the
    plan step, and its verdict there is the planner's for that allocation. Its ranks are not wanted here."""
    expected = launcher_plan("--ds_config", "ds_configs/bs4.json", "--config", "recipes/train_48k.yaml",
                             "--num_nodes", "2", "--num_gpus", "8")
    proc = submit(cluster, tmp_path / "logs", "mf2-48k", RUN_DIR=str(tmp_path / "run"))
    verdict = re.compile(r"plan (accepted|refused)")
    wait_for(lambda: verdict.search(read_logs(proc)[0]), 120, "the plan step's verdict", proc)
    if expected.returncode == 0:
        subprocess.run(["scancel", str(proc.job_id)], env=cluster.env, timeout=60)
    job = finish(cluster, proc, timeout=180)
    TIMINGS["production defaults: plan step"] = job.elapsed_s
    assert "plan for 2 node(s) x 8 rank(s)" in job.out, job.show()
    if expected.returncode == 0:
        assert "plan accepted" in job.out, job.show()
        # The same card, but for where the world came from: the command line for launcher.plan, the
        # allocation's WORLD_SIZE/LOCAL_WORLD_SIZE for the job's plan step.
        card = [line for line in _card_without_row(expected.stdout, "world") if line.strip()]
        assert card and all(line in job.out for line in card), f"{expected.stdout}\n{job.show()}"
    else:
        assert "plan refused" in job.out and job.rc == expected.returncode == 2, job.show()
        assert expected.stderr.strip() in job.err, f"{expected.stderr}\n{job.show()}"
        assert not task_nodes(job.out), "no rank may start after a refused plan"


# srun signals every process of the step, DataLoader worker processes included: one mode runs with a worker
# (as production recipes do), the other reads in the rank through the prefetch thread (the demo recipe).
@pytest.mark.parametrize("mode, workers", [("srun", 1), ("deepspeed", 0)])
def test_usr1_checkpoints_requeues_and_resumes(cluster, demo_corpus, tmp_path, mode, workers):
    run_dir = tmp_path / "run"
    max_steps = 40
    proc = submit(cluster, tmp_path / "logs", f"mf2-preempt-{mode}", "--nodes=2", "--gpus-per-node=0",
                  f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir), LAUNCH_MODE=mode,
                  EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps={max_steps} train.log_interval_steps=1 "
                             f"data.num_workers={workers}")
    notify_after_two_steps(cluster, proc, run_dir)
    restarted = wait_for(lambda: "SLURM_RESTART_COUNT=1" in read_logs(proc)[0], 180, "the requeued run", proc)
    TIMINGS[f"{mode}: USR1 → requeued run starts"] = restarted
    job = finish(cluster, proc)
    TIMINGS[f"{mode}: preempt test job"] = job.elapsed_s
    assert job.rc == 0, job.show()
    first, second, step = saved_and_resumed(job)
    assert 2 <= step < max_steps
    assert task_nodes(second) == {("0", "node1"), ("1", "node2")}, job.show()
    # The step count continues where the checkpoint left it: every step once, none repeated.
    assert train_steps(run_dir) == list(range(1, max_steps + 1)), train_steps(run_dir)
    assert plan_of(run_dir)["world_size"] == 2


def test_notice_during_start_up_is_not_lost(cluster, demo_corpus, tmp_path):
    """The ranks ignore USR1 until their handler exists; the batch shell repeats the notice."""
    run_dir = tmp_path / "run"
    proc = submit(cluster, tmp_path / "logs", "mf2-early", "--nodes=2", "--gpus-per-node=0",
                  f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir), MF2_SIGNAL_REPEAT_S="5",
                  # Long enough that a repeat (every 5 s) lands while training runs, however fast start-up is.
                  EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps=40 train.log_interval_steps=1")
    wait_for(lambda: len(task_nodes(read_logs(proc)[0])) == 2, 120, "both ranks to start", proc)
    assert not train_steps(run_dir), "the notice must arrive before training does"
    sent = subprocess.run(["scancel", "--signal=USR1", "--batch", str(proc.job_id)], env=cluster.env,
                          capture_output=True, text=True, timeout=60)
    assert sent.returncode == 0, sent.stderr
    job = finish(cluster, proc)
    TIMINGS["early notice job"] = job.elapsed_s
    assert job.rc == 0, job.show()
    first, second, step = saved_and_resumed(job)
    assert "(exit 75)" in first, "the repeated notice must not kill ranks that are already exiting"
    assert train_steps(run_dir) == list(range(1, 41)), train_steps(run_dir)


def test_scancel_ends_the_job_without_requeue(cluster, demo_corpus, tmp_path):
    """TERM (scancel, time limit) is SLURM ending the job: the script must not requeue it."""
    run_dir = tmp_path / "run"
    proc = submit(cluster, tmp_path / "logs", "mf2-cancel", "--nodes=2", "--gpus-per-node=0",
                  f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir),
                  EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps=1000 train.log_interval_steps=1")
    wait_for(lambda: len(train_steps(run_dir)) >= 2, 300, "two optimizer steps", proc)
    subprocess.run(["scancel", str(proc.job_id)], env=cluster.env, check=True, timeout=60)
    job = finish(cluster, proc, timeout=120)
    TIMINGS["scancel job"] = job.elapsed_s
    assert "requeueing job" not in job.out and "SLURM_RESTART_COUNT=1" not in job.out, job.show()
    # `sbatch --wait` says 0 for a cancelled job; SLURM's job completion log has the state.
    config = subprocess.run(["scontrol", "show", "config"], env=cluster.env, capture_output=True, text=True,
                            timeout=60).stdout
    jobcomp = Path(re.search(r"JobCompLoc\s*=\s*(\S+)", config).group(1)).read_text()
    states = re.findall(rf"JobId={job.job_id} .*Name=mf2-cancel JobState=(\w+)", jobcomp)
    assert states and states[-1] == "CANCELLED", states  # (job ids restart when the cluster does)


def test_requeue_onto_one_node_keeps_global_batch_and_lr(cluster, demo_corpus, tmp_path):
    """Preempted on 2 nodes; while the requeued job waits, it is changed to 1 node (as an admin or a
    node-range request would); the second run holds the global batch and LR with twice the accumulation."""
    run_dir = tmp_path / "run"
    max_steps = 30
    proc = submit(cluster, tmp_path / "logs", "mf2-shrink", "--nodes=2", "--gpus-per-node=0",
                  f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir),
                  EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps={max_steps} train.log_interval_steps=1")
    wait_for(lambda: (run_dir / "plan.json").exists(), 300, "the first run's plan", proc)
    plan2 = plan_of(run_dir)
    notify_after_two_steps(cluster, proc, run_dir)

    def pending() -> bool:
        state = subprocess.run(["squeue", "-h", "-j", str(proc.job_id), "-o", "%T"], env=cluster.env,
                               capture_output=True, text=True, timeout=60).stdout.strip()
        return "requeueing job" in read_logs(proc)[0] and state == "PENDING"

    wait_for(pending, 120, "the requeued job to be pending", proc)
    shown = subprocess.run(["scontrol", "show", "job", str(proc.job_id)], env=cluster.env, capture_output=True,
                           text=True, timeout=60).stdout
    cpus = re.search(r"CPUs/Task=(\d+)", shown).group(1)
    shrink = subprocess.run(["scontrol", "update", f"JobId={proc.job_id}", "NumNodes=1-1", "NumTasks=1",
                             f"NumCPUs={cpus}"], env=cluster.env, capture_output=True, text=True, timeout=60)
    assert shrink.returncode == 0, shrink.stderr
    job = finish(cluster, proc)
    TIMINGS["shrink: preempt + requeue onto 1 node"] = job.elapsed_s
    assert job.rc == 0, job.show()
    first, second, step = saved_and_resumed(job)
    assert "= world 1, cpu" in second and task_nodes(second) == {("0", "node1")}, job.show()
    plan1 = plan_of(run_dir)
    assert (plan2["world_size"], plan1["world_size"]) == (2, 1)
    assert plan1["global_batch"] == plan2["global_batch"]
    assert plan1["peak_lr"] == plan2["peak_lr"]
    assert plan1["accumulation_steps"] == 2 * plan2["accumulation_steps"]
    headline = f"{plan1['micro_batch']} × {plan1['accumulation_steps']} × 1 = {plan1['global_batch']}"
    assert headline in second, "the second run's plan card shows the world of 1"
    assert re.search(rf"step{step:08d}: step {step}\b.*world 2 → 1", second), job.show()
    assert train_steps(run_dir) == list(range(1, max_steps + 1)), train_steps(run_dir)
    # Across the restart the LR keeps rising through the warmup instead of starting over.
    warmup = plan2["warmup_steps"]
    assert warmup > step, f"the demo recipe's warmup ({warmup} steps) must outlast step {step}"
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"][:warmup]
    assert lrs == sorted(set(lrs)), f"the LR schedule did not continue: {lrs}"


CONTRADICTION = "--batch_size 12 --accu_grad 1 --effec_batch_size 8"  # the story's explicit 12/8


@pytest.mark.parametrize(
    "case, sbatch_args, env, expect",
    [
        # Explicit batch values that contradict each other: refused whatever the world.
        ("plan", ["--nodes=2", "--gpus-per-node=0"], {"DS_CONFIG": "ds_configs/base.json", "EXTRA_ARGS": CONTRADICTION},
         r"effec_batch_size 8 is not a positive multiple of batch_size 12[\s\S]*Valid choices"),
        # A world the same flags in EXTRA_ARGS contradict.
        ("num_nodes", ["--nodes=2", "--gpus-per-node=0"], {"EXTRA_ARGS": "--num_nodes 3"},
         r"--num_nodes 3 was given but the launcher started 2 node\(s\)"),
        # Two GPUs per node but one rank per node.
        ("gpus", ["--nodes=2", "--gpus-per-node=2"], {"RANKS_PER_NODE": "1"},
         r"SLURM gives 2 GPU\(s\) per node but 1 rank\(s\) run per node"),
        ("recipe", ["--nodes=2", "--gpus-per-node=0"], {"RECIPE": "recipes/nope.yaml"},
         r"RECIPE=recipes/nope.yaml: no such file"),
        ("run_dir", ["--nodes=2", "--gpus-per-node=0"], {"RUN_DIR": "/proc/mf2-run"},
         r"RUN_DIR=/proc/mf2-run cannot be written"),
    ],
)
def test_preflight_refuses_a_world_that_disagrees(cluster, demo_corpus, tmp_path, case, sbatch_args, env, expect):
    """Refused in the batch shell, before any rank starts: within seconds, exit 2, no requeue."""
    extra = f"{corpus_args(demo_corpus)} {env.pop('EXTRA_ARGS', '')}"
    env = {"RECIPE": DEMO, "RUN_DIR": str(tmp_path / "run"), "EXTRA_ARGS": extra, **env}
    job = run(cluster, tmp_path / "logs", f"mf2-preflight-{case}", *sbatch_args, **env)
    assert job.rc == 2, job.show()
    assert re.search(expect, job.err), job.show()
    assert not task_nodes(job.out), f"no rank may start\n{job.show()}"
    assert job.elapsed_s < PREFLIGHT_LIMIT_S, f"took {job.elapsed_s:.0f} s\n{job.show()}"
    assert "requeueing job" not in job.out and "SLURM_RESTART_COUNT=1" not in job.out
    if case == "plan":  # the planner's own words, as `python -m launcher.plan` says them for this world
        said = launcher_plan("--ds_config", "ds_configs/base.json", "--config", DEMO, "--num_nodes", "2",
                             "--num_gpus", "1", *CONTRADICTION.split())
        assert said.returncode == 2 and said.stderr.strip() in job.err, f"{said.stderr}\n{job.show()}"


def test_gpu_job_with_a_stray_ds_accelerator_is_refused(cluster, demo_corpus, tmp_path):
    """DS_ACCELERATOR=cpu exported from the submitting shell into a job with GPUs (fake ones here): the GPU
    branch does not keep it, and the rank, whose torch finds no CUDA device, refuses instead of training."""
    run_dir = tmp_path / "run"
    job = run(cluster, tmp_path / "logs", "mf2-stray-accelerator", "--nodes=1", "--gpus-per-node=1",
              f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir), DS_ACCELERATOR="cpu",
              EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps=2")
    assert job.rc not in (0, 75), job.show()
    assert "DS_ACCELERATOR=cpu came with the submitting environment" in job.out, job.show()
    assert re.search(r"error \(rank 0\): preflight on gpu1: SLURM gave this node 1 GPU\(s\) \(SLURM_GPUS_ON_NODE=1\), "
                     r"but this rank cannot use them: .*finds no CUDA device", job.err), job.show()
    assert not (run_dir / "metrics.jsonl").exists(), "nothing may train"
    assert job.elapsed_s < PREFLIGHT_LIMIT_S, f"took {job.elapsed_s:.0f} s\n{job.show()}"
    assert "requeueing job" not in job.out


def test_deepspeed_mode_keeps_the_gpus_slurm_allocated(cluster, demo_corpus, tmp_path):
    """On nodes shared with a job that holds GPUs 0 and 1, SLURM gives ours 2 and 3; DeepSpeed's launcher
    must hand its ranks those, not the 0 and 1 its hostfile slots would name."""
    settle(cluster)
    holder = subprocess.run(["sbatch", "--parsable", "--nodes=2", "--gpus-per-node=2", "--output=/dev/null",
                             "--job-name=mf2-gpu-holder", "--wrap", "sleep 600"], env=cluster.env, capture_output=True,
                            text=True, timeout=60)
    assert holder.returncode == 0, holder.stderr
    holder_id = holder.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: squeue_state(cluster, int(holder_id))[0] == "RUNNING", 120, "the GPU-holding job")
        # --oversubscribe undoes the script's --exclusive so that the nodes can be shared.
        job = run(cluster, tmp_path / "logs", "mf2-ds-gpus", "--oversubscribe", "--cpus-per-task=2", "--nodes=2",
                  "--gpus-per-node=2", f"--export=ALL,RECIPE={DEMO}", alone=False, RUN_DIR=str(tmp_path / "run"),
                  LAUNCH_MODE="deepspeed", EXTRA_ARGS=corpus_args(demo_corpus))
    finally:
        subprocess.run(["scancel", holder_id], env=cluster.env, timeout=60)
    assert task_nodes(job.out) == {("0", "gpu1"), ("1", "gpu2")}, job.show()
    assert job.out.count("CUDA_VISIBLE_DEVICES=2,3)") == 2, f"SLURM's GPUs for this job\n{job.show()}"
    set_by_deepspeed = re.findall(r"launch.py:\d+:main\] Setting CUDA_VISIBLE_DEVICES=(\S+)$", job.out + job.err, re.M)
    assert set_by_deepspeed == ["2,3", "2,3"], job.show()
    # This machine has no CUDA device, so the ranks refuse (and the job fails) after DeepSpeed set them up.
    assert job.rc not in (0, 75) and "finds no CUDA device (CUDA_VISIBLE_DEVICES=2,3)" in job.err, job.show()


PICK_DEVICE = """
import os
from launcher.dist.gpu import pick_cuda_device, visible_devices
seen = visible_devices(os.environ) or []
device = pick_cuda_device(os.environ, len(seen))  # no CUDA here: the task would see what it is told
print(f"[pick] {os.environ['BINDING']} {os.environ['SLURMD_NODENAME']} {os.environ['SLURM_LOCALID']} {seen[device.index]}")
"""
BINDINGS = ("default", "--gpus-per-task=1", "--gpu-bind=single:1", "--gpu-bind=map_gpu:1,0", "--gpu-bind=closest")


def test_each_srun_binding_gives_each_rank_its_own_gpu(cluster, tmp_path):
    """Under each binding SLURM offers, what each task picks from the environment srun really gives it: the
    two ranks of a node end on its two GPUs (with --gpus-per-task=1, LOCAL_RANK 1 named a missing cuda:1)."""
    (tmp_path / "pick.py").write_text(PICK_DEVICE)
    lines = ["#!/bin/bash", "set -e", f"export PYTHONPATH={ROOT}"]
    for binding in BINDINGS:
        flags = "" if binding == "default" else binding
        lines.append(f"BINDING={binding} srun --ntasks=4 --ntasks-per-node=2 {flags} python3 {tmp_path / 'pick.py'}")
    script = tmp_path / "bindings.sh"
    script.write_text("\n".join(lines) + "\n")
    job = finish(cluster, submit(cluster, tmp_path / "logs", "mf2-bindings", "--nodes=2", "--gpus-per-node=2",
                                 "--ntasks-per-node=2", script=str(script)))
    assert job.rc == 0, job.show()
    picked = re.findall(r"^\[pick\] (\S+) (\S+) (\d) (\S+)$", job.out, re.M)
    for binding in BINDINGS:
        for node in ("gpu1", "gpu2"):
            gpus = {gpu for b, n, _, gpu in picked if (b, n) == (binding, node)}
            assert gpus == {"0", "1"}, f"{binding} on {node}: {picked}\n{job.show()}"


SRUN_BY_HAND = ('export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1) '
                'MASTER_PORT=$((20000 + SLURM_JOB_ID % 10000)) DS_ACCELERATOR=cpu; '
                "srun {srun} python3 -u launcher/train.py --ds_config ds_configs/bs4.json "
                "--config recipes/demo_cpu.yaml --run_dir {run_dir} {extra}")


@pytest.mark.parametrize(
    "case, sbatch_args, srun, expect",
    [
        # srun spreads 3 tasks over 2 nodes as 2 + 1.
        ("uneven", ["--nodes=2", "--ntasks=3"], "", r"unequal tasks per node \(2,1\)"),
        # The step uses one of the job's two nodes.
        ("partial", ["--nodes=2", "--ntasks-per-node=2"], "--nodes=1 --ntasks=2",
         r"the job holds 2 node\(s\) but its ranks run on 1"),
    ],
)
def test_preflight_refuses_srun_by_hand(cluster, demo_corpus, tmp_path, case, sbatch_args, srun, expect):
    wrap = SRUN_BY_HAND.format(srun=srun, run_dir=tmp_path / "run", extra=corpus_args(demo_corpus))
    job = finish(cluster, submit(cluster, tmp_path / "logs", f"mf2-srun-{case}", *sbatch_args,
                                 "--gpus-per-node=0", script=None, wrap=wrap))
    TIMINGS[f"mf2-srun-{case}"] = job.elapsed_s
    assert job.rc == 2, job.show()
    assert re.search(expect, job.err), job.show()
    assert job.elapsed_s < PREFLIGHT_LIMIT_S, f"took {job.elapsed_s:.0f} s\n{job.show()}"
