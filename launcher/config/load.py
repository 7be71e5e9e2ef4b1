"""Recipe configuration: built-in defaults < YAML recipe (and the recipes it extends) < command-line overrides.

An unknown section or key anywhere is an error that lists the valid ones; a value is coerced to its key's
type and checked against its range (launcher/config/sections.py), and an error names the layer that set it.
Only the standard library and PyYAML are imported here so the dry run stays fast.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal

import yaml

from launcher.config.sections import YAML_BOOLEAN_WORDS, Config, ConfigError

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
        expected = []
        for option in inner:
            try:
                return _coerce(value, option, where)
            except ConfigError as e:
                expected.append(str(e).split(": expected ", 1)[-1].split(", got ", 1)[0])
        raise ConfigError(f"{where}: expected {' or '.join(expected)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{where}: expected {' or '.join(repr(a) for a in args)}, got {value!r}")
    if origin is tuple:
        return _coerce_tuple(value, args, where)
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


def _coerce_tuple(value: Any, args: tuple[Any, ...], where: str) -> tuple[Any, ...]:
    """A list of any length (`tuple[str, ...]`: one path needs no brackets) or of exactly len(args) values."""
    if isinstance(value, str):
        value = yaml.safe_load(value)
        if isinstance(value, str) and args[-1] is Ellipsis:
            value = [value]
    if args[-1] is Ellipsis:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, args[0], where) for v in value)
    if not isinstance(value, (list, tuple)) or len(value) != len(args):
        raise ConfigError(f"{where}: expected a list of {len(args)} numbers, got {value!r}")
    return tuple(_coerce(v, a, where) for v, a in zip(value, args))


def _build_section(cls: type, values: dict[str, Any], where: str,
                   origins: dict[tuple[str, str], str] | None = None) -> Any:
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(valid))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; valid keys of '{where.split(':')[-1]}': "
            f"{', '.join(valid)}"
        )
    section = where.split(":")[-1]

    def key_where(k: str) -> str:
        origin = (origins or {}).get((section, k))
        return f"{origin}: {section}.{k}" if origin else f"{where}.{k}"

    def word(k: str, v: Any) -> Any:
        return YAML_BOOLEAN_WORDS.get((section, k), {}).get(v, v) if isinstance(v, bool) else v

    kwargs = {k: _coerce(word(k, v), hints[k], key_where(k)) for k, v in values.items()}
    return cls(**kwargs)


def _merge(base: dict[str, dict[str, Any]], extra: dict[str, Any], where: str,
           origins: dict[tuple[str, str], str] | None = None) -> None:
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
        if origins is not None:
            origins.update({(name, key): where for key in values})


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


def _read_recipe(path: Path, raw: dict[str, dict[str, Any]], origins: dict[tuple[str, str], str],
                 chain: tuple[Path, ...] = ()) -> None:
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
        _read_recipe(path.parent / str(parent), raw, origins, (*chain, path.resolve()))
    _replace_accumulation_way(raw, loaded)
    _merge(raw, loaded, str(path), origins)


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Defaults < YAML at `path` (after the recipe it `extends`) < `overrides` (each `section.key=value`)."""
    return load_config_with_origins(path, overrides)[0]


def load_config_with_origins(path: str | Path | None = None, overrides: typing.Iterable[str] = ()
                             ) -> tuple[Config, dict[tuple[str, str], str]]:
    """The config and, for every (section, key) a layer set, that layer: a recipe file's path, or
    "command line 'section.key=value'" for an override. Keys absent from the mapping are built-in defaults."""
    raw: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        _read_recipe(Path(path), raw, origins)
    layer: dict[str, dict[str, Any]] = {}
    for text in overrides:
        section, key, value = parse_override(text)
        # Values are parsed as YAML scalars so `none`, `1e-4` and `[0.9, 0.99]` work.
        try:
            parsed = yaml.safe_load(value) if value else value
        except yaml.YAMLError:
            parsed = value
        _merge(layer, {section: {key: parsed}}, f"command line {text!r}", origins)
    _replace_accumulation_way(raw, layer)
    _merge(raw, layer, "overrides")
    sections = _section_types()
    built = {}
    try:
        for name, cls in sections.items():
            built[name] = _build_section(cls, raw.get(name, {}), f"{where}:{name}", origins)
        return Config(**built), origins
    except ConfigError as e:
        if e.key is None:
            raise
        # A value out of range, or keys that contradict each other: say which layer set the one named, else (a
        # key left at its default, e.g. the noise lists that clean lists need) the layers that set its section.
        section_layers = dict.fromkeys(o for (section, _), o in origins.items() if section == e.key[0])
        where = origins.get(e.key) or "; ".join(section_layers) or "built-in defaults"
        raise ConfigError(f"{where}: {e}", e.key) from None


def replace_section(cfg: Config, section: str, **changes: Any) -> Config:
    """A copy of `cfg` with some keys of one section changed (validated like an override)."""
    current = getattr(cfg, section)
    values = {**dataclasses.asdict(current), **changes}
    return dataclasses.replace(cfg, **{section: _build_section(type(current), values, f"override:{section}")})


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
