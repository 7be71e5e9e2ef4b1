"""How the precision presets compose with the stage presets: bf16 sums and all-reduces gradients in fp32,
which DeepSpeed does only at ZeRO >= 1, so a spec without a stage derives ZeRO 1 (the card says so) and an
explicit ZeRO 0 is refused; an overlay that asks for bf16 sums on purpose is honoured and shown."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT
from conftest import run_dry_run as run
from launcher.plan.ds_config import (DsConfigError, communication_dtype, grad_accum_dtype, load_preset, precision,
                                     stage_named, zero_stage)

RECIPE = "recipes/train_48k.yaml"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch) -> None:
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("spec, stage", [
    ("ds_configs/bf16.json", 1),
    ("ds_configs/bs12.json+ds_configs/bf16.json", 1),
    ("ds_configs/bs4.json+ds_configs/zero3.json+ds_configs/bf16.json", 3),
    ("ds_configs/bf16.json+ds_configs/zero3.json+ds_configs/bs4.json", 3),
    ("ds_configs/zero2.json+ds_configs/bf16.json", 2),
    ("ds_configs/bf16.json+ds_configs/zero1.json", 1),
])
def test_bf16_sums_and_reduces_gradients_in_fp32_and_keeps_a_named_stage(spec, stage) -> None:
    preset = load_preset(spec)
    assert precision(preset) == "bf16" and zero_stage(preset) == stage
    assert grad_accum_dtype(preset) == "fp32" and communication_dtype(preset) == "fp32"
    assert stage_named(spec) == ("zero" in spec)


def test_other_precisions_keep_their_dtypes_and_stage() -> None:
    fp16 = load_preset("ds_configs/fp16.json")
    assert (zero_stage(fp16), grad_accum_dtype(fp16), communication_dtype(fp16)) == (0, "fp16", "fp16")
    fp32 = load_preset("ds_configs/bs4.json")
    assert (zero_stage(fp32), grad_accum_dtype(fp32), communication_dtype(fp32)) == (0, "fp32", "fp32")


@pytest.mark.parametrize("spec", ["ds_configs/zero0.json+ds_configs/bf16.json",
                                  "ds_configs/bf16.json+ds_configs/zero0.json+ds_configs/bs12.json"])
def test_bf16_at_an_explicit_zero0_is_refused_with_the_ways_out(spec) -> None:
    with pytest.raises(DsConfigError, match="ZeRO stage 0 with bf16") as e:
        load_preset(spec)
    assert "ds_configs/zero1.json" in str(e.value) and '"grad_accum_dtype": "bf16"' in str(e.value)


def test_summing_in_bf16_on_purpose_is_allowed_at_zero0_and_shown(tmp_path, capsys) -> None:
    overlay = tmp_path / "sum_in_bf16.json"
    overlay.write_text(json.dumps({"data_types": {"grad_accum_dtype": "bf16"}}))
    spec = f"ds_configs/zero0.json+ds_configs/bf16.json+{overlay}"
    preset = load_preset(spec)
    assert zero_stage(preset) == 0 and grad_accum_dtype(preset) == "bf16" and communication_dtype(preset) == "fp32"
    rc, out, _ = run(capsys, "--config", RECIPE, "--ds_config", spec, "--effec_batch_size", "24")
    assert rc == 0
    assert _row(out).startswith("grad accumulation bf16, all-reduced in fp32 (6 micro-batches summed in bf16")


def _row(out: str) -> str:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "grad accumulation" in line)
    row = [lines[start]] + [line for line in lines[start + 1:start + 4] if re.match(r"│\s{10,}", line)]
    return " ".join(" ".join(line.strip("│ ").split()) for line in row)


@pytest.mark.parametrize("spec, expected", [
    ("ds_configs/bs12.json+ds_configs/bf16.json",
     "grad accumulation fp32, all-reduced in fp32 (DeepSpeed's BF16 optimizer; ZeRO 1 derived: no preset names a "
     "stage, and ZeRO 0 cannot accumulate bf16 in fp32)"),
    ("ds_configs/bs12.json+ds_configs/zero1.json+ds_configs/bf16.json",
     "grad accumulation fp32, all-reduced in fp32 (DeepSpeed's BF16 optimizer)"),
    ("ds_configs/bs12.json+ds_configs/zero3.json+ds_configs/bf16.json", "grad accumulation fp32, all-reduced in fp32"),
    ("ds_configs/bs12.json+ds_configs/fp16.json",
     "grad accumulation fp16, all-reduced in fp16 (2 micro-batches summed in fp16, loss-scaled; ds_configs/bf16.json "
     "accumulates in fp32)"),
    ("ds_configs/bs12.json", "grad accumulation fp32, all-reduced in fp32"),
])
def test_the_card_shows_the_accumulation_dtype_and_a_derived_stage(capsys, spec, expected) -> None:
    rc, out, _ = run(capsys, "--config", RECIPE, "--ds_config", spec, "--effec_batch_size", "24")
    assert rc == 0
    assert _row(out).startswith(expected), _row(out)


def test_the_dry_run_refuses_bf16_at_zero0(capsys) -> None:
    rc, out, err = run(capsys, "--config", RECIPE, "--ds_config", "ds_configs/zero0.json+ds_configs/bf16.json")
    assert rc == 2 and out == "" and err.startswith("error: ") and "ZeRO stage 0 with bf16" in err


def test_the_memory_estimate_counts_fp32_accumulation() -> None:
    """bench/bench_zero_memory.py (2 ranks, bf16.json): grads 6Ψ at stage 1 (DeepSpeed's BF16 optimizer: bf16
    gradients and fp32 accumulators), 4Ψ/N at 2–3; no reduce bucket at stage 1, an fp32 one at stage 3."""
    from launcher.plan.memory import model_state_bytes, reduce_bucket_bytes

    psi = 1000
    stage_1, stage_2, stage_3 = (load_preset(f"ds_configs/zero{s}.json+ds_configs/bf16.json") for s in (1, 2, 3))
    assert model_state_bytes(psi, 1, "bf16", 2, grad_accum_dtype="fp32").grads == 6 * psi
    assert model_state_bytes(psi, 2, "bf16", 2, grad_accum_dtype="fp32").grads == 4 * psi // 2
    assert model_state_bytes(psi, 3, "bf16", 2, grad_accum_dtype="fp32").grads_formula == "4Ψ/N"
    assert model_state_bytes(psi, 2, "bf16", 2).grads == 2 * psi // 2  # summing in bf16: as before
    assert reduce_bucket_bytes(stage_1, 1, "bf16") == 0
    assert reduce_bucket_bytes(stage_2, 2, "bf16") == 500_000_000 * 2
    assert reduce_bucket_bytes(stage_3, 3, "bf16") == 500_000_000 * 4
