"""The training entry point for real: `deepspeed launcher/train.py`, 2 CPU ranks, tiny preset.

Each test launches DeepSpeed's own launcher in a subprocess, exactly as a user would, and checks
what the run leaves behind: metrics.jsonl, the run record and the checkpoints.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, deepspeed_cmd, free_port, read_jsonl, run_deepspeed, train_env

pytestmark = pytest.mark.slow

DEMO = "recipes/demo_cpu.yaml"


def demo_args(corpus: dict, run_dir: Path, *extra: str, ds: str = "ds_configs/bs4.json") -> list[str]:
    return ["--ds_config", ds, "--config", DEMO, "--run_dir", str(run_dir),
            f"data.train_list={corpus['train_list']}", f"data.valid_list={corpus['valid_list']}",
            "train.progress_bar=false", "data.num_workers=0", *extra]


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-6000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    return proc


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == kind]


def exported(run_dir: Path, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-m", "launcher.export", str(run_dir), str(out)], cwd=ROOT,
                          env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return torch.load(out, weights_only=True)["model"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stages_train_with_falling_loss_and_ranks_in_sync(demo_corpus, tmp_path, stage):
    run_dir = tmp_path / f"zero{stage}"
    ok(run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_steps=16", "train.log_interval_steps=1",
                                "data.valid_list=none", ds=f"ds_configs/bs4.json+ds_configs/zero{stage}.json")))
    train = records(run_dir, "train")
    losses = [r["loss"] for r in train]
    assert len(losses) == 16 and all(map(lambda x: x == x and abs(x) < 1e6, losses))
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < first, f"loss did not fall: {losses}"
    end = records(run_dir, "end")[-1]
    plan = json.loads((run_dir / "plan.json").read_text())
    # 4 per rank × accumulation 2 × 2 ranks: every optimizer step consumed exactly `accum` micro-batches.
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["world_size"]) == (4, 2, 2)
    assert end["step"] == 16 and end["micro_steps"] == 16 * plan["accumulation_steps"]
    assert end["samples_seen"] == 16 * plan["global_batch"]
    a, b = end["param_fingerprints"]
    assert a == b, f"ranks disagree on the parameters: {a} vs {b}"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 16


def test_optimizer_steps_per_epoch_match_the_plan(demo_corpus, tmp_path):
    run_dir = tmp_path / "epoch"
    ok(run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_epoch=1", "train.log_interval_steps=1")))
    plan = json.loads((run_dir / "plan.json").read_text())
    end = records(run_dir, "end")[-1]
    assert plan["steps_per_epoch"] and end["step"] == plan["steps_per_epoch"]
    assert end["micro_steps"] == plan["steps_per_epoch"] * plan["accumulation_steps"]
    valid = records(run_dir, "valid")
    assert len(valid) == 1 and valid[0]["loss"] == valid[0]["loss"] and "si_snr_db" in valid[0]
    for name in ("config.yaml", "plan.json", "ds_config.json", "revision.txt"):
        assert (run_dir / name).is_file()


def test_reference_failure_is_refused_before_any_process_group(demo_corpus, tmp_path):
    # The story, typed: 12 per GPU with effec_batch_size 8 never steps in the reference.
    proc = run_deepspeed(*demo_args(demo_corpus, tmp_path / "r", "--accu_grad", "1", "--effec_batch_size", "8",
                                    ds="ds_configs/bs12.json"), timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "8 is not a positive multiple of 12" in out
    assert "Check batch related parameters" not in out  # never DeepSpeed's own assertion
    assert "Initializing TorchBackend" not in out and not (tmp_path / "r" / "checkpoints").exists()


def test_the_mission_line_as_written_plans_then_stops_before_the_process_group(tmp_path):
    """`deepspeed --num_gpus 2 launcher/train.py --ds_config ds_configs/bs12.json`: no recipe, so the built-in
    defaults, which name no training list. It plans 12 × 2 × 2 = 48 and stops with one error line."""
    proc = subprocess.run(deepspeed_cmd("--ds_config", "ds_configs/bs12.json", "--run_dir", str(tmp_path / "r")),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "12 × 2 × 2 = 48 samples per update" in proc.stdout
    assert proc.stderr.count("error: data.train_list is not set (the built-in defaults have none)") == 1
    assert "Traceback" not in out and "Initializing TorchBackend" not in out


def test_the_mission_line_trains_on_the_demo_corpus(demo_corpus, tmp_path):
    """The same launch with the demo corpus and the tiny model: the built-in defaults' accumulation (8 samples per
    GPU at batch_size 4: 2 micro-batches) kept at the preset's 12, on the 2 ranks the launcher started."""
    run_dir = tmp_path / "bs12"
    ok(run_deepspeed("--ds_config", "ds_configs/bs12.json", "--run_dir", str(run_dir), "model.preset=tiny",
                     f"data.train_list={demo_corpus['train_list']}", "data.segment_seconds=1.0", "data.num_workers=0",
                     "train.max_steps=2", "train.progress_bar=false", "train.log_interval_steps=1"))
    plan = json.loads((run_dir / "plan.json").read_text())
    assert (plan["micro_batch"], plan["accumulation_steps"], plan["world_size"], plan["global_batch"]) == (12, 2, 2, 48)
    assert plan["peak_lr"] == pytest.approx(1.5e-3) and plan["warmup_from_lr"] == 5e-4
    assert plan["sources"]["world_size"] == "the launcher (deepspeed or torchrun: WORLD_SIZE, LOCAL_WORLD_SIZE)"
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [1, 2]
    # The warmup starts from base_lr (Goyal et al.), not from 0.
    assert 5e-4 < train[0]["lr"] < 5e-4 + (1.5e-3 - 5e-4) / plan["warmup_steps"] * 1.001
    end = records(run_dir, "end")[-1]
    assert end["micro_steps"] == 4 and end["samples_seen"] == 96


@pytest.mark.parametrize("extra, preset, message", [
    (("train.max_epoch=-3",), None, "error: command line 'train.max_epoch=-3': train.max_epoch must be >= 1, got -3"),
    ((), {"zero_optimization": {"stage": 7}}, "zero_optimization.stage is 7; valid ZeRO stages: 0, 1, 2, 3"),
    # Past the dry run's own checks: only DeepSpeed's config model knows the range of a bucket size.
    ((), {"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}},
     "DeepSpeed 0.19.8 refuses zero_optimization.reduce_bucket_size = -5: Input should be greater than 0"),
])
def test_bad_config_is_one_error_line_before_any_process_group(demo_corpus, tmp_path, extra, preset, message):
    ds = "ds_configs/bs4.json"
    if preset is not None:
        (tmp_path / "bad.json").write_text(json.dumps(preset))
        ds += f"+{tmp_path / 'bad.json'}"
    proc = run_deepspeed(*demo_args(demo_corpus, tmp_path / "r", *extra, ds=ds), timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and message in errors[0], proc.stderr[-3000:]  # rank 0 only, one line
    if preset is not None:
        assert errors[0].startswith(f"error: {tmp_path / 'bad.json'}: ")  # the file to fix
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out and "Initializing TorchBackend" not in out


def test_dry_run_needs_no_process_group(demo_corpus):
    code = ("import sys; from launcher.train import main; "
            f"rc = main(['--dry_run', '--ds_config', 'ds_configs/bs4.json', '--config', '{DEMO}', "
            f"'data.train_list={demo_corpus['train_list']}']); "
            "import torch.distributed as d; assert not (d.is_available() and d.is_initialized()); "
            "assert 'deepspeed' not in sys.modules, 'dry run imported deepspeed'; sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=train_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "4 × 2 × 2 = 16" in proc.stdout


def test_resume_is_exact(demo_corpus, tmp_path):
    common = ("train.log_interval_steps=1", "data.valid_list=none")
    straight = tmp_path / "straight"
    ok(run_deepspeed(*demo_args(demo_corpus, straight, "train.max_steps=6", *common)))
    split = tmp_path / "split"
    ok(run_deepspeed(*demo_args(demo_corpus, split, "train.max_steps=3", *common)))
    proc = ok(run_deepspeed(*demo_args(demo_corpus, split, "train.max_steps=6", "--resume", "auto", *common)))
    assert "[resume]" in proc.stdout and "step 3" in proc.stdout
    a = exported(straight, tmp_path / "a.pt")
    b = exported(split, tmp_path / "b.pt")
    assert a.keys() == b.keys()
    # Same data, same RNG streams, same optimizer state: the runs agree to float32 rounding. (Bitwise
    # equality was seen in isolated runs; on a loaded machine a ~1e-8 relative drift appeared once,
    # after the second step past the resume — see the issue notes.)
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point()}
    assert max(diffs.values()) <= 1e-6, sorted(diffs.items(), key=lambda kv: -kv[1])[:5]
    # The straight and resumed runs logged the same losses for the same steps.
    la = {r["step"]: r["loss"] for r in records(straight, "train")}
    lb = {r["step"]: r["loss"] for r in records(split, "train")}
    assert la.keys() == lb.keys() == set(range(1, 7))
    assert all(abs(la[k] - lb[k]) <= 1e-6 * abs(la[k]) for k in la), (la, lb)


def test_a_checkpoint_of_the_earlier_layout_resumes_exactly(demo_corpus, tmp_path):
    """tests/data/checkpoint_669dc01 was written by launcher/train.py before launcher/ became packages (main
    669dc01, ZeRO 1, step 2 of 4; expected.json holds that run's own steps 3-4 and end). Resumed by today's code it
    trains the same steps to the same losses and parameters."""
    import shutil

    old = ROOT / "tests" / "data" / "checkpoint_669dc01"
    expected = json.loads((old / "expected.json").read_text())
    run_dir = tmp_path / "old"
    shutil.copytree(old / "step00000002", run_dir / "checkpoints" / "step00000002")
    proc = ok(run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_steps=4", "train.save_interval_steps=2",
                                       "train.keep_last=5", "train.log_interval_steps=1", "data.valid_list=none",
                                       "--resume", "auto", ds="ds_configs/bs4.json+ds_configs/zero1.json")))
    assert "[resume]" in proc.stdout and "step 2" in proc.stdout
    got = records(run_dir, "train")
    assert [r["step"] for r in got] == [3, 4]
    for want, have in zip(expected["steps_3_4"], got):
        for key in ("loss", "lr", "grad_norm"):
            assert have[key] == pytest.approx(want[key], rel=1e-6, abs=0), (key, want, have)
        assert have["samples_seen"] == want["samples_seen"]
    end = records(run_dir, "end")[-1]
    assert (end["step"], end["samples_seen"]) == (4, 64)  # (DeepSpeed does not restore its micro_steps count)
    for want, have in zip(expected["end"]["param_fingerprints"], end["param_fingerprints"]):
        assert have == pytest.approx(want, rel=1e-9), (want, have)


def test_resume_on_fewer_ranks_keeps_global_batch_lr_and_cursor(demo_corpus, tmp_path):
    run_dir = tmp_path / "shrink"
    common = ("train.log_interval_steps=1", "data.valid_list=none")
    ds = "ds_configs/bs4.json+ds_configs/zero2.json"
    ok(run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_steps=3", *common, ds=ds)))
    plan2 = json.loads((run_dir / "plan.json").read_text())
    ckpt = run_dir / "checkpoints" / "step00000003"
    before = json.loads((ckpt / "COMPLETE.json").read_text())
    proc = ok(run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_steps=5", "--resume", "auto", *common, ds=ds),
                            nproc=1))
    plan1 = json.loads((run_dir / "plan.json").read_text())
    assert plan1["world_size"] == 1 and plan2["world_size"] == 2
    assert plan1["global_batch"] == plan2["global_batch"] and plan1["peak_lr"] == plan2["peak_lr"]
    assert plan1["accumulation_steps"] == 2 * plan2["accumulation_steps"]
    assert "universal" in proc.stdout
    assert "global batch 16 held from checkpoint" in " ".join(proc.stdout.replace("│", " ").split())
    assert plan1["resumed_from"] == f"checkpoint {run_dir / 'checkpoints' / 'step00000003'}"
    assert plan1["sources"]["global_batch"].startswith(f"held from {plan1['resumed_from']}")
    after = json.loads((run_dir / "checkpoints" / "step00000005" / "COMPLETE.json").read_text())
    cursor_before = before["state"]["sampler"]["cursor"]
    assert after["state"]["sampler"]["cursor"] == cursor_before + 2 * plan1["global_batch"] or \
        after["state"]["sampler"]["epoch"] > before["state"]["sampler"]["epoch"]
    steps = [r["step"] for r in records(run_dir, "train")]
    assert steps[-2:] == [4, 5]
    # An explicit batch that contradicts the checkpoint is refused before any process group, with the numbers.
    proc = run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_steps=7", "--resume", "auto",
                                    "--global_batch", "32", *common, ds=ds), nproc=1, timeout=300)
    assert proc.returncode != 0 and "Initializing TorchBackend" not in proc.stdout + proc.stderr
    assert "command line global_batch=32 means 32 samples per update, but this run resumes checkpoint " in proc.stderr
    assert "which was trained with a global batch of 16" in proc.stderr


def test_export_loads_into_a_plain_model(demo_corpus, tmp_path):
    from model import build_model, load_reference_checkpoint

    run_dir = tmp_path / "z3"
    ok(run_deepspeed(*demo_args(demo_corpus, run_dir, "train.max_steps=2", "data.valid_list=none",
                                ds="ds_configs/bs4.json+ds_configs/zero3.json")))
    state = exported(run_dir, tmp_path / "out.pt")
    assert all(k.startswith("mossformer.") for k in state)
    model = build_model("tiny")
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_reference_checkpoint(model, tmp_path / "out.pt")
    # ZeRO-3 must not silently load nothing: the trained weights differ from a fresh init.
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, fresh[k])]
    assert changed


def test_nonfinite_steps_are_skipped_then_abort(demo_corpus, tmp_path):
    import numpy as np
    import soundfile as sf

    # Float WAVs holding NaN pass header validation (as corrupt float files do in real corpora).
    bad = tmp_path / "bad"
    bad.mkdir()
    lines = []
    for i in range(16):
        x = np.full(48000, np.nan, dtype=np.float32)
        sf.write(bad / f"n{i}.wav", x, 48000, subtype="FLOAT")
        sf.write(bad / f"c{i}.wav", np.zeros(48000, np.float32), 48000, subtype="FLOAT")
        lines.append(f"n{i}.wav c{i}.wav 1.0")
    (bad / "train.lst").write_text("\n".join(lines) + "\n")
    run_dir = tmp_path / "nan"
    proc = run_deepspeed(*demo_args({"train_list": str(bad / "train.lst"), "valid_list": "none"}, run_dir,
                                    "train.max_steps=20", "train.max_consecutive_nonfinite=3", "train.max_epoch=50"))
    assert proc.returncode != 0
    assert "3 consecutive optimizer steps were skipped for a non-finite loss" in proc.stdout + proc.stderr


def adam_step_counts(tag_dir: Path) -> set[int]:
    """The step count of every Adam state in a DeepSpeed tag, whatever its ZeRO stage and precision."""
    found = set()

    def walk(obj) -> None:
        if isinstance(obj, dict):
            if "exp_avg" in obj and "step" in obj:
                found.add(int(obj["step"]))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    for f in tag_dir.glob("*.pt"):
        walk(torch.load(f, map_location="cpu", weights_only=False))
    return found


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (3, "fp32"), (2, "bf16")])
def test_a_nonfinite_micro_batch_on_one_rank_skips_exactly_its_step_on_every_rank(demo_corpus, tmp_path, stage,
                                                                                   precision):
    import numpy as np
    import soundfile as sf

    from data import CursorSampler

    # The demo corpus plus three float WAVs full of NaN (they pass header validation, as corrupt float files do).
    corpus = Path(demo_corpus["dir"])
    lines = [f"{corpus / n} {corpus / c}" for n, c, *_ in
             (line.split() for line in Path(demo_corpus["train_list"]).read_text().splitlines() if not line.startswith("#"))]
    for k in range(3):
        sf.write(tmp_path / f"nan{k}.wav", np.full(48000, np.nan, np.float32), 48000, subtype="FLOAT")
        sf.write(tmp_path / f"zero{k}.wav", np.zeros(48000, np.float32), 48000, subtype="FLOAT")
        lines.insert(40 * (k + 1), f"{tmp_path / f'nan{k}.wav'} {tmp_path / f'zero{k}.wav'}")
    bad = {i for i, line in enumerate(lines) if "nan" in line.split()[0].rsplit("/", 1)[-1]}
    (tmp_path / "mixed.lst").write_text("\n".join(lines) + "\n")

    # Which optimizer steps hold a NaN pair, and on which ranks: micro 4 × accumulation 2 × 2 ranks, seed 777.
    steps, expected, one_rank_only = 20, set(), 0
    samplers = [CursorSampler(len(lines), 4, rank, 2, seed=777, epoch_quantum=16) for rank in (0, 1)]
    step = 0
    for epoch in range(3):
        per_rank = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            per_rank.append([{i for i, _ in batch} for batch in sampler])
        for k in range(len(per_rank[0]) // 2):
            step += 1
            hit = [bool(bad & (r[2 * k] | r[2 * k + 1])) for r in per_rank]
            if step <= steps and any(hit):
                expected.add(step)
                one_rank_only += sum(hit) == 1
    assert expected and one_rank_only, "the corpus must put a NaN pair on one rank only within the first steps"

    ds = "ds_configs/bs4.json" + (f"+ds_configs/zero{stage}.json" if stage != 3 else "")
    ds += "+ds_configs/bf16.json" if precision == "bf16" else ""
    if stage == 3:
        # Every parameter partitioned (the tiny model's are all below the default persistence threshold) and
        # released after each use (else the whole tiny model stays gathered from forward to backward), so that
        # each forward gathers collectively: an extra forward on one rank only would desynchronise the ranks.
        (tmp_path / "persist0.json").write_text(json.dumps({"zero_optimization": {
            "stage3_param_persistence_threshold": 0, "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}}))
        ds += f"+ds_configs/zero3.json+{tmp_path / 'persist0.json'}"
    run_dir = tmp_path / "mixed"
    ok(run_deepspeed(*demo_args({"train_list": str(tmp_path / "mixed.lst"), "valid_list": "none"}, run_dir,
                                f"train.max_steps={steps}", "train.log_interval_steps=1",
                                "train.max_consecutive_nonfinite=100", "train.max_epoch=50", ds=ds),
                     timeout=400, MF2_COLLECTIVE_TIMEOUT_S="120"))
    train = records(run_dir, "train")
    skipped = {r["step"] for r in train if r["lr"] == 0.0}
    assert skipped == expected
    assert all(r["loss"] == r["loss"] for r in train), "a skipped micro-batch leaked into the logged loss"
    nonfinite = records(run_dir, "nonfinite")
    assert {r["step"] for r in nonfinite} == expected and {r["reason"] for r in nonfinite} == {"non-finite loss"}
    end = records(run_dir, "end")[-1]
    assert end["skipped_steps"] == end["nonfinite_steps"] == len(expected) and end["step"] == steps
    a, b = end["param_fingerprints"]
    assert a == b and all(x == x for x in a), f"ranks disagree or hold NaN: {a} vs {b}"
    # The NaN micro-batches were backpropagated, yet no skipped step reached Adam: it counted only the others.
    assert adam_step_counts(run_dir / "checkpoints" / f"step{steps:08d}") == {steps - len(expected)}


def test_a_run_leaves_no_shared_memory_behind(demo_corpus, tmp_path):
    # DeepSpeed's CPU all-reduce creates one 66 MB /dev/shm segment per rank, named after the port, and never
    # removes it; the launcher unlinks the names once every rank has mapped them (launcher/dist/group.py).
    port = free_port()
    pattern = f"deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"
    proc = subprocess.run(deepspeed_cmd(*demo_args(demo_corpus, tmp_path / "shm", "train.max_steps=2",
                                                   "data.valid_list=none"), port=port),
                          cwd=ROOT, env=train_env(), capture_output=True, text=True, timeout=600)
    ok(proc)
    assert not sorted(Path("/dev/shm").glob(pattern)), "shared-memory segments left behind"


def test_a_killed_rank_ends_the_job_promptly(demo_corpus, tmp_path):
    run_dir = tmp_path / "kill"
    proc = subprocess.Popen(deepspeed_cmd(*demo_args(demo_corpus, run_dir, "train.max_steps=100000",
                                                     "train.log_interval_steps=1", "data.valid_list=none")),
                            cwd=ROOT, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.5)
        while time.time() < deadline and not records(run_dir, "train"):
            time.sleep(0.5)
        assert records(run_dir, "train"), "training never started"
        ranks = subprocess.run(["pgrep", "-f", f"launcher/train.py.*--local_rank=1.*{run_dir}"],
                               capture_output=True, text=True).stdout.split()
        if not ranks:
            ranks = subprocess.run(["pgrep", "-f", "launcher/train.py --local_rank=1"], capture_output=True,
                                   text=True).stdout.split()
        assert ranks, "rank 1 not found"
        killed_at = time.time()
        os.kill(int(ranks[0]), signal.SIGKILL)
        rc = proc.wait(timeout=60)
        assert rc != 0 and time.time() - killed_at < 60
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
