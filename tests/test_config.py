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


def _numeric(annotation) -> bool:
    import typing

    args = typing.get_args(annotation) or (annotation,)
    return any(a in (int, float) or typing.get_origin(a) is tuple for a in args)


def test_every_numeric_or_choice_key_has_a_range():
    """A key added without a range check fails here."""
    import dataclasses
    import typing

    from launcher.config import RANGES

    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] is bool:
                continue  # true/false is all there is, and _coerce refuses anything else
            assert f.name in RANGES[section.name], f"{section.name}.{f.name} has no range in launcher/config/sections.py RANGES"
        assert set(RANGES[section.name]) <= {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize("override, message", [
    ("train.max_epoch=-3", "train.max_epoch must be >= 1, got -3"),
    ("train.max_steps=0", "train.max_steps must be >= 1, got 0"),
    ("train.seed=-1", "train.seed must be between 0 and 4294967295, got -1"),
    ("train.seed=4294967296", "train.seed must be between 0 and 4294967295, got 4294967296"),
    ("train.log_interval_steps=0", "train.log_interval_steps must be >= 1, got 0"),
    ("train.save_interval_steps=-5", "train.save_interval_steps must be >= 1, got -5"),
    ("train.valid_interval_steps=0", "train.valid_interval_steps must be >= 1, got 0"),
    ("train.keep_last=0", "train.keep_last must be >= 1, got 0"),
    ("train.max_consecutive_nonfinite=0", "train.max_consecutive_nonfinite must be >= 1, got 0"),
    ("train.run_dir=", "train.run_dir must be a non-empty string, got ''"),
    ("optim.base_lr=0", "optim.base_lr must be > 0, got 0.0"),
    ("optim.base_lr=nan", "optim.base_lr must be a finite number > 0, got nan"),
    ("optim.reference_batch=0", "optim.reference_batch must be >= 1, got 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must be in [0, 1), got (0.9, 1.0)"),
    ("optim.betas=[-0.1, 0.999]", "optim.betas must be in [0, 1), got (-0.1, 0.999)"),
    ("optim.eps=0", "optim.eps must be > 0, got 0.0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay must be >= 0, got -0.01"),
    ("optim.warmup_samples=-1", "optim.warmup_samples must be >= 0 or 'auto', got -1"),
    ("optim.lr_rule=cubic", "optim.lr_rule must be one of linear, sqrt, none, got 'cubic'"),
    ("schedule.kind=step", "schedule.kind must be one of plateau, cosine, got 'step'"),
    ("schedule.halve_after=0", "schedule.halve_after must be >= 1, got 0"),
    ("schedule.stop_after=0", "schedule.stop_after must be >= 1, got 0"),
    ("schedule.factor=0", "schedule.factor must be in (0, 1], got 0.0"),
    ("schedule.factor=1.5", "schedule.factor must be in (0, 1], got 1.5"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio must be between 0 and 1, got 2.0"),
    ("batch.batch_size=0", "batch.batch_size must be >= 1, got 0"),
    ("batch.accu_grad=2", "batch.accu_grad must be one of 0, 1, got 2"),
    ("batch.effec_batch_size=0", "batch.effec_batch_size must be >= 1, got 0"),
    ("batch.gradient_accumulation_steps=-1", "batch.gradient_accumulation_steps must be >= 1, got -1"),
    ("batch.global_batch=0", "batch.global_batch must be >= 1, got 0"),
    ("batch.recipe_num_nodes=0", "batch.recipe_num_nodes must be >= 1, got 0"),
    ("batch.recipe_gpus_per_node=0", "batch.recipe_gpus_per_node must be >= 1, got 0"),
    ("batch.hold=world", "batch.hold must be one of accumulation, global_batch, got 'world'"),
    ("data.sample_rate_hz=0", "data.sample_rate_hz must be >= 1, got 0"),
    ("data.train_list=", "data.train_list must be a non-empty string, got ''"),
    ("model.preset=", "model.preset must be a non-empty string, got ''"),
])
def test_out_of_range_values_name_the_key_the_value_and_the_range(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "recipes/train_48k.yaml", [override])
    assert str(e.value) == f"command line {override!r}: {message}"


def test_a_recipe_value_out_of_range_names_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  max_epoch: -3\n")
    with pytest.raises(ConfigError, match=f"^{recipe}: train.max_epoch must be >= 1, got -3$"):
        load_config(recipe)
    child = tmp_path / "child.yaml"
    child.write_text("extends: r.yaml\ntrain:\n  seed: 1\n")
    with pytest.raises(ConfigError, match=f"^{recipe}: train.max_epoch"):  # the file that set it
        load_config(child)
    assert load_config(recipe, ["train.max_epoch=3"]).train.max_epoch == 3  # the command line fixes it


def test_warmup_is_automatic_by_default_and_no_shipped_recipe_switches_it_off():
    assert load_config(None).optim.warmup_samples == "auto"
    assert load_config(None, ["optim.warmup_samples=auto"]).optim.warmup_samples == "auto"
    assert load_config(None, ["optim.warmup_samples=480"]).optim.warmup_samples == 480
    with pytest.raises(ConfigError, match="expected an integer or 'auto', got 'soon'"):
        load_config(None, ["optim.warmup_samples=soon"])
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        cfg = load_config(recipe)
        assert cfg.optim.warmup_samples != 0, recipe.name
        # The shipped recipes take the default hold: a new micro-batch or world keeps their accumulation.
        assert cfg.batch.hold == "accumulation", recipe.name


def test_origins_say_which_layer_set_each_key(tmp_path):
    from launcher.config import load_config_with_origins

    (tmp_path / "base.yaml").write_text("batch:\n  batch_size: 2\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\noptim:\n  base_lr: 1.0e-3\n")
    cfg, origins = load_config_with_origins(tmp_path / "child.yaml", ["train.seed=5"])
    assert origins[("batch", "batch_size")] == str(tmp_path / "base.yaml")
    assert origins[("optim", "base_lr")] == str(tmp_path / "child.yaml")
    assert origins[("train", "seed")] == "command line 'train.seed=5'"
    assert ("train", "max_epoch") not in origins and cfg.train.max_epoch == 100
