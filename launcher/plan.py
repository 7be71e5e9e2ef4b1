"""The batch and learning-rate planner: numbers in, one frozen `Plan` out, or a `PlanError`.

Why this module exists: the reference solver treats `accu_grad` as an on/off switch and steps the
optimizer when an integer counter *equals* effec_batch_size / batch_size. With batch_size 12 and
effec_batch_size 8 that ratio is 0.667, the counter never equals it, and the optimizer never steps.
Here every batch number is checked before anything starts, and every inconsistency is refused
with the numbers, the rule that failed and the nearest valid choices. Nothing is rounded or
adjusted silently.

The module is pure: no torch, no deepspeed, no environment, no I/O. `python -m launcher.plan`
runs the dry run (launcher/dry_run.py).

Vocabulary (per optimizer update):
- B, micro-batch: samples per GPU per forward/backward (DeepSpeed's train_micro_batch_size_per_gpu);
- K, accumulation steps: micro-batches per GPU per update (DeepSpeed's gradient_accumulation_steps);
- W, world size: num_nodes × gpus_per_node data-parallel ranks;
- G, global batch: samples per update over all ranks, G = B × K × W (DeepSpeed's train_batch_size).

Accumulation is given in one of four ways, at two levels (recipe, command line):
- `accu_grad` 0/1 with `effec_batch_size` E (the reference's way; E is samples per GPU per update,
  so K = E / B, which must be a whole number); accu_grad 0 means K = 1;
- `gradient_accumulation_steps` K;
- `global_batch` G.
A way given on the command line replaces the recipe's and is used as given at the actual world.
The recipe's way is defined at the world the recipe was written for (recipe_num_nodes ×
recipe_gpus_per_node); `hold` says what to keep when the actual world differs:
- "global_batch": keep the recipe's global batch (and so the LR), re-derive K = G / (B × W);
- "accumulation": keep the recipe's K; the global batch follows the world and the LR is rescaled.
The LR is always base_lr × rule(G / reference_batch), rule linear, sqrt or none.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any

HOLDS = ("global_batch", "accumulation")
LR_RULES = ("linear", "sqrt", "none")
# What a PlanError may suggest; see apply_suggestion for what each one changes in the request.
SUGGESTION_KEYS = (
    "batch_size",
    "effec_batch_size",
    "gradient_accumulation_steps",
    "global_batch",
    "world_size",
    "num_nodes",
    "hold",
)
_SHOWN = 3  # how many nearest values a suggestion line offers


class PlanError(ValueError):
    """Inconsistent batch/LR input. The message names the numbers, the rule and valid choices.

    `rule` is a short name of the rule that failed; `suggestions` maps a key of SUGGESTION_KEYS to
    values that each, applied alone with `apply_suggestion`, give a valid plan.
    """

    def __init__(self, message: str, *, rule: str = "", suggestions: dict[str, tuple] | None = None):
        super().__init__(message)
        self.rule = rule
        self.suggestions: dict[str, tuple] = {k: tuple(v) for k, v in (suggestions or {}).items() if v}


@dataclass(frozen=True)
class AccumSpec:
    """Accumulation as one level (recipe or command line) gives it; all None = not given here."""

    accu_grad: int | None = None  # the reference's on/off switch 0/1; 1 needs effec_batch_size
    effec_batch_size: int | None = None  # samples per GPU per update; alone implies accu_grad 1
    gradient_accumulation_steps: int | None = None
    global_batch: int | None = None  # samples per update over all ranks

    def is_given(self) -> bool:
        return any(getattr(self, f.name) is not None for f in fields(self))

    def describe(self) -> str:
        given = [f"{f.name}={getattr(self, f.name)}" for f in fields(self) if getattr(self, f.name) is not None]
        return ", ".join(given) if given else "nothing"


@dataclass(frozen=True)
class PlanRequest:
    batch_size: int  # per-GPU micro-batch (= train_micro_batch_size_per_gpu)
    num_nodes: int  # the actual world
    gpus_per_node: int
    recipe_accum: AccumSpec  # from the YAML recipe
    cli_accum: AccumSpec = AccumSpec()  # from the command line: any way given here replaces the recipe's
    recipe_num_nodes: int = 1  # the world the recipe's accumulation was written for
    recipe_gpus_per_node: int = 2
    hold: str = "global_batch"  # or "accumulation"
    base_lr: float = 5e-4  # the LR at reference_batch samples per update
    reference_batch: int = 16
    lr_rule: str = "linear"  # linear | sqrt | none
    warmup_samples: int = 0
    segment_seconds: float = 4.0
    dataset_size: int | None = None  # training examples (crops) per epoch
    notes: tuple[str, ...] = ()  # carried into the plan verbatim (e.g. where the micro-batch came from)


@dataclass(frozen=True)
class Plan:
    world_size: int
    num_nodes: int
    gpus_per_node: int
    micro_batch: int
    accumulation_steps: int
    global_batch: int
    samples_per_gpu_per_update: int  # the reference's effec_batch_size: micro_batch × accumulation_steps
    base_lr: float
    reference_batch: int
    lr_rule: str
    peak_lr: float
    lr_derivation: str
    warmup_samples: int
    warmup_steps: int  # ceil(warmup_samples / global_batch) optimizer steps
    segment_seconds: float
    audio_seconds_per_update: float
    dataset_size: int | None
    steps_per_epoch: int | None  # optimizer steps; the sampler drops the last partial update
    hold: str
    accumulation_source: str
    recipe_num_nodes: int
    recipe_gpus_per_node: int
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Guards plans rebuilt with from_dict: the triple must be exact.
        if self.world_size != self.num_nodes * self.gpus_per_node:
            raise PlanError(
                f"plan: world_size {self.world_size} != num_nodes {self.num_nodes} × gpus_per_node "
                f"{self.gpus_per_node}",
                rule="world_size = num_nodes × gpus_per_node",
            )
        if self.global_batch != self.micro_batch * self.accumulation_steps * self.world_size:
            raise PlanError(
                f"plan: global_batch {self.global_batch} != micro_batch {self.micro_batch} × "
                f"accumulation_steps {self.accumulation_steps} × world_size {self.world_size}",
                rule="global_batch = micro_batch × accumulation_steps × world_size",
            )
        if self.samples_per_gpu_per_update != self.micro_batch * self.accumulation_steps:
            raise PlanError(
                f"plan: samples_per_gpu_per_update {self.samples_per_gpu_per_update} != micro_batch "
                f"{self.micro_batch} × accumulation_steps {self.accumulation_steps}",
                rule="samples_per_gpu_per_update = micro_batch × accumulation_steps",
            )

    @property
    def headline(self) -> str:
        return (
            f"{self.micro_batch} × {self.accumulation_steps} × {self.world_size} = "
            f"{self.global_batch} samples per update"
        )

    def ds_batch_keys(self) -> dict[str, int]:
        """The batch triple exactly as DeepSpeed's config wants it."""
        return {
            "train_batch_size": self.global_batch,
            "train_micro_batch_size_per_gpu": self.micro_batch,
            "gradient_accumulation_steps": self.accumulation_steps,
        }

    def to_dict(self) -> dict[str, Any]:
        """The plan's fields plus DeepSpeed's names for the triple and `lr` (= peak_lr)."""
        d = asdict(self)
        d["notes"] = list(self.notes)
        d.update(self.ds_batch_keys())
        d["lr"] = self.peak_lr
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        """Inverse of to_dict; the derived keys, if present, must agree with the fields."""
        if not isinstance(d, dict):
            raise PlanError(f"plan: expected a mapping, got {type(d).__name__}")
        names = [f.name for f in fields(cls)]
        derived = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "lr")
        unknown = sorted(set(d) - set(names) - set(derived))
        if unknown:
            raise PlanError(f"plan: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
        missing = [n for n in names if n not in d and n != "notes"]
        if missing:
            raise PlanError(f"plan: missing key(s) {', '.join(missing)}")
        kwargs = {n: d[n] for n in names if n in d}
        kwargs["notes"] = tuple(kwargs.get("notes", ()))
        plan = cls(**kwargs)
        expect = {**plan.ds_batch_keys(), "lr": plan.peak_lr}
        for key in derived:
            if key in d and d[key] != expect[key]:
                raise PlanError(f"plan: {key} is {d[key]!r} but the plan's fields give {expect[key]!r}")
        return plan

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def format_lr(x: float) -> str:
    """5e-4, 3e-3, 1.2247e-3: short scientific notation for learning rates."""
    mantissa, exponent = f"{x:.4e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def _world_text(nodes: int, gpus: int) -> str:
    return f"{nodes}×{gpus} GPUs"


def _join(values: tuple | list, more: bool = False) -> str:
    text = ", ".join(str(v) for v in values)
    return text + ", …" if more else text


def _divisors(n: int) -> list[int]:
    small, large = [], []
    i = 1
    while i * i <= n:
        if n % i == 0:
            small.append(i)
            if i * i != n:
                large.append(n // i)
        i += 1
    return small + large[::-1]


def _nearest(candidates: list[int], target: int) -> list[int]:
    return sorted(set(candidates), key=lambda v: (abs(v - target), v))


def _multiples_near(step: int, target: int) -> list[int]:
    """Positive multiples of `step` around `target`, nearest first."""
    low = max(1, target // step - _SHOWN)
    return _nearest([step * m for m in range(low, target // step + _SHOWN + 2)], target)


def apply_suggestion(req: PlanRequest, key: str, value: Any) -> PlanRequest:
    """The request with one suggestion of a PlanError applied (as the command line would).

    batch_size, num_nodes and hold replace those fields; world_size runs `value` GPUs on one node
    (any split with the same product plans the same); effec_batch_size, gradient_accumulation_steps
    and global_batch become the command line's only accumulation way.
    """
    if key in ("batch_size", "num_nodes", "hold"):
        return replace(req, **{key: value})
    if key == "world_size":
        return replace(req, num_nodes=1, gpus_per_node=value)
    if key in ("effec_batch_size", "gradient_accumulation_steps", "global_batch"):
        return replace(req, cli_accum=AccumSpec(**{key: value}))
    raise KeyError(f"unknown suggestion key {key!r}; valid: {', '.join(SUGGESTION_KEYS)}")


def _feasible(req: PlanRequest) -> bool:
    try:
        _plan(req, suggest=False)
    except PlanError:
        return False
    return True


def _keep_feasible(req: PlanRequest, key: str, values: list[Any], limit: int | None = None) -> list[Any]:
    kept = []
    for v in values:
        if _feasible(apply_suggestion(req, key, v)):
            kept.append(v)
            if limit is not None and len(kept) >= limit:
                break
    return kept


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: Any, minimum: int = 1) -> None:
    if not _is_int(v):
        raise PlanError(f"{name} must be a whole number, got {v!r}", rule="type")
    if v < minimum:
        raise PlanError(f"{name} must be at least {minimum}, got {v}", rule="range")


def _check_real(name: str, v: Any) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise PlanError(f"{name} must be a number, got {v!r}", rule="type")
    if not math.isfinite(v) or v <= 0:
        raise PlanError(f"{name} must be a positive finite number, got {v!r}", rule="range")


def _check_spec(level: str, spec: Any) -> None:
    if not isinstance(spec, AccumSpec):
        raise PlanError(f"{level} accumulation must be an AccumSpec, got {type(spec).__name__}", rule="type")
    if spec.accu_grad is not None:
        if not _is_int(spec.accu_grad) or spec.accu_grad not in (0, 1):
            raise PlanError(
                f"{level} accu_grad must be 0 (off) or 1 (on, with effec_batch_size), got {spec.accu_grad!r}",
                rule="accu_grad is 0 or 1",
            )
    for name in ("effec_batch_size", "gradient_accumulation_steps", "global_batch"):
        value = getattr(spec, name)
        if value is not None:
            _check_int(f"{level} {name}", value)


def _validate(req: PlanRequest) -> None:
    if not isinstance(req, PlanRequest):
        raise PlanError(f"expected a PlanRequest, got {type(req).__name__}", rule="type")
    for name in ("batch_size", "num_nodes", "gpus_per_node", "recipe_num_nodes", "recipe_gpus_per_node",
                 "reference_batch"):
        _check_int(name, getattr(req, name))
    _check_int("warmup_samples", req.warmup_samples, minimum=0)
    if req.dataset_size is not None:
        _check_int("dataset_size", req.dataset_size)
    _check_real("base_lr", req.base_lr)
    _check_real("segment_seconds", req.segment_seconds)
    if req.hold not in HOLDS:
        raise PlanError(f"hold must be one of {', '.join(HOLDS)}, got {req.hold!r}", rule="hold")
    if req.lr_rule not in LR_RULES:
        raise PlanError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {req.lr_rule!r}", rule="lr_rule")
    if not isinstance(req.notes, tuple) or not all(isinstance(n, str) for n in req.notes):
        raise PlanError(f"notes must be a tuple of strings, got {req.notes!r}", rule="type")
    _check_spec("recipe", req.recipe_accum)
    _check_spec("command line", req.cli_accum)


@dataclass(frozen=True)
class _Way:
    text: str  # e.g. "effec_batch_size=8"
    global_batch: int  # at the level's world
    steps: int | None  # None: the global batch is not a whole number of micro-batches at that world
    keys: tuple[str, ...] = ()  # the AccumSpec fields that gave it


def _flag(name: str) -> str:
    return f"--{name}"


def _effec_error(req: PlanRequest, level: str, effec: int, world: int) -> PlanError:
    """The reference's own failure: effec_batch_size not a whole number of micro-batches."""
    b = req.batch_size
    ratio = effec / b
    effecs = _nearest([b * m for m in range(1, effec // b + _SHOWN + 2)], effec)
    effecs = sorted(_keep_feasible(req, "effec_batch_size", effecs, limit=_SHOWN))
    batches = _keep_feasible(req, "batch_size", _divisors(effec))
    per_update = b * world
    target = effec * world
    globals_ = _multiples_near(per_update, target)
    globals_ = sorted(_keep_feasible(req, "global_batch", globals_, limit=_SHOWN))
    lines = [
        f"effec_batch_size {effec} is not a positive multiple of batch_size {b} "
        f"({level}: accu_grad 1, effec_batch_size {effec}; batch_size {b}).",
        f"Rule: effec_batch_size must be a positive multiple of batch_size, and {effec} is not a positive "
        f"multiple of {b}: with accu_grad 1 each GPU accumulates effec_batch_size / batch_size micro-batches "
        f"per optimizer update, which must be a whole number; {effec}/{b} = {ratio:.3g} is not "
        f"(the reference then never steps the optimizer).",
        "Valid choices:",
    ]
    if effecs:
        lines.append(f"  valid effec_batch_size values (multiples of {b}): {_join(effecs, more=True)}"
                     f"  e.g. {_flag('effec_batch_size')} {effecs[0]}")
    if batches:
        lines.append(f"  valid batch_size values (divisors of {effec}): {_join(batches)}")
    if globals_:
        lines.append(f"  or give the global batch directly (multiples of {b} × {world} GPUs): "
                     f"{_flag('global_batch')} {_join(globals_)}")
    return PlanError(
        "\n".join(lines),
        rule="effec_batch_size is a positive multiple of batch_size",
        suggestions={"effec_batch_size": effecs, "batch_size": batches, "global_batch": globals_},
    )


def _level_way(req: PlanRequest, level: str, spec: AccumSpec, world: int, world_text: str,
               suggest: bool, recipe_spec: AccumSpec | None = None) -> _Way | None:
    """The accumulation one level gives, as (global batch, steps) at that level's world."""
    b = req.batch_size
    ways: list[_Way] = []
    accu, effec = spec.accu_grad, spec.effec_batch_size
    if accu == 0:
        if effec is not None and effec != b:
            raise PlanError(
                f"{level}: accu_grad 0 (no accumulation) but effec_batch_size {effec} differs from "
                f"batch_size {b}.\nRule: with accu_grad 0 each GPU takes one micro-batch per update, so "
                f"effec_batch_size must equal batch_size or be unset; it is not silently ignored.\n"
                f"Valid choices: drop effec_batch_size (or set it to {b}), or turn accumulation on with "
                f"accu_grad 1" + (f" (effec_batch_size {effec} = {effec // b} micro-batches)" if effec % b == 0 else
                                  f" and an effec_batch_size that is a multiple of {b}") + ".",
                rule="accu_grad 0 means effec_batch_size == batch_size",
            )
        ways.append(_Way("accu_grad=0", b * world, 1, ("accu_grad",) + (("effec_batch_size",) if effec else ())))
    elif accu == 1 or effec is not None:
        text = f"effec_batch_size={effec}"
        if effec is None:
            others = spec.gradient_accumulation_steps is not None or spec.global_batch is not None
            if level == "command line" and not others and recipe_spec is not None \
                    and recipe_spec.effec_batch_size is not None:
                effec = recipe_spec.effec_batch_size
                text = f"accu_grad=1 with the recipe's effec_batch_size={effec}"
            else:
                where = "--effec_batch_size" if level == "command line" else "batch.effec_batch_size"
                raise PlanError(
                    f"{level}: accu_grad 1 needs effec_batch_size (samples per GPU per update) at the same "
                    f"level" + (" and the recipe gives none" if level == "command line" else "") + ".\n"
                    f"Rule: the reference's way is accu_grad 1 + effec_batch_size; accu_grad alone says only "
                    f"'accumulate'.\nValid choices: add {where} (a multiple of batch_size {b}, e.g. {2 * b}), "
                    f"or give gradient_accumulation_steps or global_batch instead of accu_grad.",
                    rule="accu_grad 1 needs effec_batch_size",
                )
        if effec % b != 0:
            raise _effec_error(req, level, effec, world) if suggest else PlanError("infeasible")
        keys = tuple(k for k in ("accu_grad", "effec_batch_size") if getattr(spec, k) is not None)
        ways.append(_Way(text, effec * world, effec // b, keys))
    if spec.gradient_accumulation_steps is not None:
        k = spec.gradient_accumulation_steps
        ways.append(_Way(f"gradient_accumulation_steps={k}", b * k * world, k, ("gradient_accumulation_steps",)))
    if spec.global_batch is not None:
        g = spec.global_batch
        ways.append(_Way(f"global_batch={g}", g, g // (b * world) if g % (b * world) == 0 else None,
                         ("global_batch",)))
    if len({w.global_batch for w in ways}) > 1:
        implied = "; ".join(f"{w.text} means {w.global_batch} samples per update" for w in ways)
        if level == "recipe":
            fix = "set the others to null in the recipe's batch section, e.g. " + "; ".join(
                f"to keep {w.text}: " + " ".join(f"--set batch.{k}=null" for o in ways if o is not w for k in o.keys)
                for w in ways)
        else:
            fix = "pass only one of them"
        raise PlanError(
            f"{level} gives the accumulation in {len(ways)} ways that disagree at {world_text} with "
            f"batch_size {b}: {implied}.\nRule: accumulation is given in exactly one way "
            f"(or in ways that agree).\nValid choices: keep one way and {fix}.",
            rule="one accumulation way per level",
        )
    if not ways:
        return None
    if len(ways) > 1:
        return _Way(" = ".join(w.text for w in ways), ways[0].global_batch,
                    next((w.steps for w in ways if w.steps is not None), None))
    return ways[0]


def _world_error(req: PlanRequest, g: int, what: str) -> PlanError:
    """A global batch that B × W does not divide."""
    b, n, gpn = req.batch_size, req.num_nodes, req.gpus_per_node
    w = n * gpn
    worlds = _keep_feasible(req, "world_size", _divisors(g // b)) if g % b == 0 else []
    nodes = _keep_feasible(req, "num_nodes", [x // gpn for x in worlds if x % gpn == 0])
    batches = _keep_feasible(req, "batch_size", _divisors(g // w)) if g % w == 0 else []
    per_update = b * w
    globals_ = _multiples_near(per_update, g)
    globals_ = sorted(_keep_feasible(req, "global_batch", globals_, limit=_SHOWN))
    holds = [h for h in HOLDS if h != req.hold and _feasible(replace(req, hold=h))] \
        if not req.cli_accum.is_given() else []
    lines = [
        f"global batch {g} ({what}) cannot be split over {w} GPUs ({n} node{'s' if n > 1 else ''} × {gpn} GPUs) "
        f"at batch_size {b}: "
        f"{g} / ({b} × {w}) = {g / per_update:.3g} micro-batches per GPU per update is not a whole number.",
        "Rule: global_batch = batch_size × gradient_accumulation_steps × world_size, all whole numbers.",
        "Valid choices:",
    ]
    if worlds:
        at_nodes = (f"; at {gpn} GPUs per node: --num_nodes {_join(nodes)}" if nodes
                    else f"; no node count at {gpn} GPUs per node")
        lines.append(f"  world sizes that can hold {g} at batch_size {b}: {_join(worlds)}{at_nodes}")
    else:
        lines.append(f"  no world size can hold {g} at batch_size {b} ({g} is not a multiple of {b})")
    if batches:
        lines.append(f"  valid batch_size values at {w} GPUs: {_join(batches)}")
    elif g % w != 0:
        lines.append(f"  no batch_size can hold {g} on {w} GPUs ({g} is not a multiple of {w})")
    if globals_:
        lines.append(f"  nearest valid global batches at batch_size {b} × {w} GPUs: {_flag('global_batch')} "
                     f"{_join(globals_)}")
    if holds:
        alt = _plan(replace(req, hold=holds[0]), suggest=False)
        lines.append(f"  or --hold {holds[0]}: {alt.headline}, lr {format_lr(alt.peak_lr)}")
    return PlanError(
        "\n".join(lines),
        rule="global_batch = batch_size × gradient_accumulation_steps × world_size",
        suggestions={"world_size": worlds, "num_nodes": nodes, "batch_size": batches,
                     "global_batch": globals_, "hold": holds},
    )


def _recipe_steps_error(req: PlanRequest, way: _Way, w_r: int) -> PlanError:
    b = req.batch_size
    holds = [h for h in HOLDS if h != req.hold and _feasible(replace(req, hold=h))]
    batches = _keep_feasible(req, "batch_size", _divisors(way.global_batch // w_r)) \
        if way.global_batch % w_r == 0 else []
    lines = [
        f"recipe {way.text} at {_world_text(req.recipe_num_nodes, req.recipe_gpus_per_node)} with batch_size "
        f"{b} gives {way.global_batch} / ({b} × {w_r}) = {way.global_batch / (b * w_r):.3g} accumulation steps, "
        f"not a whole number, so hold=accumulation has no accumulation to hold.",
        "Rule: global_batch = batch_size × gradient_accumulation_steps × world_size, all whole numbers.",
        "Valid choices:",
    ]
    if holds:
        lines.append(f"  --hold {holds[0]} (keep the global batch {way.global_batch})")
    if batches:
        lines.append(f"  valid batch_size values: {_join(batches)}")
    lines.append("  or give --gradient_accumulation_steps or --global_batch on the command line")
    return PlanError("\n".join(lines), rule="whole accumulation steps at the recipe's world",
                     suggestions={"hold": holds, "batch_size": batches})


def _dataset_error(req: PlanRequest, g: int, b: int, w: int) -> PlanError:
    per_update = b * w
    size = req.dataset_size
    globals_ = [per_update * m for m in range(size // per_update, 0, -1)]
    globals_ = sorted(_keep_feasible(req, "global_batch", globals_, limit=_SHOWN))
    lines = [
        f"dataset_size {size} is smaller than one optimizer update of {g} samples: an epoch would have "
        f"{size} // {g} = 0 optimizer steps.",
        "Rule: steps_per_epoch = dataset_size // global_batch must be at least 1 (the sampler drops the "
        "remainder of an epoch).",
    ]
    if globals_:
        lines.append(f"Valid choices: a global batch of at most {size}: {_flag('global_batch')} {_join(globals_)}")
    else:
        lines.append(f"Valid choices: more data, or fewer than {per_update} samples per micro-batch round "
                     f"(batch_size {b} × {w} GPUs)")
    return PlanError("\n".join(lines), rule="dataset_size >= global_batch",
                     suggestions={"global_batch": globals_})


def _plan(req: PlanRequest, suggest: bool) -> Plan:
    _validate(req)
    b = req.batch_size
    n, gpn = req.num_nodes, req.gpus_per_node
    w = n * gpn
    w_r = req.recipe_num_nodes * req.recipe_gpus_per_node
    world_text = _world_text(n, gpn)
    recipe_world_text = _world_text(req.recipe_num_nodes, req.recipe_gpus_per_node)

    def fail(make: Any, *args: Any) -> PlanError:
        # Suggestions are computed only for the error the caller sees, not while testing them.
        return make(req, *args) if suggest else PlanError("infeasible")

    cli = _level_way(req, "command line", req.cli_accum, w, world_text, suggest, recipe_spec=req.recipe_accum)
    recipe = None if cli is not None else _level_way(req, "recipe", req.recipe_accum, w_r, recipe_world_text, suggest)
    if cli is None and recipe is None:
        # No way given anywhere reads as the recipe's accu_grad 0, so `hold` means the same for every recipe.
        recipe = _Way("accumulation not given (accu_grad=0)", b * w_r, 1)

    if cli is not None:
        g = cli.global_batch
        if cli.steps is None:
            raise fail(_world_error, g, f"command line {cli.text}")
        k = cli.steps
        source = f"command line {cli.text}"
    elif req.hold == "global_batch":
        g = recipe.global_batch
        if g % (b * w) != 0:
            raise fail(_world_error, g, f"recipe {recipe.text} at {recipe_world_text}, held by hold=global_batch")
        k = g // (b * w)
        source = f"recipe {recipe.text} at {recipe_world_text}, global batch held"
    else:
        if recipe.steps is None:
            raise fail(_recipe_steps_error, recipe, w_r)
        k = recipe.steps
        g = b * k * w
        source = f"recipe {recipe.text} at {recipe_world_text}, accumulation held"

    steps_per_epoch = None
    if req.dataset_size is not None:
        if req.dataset_size < g:
            raise fail(_dataset_error, g, b, w)
        steps_per_epoch = req.dataset_size // g

    ratio = Fraction(g, req.reference_batch)
    if req.lr_rule == "linear":
        peak = float(Fraction(req.base_lr) * ratio)
        derivation = f"{format_lr(req.base_lr)} × {g}/{req.reference_batch} = {format_lr(peak)} (linear)"
    elif req.lr_rule == "sqrt":
        peak = req.base_lr * math.sqrt(g / req.reference_batch)
        derivation = f"{format_lr(req.base_lr)} × √({g}/{req.reference_batch}) = {format_lr(peak)} (sqrt)"
    else:
        peak = float(req.base_lr)
        derivation = f"{format_lr(req.base_lr)} (none: not scaled with the global batch {g}/{req.reference_batch})"

    return Plan(
        world_size=w,
        num_nodes=n,
        gpus_per_node=gpn,
        micro_batch=b,
        accumulation_steps=k,
        global_batch=g,
        samples_per_gpu_per_update=b * k,
        base_lr=float(req.base_lr),
        reference_batch=req.reference_batch,
        lr_rule=req.lr_rule,
        peak_lr=peak,
        lr_derivation=derivation,
        warmup_samples=req.warmup_samples,
        warmup_steps=-(-req.warmup_samples // g),
        segment_seconds=float(req.segment_seconds),
        audio_seconds_per_update=g * float(req.segment_seconds),
        dataset_size=req.dataset_size,
        steps_per_epoch=steps_per_epoch,
        hold=req.hold,
        accumulation_source=source,
        recipe_num_nodes=req.recipe_num_nodes,
        recipe_gpus_per_node=req.recipe_gpus_per_node,
        notes=req.notes,
    )


def make_plan(req: PlanRequest) -> Plan:
    """The plan for `req`, or PlanError naming the numbers, the rule and valid choices."""
    return _plan(req, suggest=True)


if __name__ == "__main__":
    import sys

    from launcher.dry_run import main

    sys.exit(main())
