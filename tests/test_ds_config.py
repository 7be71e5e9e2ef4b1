"""DeepSpeed presets: loading, overlays, rendering from a plan, and DeepSpeed's own verdict.

DeepSpeed's config class reads the world size from its process group and only then checks the
batch triple. No process group is started here: `deepspeed.runtime.config.dist` is replaced by a
stub that reports rank 0 of a world of the size under test (the `mpu=None` path of
DeepSpeedConfig.__init__), so the real batch assertion and the real pydantic checks run.
"""

from __future__ import annotations

import itertools
import json
import os
import types
from pathlib import Path

import pytest

from launcher.plan.ds_config import (PRESET_DIR, DsConfigError, available_presets, load_preset, precision, preset_files,
                                     preset_micro_batch, render, zero_stage)
from launcher.plan import AccumSpec, PlanError, PlanRequest, make_plan

os.environ.setdefault("DS_ACCELERATOR", "cpu")

SHIPPED = ["base.json", "bf16.json", "bs12.json", "bs4.json", "fp16.json",
           "zero0.json", "zero1.json", "zero2.json", "zero3.json"]
BATCHES = ["base.json", "bs4.json", "bs12.json"]
STAGES = [None, "zero0.json", "zero1.json", "zero2.json", "zero3.json"]
PRECISIONS = [None, "bf16.json", "fp16.json"]
# zero0.json + bf16.json is refused (bf16 accumulates in fp32 only at ZeRO >= 1): tests/test_precision_presets.py
COMBOS = ["+".join(f"ds_configs/{p}" for p in parts if p)
          for parts in itertools.product(BATCHES, STAGES, PRECISIONS) if parts[1:] != ("zero0.json", "bf16.json")]
SINGLES = [f"ds_configs/{name}" for name in SHIPPED]


@pytest.fixture(scope="module")
def deepspeed_config():
    """DeepSpeedConfig(config, world_size=W) without a process group."""
    pytest.importorskip("deepspeed")
    import deepspeed.runtime.config as dsc

    def check(config: dict, world_size: int):
        stub = types.SimpleNamespace(get_rank=lambda group=None: 0,
                                     get_world_size=lambda group=None: world_size)
        real, dsc.dist = dsc.dist, stub
        try:
            ds = dsc.DeepSpeedConfig(json.loads(json.dumps(config)))
        finally:
            dsc.dist = real
        assert ds.world_size == world_size
        return ds

    return check


def plan_for(micro: int, world: tuple[int, int] = (1, 4), steps: int = 2, warmup_samples: int = 0):
    return make_plan(PlanRequest(batch_size=micro, num_nodes=world[0], gpus_per_node=world[1],
                                 recipe_accum=AccumSpec(accu_grad=1, effec_batch_size=8),
                                 cli_accum=AccumSpec(gradient_accumulation_steps=steps),
                                 warmup_samples=warmup_samples))


def test_shipped_files() -> None:
    assert available_presets() == sorted(SHIPPED)
    base = json.loads((PRESET_DIR / "base.json").read_text())
    assert "extends" not in base and "train_micro_batch_size_per_gpu" not in base
    for name in SHIPPED:
        raw = json.loads((PRESET_DIR / name).read_text())
        for key in ("train_batch_size", "gradient_accumulation_steps"):
            assert key not in raw, (name, key)  # those come from the plan
        if name == "base.json":
            continue
        assert raw["extends"] == "base.json", name
        # An overlay only says what differs from the base: no copied settings.
        own = {k: v for k, v in raw.items() if k not in ("extends", "_comment")}
        assert len(json.dumps(own)) < 400, name
        for key, value in own.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                for sub, v in value.items():
                    assert base[key].get(sub, object()) != v, (name, key, sub)
            else:
                assert base.get(key, object()) != value, (name, key)


def test_reference_engine_settings() -> None:
    preset = load_preset("ds_configs/bs4.json")
    assert preset_micro_batch(preset) == 4
    assert preset["gradient_clipping"] == 10.0
    assert preset["optimizer"]["type"] == "Adam"
    params = preset["optimizer"]["params"]
    assert params["betas"] == [0.9, 0.999] and params["eps"] == 1e-8 and params["weight_decay"] == 0
    assert params["torch_adam"] is True and params["adam_w_mode"] is False
    assert precision(preset) == "fp32" and zero_stage(preset) == 0
    assert preset_micro_batch(load_preset("bs12.json")) == 12
    assert preset_micro_batch(load_preset("ds_configs/zero3.json")) is None


def test_overlays_merge_in_dependency_order() -> None:
    spec = "ds_configs/bf16.json+ds_configs/zero3.json+ds_configs/bs12.json"
    assert [p.name for p in preset_files(spec)] == ["base.json", "bf16.json", "zero3.json", "bs12.json"]
    preset = load_preset(spec)
    # zero3.json extends base.json again; that must not switch bf16 back off.
    assert precision(preset) == "bf16" and zero_stage(preset) == 3 and preset_micro_batch(preset) == 12
    assert preset["zero_optimization"]["reduce_bucket_size"] == 500_000_000  # from base, merged key by key
    assert "extends" not in preset and "_comment" not in preset


@pytest.mark.parametrize("spec", SINGLES + COMBOS)
def test_every_preset_renders_and_deepspeed_accepts_it(spec: str, deepspeed_config) -> None:
    preset = load_preset(spec)
    micro = preset_micro_batch(preset) or 4
    for world, steps in (((1, 4), 2), ((2, 2), 3), ((1, 1), 1)):
        plan = plan_for(micro, world, steps)
        rendered = render(preset, plan, optim={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0})
        ds = deepspeed_config(rendered, plan.world_size)
        assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (
            plan.global_batch, plan.micro_batch, plan.accumulation_steps)
        assert ds.optimizer_name == "adam" and ds.optimizer_params["lr"] == plan.peak_lr
        assert ds.zero_optimization_stage == zero_stage(preset)
        assert ds.bfloat16_config.enabled == (precision(preset) == "bf16")
        assert ds.float16_config.enabled == (precision(preset) == "fp16")
        assert ds.gradient_clipping == 10.0
    assert "extends" not in rendered


def test_deepspeed_check_is_real(deepspeed_config) -> None:
    """The same rendered config at a world it was not planned for is refused by DeepSpeed itself."""
    rendered = render(load_preset("bs12.json"), plan_for(12, (1, 4), 2))
    with pytest.raises(AssertionError, match="96 != 12 \\* 2 \\* 2"):
        deepspeed_config(rendered, 2)


def test_reference_plan_with_bs4(deepspeed_config) -> None:
    plan = make_plan(PlanRequest(batch_size=4, num_nodes=1, gpus_per_node=2,
                                 recipe_accum=AccumSpec(accu_grad=1, effec_batch_size=8)))
    rendered = render(load_preset("ds_configs/bs4.json"), plan)
    assert {k: rendered[k] for k in plan.ds_batch_keys()} == {
        "train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    assert rendered["optimizer"]["params"]["lr"] == 5e-4
    deepspeed_config(rendered, 2)


@pytest.mark.parametrize("key, value", [("train_micro_batch_size_per_gpu", 4), ("train_batch_size", 48),
                                        ("gradient_accumulation_steps", 1)])
def test_preset_batch_key_that_disagrees_is_an_error(key: str, value: int) -> None:
    plan = plan_for(12)  # 12 × 2 × 4 = 96
    preset = {**load_preset("base.json"), key: value}
    with pytest.raises(DsConfigError) as info:
        render(preset, plan, source="mine.json")
    expected = plan.ds_batch_keys()[key]
    assert f"mine.json: {key} is {value} but the plan" in str(info.value)
    assert f"gives {expected}" in str(info.value)
    assert isinstance(info.value, PlanError)


def test_preset_batch_key_that_agrees_is_kept() -> None:
    plan = plan_for(12)
    preset = {**load_preset("bs12.json"), "train_batch_size": 96, "gradient_accumulation_steps": 2}
    assert render(preset, plan)["train_batch_size"] == 96


def test_lr_and_optimizer_settings_have_one_source() -> None:
    plan = plan_for(12)
    preset = load_preset("bs12.json")
    preset["optimizer"]["params"]["lr"] = 1e-3
    with pytest.raises(DsConfigError, match="optimizer.params.lr is 0.001 but the plan's peak LR"):
        render(preset, plan)
    with pytest.raises(DsConfigError, match="optimizer.params.betas is \\[0.9, 0.999\\] but the recipe's optim.betas"):
        render(load_preset("bs12.json"), plan, optim={"betas": (0.8, 0.99)})
    rendered = render({"train_micro_batch_size_per_gpu": 12, "optimizer": {"type": "Adam"}}, plan,
                      optim={"betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 0.0})
    assert rendered["optimizer"]["params"] == {"lr": plan.peak_lr, "betas": [0.9, 0.99], "eps": 1e-6,
                                               "weight_decay": 0.0}


def test_scheduler_peak_and_warmup_from_the_plan(deepspeed_config) -> None:
    plan = plan_for(12, warmup_samples=1000)  # ceil(1000 / 96) = 11 steps
    preset = {**load_preset("bs12.json"), "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 1e-6}}}
    rendered = render(preset, plan)
    assert rendered["scheduler"]["params"] == {"warmup_min_lr": 1e-6, "warmup_max_lr": plan.peak_lr,
                                               "warmup_num_steps": 11}
    assert deepspeed_config(rendered, 4).scheduler_name == "WarmupLR"
    cosine = render({**preset, "scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 100}}}, plan)
    assert cosine["scheduler"]["params"]["warmup_num_steps"] == 11
    with pytest.raises(DsConfigError, match="warmup_num_steps is 5 but the plan's warmup"):
        render({**preset, "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 5}}}, plan)
    with pytest.raises(DsConfigError, match="scheduler type 'OneCycle' cannot be rendered"):
        render({**preset, "scheduler": {"type": "OneCycle", "params": {}}}, plan)


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(DsConfigError, match="(?s)'nope.json' not found.*Shipped presets.*bs12.json"):
        load_preset("nope.json")
    _write(tmp_path, "a.json", {"extends": "b.json"})
    _write(tmp_path, "b.json", {"extends": ["a.json"]})
    with pytest.raises(DsConfigError, match="cycle: .*a.json → .*b.json → .*a.json"):
        load_preset(str(tmp_path / "a.json"))
    _write(tmp_path, "c.json", {"extends": "missing.json"})
    with pytest.raises(DsConfigError, match="'missing.json' not found \\(extended from"):
        load_preset(str(tmp_path / "c.json"))
    _write(tmp_path, "d.json", '{\n  "gradient_clipping": 1.0,\n  oops\n}')
    with pytest.raises(DsConfigError, match="d.json:3:3: not valid JSON"):
        load_preset(str(tmp_path / "d.json"))
    _write(tmp_path, "e.json", '{"gradient_clipping": 1.0, "gradient_clipping": 2.0}')
    with pytest.raises(DsConfigError, match="duplicate key 'gradient_clipping'"):
        load_preset(str(tmp_path / "e.json"))
    _write(tmp_path, "f.json", {"extends": 3})
    with pytest.raises(DsConfigError, match="extends"):
        load_preset(str(tmp_path / "f.json"))
    _write(tmp_path, "g.json", {"train_micro_batch_size_per_gpu": 0})
    with pytest.raises(DsConfigError, match="positive whole number"):
        load_preset(str(tmp_path / "g.json"))
    _write(tmp_path, "h.json", {"elasticity": {"enabled": True}})
    with pytest.raises(DsConfigError, match="elasticity"):
        load_preset(str(tmp_path / "h.json"))
    with pytest.raises(DsConfigError, match="bf16 and fp16 are both enabled"):
        load_preset("bf16.json+fp16.json")
    with pytest.raises(DsConfigError, match="expected file"):
        load_preset("bs12.json+")


def test_extends_list_and_relative_paths(tmp_path: Path) -> None:
    sub = tmp_path / "sub"
    sub.mkdir()
    _write(tmp_path, "x.json", {"gradient_clipping": 1.0, "zero_optimization": {"stage": 1}})
    _write(sub, "y.json", {"extends": ["../x.json"], "zero_optimization": {"reduce_bucket_size": 10}})
    _write(sub, "z.json", {"extends": ["y.json", "../x.json"], "gradient_clipping": 2.0})
    preset = load_preset(str(sub / "z.json"))
    assert preset == {"gradient_clipping": 2.0, "zero_optimization": {"stage": 1, "reduce_bucket_size": 10}}


def _recorded_keys(config: dict, world_size: int, deepspeed_config) -> set[str]:
    """The top-level keys DeepSpeedConfig reads (get, [], in, keys()) while it parses `config`."""
    seen: set[str] = set()

    class Recording(dict):
        def get(self, key, *default):
            seen.add(key)
            return super().get(key, *default)

        def __getitem__(self, key):
            seen.add(key)
            return super().__getitem__(key)

        def __contains__(self, key):
            seen.add(key)
            return super().__contains__(key)

        def keys(self):
            owner = self

            class Keys(set):
                def __contains__(self, key):
                    seen.add(key)
                    return dict.__contains__(owner, key)

            return Keys(dict.keys(self))

        def __copy__(self):
            return self

    import deepspeed.runtime.config as dsc

    stub = types.SimpleNamespace(get_rank=lambda group=None: 0, get_world_size=lambda group=None: world_size)
    real, dsc.dist = dsc.dist, stub
    try:
        dsc.DeepSpeedConfig(Recording(config))
    finally:
        dsc.dist = real
    return seen


def test_pinned_deepspeed_keys_are_what_the_installed_deepspeed_reads(deepspeed_config) -> None:
    """The dry run checks keys without importing DeepSpeed; these sets must be exactly DeepSpeed's."""
    import deepspeed.runtime.config as dsc
    from deepspeed.runtime.precision_config import DeepSpeedBF16Config, DeepSpeedFP16Config
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from launcher.plan.ds_config import DEEPSPEED_KEYS, PRECISION_KEYS, REMOVED_KEYS, ZERO_KEYS

    plan = plan_for(4, (1, 2), 2)
    full = render(load_preset("ds_configs/bs4.json+ds_configs/zero3.json+ds_configs/bf16.json"), plan)
    read = _recorded_keys(full, 2, deepspeed_config) | _recorded_keys({"train_micro_batch_size_per_gpu": 1}, 2,
                                                                      deepspeed_config)
    assert set(REMOVED_KEYS) == set(dsc._REMOVED_TOP_LEVEL_CONFIG_KEYS)
    assert set(DEEPSPEED_KEYS) == read - set(REMOVED_KEYS)

    def names(model) -> set[str]:
        out = set()
        for name, field in model.model_fields.items():
            out |= {name} | ({field.alias} if field.alias else set())
        return out

    assert set(ZERO_KEYS) == names(DeepSpeedZeroConfig)
    assert set(PRECISION_KEYS["bf16"]) == names(DeepSpeedBF16Config)
    assert set(PRECISION_KEYS["fp16"]) == names(DeepSpeedFP16Config)


@pytest.mark.parametrize("content, message", [
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage is 7; valid ZeRO stages: 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage is True; valid ZeRO stages"),
    ({"zero_optimization": {"stagee": 1}}, "unknown DeepSpeed key zero_optimization.'stagee'; did you mean 'stage'?"),
    ({"zero_optimization": 3}, "zero_optimization must be an object"),
    ({"gradient_cliping": 1.0}, "unknown DeepSpeed key 'gradient_cliping'; did you mean 'gradient_clipping'? "
                                "(DeepSpeed 0.19.8 ignores unknown top-level keys silently)"),
    ({"nebula": {"enabled": True}}, "\"nebula\" was removed from DeepSpeed 0.19; remove it"),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled must be true or false, got 'yes'"),
    ({"bf16": True}, "bf16 must be an object like {\"enabled\": true}"),
    ({"fp16": {"enabled": True, "loss_scale": -1}}, "fp16.loss_scale must be a number >= 0, got -1"),
    ({"fp16": {"enable": True}}, "unknown DeepSpeed key fp16.'enable'; did you mean 'enabled'?"),
    ({"gradient_clipping": -1}, "gradient_clipping must be a number >= 0 (0: off), got -1"),
    ({"optimizer": {"type": 3}}, "optimizer must be an object like"),
])
def test_the_dry_run_checks_what_deepspeed_would_refuse_late_or_ignore(tmp_path: Path, content: dict,
                                                                        message: str) -> None:
    """Each refused before any process group, naming the file that sets the key."""
    bad = _write(tmp_path, "bad.json", {"extends": str(PRESET_DIR / "base.json"), **content})
    with pytest.raises(DsConfigError) as info:
        load_preset(f"ds_configs/bs4.json+{bad}")
    assert message in str(info.value)
    assert str(info.value).startswith(str(bad))


@pytest.fixture(scope="module")
def validate():
    pytest.importorskip("deepspeed")
    from launcher.training.engine import validate_with_deepspeed

    return validate_with_deepspeed


def test_deepspeed_validation_passes_every_shipped_combination(validate) -> None:
    for spec in COMBOS:
        preset = load_preset(spec)
        plan = plan_for(preset_micro_batch(preset) or 4, (2, 2), 3)
        validate(render(preset, plan, optim={"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0}),
                 plan.world_size, spec)


@pytest.mark.parametrize("change, message", [
    ({"zero_optimization": {"stage": 7}}, "DeepSpeed 0.19.8 refuses zero_optimization.stage = 7: Input "
                                          "should be 0, 1, 2, 3"),
    ({"fp16": {"enabled": True, "loss_scale": -1}}, "refuses fp16.loss_scale = -1: Value error, fp16.loss_scale must "
                                                    "be >= 0"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}},
     "refuses zero_optimization.reduce_bucket_size = -5: Input should be greater than 0"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}},
     "refuses the config at world size 4: bfloat16 and fp16 modes cannot be simultaneously enabled"),
    ({"optimizer": {"type": "Adamm", "params": {}}}, "optimizer.type 'Adamm' is neither a DeepSpeed optimizer"),
])
def test_deepspeed_validation_names_the_key_in_one_line(validate, change: dict, message: str) -> None:
    """What only DeepSpeed's own model knows, on a config that skipped the dry run's checks."""
    plan = plan_for(4, (2, 2), 2)
    rendered = render(load_preset("ds_configs/bs4.json"), plan)
    rendered.update(change)
    with pytest.raises(DsConfigError) as info:
        validate(rendered, plan.world_size, "mine.json")
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_deepspeed_validation_runs_at_the_worlds_size(validate) -> None:
    plan = plan_for(4, (2, 2), 2)  # 4 × 2 × 4 = 32
    rendered = render(load_preset("ds_configs/bs4.json"), plan)
    validate(rendered, 4, "bs4.json")
    with pytest.raises(DsConfigError, match="at world size 2: Check batch related parameters.*32 != 4 \\* 2 \\* 2"):
        validate(rendered, 2, "bs4.json")


def test_deepspeed_validation_names_the_preset_file_that_sets_the_key(validate, tmp_path: Path) -> None:
    bad = _write(tmp_path, "buckets.json", {"zero_optimization": {"stage": 2, "reduce_bucket_size": -5}})
    spec = f"ds_configs/bs4.json+{bad}"
    plan = plan_for(4, (2, 2), 2)
    rendered = render(load_preset(spec), plan)  # the dry run's checks let a bucket size through
    with pytest.raises(DsConfigError) as info:
        validate(rendered, plan.world_size, spec)
    assert str(info.value) == (f"{bad}: DeepSpeed 0.19.8 refuses zero_optimization.reduce_bucket_size = -5: "
                               "Input should be greater than 0")
