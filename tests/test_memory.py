"""launcher/plan/memory.py's arithmetic, the plan card's memory section and `python -m launcher.plan --suggest`.

Fast and without torch, except the one test that checks the parameter counts against the model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_dry_run as run
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from launcher.plan import memory
from launcher.plan.ds_config import load_preset
from launcher.config import load_config
from launcher.plan.cli import build_parser
from launcher.plan.request import plan_from_args
from launcher.plan.suggest import suggest
from launcher.plan import PlanError
from launcher.plan.memory import (ACTIVATIONS, GIB, PRESET_PARAMS, MemoryEstimateError, estimate,
                                  largest_fitting_micro_batch, model_state_bytes, paper_model_state_bytes,
                                  reduce_bucket_bytes)

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "recipes/train_48k.yaml"
FULL = "mossformer2_se_48k"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)


# ---- model states --------------------------------------------------------------------------------

# (stage, precision) -> bytes per parameter of (params, grads, optimizer) at N ranks, as DeepSpeed 0.19 holds
# them (bench/bench_zero_memory.py measured these layouts).
TABLE = {
    (0, "fp32"): (4, 4, 8), (1, "fp32"): (4, 4, 12 / 2), (2, "fp32"): (4, 4 / 2, 12 / 2), (3, "fp32"): (4 / 2, 4 / 2, 12 / 2),
    (0, "bf16"): (2, 2, 12), (1, "bf16"): (2, 2, 12 / 2), (2, "bf16"): (2, 2 / 2, 12 / 2), (3, "bf16"): (2 / 2, 2 / 2, 12 / 2),
}


@pytest.mark.parametrize("stage, precision", sorted(TABLE))
def test_model_states_table_at_two_ranks(stage: int, precision: str) -> None:
    n = 1_000_000
    s = model_state_bytes(n, stage, precision, 2)
    assert (s.params, s.grads, s.optimizer) == tuple(int(k * n) for k in TABLE[stage, precision])
    assert s.total == s.params + s.grads + s.optimizer


def test_full_model_reference_numbers() -> None:
    psi = PRESET_PARAMS[FULL]
    assert psi == 55_262_154
    s = model_state_bytes(psi, 0, "fp32", 2)
    assert (s.params_formula, s.grads_formula, s.optimizer_formula) == ("4Ψ", "4Ψ", "8Ψ")
    assert s.total == 16 * psi  # 884 MB: the reference's fp32 DDP layout
    s3 = model_state_bytes(psi, 3, "bf16", 8)
    assert (s3.params_formula, s3.grads_formula, s3.optimizer_formula) == ("2Ψ/N", "2Ψ/N", "12Ψ/N")
    assert s3.total == math.ceil(2 * psi / 8) * 2 + math.ceil(12 * psi / 8)


def test_mixed_precision_is_the_zero_paper() -> None:
    """bf16/fp16 with fp32 master weights: 2Ψ + 2Ψ + 12Ψ, partitioned stage by stage (ZeRO paper §5)."""
    for precision in ("bf16", "fp16"):
        for stage in range(4):
            for world in (1, 2, 8, 64):
                s = model_state_bytes(10_007, stage, precision, world)
                assert {"params": s.params, "grads": s.grads, "optimizer": s.optimizer} == \
                    paper_model_state_bytes(10_007, stage, precision, world)


def test_fp32_zero_keeps_a_master_copy() -> None:
    """DeepSpeed's ZeRO optimizers copy the fp32 partition even for an fp32 model: 12Ψ/N, not the paper's 8Ψ/N.
    On one rank ZeRO therefore costs more than stage 0 (no ZeRO optimizer)."""
    n = 1000
    for stage in (1, 2, 3):
        assert model_state_bytes(n, stage, "fp32", 4).optimizer == 12 * n // 4
        assert paper_model_state_bytes(n, stage, "fp32", 4)["optimizer"] == 8 * n // 4
        assert model_state_bytes(n, stage, "fp32", 1).total > model_state_bytes(n, 0, "fp32", 1).total


@given(n=st.integers(1, 10 ** 9), world=st.integers(2, 4096), precision=st.sampled_from(memory.PRECISIONS))
def test_each_stage_holds_no_more_than_the_last(n: int, world: int, precision: str) -> None:
    totals = [model_state_bytes(n, stage, precision, world).total for stage in range(4)]
    if precision == "fp32":
        # fp32: stage 1 adds the master copy (4Ψ/N) and removes 8Ψ(1 − 1/N) of moments.
        assert totals[1] <= totals[0] + math.ceil(4 * n / world)
    else:
        assert totals[1] <= totals[0]
    assert totals[3] <= totals[2] <= totals[1]


@pytest.mark.parametrize("bad", [dict(stage=4), dict(stage=-1), dict(precision="fp8"), dict(world_size=0),
                                 dict(world_size=True)])
def test_bad_engine_settings_are_refused(bad: dict) -> None:
    args = {"num_params": 10, "stage": 0, "precision": "fp32", "world_size": 2, **bad}
    with pytest.raises(MemoryEstimateError):
        model_state_bytes(**args)


# ---- buckets, activations, estimate --------------------------------------------------------------

def test_reduce_buckets_follow_the_preset() -> None:
    zero2 = load_preset("ds_configs/zero2.json")
    assert reduce_bucket_bytes(zero2, 0, "fp32") == 0
    assert reduce_bucket_bytes(zero2, 2, "fp32") == 500_000_000 * 4
    assert reduce_bucket_bytes(zero2, 2, "bf16") == 500_000_000 * 2
    assert reduce_bucket_bytes({"zero_optimization": {"reduce_bucket_size": 10, "overlap_comm": True}}, 1, "fp32") == 80
    assert reduce_bucket_bytes({"zero_optimization": {"reduce_bucket_size": 10, "overlap_comm": True}}, 3, "fp32") == 40
    assert reduce_bucket_bytes({"zero_optimization": {"contiguous_gradients": False}}, 2, "fp32") == 0
    assert reduce_bucket_bytes({}, 3, "bf16") == 500_000_000 * 2  # DeepSpeed's default size


def test_activations_grow_linearly_with_batch_and_seconds() -> None:
    for (preset, precision), a in ACTIVATIONS.items():
        one = estimate(preset, 0, precision, 2, 1, 4.0).activations
        two = estimate(preset, 0, precision, 2, 2, 4.0).activations
        assert abs((two - one) - 4.0 * a.per_sample_second) <= 1
        assert abs(estimate(preset, 0, precision, 2, 2, 2.0).activations - one) <= 1
    assert estimate(FULL, 0, "fp16", 2, 3, 4.0).activations == estimate(FULL, 0, "bf16", 2, 3, 4.0).activations


def test_estimate_totals_and_errors() -> None:
    e = estimate(FULL, 2, "bf16", 8, 12, 4.0, load_preset("ds_configs/zero2.json"))
    assert e.total == e.states.total + e.buffers + e.activations
    assert e.to_dict()["total_bytes"] == e.total
    with pytest.raises(MemoryEstimateError, match="known: mossformer2_se_48k, small, tiny"):
        estimate("huge", 0, "fp32", 2, 1, 4.0)
    with pytest.raises(MemoryEstimateError, match="micro_batch"):
        estimate(FULL, 0, "fp32", 2, 0, 4.0)


@settings(max_examples=200, deadline=None)
@given(budget_gib=st.floats(0.1, 200), stage=st.integers(0, 3), precision=st.sampled_from(("fp32", "bf16")),
       world=st.integers(1, 64), seconds=st.sampled_from((1.0, 2.0, 4.0, 6.0)))
def test_largest_fitting_micro_batch_is_tight(budget_gib: float, stage: int, precision: str, world: int,
                                              seconds: float) -> None:
    budget = budget_gib * GIB
    cfg = load_preset(f"ds_configs/zero{stage}.json")
    b = largest_fitting_micro_batch(FULL, stage, precision, world, seconds, budget, cfg)
    if b:
        assert estimate(FULL, stage, precision, world, b, seconds, cfg).total <= budget
    assert estimate(FULL, stage, precision, world, b + 1, seconds, cfg).total > budget


def test_stage3_persistent_parameters() -> None:
    assert memory.persistent_params(FULL) == 9_681_354  # tensors of <= 1e5 elements
    assert memory.persistent_params(FULL, 0) == 0 and memory.persistent_params(FULL, 10 ** 7) == PRESET_PARAMS[FULL]
    zero3 = load_preset("ds_configs/zero3.json")
    e = estimate(FULL, 3, "fp32", 2, 1, 4.0, zero3)
    assert e.persistent_params == 9_681_354
    assert e.states.params == math.ceil(4 * PRESET_PARAMS[FULL] / 2) + 4 * 9_681_354
    assert e.states.params_formula == "4Ψ/N + 4Ψₚ"
    tight = {"zero_optimization": {**zero3["zero_optimization"], "stage3_param_persistence_threshold": 0}}
    assert estimate(FULL, 3, "fp32", 2, 1, 4.0, tight).states.params == math.ceil(4 * PRESET_PARAMS[FULL] / 2)
    assert estimate(FULL, 2, "fp32", 2, 1, 4.0, zero3).persistent_params == 0


def test_preset_parameter_sizes_match_the_model() -> None:
    pytest.importorskip("torch")
    from collections import Counter

    from model import build_model, count_trainable_parameters

    for preset, sizes in memory.PARAM_SIZES.items():
        model = build_model(preset)
        assert count_trainable_parameters(model) == PRESET_PARAMS[preset], preset
        assert tuple(sorted(Counter(p.numel() for p in model.parameters() if p.requires_grad).items())) == sizes


def test_memory_imports_only_the_standard_library() -> None:
    code = "import sys, launcher.plan.memory; print(sorted(m for m in sys.modules if m.split('.')[0] in " \
           "('torch', 'deepspeed', 'numpy', 'rich', 'yaml')))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr


# ---- the plan card and --suggest ------------------------------------------------------------------

def test_card_shows_the_memory_section(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json")
    assert rc == 0 and err == ""
    assert "memory per GPU" in out and "ZeRO 0, fp32, Ψ = 55,262,154" in out
    assert "4Ψ = 210.8 MiB" in out and "8Ψ = 421.6 MiB (Adam moments)" in out
    assert "4 × 4 s × 332.9 MiB/sample-s" in out
    rc, out, _ = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json+ds_configs/zero3.json+bf16.json",
                     "--num_gpus", "8", "--global_batch", "64")
    # bf16.json accumulates in fp32: fp32 gradient partitions
    assert rc == 0 and "4Ψ/N = 26.4 MiB" in out and "12Ψ/N = 79.1 MiB" in out and "reduce buckets" in out
    assert "2Ψ/N + 2Ψₚ = 31.6 MiB" in out and "Ψₚ = 9,681,354" in out


def _suggest_json(capsys, *argv: str) -> dict:
    rc, out, err = run(capsys, *argv, "--suggest", "--json")
    assert rc == 0, err
    return json.loads(out)


def _replan(capsys, command: str) -> dict:
    argv = command.split()
    assert argv[:3] == ["python", "-m", "launcher.plan"]
    rc, out, err = run(capsys, *argv[3:], "--json")
    assert rc == 0, err
    return json.loads(out)


def test_suggest_the_reference_on_an_80_gb_gpu(capsys) -> None:
    d = _suggest_json(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--gpu_memory_gb", "80")
    s = d["suggestion"]
    assert (s["micro_batch"], s["gradient_accumulation_steps"], s["train_batch_size"]) == (8, 1, 16)
    assert s["lr"] == d["lr"] == 5e-4
    assert s["bound_by"] == "global batch" and s["memory_limit_micro_batch"] > 8
    # bs4.json fixes the micro-batch at 4, so the suggestion drops it for the base preset it extends.
    assert s["ds_config_spec"] == "ds_configs/base.json"
    again = _replan(capsys, s["command"])
    assert {k: again[k] for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                  "train_batch_size", "lr")} == {
        "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1, "train_batch_size": 16, "lr": 5e-4}


def test_suggest_bound_by_memory(capsys) -> None:
    d = _suggest_json(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--global_batch", "64",
                      "--gpu_memory_gb", "13")  # micro-batch 8 fits (11.2 GiB), 9 does not
    s = d["suggestion"]
    budget, b = s["budget_bytes"], s["micro_batch"]
    assert s["bound_by"] == "memory" and b == s["memory_limit_micro_batch"]
    assert s["memory"]["total_bytes"] <= budget
    assert estimate(FULL, 0, "fp32", 2, b + 1, 4.0).total > budget
    assert s["train_batch_size"] == 64 and s["micro_batch"] * s["gradient_accumulation_steps"] * 2 == 64


def test_suggest_bound_by_divisibility(capsys) -> None:
    # 24 samples per GPU per update; 16 GiB allows micro-batch 20 in bf16 at ZeRO 2, which does not divide 24.
    d = _suggest_json(capsys, "--config", RECIPE, "--ds_config",
                      "ds_configs/bs12.json+ds_configs/zero2.json+ds_configs/bf16.json", "--effec_batch_size", "24",
                      "--num_gpus", "8", "--gpu_memory_gb", "16")
    s = d["suggestion"]
    assert s["bound_by"] == "divisibility"
    assert s["micro_batch"] == 12 and s["memory_limit_micro_batch"] not in (12, 24)
    assert 24 % s["micro_batch"] == 0 and s["train_batch_size"] == 192
    assert "--num_gpus 8" in s["command"] and s["ds_config_spec"].startswith("ds_configs/bs12.json")


def test_suggest_card_prints_a_command_to_copy(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json+ds_configs/zero2.json",
                       "--suggest", "--gpu_memory_gb", "80")
    assert rc == 0 and err == ""
    assert "largest micro-batch that fits" in out and "suggested: 8 × 1 × 2 = 16 samples per update" in out
    last = out.strip().splitlines()[-1]
    assert last == ("python -m launcher.plan --ds_config ds_configs/base.json+ds_configs/zero2.json "
                    "--config recipes/train_48k.yaml --batch_size 8 --global_batch 16")


def test_suggest_when_nothing_fits(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--gpu_memory_gb", "1",
                       "--suggest")
    assert rc == 2 and out == ""
    assert err.startswith("error: --suggest: not even micro-batch 1 fits 1 GiB")
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/bs4.json", "--gpu_memory_gb", "2.2",
                       "--suggest")
    assert rc == 2 and "Valid choices at micro-batch 1: " in err and "bf16" in err


def test_suggest_needs_the_gpu_memory(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--suggest")
    assert rc == 2 and out == "" and "--suggest needs --gpu_memory_gb" in err
    rc, out, err = run(capsys, "--config", RECIPE, "--suggest", "--gpu_memory_gb", "-3")
    assert rc == 2 and out == "" and "must be positive" in err


@settings(max_examples=60, deadline=None)
@given(gib=st.floats(2.0, 160.0), gpus=st.sampled_from((1, 2, 3, 4, 8)), per_gpu=st.integers(1, 48),
       stage=st.integers(0, 3), bf16=st.booleans())
def test_suggestions_are_feasible_plans_with_the_same_global_batch_and_lr(gib, gpus, per_gpu, stage, bf16) -> None:
    assume(not (bf16 and stage == 0))  # refused: bf16 accumulates in fp32 only at ZeRO >= 1
    spec = f"ds_configs/zero{stage}.json" + ("+ds_configs/bf16.json" if bf16 else "")
    argv = ["--config", RECIPE, "--ds_config", spec, "--num_gpus", str(gpus), "--global_batch",
            str(per_gpu * gpus), "--batch_size", "1", "--gpu_memory_gb", f"{gib:.3f}"]
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.set)
    plan, ds_config = plan_from_args(args, cfg, None, None)
    try:
        s = suggest(args, cfg, plan, ds_config)
    except PlanError as e:
        assert "not even micro-batch 1 fits" in str(e)
        assert estimate(FULL, stage, "bf16" if bf16 else "fp32", gpus, 1, 4.0, ds_config).total > \
            gib * GIB * (1 - args.memory_headroom)
        return
    b, k = s.plan.micro_batch, s.plan.accumulation_steps
    assert (s.plan.global_batch, s.plan.peak_lr, s.plan.world_size) == (plan.global_batch, plan.peak_lr, gpus)
    assert b * k == per_gpu and s.memory.total <= s.budget_bytes
    bigger = [d for d in range(b + 1, per_gpu + 1) if per_gpu % d == 0]
    if bigger:  # the next feasible micro-batch does not fit
        assert estimate(FULL, stage, "bf16" if bf16 else "fp32", gpus, bigger[0], 4.0, ds_config).total > s.budget_bytes
    assert s.bound_by == ("global batch" if not bigger else "memory" if b == s.memory_limit else "divisibility")


@pytest.mark.parametrize("gib, gpus, global_batch, stage, bf16", [
    (8, 2, 16, 0, False), (16, 8, 192, 2, True), (80, 4, 96, 3, False), (141, 1, 48, 1, True), (24, 2, 32, 3, True),
])
def test_suggestion_round_trip(capsys, gib, gpus, global_batch, stage, bf16) -> None:
    spec = f"ds_configs/zero{stage}.json" + ("+ds_configs/bf16.json" if bf16 else "")
    d = _suggest_json(capsys, "--config", RECIPE, "--ds_config", spec, "--num_gpus", str(gpus), "--global_batch",
                      str(global_batch), "--batch_size", "1", "--gpu_memory_gb", str(gib))
    s = d["suggestion"]
    again = _replan(capsys, s["command"])
    assert again["train_batch_size"] == global_batch == s["train_batch_size"]
    assert again["lr"] == d["lr"]
    assert again["train_micro_batch_size_per_gpu"] == s["micro_batch"]
    assert s["memory"]["total_bytes"] <= s["budget_bytes"]
