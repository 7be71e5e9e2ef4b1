"""`train.compile` against the DeepSpeed preset: which combinations compile, checked before any process group.

What model/compile.py's regions do inside DeepSpeed 0.19.8 was measured on 2 CPU ranks (bench/bench_compile.py,
BENCHMARKS.md §10): at ZeRO 0, 1 and 2 they train in fp32, bf16 and fp16 as eager does; at ZeRO 3 nothing compiles,
whichever way. The dry run and training both call `check_compile` from launcher/plan/request.py, so a combination
that cannot work is refused by `python -m launcher.plan` as by `launcher/train.py`. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from launcher.config import COMPILE_REGIONS
from launcher.plan.ds_config import DsConfigError, precision, setting_file, zero_stage
from launcher.plan.rules import PlanError

ZERO3_UPSTREAM = ("https://github.com/pytorch/pytorch/issues/115484",
                  "https://github.com/deepspeedai/DeepSpeed/issues/7951")
_WHAT = {
    "off": "off: eager",
    "blocks": "blocks: each gated attention unit and FSMN block compiled in place (one graph per block kind), "
              "features and loss as functions",
    "model": "model: the mask network compiled as one region (every layer unrolled), features and loss as functions",
}


def check_compile(regions: str, preset: Mapping[str, Any], spec: str, origin: str) -> None:
    """Refuse `train.compile` (set by `origin`) where the preset `spec` cannot run it; raises PlanError."""
    if regions not in COMPILE_REGIONS:  # the config's range refuses it first; a direct caller gets the same rule
        raise PlanError(f"train.compile {regions!r}: valid: {', '.join(COMPILE_REGIONS)}", rule="compile regions")
    if "compile" in preset:
        raise DsConfigError(
            f"{setting_file(spec, ('compile',))}: \"compile\" configures DeepSpeed's engine.compile() (and "
            f"DeepCompile), which this launcher never calls: DeepSpeed would log that it runs without it and train "
            f"eagerly. engine.compile() also compiles the engine's own forward hooks and recompiles on every "
            f"micro-batch (BENCHMARKS.md §10).\nValid choices: remove \"compile\" from the preset, and set "
            f"train.compile=blocks (or model) to compile the training step.", rule="compile via train.compile")
    if regions == "off" or zero_stage(preset) < 3:
        return
    # bf16 accumulates gradients in fp32, which DeepSpeed does only at ZeRO >= 1 (ds_config.py).
    zero0 = "" if precision(preset) == "bf16" else " or 0 (zero0.json)"
    raise PlanError(
        f"train.compile={regions} ({origin}) with ZeRO stage 3 ({setting_file(spec, ('zero_optimization', 'stage'))}"
        f", {precision(preset)}): ZeRO 3 gathers each parameter in module hooks that dynamo cannot trace, and a "
        f"compiled region sees the parameters at their released partition size (0,); no way of compiling runs at "
        f"ZeRO 3 in DeepSpeed 0.19.8 (BENCHMARKS.md §10). Upstream: {', '.join(ZERO3_UPSTREAM)}.\n"
        f"Rule: train.compile needs ZeRO stage 0, 1 or 2.\n"
        f"Valid choices: train.compile=off with ZeRO 3; or ZeRO 2 with train.compile={regions} "
        f"(ds_configs/zero2.json in place of the stage 3 preset: gradients and optimizer states partitioned as at "
        f"ZeRO 3, the parameters whole on every GPU), or ZeRO 1 (zero1.json){zero0}.", rule="compile needs ZeRO 0-2")


def compile_text(regions: str) -> str:
    """The card's `compile` row."""
    text = _WHAT.get(regions, regions)
    if regions == "off":
        return text + " (train.compile=blocks compiles the training step at ZeRO 0-2)"
    return text + "; validation eager; the first step after a start compiles (train.slow_phase_timeout_s)"
