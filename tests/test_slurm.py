"""slurm/train_48k.sbatch on a real SLURM cluster: two emulated nodes on this machine.

../shared/slurm-local/local-cluster.sh brings up slurmctld and one slurmd per node (node1, node2),
each in its own UTS namespace, so `hostname` inside a job names the node. The nodes share this
machine's file system, which stands in for a cluster's shared storage: every job runs from the
repository root and writes its run directory under a pytest tmp dir.

The nodes advertise 64 CPUs and two fake GPUs each (scheduling only, no CUDA): the script's
production #SBATCH defaults then fit as they are, and a GPU/rank mismatch can be provoked. Jobs
that train ask for --gpus-per-node=0, which runs one CPU rank per node with gloo.

Run alone: .venv/bin/python -m pytest -m slurm tests/test_slurm.py
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import ROOT, read_jsonl

pytestmark = pytest.mark.slurm

CLUSTER_SCRIPT = ROOT.parent / "shared" / "slurm-local" / "local-cluster.sh"
SBATCH = "slurm/train_48k.sbatch"
DEMO = "recipes/demo_cpu.yaml"
JOB_TIMEOUT_S = 600
# A refused world must end the job this fast (the slowest case starts 6 Python processes on 2 cores).
PREFLIGHT_LIMIT_S = 60

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


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    if not CLUSTER_SCRIPT.is_file():
        pytest.skip(f"no local SLURM cluster: {CLUSTER_SCRIPT} is absent")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_"))}
    env.update(SLURM_CI_NODES="2", SLURM_CI_CPUS="64", SLURM_CI_GPUS="2")
    t0 = time.monotonic()
    up = subprocess.run(["bash", str(CLUSTER_SCRIPT), "up"], env=env, capture_output=True, text=True, timeout=600)
    up_s = time.monotonic() - t0
    assert up.returncode == 0, f"local-cluster.sh up failed ({up.returncode}):\n{up.stdout}\n{up.stderr}"
    m = re.search(r"export SLURM_CONF=(\S+)", up.stdout)
    assert m, f"local-cluster.sh up printed no SLURM_CONF:\n{up.stdout}"
    TIMINGS["cluster up"] = up_s
    job_env = {
        **env,
        "SLURM_CONF": m.group(1),
        # The job inherits PATH (sbatch --export=ALL): python3 and deepspeed are the venv's.
        "PATH": f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}",
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
    try:
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
        subprocess.run(["bash", str(CLUSTER_SCRIPT), "down"], env=env, capture_output=True, text=True, timeout=300)
        print("\nslurm test timings: " + ", ".join(f"{k} {v:.1f} s" for k, v in TIMINGS.items()))


def corpus_args(corpus: dict) -> str:
    train = corpus.get("train_list") or corpus["train"]
    valid = corpus.get("valid_list") or corpus["valid"]
    return f"data.train_list={train} data.valid_list={valid} train.progress_bar=false"


def submit(cluster: Cluster, logs: Path, name: str, *sbatch_args: str, script: str | None = SBATCH,
           wrap: str | None = None, **env: str) -> subprocess.Popen:
    """`sbatch --wait` in the background; the first line it prints is the job id (--parsable)."""
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


def finish(cluster: Cluster, proc, timeout: float = JOB_TIMEOUT_S) -> Job:
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.monotonic() - proc.t0)))
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", str(proc.job_id)], env=cluster.env, timeout=60)
        proc.wait(60)
        out, err = read_logs(proc)
        raise AssertionError(f"job {proc.job_id} did not end within {timeout:.0f} s\n{out[-4000:]}\n{err[-4000:]}")
    elapsed = time.monotonic() - proc.t0
    out, err = read_logs(proc)
    return Job(proc.job_id, rc, out, err, elapsed)


def run(cluster: Cluster, logs: Path, name: str, *sbatch_args: str, **env: str) -> Job:
    job = finish(cluster, submit(cluster, logs, name, *sbatch_args, **env))
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


def test_two_nodes_one_cpu_rank_each(cluster, demo_corpus, tmp_path):
    """The issue's command: 2 nodes, no GPUs, the demo recipe; a few steps."""
    run_dir = tmp_path / "run"
    job = run(cluster, tmp_path / "logs", "mf2-two-nodes", "--nodes=2", "--gpus-per-node=0",
              f"--export=ALL,RECIPE={DEMO}", RUN_DIR=str(run_dir),
              EXTRA_ARGS=f"{corpus_args(demo_corpus)} train.max_steps=4 train.log_interval_steps=1")
    assert job.rc == 0, job.show()
    nodes = task_nodes(job.out)
    assert nodes == {("0", "node1"), ("1", "node2")}, f"both nodes must take part: {nodes}\n{job.show()}"
    assert "SLURM_RESTART_COUNT=0" in job.out and "world 2, cpu" in job.out
    plan = plan_of(run_dir)
    assert plan["world_size"] == 2 and (plan["num_nodes"], plan["gpus_per_node"]) == (2, 1)
    assert "× 2 =" in job.out, "the plan card names the world of 2"
    assert "host node1 world 2 (2×1) via slurm" in (run_dir / "command.txt").read_text()
    assert train_steps(run_dir) == [1, 2, 3, 4]
    # The demo recipe holds its global batch of 16: 4 per rank × accumulation 2 × 2 ranks.
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["global_batch"]) == (4, 2, 16)


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
    assert plan1["global_batch"] == plan2["global_batch"] == 16
    assert plan1["peak_lr"] == plan2["peak_lr"]
    assert plan1["accumulation_steps"] == 2 * plan2["accumulation_steps"]
    assert "4 × 4 × 1 = 16" in second, "the second run's plan card shows the world of 1"
    assert re.search(rf"step{step:08d}: step {step}\b.*world 2 → 1", second), job.show()
    assert train_steps(run_dir) == list(range(1, max_steps + 1)), train_steps(run_dir)
    # Warmup lasts 10 steps: the LR keeps rising across the restart instead of starting over.
    lrs = [r["lr"] for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "train"][:10]
    assert lrs == sorted(set(lrs)), f"the LR schedule did not continue: {lrs}"


@pytest.mark.parametrize(
    "case, sbatch_args, env, expect",
    [
        # 3 ranks per node: the demo recipe's global batch of 16 cannot be split over 6 ranks.
        ("plan", ["--nodes=2", "--gpus-per-node=0"], {"RANKS_PER_NODE": "3"},
         r"cannot be split over 6 GPUs[\s\S]*Valid choices"),
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
    env = {"RECIPE": DEMO, "RUN_DIR": str(tmp_path / "run"), "EXTRA_ARGS": corpus_args(demo_corpus), **env}
    job = run(cluster, tmp_path / "logs", f"mf2-preflight-{case}", *sbatch_args, **env)
    assert job.rc == 2, job.show()
    assert re.search(expect, job.err), job.show()
    assert job.elapsed_s < PREFLIGHT_LIMIT_S, f"took {job.elapsed_s:.0f} s\n{job.show()}"
    assert "requeueing job" not in job.out and "SLURM_RESTART_COUNT=1" not in job.out


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
