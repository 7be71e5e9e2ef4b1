"""The dry run `python -m launcher.plan`: card, JSON, exit codes, stderr-only errors, no torch."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_dry_run as run

from launcher.config import load_config
from launcher.dry_run import add_plan_arguments, plan_from_args
from launcher.plan import Plan, PlanError

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/train_48k.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)


def test_reference_defaults_card(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--dataset_size", "1000")
    assert rc == 0 and err == ""
    assert "4 × 2 × 2 = 16 samples per update" in out
    assert "5e-4 × 16/16 = 5e-4 (linear)" in out
    assert "1000 // 16 = 62 optimizer steps" in out
    assert "16 × 4 s = 64 s" in out
    assert "recipe effec_batch_size=8 at 1×2 GPUs, global batch held" in out


def test_no_arguments_is_the_reference(capsys) -> None:
    rc, out, _ = run(capsys)
    assert rc == 0 and "4 × 2 × 2 = 16 samples per update" in out


def test_bs12_with_the_reference_recipe_is_the_story(capsys) -> None:
    rc, out, err = run(capsys, "--ds_config", "ds_configs/bs12.json", "--config", RECIPE)
    assert rc == 2 and out == ""
    assert err.startswith("error: effec_batch_size 8 is not a positive multiple of batch_size 12")
    assert "12, 24, 36" in err and "1, 2, 4, 8" in err
    assert "--effec_batch_size 12" in err and "--global_batch" in err
    assert "comes from ds_configs/bs12.json" in err
    assert "Traceback" not in err


def test_bs12_card(capsys) -> None:
    rc, out, err = run(capsys, "--ds_config", "ds_configs/bs12.json", "--config", RECIPE, "--num_gpus", "4",
                       "--effec_batch_size", "24", "--dataset_size", "10000", "--set", "optim.warmup_samples=1000")
    assert rc == 0, err
    assert "12 × 2 × 4 = 96 samples per update" in out
    assert "5e-4 × 96/16 = 3e-3 (linear)" in out
    assert "1000 samples → 11 optimizer steps" in out
    assert "10000 // 96 = 104 optimizer steps" in out
    assert "command line effec_batch_size=24" in out
    assert "micro-batch 12 from ds_configs/bs12.json" in out


def test_json(capsys) -> None:
    rc, out, err = run(capsys, "--ds_config", "ds_configs/bs12.json+ds_configs/zero3.json", "--config", RECIPE,
                       "--num_nodes", "2", "--num_gpus", "2", "--global_batch", "96", "--json")
    assert rc == 0 and err == ""
    d = json.loads(out)
    assert {k: d[k] for k in ("world_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                              "train_batch_size", "base_lr", "reference_batch", "lr_rule")} == {
        "world_size": 4, "train_micro_batch_size_per_gpu": 12, "gradient_accumulation_steps": 2,
        "train_batch_size": 96, "base_lr": 5e-4, "reference_batch": 16, "lr_rule": "linear"}
    assert d["lr"] == pytest.approx(3e-3)
    ds = d["ds_config"]
    assert ds["zero_optimization"]["stage"] == 3 and ds["optimizer"]["params"]["lr"] == d["lr"]
    assert {k: ds[k] for k in ("train_batch_size", "train_micro_batch_size_per_gpu",
                               "gradient_accumulation_steps")} == {
        "train_batch_size": 96, "train_micro_batch_size_per_gpu": 12, "gradient_accumulation_steps": 2}
    plan = Plan.from_dict({k: v for k, v in d.items() if k not in ("ds_config", "ds_config_spec", "recipe")})
    assert plan.global_batch == 96


@pytest.mark.parametrize("argv, expected", [
    (["--num_gpus", "4", "--hold", "accumulation"], ("4 × 2 × 4 = 32 samples per update", "= 1e-3 (linear)")),
    (["--num_gpus", "4"], ("4 × 1 × 4 = 16 samples per update", "= 5e-4 (linear)")),
    (["--global_batch", "64", "--lr_rule", "sqrt"], ("4 × 8 × 2 = 64", "5e-4 × √(64/16) = 1e-3 (sqrt)")),
    (["--accu_grad", "0"], ("4 × 1 × 2 = 8", "2.5e-4")),
    (["--gradient_accumulation_steps", "3"], ("4 × 3 × 2 = 24", "command line gradient_accumulation_steps=3")),
    (["--batch_size", "2"], ("2 × 4 × 2 = 16", "micro-batch 2 from --batch_size")),
    (["--ds_config", "bs12.json", "--set", "batch.effec_batch_size=24"], ("12 × 2 × 2 = 48", "5e-4 × 48/16 = 1.5e-3")),
    (["--set", "batch.global_batch=32", "--set", "batch.accu_grad=null", "--set", "batch.effec_batch_size=null",
      "--num_gpus", "4"], ("4 × 2 × 4 = 32", "recipe global_batch=32 at 1×2 GPUs, global batch held")),
])
def test_flags(capsys, argv: list[str], expected: tuple[str, ...]) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, *argv)
    assert rc == 0, err
    for text in expected:
        assert text in out


@pytest.mark.parametrize("argv, message", [
    (["--ds_config", "ds_configs/bs12.json", "--batch_size", "4"],
     "ds_configs/bs12.json promises train_micro_batch_size_per_gpu 12 but --batch_size says 4"),
    (["--ds_config", "ds_configs/bs12.json", "--set", "batch.batch_size=4"],
     "promises train_micro_batch_size_per_gpu 12 but the override batch.batch_size says 4"),
    (["--num_gpus", "3"], "world sizes that can hold 16 at batch_size 4: 1, 2, 4"),
    (["--num_nodes", "3", "--num_gpus", "4"], "cannot be split over 12 GPUs"),
    (["--effec_batch_size", "6"], "6 is not a positive multiple of batch_size 4"),
    (["--effec_batch_size", "8", "--gradient_accumulation_steps", "3"], "disagree"),
    (["--set", "batch.global_batch=32", "--set", "batch.gradient_accumulation_steps=3"], "disagree"),
    (["--ds_config", "ds_configs/nope.json"], "'ds_configs/nope.json' not found"),
    (["--ds_config", "bf16.json+fp16.json"], "bf16 and fp16 are both enabled"),
    (["--set", "batch.bogus=1"], "unknown key(s) bogus"),
    (["--set", "batch.batch_size=four"], "expected an integer"),
    (["--config", "recipes/missing.yaml"], "cannot read recipe"),
    (["--dataset_size", "10"], "dataset_size 10 is smaller than one optimizer update of 16"),
    (["--batch_size", "0"], "batch_size must be at least 1"),
])
def test_bad_input_exits_2_with_the_message_on_stderr(capsys, argv: list[str], message: str) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, *argv)
    assert rc == 2 and out == ""
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv", [["--accu_grad", "2"], ["--batch_size", "x"], ["--lr_rule", "cubic"],
                                  ["--bogus"]])
def test_bad_flags_exit_2(capsys, argv: list[str]) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == "" and "usage:" in err


def test_shared_flags_for_the_training_entry_point() -> None:
    """launcher/train.py adds its own --ds_config and positional overrides, then the shared flags."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--ds_config", required=True)
    add_plan_arguments(parser)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(["--ds_config", "ds_configs/bs12.json", "--effec_batch_size", "24", "--num_gpus", "8"])
    cfg = load_config(RECIPE)
    plan, ds = plan_from_args(args, cfg, 2, 4, dataset_size=5000)  # the world training runs in
    assert (plan.micro_batch, plan.accumulation_steps, plan.world_size, plan.global_batch) == (12, 2, 8, 192)
    assert plan.steps_per_epoch == 26 and ds["train_batch_size"] == 192
    plan, _ = plan_from_args(args, cfg, None, None)  # dry run: --num_gpus 8 on the recipe's 1 node
    assert (plan.num_nodes, plan.gpus_per_node) == (1, 8)
    args = parser.parse_args(["--ds_config", "bs12.json", "batch.batch_size=4"])
    with pytest.raises(PlanError, match="but the override batch.batch_size says 4"):
        plan_from_args(args, load_config(RECIPE, args.overrides), 1, 2)


def _python(*argv: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60, **kw)


def test_module_entry_point_exit_codes() -> None:
    bad = _python("-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json", "--config", RECIPE)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.startswith("error: effec_batch_size 8 is not a positive multiple of batch_size 12")
    assert "Traceback" not in bad.stderr
    good = _python("-m", "launcher.plan", "--config", RECIPE, "--json")
    assert good.returncode == 0 and good.stderr == ""
    assert json.loads(good.stdout)["train_batch_size"] == 16


def test_imports_neither_torch_nor_deepspeed_and_is_fast() -> None:
    argv = ["-X", "importtime", "-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json+ds_configs/zero3.json",
            "--config", RECIPE, "--num_gpus", "4", "--effec_batch_size", "24"]
    proc = _python(*argv)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "launcher.plan_card" in imported and "rich" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "numpy", "torchaudio"))
    assert heavy == []
    best = min(_timed(argv[2:]) for _ in range(2))
    assert best < 2.0, f"dry run took {best:.2f} s"


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = _python(*argv)
    assert proc.returncode == 0, proc.stderr
    return time.perf_counter() - start
