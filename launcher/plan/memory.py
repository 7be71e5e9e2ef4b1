"""Per-GPU memory estimate for training MossFormer2 with DeepSpeed: model states, reduce buckets, activations.

Pure like the planner: no torch or deepspeed import, no environment, no I/O. Numbers in, bytes out.

Model states per rank, for Ψ trainable parameters, N data-parallel ranks, p bytes per element of the
model's dtype (fp32: 4, bf16/fp16: 2) and Adam (two fp32 moments, 8 bytes per parameter), as DeepSpeed
0.19 lays them out (bench/bench_zero_memory.py counts the tensors each rank holds: within 3.3 % at 2 ranks):

    stage  params        grads    optimizer states
    0      pΨ            pΨ       8Ψ (fp32)  or  12Ψ (bf16/fp16: fp32 master copy + moments)
    1      pΨ            pΨ       12Ψ/N
    2      pΨ            pΨ/N     12Ψ/N
    3      pΨ/N + pΨₚ    pΨ/N     12Ψ/N

Ψₚ: at stage 3 the parameter tensors of at most stage3_param_persistence_threshold elements (1e5 by
default) stay whole on every rank besides their partition; for the full model that is 9,681,354 of
55,262,154 parameters (17.5 %), so stage 3 holds 35 % more parameter bytes at N = 2 than pΨ/N.

Gradients are those held between micro-batches while gradients accumulate (what sits in memory next to
the next micro-batch's activations). Stage 1 keeps them whole until the boundary's reduce-scatter, stage
2 and 3 reduce them into the rank's partition during backward.

This matches the ZeRO paper (Rajbhandari et al., 2020, §5) for mixed precision: 2Ψ + 2Ψ + KΨ with K = 12,
the optimizer states partitioned at stage 1, the gradients at 2, the parameters at 3. In fp32 the paper's
accounting would need no master copy (K = 8), but DeepSpeed's ZeRO optimizers keep an fp32 copy of the
rank's partition even when the model is fp32, so stages 1–3 cost 12Ψ/N there too; stage 0 (no ZeRO
optimizer, the torch Adam steps the parameters in place) costs 8Ψ. `paper_model_state_bytes` gives the
paper's numbers for comparison.

Beyond the formulas, ZeRO stages 1–3 allocate reduce buckets of `reduce_bucket_size` elements in the
model's dtype: stage 1/2 one for the duration of each backward (two with `overlap_comm`), stage 3 one
for the whole run. They do not shrink with N and do not depend on the model (`reduce_bucket_bytes`).

Activations grow with micro-batch × crop seconds; the constants below were measured once (see
ACTIVATIONS). They count the tensors autograd saves for backward; the backward pass's transient
buffers and the allocator's fragmentation are not in them, which is what the dry run's
--memory_headroom (10 % by default) is for.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from launcher.plan.ds_config import communication_dtype, grad_accum_dtype

GIB = 2 ** 30
PRECISIONS = ("fp32", "bf16", "fp16")
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2}
ADAM_MOMENT_BYTES = 8  # exp_avg + exp_avg_sq, fp32
MASTER_BYTES = 4  # fp32 copy of the weights

# The trainable parameters of each model preset as (elements per tensor, number of such tensors): ZeRO-3
# keeps tensors of at most stage3_param_persistence_threshold elements whole on every rank, so the sizes
# matter, not only their sum. tests/test_memory.py checks these against model.build_model(preset).
PARAM_SIZES: dict[str, tuple[tuple[int, int], ...]] = {
    "mossformer2_se_48k": ((1, 98), (128, 24), (180, 2), (256, 288), (512, 102), (1024, 1), (2048, 24), (2176, 24),
                           (4352, 48), (8704, 24), (9984, 24), (34816, 24), (65536, 120), (92160, 1), (131072, 48),
                           (262144, 2), (492032, 1), (524288, 25), (1048576, 24)),
    "small": ((1, 26), (64, 6), (128, 72), (180, 2), (256, 30), (512, 1), (1024, 6), (1088, 6), (2176, 12), (4352, 6),
              (4992, 6), (16384, 30), (17408, 6), (32768, 12), (46080, 1), (65536, 2), (131072, 7), (246016, 1),
              (262144, 6)),
    "tiny": ((1, 10), (32, 26), (64, 10), (128, 5), (180, 2), (256, 2), (544, 6), (1024, 8), (1088, 2), (1248, 2),
             (2048, 6), (4096, 2), (4352, 2), (8192, 3), (11520, 1), (16384, 2), (61504, 1)),
}
PRESET_PARAMS = {name: sum(n * k for n, k in sizes) for name, sizes in PARAM_SIZES.items()}
DEFAULT_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's stage3_param_persistence_threshold default (elements)


@dataclass(frozen=True)
class Activations:
    per_sample_second: int  # saved-tensor bytes per sample per second of crop
    fixed: int  # what does not grow with the batch (position tables and the like)


# Measured 2026-11-26 with `python bench/bench_zero_memory.py --activations --preset tiny,small,
# mossformer2_se_48k --seconds 4` (torch 2.14.1, CPU; bench/results/activations.json): the bytes of the
# tensors torch.autograd.graph.saved_tensors_hooks sees in one training forward (fbank features → mask
# network in train mode → mask loss), each storage once, parameters excluded, at batch 1 and 2 of 4 s
# crops (per_sample_second = (b2 − b1) / 4 s, fixed = b1 − per sample); a 2 s crop gave half of the 4 s
# bytes within 1.6 %. "bf16" is the module cast to bf16 with bf16 features, as DeepSpeed's bf16 engine runs
# it; fp16 is assumed to equal bf16 (same element size, not measured). Saved tensors do not depend on the
# device, so these hold on a GPU too (bench/gpu_check.py compares them with the CUDA allocator's peak).
ACTIVATIONS: dict[tuple[str, str], Activations] = {
    ("mossformer2_se_48k", "fp32"): Activations(349_108_786, 10_244_096),
    ("mossformer2_se_48k", "bf16"): Activations(175_031_049, 7_153_664),
    ("small", "fp32"): Activations(46_711_282, 2_042_368),
    ("small", "bf16"): Activations(23_832_297, 1_656_064),
    ("tiny", "fp32"): Activations(5_728_626, 447_488),
    ("tiny", "bf16"): Activations(3_340_969, 414_208),
}


class MemoryEstimateError(ValueError):
    """Input the estimate cannot use (unknown preset, stage or precision)."""


def _check(stage: int, precision: str, world_size: int) -> None:
    if stage not in (0, 1, 2, 3):
        raise MemoryEstimateError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage!r}")
    if precision not in PRECISIONS:
        raise MemoryEstimateError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise MemoryEstimateError(f"world_size must be a whole number >= 1, got {world_size!r}")


@dataclass(frozen=True)
class ModelStates:
    params: int
    grads: int
    optimizer: int
    params_formula: str
    grads_formula: str
    optimizer_formula: str

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer


def _share(n_bytes: float, world_size: int) -> int:
    return math.ceil(n_bytes / world_size)


def model_state_bytes(num_params: int, stage: int, precision: str, world_size: int,
                      persistent_params: int = 0, grad_accum_dtype: str | None = None) -> ModelStates:
    """Per-rank bytes of parameters, gradients and optimizer states as DeepSpeed 0.19 holds them.

    persistent_params (Ψₚ): at stage 3, the parameters in tensors small enough to stay whole on every rank
    (see `persistent_params`); ignored at stages 0–2. grad_accum_dtype (data_types.grad_accum_dtype; None: the
    model's): fp32 accumulation of bf16/fp16 gradients (ds_configs/bf16.json) keeps fp32 gradient partitions
    at stages 2–3 (4Ψ/N), and at stage 1 DeepSpeed's BF16 optimizer keeps fp32 accumulators of the whole
    model beside the 16-bit gradients (pΨ + 4Ψ) (bench/bench_zero_memory.py).
    """
    _check(stage, precision, world_size)
    p = BYTES_PER_ELEMENT[precision]
    n, w = num_params, world_size
    if stage < 3:
        params = (p * n, f"{p}Ψ")
    elif persistent_params:
        params = (_share(p * n, w) + p * persistent_params, f"{p}Ψ/N + {p}Ψₚ")
    else:
        params = (_share(p * n, w), f"{p}Ψ/N")
    g = BYTES_PER_ELEMENT[grad_accum_dtype] if grad_accum_dtype in BYTES_PER_ELEMENT else p
    if stage == 0 or g == p:
        grads = (p * n, f"{p}Ψ") if stage < 2 else (_share(p * n, w), f"{p}Ψ/N")
    elif stage == 1:
        grads = ((p + g) * n, f"{p}Ψ + {g}Ψ")
    else:
        grads = (_share(g * n, w), f"{g}Ψ/N")
    if stage == 0:
        k = ADAM_MOMENT_BYTES + (0 if precision == "fp32" else MASTER_BYTES)
        optimizer = (k * n, f"{k}Ψ")
    else:
        k = ADAM_MOMENT_BYTES + MASTER_BYTES
        optimizer = (_share(k * n, w), f"{k}Ψ/N")
    return ModelStates(params[0], grads[0], optimizer[0], params[1], grads[1], optimizer[1])


def paper_model_state_bytes(num_params: int, stage: int, precision: str, world_size: int) -> dict[str, int]:
    """The ZeRO paper's accounting: mixed precision 2Ψ + 2Ψ + 12Ψ; for fp32, 4Ψ + 4Ψ + 8Ψ (no master copy
    needed); the optimizer states divided by N from stage 1, the gradients from 2, the parameters at 3."""
    _check(stage, precision, world_size)
    p = BYTES_PER_ELEMENT[precision]
    k = ADAM_MOMENT_BYTES + (0 if precision == "fp32" else MASTER_BYTES)
    n, w = num_params, world_size
    return {
        "params": _share(p * n, w) if stage >= 3 else p * n,
        "grads": _share(p * n, w) if stage >= 2 else p * n,
        "optimizer": _share(k * n, w) if stage >= 1 else k * n,
    }


def _zero_block(ds_config: Mapping[str, Any]) -> Mapping[str, Any]:
    zero = ds_config.get("zero_optimization") or {}
    return zero if isinstance(zero, Mapping) else {}


def persistence_threshold(ds_config: Mapping[str, Any]) -> int:
    return int(_zero_block(ds_config).get("stage3_param_persistence_threshold", DEFAULT_PERSISTENCE_THRESHOLD))


def persistent_params(preset: str, threshold: int = DEFAULT_PERSISTENCE_THRESHOLD) -> int:
    """Ψₚ: parameters in tensors of at most `threshold` elements, which ZeRO-3 keeps whole on every rank."""
    preset_params(preset)
    return sum(n * k for n, k in PARAM_SIZES[preset] if n <= threshold)


def reduce_bucket_bytes(ds_config: Mapping[str, Any], stage: int, precision: str) -> int:
    """DeepSpeed's gradient-reduction buckets at ZeRO 1–3 (0 at stage 0), with contiguous_gradients:
    reduce_bucket_size elements of the model's dtype; stage 1/2 allocate one per backward (two with
    overlap_comm), stage 3 one for the whole run, in its communication dtype (communication_data_type: fp32
    in ds_configs/bf16.json). DeepSpeed's BF16 optimizer (bf16, fp32 accumulation, stage 1) all-reduces its
    fp32 accumulators directly and keeps none. DeepSpeed's default reduce_bucket_size is 5e8."""
    if stage == 0:
        return 0
    zero = _zero_block(ds_config)
    if not zero.get("contiguous_gradients", True):
        return 0
    if stage == 1 and precision == "bf16" and explicit_grad_accum_dtype(ds_config) == "fp32":
        return 0
    size = int(zero.get("reduce_bucket_size", 500_000_000))
    copies = 1 if stage == 3 else 1 + bool(zero.get("overlap_comm", False))
    communicate = communication_dtype(ds_config) if "communication_data_type" in ds_config else precision
    return copies * size * BYTES_PER_ELEMENT.get(communicate if stage == 3 else precision, BYTES_PER_ELEMENT[precision])


def explicit_grad_accum_dtype(ds_config: Mapping[str, Any] | None) -> str | None:
    """data_types.grad_accum_dtype where the config names one (else DeepSpeed accumulates in the model's dtype)."""
    block = (ds_config or {}).get("data_types")
    return grad_accum_dtype(ds_config) if isinstance(block, Mapping) and "grad_accum_dtype" in block else None


def activation_bytes(preset: str, precision: str, micro_batch: int, segment_seconds: float) -> int | None:
    """Saved-tensor bytes of one micro-batch, or None where no measurement exists for the preset."""
    key = (preset, "bf16" if precision == "fp16" else precision)
    a = ACTIVATIONS.get(key)
    if a is None:
        return None
    return math.ceil(a.fixed + a.per_sample_second * micro_batch * segment_seconds)


@dataclass(frozen=True)
class MemoryEstimate:
    preset: str
    num_params: int
    stage: int
    precision: str
    world_size: int
    micro_batch: int
    segment_seconds: float
    states: ModelStates
    buffers: int
    activations: int | None  # None: not measured for this preset
    activations_per_sample_second: int | None = None  # the measured constant used
    persistent_params: int = 0  # Ψₚ at stage 3
    notes: tuple[str, ...] = field(default=())

    @property
    def total(self) -> int | None:
        if self.activations is None:
            return None
        return self.states.total + self.buffers + self.activations

    @property
    def total_without_activations(self) -> int:
        return self.states.total + self.buffers

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset, "num_params": self.num_params, "zero_stage": self.stage,
            "precision": self.precision, "world_size": self.world_size, "micro_batch": self.micro_batch,
            "segment_seconds": self.segment_seconds,
            "params_bytes": self.states.params, "grads_bytes": self.states.grads,
            "optimizer_bytes": self.states.optimizer, "reduce_bucket_bytes": self.buffers,
            "activation_bytes": self.activations, "total_bytes": self.total,
            "persistent_params": self.persistent_params,
            "formulas": {"params": self.states.params_formula, "grads": self.states.grads_formula,
                         "optimizer": self.states.optimizer_formula},
            "notes": list(self.notes),
        }


def preset_params(preset: str) -> int:
    try:
        return PRESET_PARAMS[preset]
    except KeyError:
        raise MemoryEstimateError(f"no parameter count for model preset {preset!r}; known: "
                           f"{', '.join(sorted(PRESET_PARAMS))}") from None


def estimate(preset: str, stage: int, precision: str, world_size: int, micro_batch: int,
             segment_seconds: float, ds_config: Mapping[str, Any] | None = None) -> MemoryEstimate:
    """Per-GPU bytes for one rank training `preset` at this stage, precision, world and micro-batch."""
    num_params = preset_params(preset)
    _check(stage, precision, world_size)
    if isinstance(micro_batch, bool) or not isinstance(micro_batch, int) or micro_batch < 1:
        raise MemoryEstimateError(f"micro_batch must be a whole number >= 1, got {micro_batch!r}")
    persist = persistent_params(preset, persistence_threshold(ds_config or {})) if stage == 3 else 0
    states = model_state_bytes(num_params, stage, precision, world_size, persist, explicit_grad_accum_dtype(ds_config))
    buffers = reduce_bucket_bytes(ds_config or {}, stage, precision)
    acts = activation_bytes(preset, precision, micro_batch, segment_seconds)
    measured = ACTIVATIONS.get((preset, "bf16" if precision == "fp16" else precision))
    notes = []
    if acts is None:
        notes.append(f"activations not measured for preset {preset!r}")
    if precision == "fp16":
        notes.append("fp16 activations taken as bf16's (same element size; not measured)")
    return MemoryEstimate(preset, num_params, stage, precision, world_size, micro_batch, float(segment_seconds),
                          states, buffers, acts, measured.per_sample_second if measured else None, persist,
                          tuple(notes))


def engine_settings(ds_config: Mapping[str, Any]) -> tuple[int, str]:
    """(ZeRO stage, precision) of a rendered DeepSpeed config."""
    zero = _zero_block(ds_config)
    stage = int(zero.get("stage", 0))
    for name in ("bf16", "fp16"):
        block = ds_config.get(name)
        if isinstance(block, Mapping) and block.get("enabled"):
            return stage, name
    return stage, "fp32"


def estimate_for(plan: Any, ds_config: Mapping[str, Any], preset: str) -> MemoryEstimate:
    """The estimate for a launcher.plan.Plan and its rendered DeepSpeed config."""
    stage, precision = engine_settings(ds_config)
    return estimate(preset, stage, precision, plan.world_size, plan.micro_batch, plan.segment_seconds, ds_config)


def largest_fitting_micro_batch(preset: str, stage: int, precision: str, world_size: int, segment_seconds: float,
                                budget_bytes: float, ds_config: Mapping[str, Any] | None = None,
                                limit: int = 1 << 16) -> int:
    """The largest micro-batch whose estimate fits `budget_bytes` (0 if not even 1 fits)."""
    base = estimate(preset, stage, precision, world_size, 1, segment_seconds, ds_config)
    if base.activations is None:
        raise MemoryEstimateError(f"activations not measured for preset {preset!r}: cannot size a micro-batch")
    a = ACTIVATIONS[(preset, "bf16" if precision == "fp16" else precision)]
    room = budget_bytes - base.total_without_activations - a.fixed
    per_sample = a.per_sample_second * segment_seconds
    if room < per_sample:
        return 0
    b = min(limit, int(room // per_sample))
    # Guard the float division at the edge: the estimate's own rounding decides.
    while b > 0 and estimate(preset, stage, precision, world_size, b, segment_seconds, ds_config).total > budget_bytes:
        b -= 1
    return b


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "not measured"
    if n >= GIB:
        return f"{n / GIB:.2f} GiB"
    return f"{n / 2 ** 20:.1f} MiB"
