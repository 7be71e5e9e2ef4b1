"""`train.compile` before any process group: the recipe key and its range, the plan's refusal of ZeRO 3 (and of
DeepSpeed's own compile block) in the dry run, the card's `compile` row; and the MFU table
(launcher/training/mfu.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ROOT, run_dry_run
from launcher.config import COMPILE_REGIONS, ConfigError, dump_yaml, load_config
from launcher.plan.compiled import ZERO3_UPSTREAM

DEMO = "recipes/demo_cpu.yaml"


def test_the_recipe_key_takes_the_regions_model_compile_has_and_yaml_off(tmp_path: Path) -> None:
    from model.compile import REGIONS

    assert COMPILE_REGIONS == REGIONS
    assert load_config(None).train.compile == "off"
    for typed, meant in (("off", "off"), ("false", "off"), ("blocks", "blocks"), ("model", "model")):
        assert load_config(None, [f"train.compile={typed}"]).train.compile == meant
    # A recipe's bare `off` is YAML 1.1's false; the config keeps the word, and writes it back quoted.
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  compile: off\n")
    cfg = load_config(recipe)
    assert cfg.train.compile == "off" and "compile: 'off'" in dump_yaml(cfg)
    for typed, shown in (("on", "'true'"), ("whole", "'whole'"), ("1", "'1'")):
        with pytest.raises(ConfigError, match=f"train.compile must be one of off, blocks, model, got {shown}"):
            load_config(None, [f"train.compile={typed}"])


def test_zero3_with_compile_is_refused_with_the_reason_the_choices_and_the_upstream_issues(capsys, tmp_path) -> None:
    for spec, regions, precision in (("ds_configs/bs4.json+ds_configs/zero3.json", "blocks", "fp32"),
                                     ("ds_configs/bs4.json+ds_configs/zero3.json+ds_configs/bf16.json", "model",
                                      "bf16")):
        rc, out, err = run_dry_run(capsys, "--config", DEMO, "--ds_config", spec, "--set", f"train.compile={regions}")
        assert rc == 2 and out == ""
        assert f"train.compile={regions} (command line 'train.compile={regions}') with ZeRO stage 3 " \
               f"(ds_configs/zero3.json, {precision})" in err
        assert all(link in err for link in ZERO3_UPSTREAM)
        assert "Rule: train.compile needs ZeRO stage 0, 1 or 2." in err
        assert f"train.compile=off with ZeRO 3; or ZeRO 2 with train.compile={regions}" in err
        # bf16 cannot run ZeRO 0 here (its fp32 accumulation needs ZeRO >= 1): not offered then.
        assert ("zero0.json" in err) == (precision == "fp32")
    # From a recipe, the recipe is named.
    recipe = tmp_path / "compiled.yaml"
    recipe.write_text(f"extends: {ROOT / DEMO}\ntrain:\n  compile: blocks\n")
    rc, _, err = run_dry_run(capsys, "--config", str(recipe), "--ds_config", "ds_configs/bs4.json+ds_configs/zero3.json")
    assert rc == 2 and f"train.compile=blocks (recipe {recipe}) with ZeRO stage 3" in err
    # ZeRO 3 eager, and compile at ZeRO 0-2 in every precision, plan.
    for spec, regions in (("ds_configs/bs4.json+ds_configs/zero3.json", "off"),
                          ("ds_configs/bs4.json+ds_configs/zero0.json", "blocks"),
                          ("ds_configs/bs4.json+ds_configs/zero1.json+ds_configs/fp16.json", "model"),
                          ("ds_configs/bs4.json+ds_configs/zero2.json+ds_configs/bf16.json", "blocks")):
        rc, out, err = run_dry_run(capsys, "--config", DEMO, "--ds_config", spec, "--set", f"train.compile={regions}")
        assert rc == 0, err


def test_deepspeeds_own_compile_block_is_refused(capsys, tmp_path: Path) -> None:
    preset = tmp_path / "deepcompile.json"
    preset.write_text(json.dumps({"extends": str(ROOT / "ds_configs" / "bs4.json"), "compile": {"deepcompile": True}}))
    rc, out, err = run_dry_run(capsys, "--config", DEMO, "--ds_config", str(preset))
    assert rc == 2 and out == ""
    assert "\"compile\" configures DeepSpeed's engine.compile()" in err and "train.compile=blocks" in err


def test_the_card_has_a_compile_row(capsys) -> None:
    rc, out, _ = run_dry_run(capsys, "--config", DEMO, "--ds_config", "ds_configs/bs4.json")
    text = " ".join(out.replace("│", " ").split())
    assert rc == 0 and "compile off: eager (train.compile=blocks compiles the training step at ZeRO 0-2)" in text
    rc, out, _ = run_dry_run(capsys, "--config", DEMO, "--ds_config", "ds_configs/bs4.json", "--set",
                             "train.compile=blocks")
    text = " ".join(out.replace("│", " ").split())
    assert rc == 0 and "compile blocks: each gated attention unit and FSMN block compiled in place" in text
    assert "the first step after a start compiles (train.slow_phase_timeout_s)" in text
    rc, out, _ = run_dry_run(capsys, "--config", DEMO, "--ds_config", "ds_configs/bs4.json", "--set",
                             "train.compile=model", "--json")
    assert rc == 0 and json.loads(out)["compile"] == "model"


def test_peaks_by_device_name_and_precision() -> None:
    from launcher.training.mfu import FlopRate, peak_kind, peak_tflops

    assert [peak_kind(p, tf32) for p, tf32 in (("bf16", False), ("fp16", False), ("fp32", True), ("fp32", False))] \
        == ["bf16", "bf16", "tf32", "fp32"]
    # torch.cuda.get_device_name() of each card; the longest matching fragment decides (PCIe and NVL are H100s too).
    for name, kind, peak in (("NVIDIA H100 80GB HBM3", "bf16", 989.4), ("NVIDIA H100 PCIe", "bf16", 756.5),
                             ("NVIDIA H100 NVL", "tf32", 417.5), ("NVIDIA H200", "fp32", 66.9),
                             ("NVIDIA H200 NVL", "bf16", 835.0), ("NVIDIA A100-SXM4-80GB", "tf32", 156.0),
                             ("NVIDIA A100 80GB PCIe", "fp32", 19.5)):
        assert peak_tflops(name, kind) == peak, name
    assert peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None and peak_tflops(None, "fp32") is None
    assert FlopRate(10**12).record(2, 4.0) == {"tflops": 0.5}
    assert FlopRate(10**12, 1.0).record(2, 4.0) == {"tflops": 0.5, "mfu": 0.5}
