"""Recipe configuration: defaults < YAML recipe < command-line overrides.

Each section is a small frozen dataclass and each component receives only its own section
(`build_model(cfg.model.preset)`, the data pipeline gets `cfg.data`, ...). An unknown section or
key anywhere is an error that lists the valid ones. Only the standard library and PyYAML are
imported here so the dry run stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says which key and why."""


@dataclass(frozen=True)
class ModelSection:
    preset: str = "mossformer2_se_48k"


@dataclass(frozen=True)
class DataSection:
    train_list: str | None = None
    valid_list: str | None = None
    sample_rate_hz: int = 48000
    segment_seconds: float = 4.0
    normalize: bool = True
    resample: bool = False
    skip_bad: bool = False
    # Where validated file headers are cached; None caches next to the list file.
    cache_dir: str | None = None
    num_workers: int = 4
    pin_memory: bool = True
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # Batches a background thread in each rank keeps ready for the loop (data/loader.py ThreadPrefetcher);
    # 0 takes them straight from the DataLoader.
    thread_prefetch: int = 2
    # How many nice levels below the training loop the loading (prefetch thread, workers) runs (Linux). On
    # CPU ranks that compute on every core (the demo) 19 lets the loop go first; 0 by default, because a GPU
    # rank may spin-wait on its device at normal priority and would then starve niced workers.
    loader_nice: int = 0

    def __post_init__(self) -> None:
        for key, low, high in (("num_workers", 0, None), ("prefetch_factor", 1, None), ("thread_prefetch", 0, None),
                               ("loader_nice", 0, 19)):
            value = getattr(self, key)
            if value < low or (high is not None and value > high):
                span = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ConfigError(f"data.{key} must be {span}, got {value}")
        if not self.segment_seconds > 0:
            raise ConfigError(f"data.segment_seconds must be > 0, got {self.segment_seconds}")


@dataclass(frozen=True)
class BatchSection:
    """Per-GPU micro-batch and accumulation, given in exactly one way (see launcher/plan.py)."""

    batch_size: int = 4
    accu_grad: int | None = 1
    effec_batch_size: int | None = 8
    gradient_accumulation_steps: int | None = None
    global_batch: int | None = None
    # The world the recipe's accumulation was written for (the reference: 2 GPUs on one node).
    recipe_num_nodes: int = 1
    recipe_gpus_per_node: int = 2
    hold: str = "global_batch"


@dataclass(frozen=True)
class OptimSection:
    base_lr: float = 5e-4
    reference_batch: int = 16
    lr_rule: str = "linear"
    warmup_samples: int = 0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0


@dataclass(frozen=True)
class ScheduleSection:
    """LR schedule after warmup.

    `plateau` is the reference rule: the validation loss of an epoch that is not lower than the
    previous epoch's counts as a bad epoch; on the `halve_after`-th consecutive bad epoch the best
    checkpoint is reloaded and the LR multiplied by `factor`; on the `stop_after`-th training stops.
    `cosine` decays from the peak LR to `min_lr_ratio` × peak over the whole run.
    """

    kind: str = "plateau"
    halve_after: int = 5
    stop_after: int = 10
    factor: float = 0.5
    min_lr_ratio: float = 0.0


@dataclass(frozen=True)
class TrainSection:
    max_epoch: int = 100
    # Stop after this many optimizer steps in total (None: run max_epoch epochs).
    max_steps: int | None = None
    seed: int = 777
    run_dir: str = "runs/mossformer2_se_48k"
    log_interval_steps: int = 10
    # Checkpoint every N optimizer steps besides the end of each epoch (None: epochs only).
    save_interval_steps: int | None = None
    keep_last: int = 3
    # Validate every N optimizer steps besides the end of each epoch (None: epochs only).
    valid_interval_steps: int | None = None
    # Abort after this many consecutive optimizer steps with a non-finite loss.
    max_consecutive_nonfinite: int = 5
    progress_bar: bool = True
    # Start from these weights (launcher/init_weights.py): a ClearerVoice checkpoint, a launcher.export file or a
    # run directory. Only the weights: optimizer and LR are the recipe's. A run that resumes ignores it.
    init_from: str | None = None
    # A tensor of the model missing from init_from is an error; false keeps its fresh initialisation instead.
    init_strict: bool = True
    # PESQ/STOI/SI-SDR/DNSMOS of whole validation files every N epochs (0: never), on at most eval_max_pairs
    # pairs spread over data.valid_list, sharded over the ranks (launcher/evaluate.py).
    eval_interval_epochs: int = 0
    eval_max_pairs: int = 64
    # Processes per rank that compute the metrics while the model enhances the next batch (0: in the rank).
    eval_metric_workers: int = 1

    def __post_init__(self) -> None:
        for key, low in (("eval_interval_epochs", 0), ("eval_max_pairs", 1), ("eval_metric_workers", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"train.{key} must be >= {low}, got {getattr(self, key)}")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("train.init_from is empty: give a checkpoint file or run directory, or none")


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config)}


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type, refusing what does not fit."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def _build_section(cls: type, values: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys of '{where.split(':')[-1]}': "
            f"{', '.join(valid)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, Any], where: str) -> None:
    sections = _section_types()
    if not isinstance(extra, dict):
        raise ConfigError(f"{where}: expected a mapping of sections, got {type(extra).__name__}")
    for name, values in extra.items():
        if name not in sections:
            raise ConfigError(
                f"{where}: unknown section '{name}'; valid sections: {', '.join(sections)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}:{name}: expected a mapping, got {values!r}")
        base.setdefault(name, {}).update(values)


def parse_override(text: str) -> tuple[str, str, str]:
    """`section.key=value` → (section, key, value)."""
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. train.max_steps=20)")
    dotted, value = text.split("=", 1)
    section, key = dotted.split(".", 1)
    return section.strip(), key.strip(), value.strip()


# Accumulation is given in exactly one way; a layer (recipe, overrides) that names any of these
# replaces the way of the layers below it instead of mixing with their leftovers.
ACCUMULATION_KEYS = ("accu_grad", "effec_batch_size", "gradient_accumulation_steps", "global_batch")


def _replace_accumulation_way(raw: dict[str, dict[str, Any]], layer: dict[str, Any]) -> None:
    batch = layer.get("batch") if isinstance(layer, dict) else None
    if isinstance(batch, dict) and any(k in batch for k in ACCUMULATION_KEYS):
        for key in ACCUMULATION_KEYS:
            raw.setdefault("batch", {})[key] = None


def _read_recipe(path: Path, raw: dict[str, dict[str, Any]], chain: tuple[Path, ...] = ()) -> None:
    """Merge a YAML recipe into `raw`, after the recipe it `extends` (a path relative to it), if any."""
    if path.resolve() in chain:
        raise ConfigError(f"{path}: 'extends' cycle: {' → '.join(str(p) for p in (*chain, path))}")
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read recipe: {e.strerror}") from None
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if isinstance(loaded, dict) and "extends" in loaded:
        parent = loaded.pop("extends")
        _read_recipe(path.parent / str(parent), raw, (*chain, path.resolve()))
    _replace_accumulation_way(raw, loaded)
    _merge(raw, loaded, str(path))


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults < YAML at `path` (after the recipe it `extends`) < `overrides` (each `section.key=value`)."""
    raw: dict[str, dict[str, Any]] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        _read_recipe(Path(path), raw)
    layer: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        # Values are parsed as YAML scalars so `none`, `1e-4` and `[0.9, 0.99]` work.
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value
        _merge(layer, {section: {key: parsed}}, f"override {text!r}")
    _replace_accumulation_way(raw, layer)
    _merge(raw, layer, "overrides")
    sections = _section_types()
    built = {
        name: _build_section(cls, raw.get(name, {}), f"{where}:{name}") for name, cls in sections.items()
    }
    return Config(**built)


def replace_section(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of `cfg` with some keys of one section changed (validated like an override)."""
    current = getattr(cfg, section)
    values = {**dataclasses.asdict(current), **changes}
    return dataclasses.replace(cfg, **{section: _build_section(type(current), values, f"override:{section}")})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
