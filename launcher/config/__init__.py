"""The recipe: typed sections with ranges (`sections`), and their loading from defaults, YAML and overrides (`load`).

Torch-free, like the planner: the dry run imports it. The loading's names are imported on first use, so that the
planner's rules, which only need the sections' vocabulary, import nothing beyond the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from launcher.config.sections import (COMPILE_REGIONS, HOLDS, LR_RULES, RANGES, WARMUP_AUTO, BatchSection, Config,
                                      ConfigError, CudaSection, DataSection, MixingSection, ModelSection, OptimSection,
                                      Range, ScheduleSection, TrainSection)

_LOAD = ("ACCUMULATION_KEYS", "config_to_dict", "dump_yaml", "load_config", "load_config_with_origins",
         "parse_override", "replace_section")
__all__ = ["COMPILE_REGIONS", "HOLDS", "LR_RULES", "RANGES", "WARMUP_AUTO", "BatchSection", "Config", "ConfigError",
           "CudaSection", "DataSection", "MixingSection", "ModelSection", "OptimSection", "Range", "ScheduleSection",
           "TrainSection", *_LOAD]

if TYPE_CHECKING:
    from launcher.config.load import (ACCUMULATION_KEYS, config_to_dict, dump_yaml, load_config,
                                      load_config_with_origins, parse_override, replace_section)


def __getattr__(name: str) -> Any:
    if name not in _LOAD:
        raise AttributeError(f"module 'launcher.config' has no attribute {name!r}")
    value = getattr(importlib.import_module("launcher.config.load"), name)
    globals()[name] = value
    return value
