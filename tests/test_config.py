"""Config flows one way: defaults < YAML < overrides; unknown keys are errors listing valid ones."""

from pathlib import Path

import pytest

from launcher.config import Config, ConfigError, config_to_dict, load_config, replace_section

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_reference_recipe():
    cfg = load_config(None)
    assert cfg.batch.batch_size == 4 and cfg.batch.accu_grad == 1 and cfg.batch.effec_batch_size == 8
    assert cfg.optim.base_lr == 5e-4 and cfg.optim.reference_batch == 16
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.eps == 1e-8 and cfg.optim.weight_decay == 0.0
    assert cfg.data.sample_rate_hz == 48000 and cfg.data.segment_seconds == 4.0
    assert cfg.train.seed == 777 and cfg.train.max_epoch == 100
    assert (cfg.schedule.halve_after, cfg.schedule.stop_after, cfg.schedule.factor) == (5, 10, 0.5)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load(recipe):
    assert isinstance(load_config(recipe), Config)


def test_yaml_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch:\n  batch_size: 12\noptim:\n  base_lr: 1.0e-3\n")
    cfg = load_config(recipe, ["optim.base_lr=2e-3", "train.max_steps=7", "optim.betas=[0.8, 0.9]",
                               "batch.effec_batch_size=none"])
    assert cfg.batch.batch_size == 12  # YAML over defaults
    assert cfg.optim.base_lr == 2e-3  # override over YAML
    assert cfg.train.max_steps == 7 and cfg.optim.betas == (0.8, 0.9) and cfg.batch.effec_batch_size is None


@pytest.mark.parametrize("override, words", [
    ("optim.lr=1", ["unknown key", "lr", "base_lr", "reference_batch"]),
    ("optimizer.base_lr=1", ["unknown section", "optimizer", "optim", "schedule"]),
    ("batch.batch_size=four", ["batch.batch_size", "integer", "four"]),
    ("batch.batch_size=true", ["integer"]),
    ("data.normalize=maybe", ["true/false"]),
    ("nodot=1", ["section.key=value"]),
    ("data.num_workers=-1", ["data.num_workers", ">= 0", "-1"]),
    ("data.prefetch_factor=0", ["data.prefetch_factor", ">= 1"]),
    ("data.thread_prefetch=-1", ["data.thread_prefetch", ">= 0"]),
    ("data.loader_nice=20", ["data.loader_nice", "between 0 and 19", "20"]),
    ("data.segment_seconds=0", ["data.segment_seconds", "> 0"]),
])
def test_bad_overrides_name_the_key(override, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for w in words:
        assert w in str(e.value)


def test_unknown_yaml_key_lists_valid_ones(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"max_epochs.*max_epoch"):
        load_config(recipe)


def test_missing_or_broken_recipe(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("batch: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_replace_section_validates_and_round_trips():
    cfg = replace_section(load_config(None), "train", run_dir="/tmp/x")
    assert cfg.train.run_dir == "/tmp/x"
    assert config_to_dict(cfg)["train"]["run_dir"] == "/tmp/x"
    with pytest.raises(ConfigError):
        replace_section(cfg, "train", nonsense=1)


def test_a_layer_naming_an_accumulation_way_replaces_the_way_below(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("batch:\n  gradient_accumulation_steps: 3\n")
    cfg = load_config(recipe)
    assert cfg.batch.gradient_accumulation_steps == 3
    assert cfg.batch.accu_grad is None and cfg.batch.effec_batch_size is None
    cfg = load_config(recipe, ["batch.global_batch=48"])
    assert cfg.batch.global_batch == 48 and cfg.batch.gradient_accumulation_steps is None
    # Two ways in the same layer stay, for the planner to check that they agree.
    cfg = load_config(None, ["batch.global_batch=48", "batch.gradient_accumulation_steps=6"])
    assert (cfg.batch.global_batch, cfg.batch.gradient_accumulation_steps) == (48, 6)
    # Other batch keys leave the way alone.
    cfg = load_config(None, ["batch.batch_size=2"])
    assert (cfg.batch.accu_grad, cfg.batch.effec_batch_size) == (1, 8)


def test_recipes_extend_other_recipes(tmp_path):
    (tmp_path / "base.yaml").write_text("batch:\n  batch_size: 2\n  effec_batch_size: 4\ntrain:\n  seed: 1\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nbatch:\n  global_batch: 24\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.batch.batch_size == 2 and cfg.train.seed == 1
    assert cfg.batch.global_batch == 24 and cfg.batch.effec_batch_size is None  # the child's way replaces
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
