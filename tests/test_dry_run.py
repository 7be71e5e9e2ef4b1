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
from launcher.plan.request import add_plan_arguments, plan_from_args
from launcher.plan import Plan, PlanError

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/train_48k.yaml"


EXPLICIT_12_8 = """\
error: effec_batch_size 8 is not a positive multiple of batch_size 12 (command line: accu_grad 1, effec_batch_size 8; batch_size 12).
Rule: effec_batch_size must be a positive multiple of batch_size, and 8 is not a positive multiple of 12: with accu_grad 1 each GPU accumulates effec_batch_size / batch_size micro-batches per optimizer update, which must be a whole number; 8/12 = 0.667 is not (the reference then never steps the optimizer).
Valid choices:
  valid effec_batch_size values (multiples of 12): 12, 24, 36, …  e.g. --effec_batch_size 12
  valid batch_size values (divisors of 8): 1, 2, 4, 8
  or give the global batch directly (multiples of 12 × 2 GPUs): --global_batch 24, 48, 72
"""


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)


def flat(card: str) -> str:
    """The card's text with the panel's borders removed and wrapped lines joined, to search for whole phrases."""
    return " ".join(" ".join(line.strip("│╭╮╰╯─ ").split()) for line in card.splitlines())


def test_reference_defaults_card(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--dataset_size", "1000")
    assert rc == 0 and err == ""
    out = flat(out)
    assert "4 × 2 × 2 = 16 samples per update" in out
    assert "5e-4 × 16/16 = 5e-4 (linear)" in out
    assert "1000 // 16 = 62 optimizer steps" in out
    assert "16 × 4 s = 64 s" in out
    assert ("accumulation 2 — derived: effec_batch_size=8 in recipe recipes/train_48k.yaml at its batch_size 4 = 2 "
            "micro-batches per update") in out
    assert "warmup none — automatic: none, the LR is not raised above base_lr (k = 1)" in out
    assert "warning" not in out


def test_no_arguments_is_the_reference(capsys) -> None:
    rc, out, _ = run(capsys)
    assert rc == 0 and "4 × 2 × 2 = 16 samples per update" in out


@pytest.mark.parametrize("recipe", [[], ["--config", RECIPE]])
def test_a_preset_micro_batch_keeps_the_recipes_accumulation(capsys, recipe: list[str]) -> None:
    """ds_configs/bs12.json on the recipe's 1 × 2 GPUs: 12 × 2 × 2 = 48 at 5e-4 × 48/16 (the README's example)."""
    rc, out, err = run(capsys, "--ds_config", "ds_configs/bs12.json", *recipe, "--dataset_size", "11572")
    assert rc == 0 and err == ""
    out = flat(out)
    where = f"recipe {RECIPE}" if recipe else "built-in defaults"
    assert "12 × 2 × 2 = 48 samples per update" in out
    assert f"micro-batch 12 — preset ds_configs/bs12.json (replaces batch_size 4 of {where})" in out
    assert (f"accumulation 2 — derived: effec_batch_size=8 in {where} at its batch_size 4 = 2 micro-batches per "
            f"update, kept at batch_size 12") in out
    assert "global batch 48 — derived: 12 × 2 × 2" in out
    assert "learning rate 1.5e-3 — derived: 5e-4 × 48/16 = 1.5e-3 (linear)" in out
    assert "k = 3 × base_lr" in out
    assert ("warmup 32000 samples → 667 optimizer steps (ceil(32000 / 48), 2.77 epochs), LR 5e-4 → 1.5e-3 — "
            "automatic at k = 3 > 1") in out
    assert "warning" not in out


@pytest.mark.parametrize("argv, expected", [
    (["--ds_config", "ds_configs/bs12.json", "--num_nodes", "2", "--num_gpus", "8"],
     ("12 × 2 × 16 = 384 samples per update", "5e-4 × 384/16 = 1.2e-2 (linear)", "√(384/16) = 2.4495e-3")),
    (["--ds_config", "ds_configs/bs4.json", "--config", RECIPE, "--num_nodes", "2", "--num_gpus", "8"],
     ("4 × 2 × 16 = 128 samples per update", "5e-4 × 128/16 = 4e-3 (linear)", "√(128/16) = 1.4142e-3")),
])
def test_large_worlds_scale_the_lr_warm_up_and_warn(capsys, argv: list[str], expected: tuple[str, ...]) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and err == ""
    out = flat(out)
    headline, lr, sqrt = expected
    assert headline in out and lr in out
    assert "world 16 (2 nodes × 8 GPUs) — command line --num_nodes 2 --num_gpus 8" in out
    assert "automatic at k =" in out and "LR 5e-4 →" in out
    assert "warning: the linear rule raises the LR" in out and f"--lr_rule sqrt gives 5e-4 × {sqrt}" in out
    rc, out, _ = run(capsys, *argv, "--json")
    d = json.loads(out)
    assert len(d["warnings"]) == 1 and d["warnings"][0].endswith(sqrt)
    assert d["sources"]["world_size"] == "command line --num_nodes 2 --num_gpus 8"
    assert d["sources"]["accumulation_steps"].startswith("derived: effec_batch_size=8 in ")
    assert d["warmup_samples"] == 32000 and d["warmup_from_lr"] == 5e-4


@pytest.mark.parametrize("argv", [
    ["--batch_size", "12", "--accu_grad", "1", "--effec_batch_size", "8"],
    ["--config", RECIPE, "--batch_size", "12", "--accu_grad", "1", "--effec_batch_size", "8"],
    ["--ds_config", "ds_configs/bs12.json", "--batch_size", "12", "--accu_grad", "1", "--effec_batch_size", "8"],
    ["--set", "batch.batch_size=12", "--set", "batch.accu_grad=1", "--set", "batch.effec_batch_size=8"],
])
def test_the_story_typed_on_the_command_line_is_refused_as_before(capsys, argv: list[str]) -> None:
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and out == ""
    assert err == EXPLICIT_12_8


def test_explicit_accumulation_is_checked_against_an_inherited_micro_batch(capsys) -> None:
    rc, out, err = run(capsys, "--ds_config", "ds_configs/bs12.json", "--effec_batch_size", "8")
    assert rc == 2 and out == ""
    assert err.startswith(EXPLICIT_12_8)
    assert "(batch_size 12 comes from ds_configs/bs12.json; for another batch_size pick a preset without a " \
           "micro-batch, e.g. ds_configs/base.json, and pass --batch_size)" in err


def test_a_recipe_that_contradicts_itself_is_refused_naming_it(capsys, tmp_path) -> None:
    story = tmp_path / "story.yaml"
    story.write_text("batch:\n  batch_size: 12\n  accu_grad: 1\n  effec_batch_size: 8\n")
    rc, out, err = run(capsys, "--config", str(story))
    assert rc == 2 and out == ""
    assert err.startswith(f"error: recipe {story}: effec_batch_size 8 is not a positive multiple of its "
                          f"batch_size 12")
    rc, out, err = run(capsys, "--config", str(story), "--global_batch", "48")  # the command line's way replaces it
    assert rc == 0 and "12 × 2 × 2 = 48" in out


def test_hold_global_batch_reproduces_the_recipe_exactly(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--num_gpus", "4",
                       "--hold", "global_batch")
    assert rc == 0, err
    out = flat(out)
    assert "4 × 1 × 4 = 16 samples per update" in out and "= 5e-4 (linear)" in out
    assert "global batch 16 — effec_batch_size=8 in recipe recipes/train_48k.yaml at its batch_size 4 on 1×2 " \
           "GPUs, held (hold global_batch)" in out
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs12.json",
                       "--set", "batch.hold=global_batch")
    assert rc == 2 and out == ""
    assert "global batch 16 (recipe recipes/train_48k.yaml effec_batch_size=8 at 1×2 GPUs, held by " \
           "hold=global_batch) cannot be split over 2 GPUs" in err
    assert "or --hold accumulation: 12 × 2 × 2 = 48 samples per update, lr 1.5e-3" in err


@pytest.mark.parametrize("argv, samples, source", [
    (["--warmup_samples", "0"], 0, "command line --warmup_samples 0"),
    (["--set", "optim.warmup_samples=0"], 0, "command line 'optim.warmup_samples=0'"),
    (["--warmup_samples", "4800"], 4800, "command line --warmup_samples 4800"),
    (["--warmup_samples", "auto"], 32000, "automatic at k = 3 > 1"),
])
def test_warmup_flags(capsys, argv: list[str], samples: int, source: str) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs12.json", *argv, "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["warmup_samples"] == samples and d["warmup_steps"] == -(-samples // 48)
    assert d["sources"]["warmup_samples"].startswith(source)


def test_a_recipes_warmup_0_does_not_switch_the_guard_off(capsys, tmp_path) -> None:
    recipe = tmp_path / "nowarmup.yaml"
    recipe.write_text(f"extends: {ROOT / RECIPE}\noptim:\n  warmup_samples: 0\n")
    rc, out, err = run(capsys, "--config", str(recipe), "--ds_config", "ds_configs/bs12.json", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert d["warmup_samples"] == 32000
    assert f"recipe {recipe}'s warmup_samples 0 holds for k <= 1 only" in d["sources"]["warmup_samples"]
    rc, out, _ = run(capsys, "--config", str(recipe), "--json")  # k = 1: the recipe's 0 stands
    assert json.loads(out)["warmup_samples"] == 0


def test_bs12_card(capsys) -> None:
    rc, out, err = run(capsys, "--ds_config", "ds_configs/bs12.json", "--config", RECIPE, "--num_gpus", "4",
                       "--effec_batch_size", "24", "--dataset_size", "10000", "--set", "optim.warmup_samples=1000")
    assert rc == 0, err
    out = flat(out)
    assert "12 × 2 × 4 = 96 samples per update" in out
    assert "5e-4 × 96/16 = 3e-3 (linear)" in out
    assert "1000 samples → 11 optimizer steps" in out
    assert "10000 // 96 = 104 optimizer steps" in out
    assert "accumulation 2 — command line effec_batch_size=24" in out
    assert "micro-batch 12 — preset ds_configs/bs12.json" in out
    assert "world 4 (1 node × 4 GPUs) — command line --num_gpus 4; recipe recipes/train_48k.yaml (the recipe's " \
           "world)" in out


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
    assert d["compile"] == "off"  # the recipe's train.compile, beside the plan as on the card
    plan = Plan.from_dict({k: v for k, v in d.items() if k not in ("ds_config", "ds_config_spec", "recipe", "compile")})
    assert plan.global_batch == 96


@pytest.mark.parametrize("argv, expected", [
    (["--num_gpus", "4", "--hold", "accumulation"], ("4 × 2 × 4 = 32 samples per update", "= 1e-3 (linear)")),
    (["--num_gpus", "4"], ("4 × 2 × 4 = 32 samples per update", "= 1e-3 (linear)")),
    (["--num_gpus", "4", "--hold", "global_batch"], ("4 × 1 × 4 = 16 samples per update", "= 5e-4 (linear)")),
    (["--global_batch", "64", "--lr_rule", "sqrt"], ("4 × 8 × 2 = 64", "5e-4 × √(64/16) = 1e-3 (sqrt)")),
    (["--accu_grad", "0"], ("4 × 1 × 2 = 8", "2.5e-4")),
    (["--gradient_accumulation_steps", "3"], ("4 × 3 × 2 = 24", "command line gradient_accumulation_steps=3")),
    (["--batch_size", "2"], ("2 × 2 × 2 = 8", "micro-batch 2 — command line --batch_size 2",
                             "at its batch_size 4 = 2 micro-batches per update, kept at batch_size 2")),
    (["--ds_config", "bs12.json", "--set", "batch.effec_batch_size=24"],
     ("12 × 2 × 2 = 48", "5e-4 × 48/16 = 1.5e-3", "accumulation 2 — command line effec_batch_size=24")),
    (["--set", "batch.global_batch=32", "--set", "batch.accu_grad=null", "--set", "batch.effec_batch_size=null",
      "--num_gpus", "4"], ("4 × 2 × 4 = 32", "accumulation 2 — command line global_batch=32",
                           "global batch 32 — command line global_batch=32")),
])
def test_flags(capsys, argv: list[str], expected: tuple[str, ...]) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, *argv)
    assert rc == 0, err
    for text in expected:
        assert text in flat(out)


@pytest.mark.parametrize("argv, message", [
    (["--ds_config", "ds_configs/bs12.json", "--batch_size", "4"],
     "ds_configs/bs12.json promises train_micro_batch_size_per_gpu 12 but --batch_size says 4"),
    (["--ds_config", "ds_configs/bs12.json", "--set", "batch.batch_size=4"],
     "promises train_micro_batch_size_per_gpu 12 but the override batch.batch_size says 4"),
    (["--num_gpus", "3", "--hold", "global_batch"], "world sizes that can hold 16 at batch_size 4: 1, 2, 4"),
    (["--num_nodes", "3", "--num_gpus", "4", "--hold", "global_batch"], "cannot be split over 12 GPUs"),
    (["--set", "train.max_epoch=-3"], "command line 'train.max_epoch=-3': train.max_epoch must be >= 1, got -3"),
    (["--set", "optim.betas=[0.9, 1.5]"], "optim.betas must be in [0, 1), got (0.9, 1.5)"),
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
                                  ["--bogus"], ["--warmup_samples", "-1"], ["--warmup_samples", "soon"],
                                  ["--hold", "world"]])
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
    bad = _python("-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json", "--config", RECIPE,
                  "--batch_size", "12", "--accu_grad", "1", "--effec_batch_size", "8")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr == EXPLICIT_12_8
    good = _python("-m", "launcher.plan", "--config", RECIPE, "--json")
    assert good.returncode == 0 and good.stderr == ""
    assert json.loads(good.stdout)["train_batch_size"] == 16


def test_imports_neither_torch_nor_deepspeed_and_is_fast() -> None:
    argv = ["-X", "importtime", "-m", "launcher.plan", "--ds_config", "ds_configs/bs12.json+ds_configs/zero3.json",
            "--config", RECIPE, "--num_gpus", "4", "--effec_batch_size", "24"]
    proc = _python(*argv)
    assert proc.returncode == 0, proc.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "launcher.plan.card" in imported and "rich" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in ("torch", "deepspeed", "numpy", "torchaudio"))
    assert heavy == []
    best = min(_timed(argv[2:]) for _ in range(2))
    assert best < 2.0, f"dry run took {best:.2f} s"


def _timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = _python(*argv)
    assert proc.returncode == 0, proc.stderr
    return time.perf_counter() - start


def test_the_card_of_a_resumed_plan_says_what_the_checkpoint_holds() -> None:
    import io

    from launcher.plan import AccumSpec, PlanRequest, ResumeHold, make_plan
    from launcher.plan.card import print_card

    held = ResumeHold(source="checkpoint runs/x/checkpoints/step00000120", global_batch=128, peak_lr=4e-3,
                      base_lr=5e-4, reference_batch=16, lr_rule="linear", lr_derivation="5e-4 × 128/16 = 4e-3 (linear)",
                      warmup_samples=32000, warmup_from_lr=5e-4)
    plan = make_plan(PlanRequest(batch_size=4, num_nodes=1, gpus_per_node=8,
                                 recipe_accum=AccumSpec(accu_grad=1, effec_batch_size=8), resume=held))
    out = io.StringIO()
    print_card(plan, file=out)
    text = flat(out.getvalue())
    assert "4 × 4 × 8 = 128 samples per update" in text
    assert ("resume global batch 128 held from checkpoint runs/x/checkpoints/step00000120, with its LR and warmup; "
            "the accumulation is re-derived for this world") in text
    assert "learning rate 4e-3 — held from checkpoint runs/x/checkpoints/step00000120" in text
    assert "hold accumulation" not in text
