"""DeepSpeed presets: engine settings in small JSON overlays; batch numbers and LR from the plan.

A preset is a JSON file in ds_configs/ that carries engine settings (ZeRO stage, precision,
clipping, bucket sizes, optimizer type and its betas/eps/weight decay) and at most the per-GPU
micro-batch its name promises. A preset extends others with `"extends": "base.json"` (or a list,
paths relative to the file); a spec may join several presets with `+`
(`ds_configs/bs12.json+ds_configs/zero3.json`). Files are merged in dependency order, each file
once, later files winning (dicts merge key by key, anything else is replaced), so an overlay's
settings are never undone by a base that a later overlay extends again.

`render(preset, plan)` adds the batch triple and the LR from the plan. A preset that already
holds one of those numbers must agree with the plan: a disagreement is an error, not an override.

Two levels of checking. Loading a preset checks, without DeepSpeed, what can go wrong silently or
late: top-level keys DeepSpeed does not know (it ignores them), keys it removed, the ZeRO block
(its keys, stage 0-3), the precision blocks (their keys, booleans), clipping and the optimizer
block. `validate_with_deepspeed` (training, before any process group) then runs DeepSpeed's own
config model at the run's world size. Only the standard library is imported here at module level
(the dry run stays fast).
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launcher.plan.rules import Plan, PlanError

PRESET_DIR = Path(__file__).resolve().parent.parent.parent / "ds_configs"
DEFAULT_PRESET = "ds_configs/base.json"
BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_COMMENT_KEY = "_comment"
# DeepSpeed schedulers whose peak LR and warmup we know how to render from the plan.
_SCHEDULER_KEYS = {
    "WarmupLR": ("warmup_max_lr", "warmup_num_steps"),
    "WarmupDecayLR": ("warmup_max_lr", "warmup_num_steps"),
    "WarmupCosineLR": (None, "warmup_num_steps"),  # its peak is the optimizer's lr
}


# What DeepSpeed 0.19.8 reads, pinned here so that the dry run needs no DeepSpeed import; tests/test_ds_config.py
# checks each set against the installed DeepSpeed (the top-level keys DeepSpeedConfig reads, and the fields and
# aliases of its pydantic models), so an upgrade that changes them fails a test instead of passing silently.
DEEPSPEED_KEYS = frozenset({
    "activation_checkpointing", "aio", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "csv_monitor", "data_efficiency", "data_types", "dataloader_drop_last",
    "datastates_ckpt", "disable_allgather", "disable_python_gc", "dump_state", "expert_parallel", "flops_profiler",
    "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping", "gradient_predivide_factor",
    "hybrid_engine", "log_level", "managed_gradient_accumulation", "memory_breakdown", "optimizer", "pipeline",
    "prescale_gradients", "scheduler", "seq_parallel_communication_data_type", "sequence_parallel_size",
    "steps_per_print", "tensor_parallel", "tensorboard", "timers", "torch_autocast", "train_batch_size",
    "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism", "vocabulary_size", "wall_clock_breakdown",
    "wandb", "weight_quantization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "zero_optimization",
})
# Top-level keys DeepSpeed 0.19 removed (it refuses them after the process group starts).
REMOVED_KEYS = frozenset({
    "amp", "compression_training", "curriculum_learning", "eigenvalue", "elasticity", "graph_harvesting", "nebula",
    "progressive_layer_drop", "quantize_training", "sparse_attention", "sparse_gradients",
})
ZERO_KEYS = frozenset({
    "allgather_bucket_size", "allgather_partitions", "allgather_sequential", "compute_grad_norm",
    "contiguous_gradients", "cpu_offload", "cpu_offload_param", "cpu_offload_use_pin_memory", "elastic_checkpoint",
    "enable_sanity_checks", "gather_16bit_weights_on_model_save", "ignore_unused_parameters", "leaf_module",
    "legacy_stage1", "load_from_fp32_weights", "log_trace_cache_warnings", "max_live_parameters",
    "max_reuse_distance", "memory_efficient_linear", "model_persistence_threshold", "module_granularity_threshold",
    "offload_optimizer", "offload_param", "overlap_comm", "override_module_apply", "param_persistence_threshold",
    "parameter_alignment", "pipeline_loading_checkpoint", "prefetch_bucket_size", "reduce_bucket_size",
    "reduce_scatter", "round_robin_gradients", "save_muon_momentum_buffer_in_memory", "stage",
    "stage3_allgather_sequential", "stage3_gather_16bit_weights_on_model_save",
    "stage3_gather_fp16_weights_on_model_save", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_model_persistence_threshold", "stage3_module_granularity_threshold", "stage3_param_persistence_threshold",
    "stage3_prefetch_bucket_size", "stage3_use_all_reduce_for_fetch_params", "sub_group_size",
    "use_all_reduce_for_fetch_params", "use_multi_rank_bucket_allreduce", "zenflow", "zero_hpz_partition_size",
    "zero_quantized_gradients", "zero_quantized_nontrainable_weights", "zero_quantized_weights",
})
ZERO_STAGES = (0, 1, 2, 3)
PRECISION_KEYS = {
    "bf16": frozenset({"bf16_master_weights_and_grads", "bf16_optimizer_states", "check_grad_overflow", "enabled",
                       "immediate_grad_update"}),
    "fp16": frozenset({"auto_cast", "consecutive_hysteresis", "enabled", "fp16_master_weights_and_grads",
                       "hysteresis", "initial_scale_power", "loss_scale", "loss_scale_window", "min_loss_scale"}),
}
PRECISION_KEYS["bfloat16"] = PRECISION_KEYS["bf16"]  # DeepSpeed's older name for the bf16 block
_PRECISION_BOOLS = {"enabled", "auto_cast", "consecutive_hysteresis", "fp16_master_weights_and_grads",
                    "bf16_master_weights_and_grads", "bf16_optimizer_states", "check_grad_overflow",
                    "immediate_grad_update"}


class DsConfigError(PlanError):
    """A preset that cannot be loaded or that disagrees with the plan."""


def available_presets() -> list[str]:
    return sorted(p.name for p in PRESET_DIR.glob("*.json"))


def _display(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _find(part: str, relative_to: Path | None) -> Path:
    """A preset file: relative to the extending file, else as given, else in the shipped folder."""
    given = Path(part)
    if relative_to is not None:
        candidates = [relative_to / given]
    else:
        candidates = [given]
        if not given.is_absolute():
            candidates += [PRESET_DIR.parent / given, PRESET_DIR / given]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    where = f" (extended from {_display(relative_to)})" if relative_to is not None else ""
    raise DsConfigError(
        f"DeepSpeed preset {part!r} not found{where}; looked at "
        f"{', '.join(dict.fromkeys(_display(c.absolute()) for c in candidates))}.\n"
        f"Shipped presets in {_display(PRESET_DIR)}: {', '.join(available_presets())}; join several with '+', "
        f"e.g. ds_configs/bs12.json+ds_configs/zero3.json",
        rule="preset file exists",
    )


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DsConfigError(f"duplicate key {key!r}", rule="no duplicate keys")
        out[key] = value
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise DsConfigError(f"{_display(path)}: cannot read: {e.strerror}", rule="preset readable") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise DsConfigError(f"{_display(path)}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}",
                            rule="preset is JSON") from None
    except DsConfigError as e:
        raise DsConfigError(f"{_display(path)}: {e}", rule=e.rule) from None
    if not isinstance(data, dict):
        raise DsConfigError(f"{_display(path)}: a preset is a JSON object, got {type(data).__name__}",
                            rule="preset is an object")
    return data


def _parents(data: dict[str, Any], path: Path) -> list[str]:
    extends = data.get("extends", [])
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list) or not all(isinstance(e, str) for e in extends):
        raise DsConfigError(f"{_display(path)}: \"extends\" is a file name or a list of them, got {extends!r}",
                            rule="extends is a list of files")
    return extends


def _linearize(path: Path, stack: list[Path], order: list[Path], contents: dict[Path, dict]) -> None:
    """Depth-first: each file after everything it extends, each file once; cycles refused."""
    if path in stack:
        cycle = " → ".join(_display(p) for p in stack[stack.index(path):] + [path])
        raise DsConfigError(f"DeepSpeed presets extend each other in a cycle: {cycle}", rule="no extends cycle")
    if path in contents:
        return
    data = _read(path)
    stack.append(path)
    for parent in _parents(data, path):
        _linearize(_find(parent, path.parent), stack, order, contents)
    stack.pop()
    contents[path] = data
    order.append(path)


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _resolve(spec: str) -> tuple[list[Path], dict[Path, dict]]:
    parts = [p.strip() for p in spec.split("+")] if isinstance(spec, str) else []
    if not parts or not all(parts):
        raise DsConfigError(f"DeepSpeed preset spec {spec!r}: expected file[+file...]", rule="preset spec")
    order: list[Path] = []
    contents: dict[Path, dict] = {}
    for part in parts:
        _linearize(_find(part, None), [], order, contents)
    return order, contents


def preset_files(spec: str) -> list[Path]:
    """The files a spec resolves to, in merge order."""
    return _resolve(spec)[0]


def load_preset(spec: str) -> dict[str, Any]:
    """The merged preset for `spec` ('a.json' or 'a.json+b.json'), without `extends`/comments."""
    order, contents = _resolve(spec)
    merged: dict[str, Any] = {}
    for path in order:
        own = {k: v for k, v in contents[path].items() if k not in ("extends", _COMMENT_KEY)}
        _merge(merged, own)
    _check_preset(merged, spec, lambda *keys: _file_setting(order, contents, keys, spec))
    _stage_for_fp32_accumulation(merged, spec, named_stage=any(_names_stage(contents[p]) for p in order))
    return merged


def _names_stage(data: Mapping[str, Any]) -> bool:
    zero = data.get("zero_optimization")
    return isinstance(zero, Mapping) and "stage" in zero


def stage_named(spec: str) -> bool:
    """Whether a file of `spec` names a ZeRO stage (else the stage is DeepSpeed's default or derived)."""
    order, contents = _resolve(spec)
    return any(_names_stage(contents[p]) for p in order)


def grad_accum_dtype(preset: Mapping[str, Any]) -> str:
    """The dtype DeepSpeed accumulates gradients in across micro-batches: data_types.grad_accum_dtype, else
    the model's."""
    block = preset.get("data_types")
    return _dtype_name(block.get("grad_accum_dtype") if isinstance(block, Mapping) else None, preset)


def communication_dtype(preset: Mapping[str, Any]) -> str:
    """The dtype DeepSpeed all-reduces (reduce-scatters) gradients in: communication_data_type, else the model's."""
    return _dtype_name(preset.get("communication_data_type"), preset)


_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
                "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16"}


def _dtype_name(given: Any, preset: Mapping[str, Any]) -> str:
    return precision(preset) if given is None else _DTYPE_NAMES.get(str(given).lower(), str(given))


def _stage_for_fp32_accumulation(preset: dict[str, Any], spec: str, named_stage: bool) -> None:
    """bf16 with fp32 gradient accumulation (ds_configs/bf16.json) needs ZeRO ≥ 1: DeepSpeed refuses
    grad_accum_dtype fp32 at stage 0 ("unsupported mix"), where it would sum and all-reduce bf16 gradients.
    With no stage named anywhere in the spec, ZeRO 1 is derived (DeepSpeed's BF16 optimizer: fp32
    accumulation and all-reduce, fp32 masters partitioned; the card says so); a named stage 0 is refused."""
    if precision(preset) != "bf16" or grad_accum_dtype(preset) != "fp32" or zero_stage(preset) != 0:
        return
    if named_stage:
        raise DsConfigError(
            f"{spec}: ZeRO stage 0 with bf16 and data_types.grad_accum_dtype fp32: DeepSpeed accumulates and "
            f"all-reduces gradients in the model's dtype at stage 0 and refuses fp32 there.\n"
            f"Valid choices: ZeRO 1 (ds_configs/zero1.json: DeepSpeed's BF16 optimizer, fp32 accumulation and "
            f"all-reduce), 2 or 3 instead of stage 0; or no stage preset at all (ZeRO 1 is then derived); or, to "
            f"sum gradients in bf16 on purpose, an overlay with \"data_types\": {{\"grad_accum_dtype\": \"bf16\"}}.",
            rule="bf16 accumulates in fp32",
        )
    preset.setdefault("zero_optimization", {})["stage"] = 1


def _file_setting(order: list[Path], contents: dict[Path, dict], keys: tuple[str, ...], spec: str) -> str:
    """The last file of a spec that sets the (nested) key: the one to edit; the spec if none does."""
    for path in reversed(order):
        block: Any = contents[path]
        for key in keys:
            block = block.get(key) if isinstance(block, Mapping) else None
        if block is not None:
            return _display(path)
    return spec


def _unknown_key(where: str, key: str, known: frozenset[str], block: str = "") -> DsConfigError:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return DsConfigError(
        f"{where}: unknown DeepSpeed key {block}{key!r}{hint} (DeepSpeed 0.19.8 "
        + ("ignores unknown top-level keys silently" if not block else "refuses it after the process group starts")
        + f"); valid keys{' of ' + block.rstrip('.') if block else ''}: {', '.join(sorted(known))}",
        rule="known DeepSpeed keys")


def _check_preset(preset: dict[str, Any], spec: str, where: Any = None) -> None:
    where = where or (lambda *keys: spec)
    for key in preset:
        if key in REMOVED_KEYS:
            raise DsConfigError(f"{where(key)}: \"{key}\" was removed from DeepSpeed 0.19"
                                + ("; the planner sizes the batch for each world instead" if key == "elasticity"
                                   else "; remove it"), rule="no removed DeepSpeed keys")
        if key not in DEEPSPEED_KEYS:
            raise _unknown_key(where(key), key, DEEPSPEED_KEYS)
    zero = preset.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, Mapping):
            raise DsConfigError(f"{where('zero_optimization')}: zero_optimization must be an object, got {zero!r}",
                                rule="zero_optimization block")
        for key in zero:
            if key not in ZERO_KEYS:
                raise _unknown_key(where("zero_optimization", key), key, ZERO_KEYS, "zero_optimization.")
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage not in ZERO_STAGES:
            raise DsConfigError(f"{where('zero_optimization', 'stage')}: zero_optimization.stage is {stage!r}; "
                                f"valid ZeRO stages: {', '.join(map(str, ZERO_STAGES))} (ds_configs/zero0.json … "
                                f"zero3.json)", rule="ZeRO stage 0-3")
    for name, known in PRECISION_KEYS.items():
        block = preset.get(name)
        if block is None:
            continue
        if not isinstance(block, Mapping):
            raise DsConfigError(f"{where(name)}: {name} must be an object like {{\"enabled\": true}}, got {block!r}",
                                rule="precision block")
        for key, value in block.items():
            if key not in known:
                raise _unknown_key(where(name, key), key, known, f"{name}.")
            if key in _PRECISION_BOOLS and not isinstance(value, bool):
                raise DsConfigError(f"{where(name, key)}: {name}.{key} must be true or false, got {value!r}",
                                    rule="precision block")
            if key not in _PRECISION_BOOLS and (isinstance(value, bool) or not isinstance(value, (int, float))
                                                or value < 0):
                raise DsConfigError(f"{where(name, key)}: {name}.{key} must be a number >= 0, got {value!r}",
                                    rule="precision block")
    enabled = [p for p in ("bf16", "bfloat16", "fp16")
               if isinstance(preset.get(p), Mapping) and preset[p].get("enabled")]
    if len(enabled) > 1:
        raise DsConfigError(f"{spec}: {' and '.join(enabled)} are both enabled; pick one precision overlay",
                            rule="one precision")
    clip = preset.get("gradient_clipping")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip >= 0
                             or not math.isfinite(clip)):
        raise DsConfigError(f"{where('gradient_clipping')}: gradient_clipping must be a number >= 0 (0: off), "
                            f"got {clip!r}", rule="gradient_clipping")
    optimizer = preset.get("optimizer")
    if optimizer is not None and not (isinstance(optimizer, Mapping) and isinstance(optimizer.get("type"), str)
                                      and isinstance(optimizer.get("params", {}), Mapping)):
        raise DsConfigError(f"{where('optimizer')}: optimizer must be an object like {{\"type\": \"Adam\", "
                            f"\"params\": {{...}}}}, got {optimizer!r}", rule="optimizer block")
    for key in BATCH_KEYS:
        value = preset.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DsConfigError(f"{where(key)}: {key} must be a positive whole number, got {value!r}",
                                rule="batch keys are positive integers")


def setting_file(spec: str, keys: tuple[str, ...]) -> str:
    """The last file of a preset spec that sets the (nested) key `keys`: the one to edit; the spec itself if none
    does or if `spec` is not a preset spec."""
    try:
        return _file_setting(*_resolve(spec), keys, spec)
    except DsConfigError:
        return spec


def preset_micro_batch(preset: Mapping[str, Any]) -> int | None:
    """The per-GPU micro-batch a preset promises (bs12.json → 12), or None."""
    return preset.get("train_micro_batch_size_per_gpu")


def zero_stage(preset: Mapping[str, Any]) -> int:
    zero = preset.get("zero_optimization") or {}
    return int(zero.get("stage", 0)) if isinstance(zero, Mapping) else 0


def precision(preset: Mapping[str, Any]) -> str:
    for name in ("bf16", "fp16"):
        block = preset.get(name)
        if isinstance(block, Mapping) and block.get("enabled"):
            return name
    return "fp32"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    return a == b


def _agree(block: dict[str, Any], key: str, value: Any, where: str, source: str, origin: str) -> None:
    if key in block and not _same(block[key], value):
        raise DsConfigError(
            f"{source}: {where}{key} is {block[key]!r} but {origin} gives {value!r}.\n"
            f"Rule: one source of truth per number: the preset carries engine settings; this number comes "
            f"from {origin}.\nValid choices: remove {where}{key} from the preset, or change {origin}.",
            rule="preset agrees with the plan",
        )
    block[key] = list(value) if isinstance(value, tuple) else value


def render(preset: Mapping[str, Any], plan: Plan, optim: Mapping[str, Any] | None = None,
           source: str = "the DeepSpeed preset") -> dict[str, Any]:
    """The config for deepspeed.initialize: `preset` plus the plan's batch triple and LR.

    `optim` (optional) holds the recipe's Adam settings (betas, eps, weight_decay); where the
    preset also has them they must agree. Raises DsConfigError naming the key and both values.
    """
    cfg = copy.deepcopy(dict(preset))
    cfg.pop("extends", None)
    cfg.pop(_COMMENT_KEY, None)
    plan_origin = f"the plan ({plan.headline})"
    for key, value in plan.ds_batch_keys().items():
        _agree(cfg, key, value, "", source, plan_origin)
    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, dict):
            raise DsConfigError(f"{source}: \"optimizer\" must be an object, got {optimizer!r}",
                                rule="optimizer block")
        params = optimizer.setdefault("params", {})
        _agree(params, "lr", plan.peak_lr, "optimizer.params.", source,
               f"the plan's peak LR ({plan.lr_derivation})")
        for key, value in (optim or {}).items():
            _agree(params, key, value, "optimizer.params.", source, f"the recipe's optim.{key}")
    scheduler = cfg.get("scheduler")
    if scheduler is not None:
        kind = scheduler.get("type") if isinstance(scheduler, dict) else None
        if kind not in _SCHEDULER_KEYS:
            raise DsConfigError(
                f"{source}: scheduler type {kind!r} cannot be rendered from the plan; supported: "
                f"{', '.join(_SCHEDULER_KEYS)} (or leave the LR schedule to the training loop)",
                rule="known scheduler",
            )
        params = scheduler.setdefault("params", {})
        peak_key, warmup_key = _SCHEDULER_KEYS[kind]
        if peak_key:
            _agree(params, peak_key, plan.peak_lr, "scheduler.params.", source,
                   f"the plan's peak LR ({plan.lr_derivation})")
        _agree(params, warmup_key, plan.warmup_steps, "scheduler.params.", source,
               f"the plan's warmup ({plan.warmup_samples} samples / {plan.global_batch} per update)")
    return cfg
