"""Fast checks of the launcher's small tools: preflight rules, checkpoint bookkeeping, report, export errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, train_env
from launcher.checkpoint.marker import CheckpointError, MARKER, complete_tags, resolve_resume, tag_for
from launcher.dist.env import read_dist_env
from launcher.dist.preflight import PreflightError, check_run_dir, check_world
from launcher.training.curves import draw, read_metrics


def test_world_must_match_slurm_allocation():
    env = read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2",
                         "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "2", "SLURM_NTASKS": "2", "SLURM_TASKS_PER_NODE": "2"}
    with pytest.raises(PreflightError, match="SLURM allocated 2 node"):
        check_world(env, slurm)
    check_world(env, {**slurm, "SLURM_NNODES": "1"})


def test_world_must_match_gpus_per_node_and_explicit_flags():
    env = read_dist_env({"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"})
    with pytest.raises(PreflightError, match="4 GPU"):
        check_world(env, {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "4"})
    check_world(env, {"SLURM_JOB_ID": "1", "SLURM_NNODES": "2", "SLURM_GPUS_PER_NODE": "0"})  # CPU ranks
    with pytest.raises(PreflightError, match="--num_nodes 3"):
        check_world(env, {}, requested_nodes=3)


def test_run_dir_must_be_writable(tmp_path):
    check_run_dir(tmp_path / "new", create=True)
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # a path under a regular file cannot be created, even by root
    with pytest.raises(PreflightError, match="not writable"):
        check_run_dir(blocker / "run", create=True)
    with pytest.raises(PreflightError, match="not writable"):
        check_run_dir(tmp_path / "missing", create=False)


def test_only_complete_tags_are_resumed(tmp_path):
    ck = tmp_path / "checkpoints"
    for step, complete in [(10, True), (20, True), (30, False)]:
        (ck / tag_for(step)).mkdir(parents=True)
        if complete:
            (ck / tag_for(step) / MARKER).write_text("{}")
    assert complete_tags(ck) == ["step00000010", "step00000020"]
    assert resolve_resume("auto", ck) == (ck, "step00000020")  # the interrupted save at 30 is ignored
    assert resolve_resume("auto", tmp_path / "none") is None
    assert resolve_resume(str(tmp_path), ck) == (ck, "step00000020")  # a run directory
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_resume(str(ck / "step00000030"), ck)


def test_report_draws_runs_against_samples_seen(tmp_path):
    for name, scale in [("a", 1.0), ("b", 1.1)]:
        run = tmp_path / name
        run.mkdir()
        lines = [{"kind": "train", "step": s, "samples_seen": 16 * s, "loss": scale / s} for s in range(1, 6)]
        lines += [{"kind": "valid", "step": 5, "samples_seen": 80, "loss": 0.3, "si_snr_db": 4.0}]
        lines += [{"kind": "train", "step": 5, "samples_seen": 80, "loss": 0.1}]  # a resumed run re-logs step 5
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
        (run / "plan.json").write_text(json.dumps({"micro_batch": 4, "accumulation_steps": 2, "world_size": 2,
                                                   "global_batch": 16, "peak_lr": 5e-4}))
    assert [r["loss"] for r in read_metrics(tmp_path / "a") if r["kind"] == "train"][-1] == 0.1
    out = draw([tmp_path / "a", tmp_path / "b"], tmp_path / "curves.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_and_export_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "launcher.report", str(tmp_path)], cwd=ROOT, env=train_env(),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "no metrics.jsonl" in r.stderr
    e = subprocess.run([sys.executable, "-m", "launcher.export", str(tmp_path), str(tmp_path / "o.pt")], cwd=ROOT,
                       env=train_env(), capture_output=True, text=True, timeout=120)
    assert e.returncode == 2 and "no complete checkpoint" in e.stderr


