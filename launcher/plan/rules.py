"""The batch and learning-rate planner: numbers in, one frozen `Plan` out, or a `PlanError`.

Why this module exists: the reference solver treats `accu_grad` as an on/off switch and steps the
optimizer when an integer counter *equals* effec_batch_size / batch_size. With batch_size 12 and
effec_batch_size 8 that ratio is 0.667, the counter never equals it, and the optimizer never steps.
Here every batch number is checked before anything starts, and every inconsistency is refused
with the numbers, the rule that failed and the nearest valid choices.

The module is pure: no torch, no deepspeed, no environment, no I/O. `python -m launcher.plan`
runs the dry run (launcher/plan/cli.py).

Vocabulary (per optimizer update):
- B, micro-batch: samples per GPU per forward/backward (DeepSpeed's train_micro_batch_size_per_gpu);
- K, accumulation steps: micro-batches per GPU per update (DeepSpeed's gradient_accumulation_steps);
- W, world size: num_nodes × gpus_per_node data-parallel ranks;
- G, global batch: samples per update over all ranks, G = B × K × W (DeepSpeed's train_batch_size).

Accumulation is given in one of four ways, at two levels (recipe, command line):
- `accu_grad` 0/1 with `effec_batch_size` E (the reference's way; E is samples per GPU per update
  at that level's batch_size, so K = E / B, which must be a whole number); accu_grad 0 means K = 1;
- `gradient_accumulation_steps` K;
- `global_batch` G.

Explicit values (the command line) are checked; inherited ones (recipe, preset, world) are derived:
- A way given on the command line replaces the recipe's and is used as given, at the actual
  micro-batch and world: values that contradict each other are refused.
- The recipe's way is read at the recipe's own batch_size and world (recipe_num_nodes ×
  recipe_gpus_per_node), where it means K_r micro-batches per update (effec_batch_size 8 at
  batch_size 4: K_r = 2). A recipe whose way is not a whole number of micro-batches at its own
  batch_size contradicts itself and is refused, naming the recipe.
- A micro-batch from a preset or --batch_size, and the actual world, are then applied to it
  according to `hold`:
  "accumulation" (the default): keep K_r; G = B × K_r × W follows, and so does the LR;
  "global_batch": keep the recipe's global batch G_r = b_r × K_r × W_r; K = G_r / (B × W).
- A resumed run (`resume`) holds the checkpoint's global batch, LR and warmup whatever the world
  and the hold, re-deriving only K; a command-line way that contradicts it is refused.
The LR is base_lr × rule(G / reference_batch), rule linear, sqrt or none.

When the LR ends above base_lr (k = peak_lr / base_lr > 1) a warmup ramps it from base_lr (Goyal
et al. 2017), automatic by default (see auto_warmup_samples); the plan warns when the linear rule
raises the LR more than LINEAR_LR_WARN_FACTOR times (see there).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from fractions import Fraction
from typing import Any

from launcher.config.sections import HOLDS, LR_RULES, WARMUP_AUTO

# Goyal et al. 2017 ramp the LR from the base LR to k × base over the first 5 epochs, for every k up to 32.
WARMUP_EPOCHS = 5
# Past this factor the plan warns about the linear rule. Linear scaling is derived for SGD (Goyal et al. 2017);
# for Adam, Malladi et al. 2022 derive square-root scaling, so linear overshoots that by √k. At k = 4 the two
# differ by 2×, the size of a step in a usual LR sweep and of the plateau rule's own ×0.5: beyond it the choice
# of rule matters more than LR tuning would, and the user should make it knowingly.
LINEAR_LR_WARN_FACTOR = 4.0
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
class ResumeHold:
    """What a checkpoint fixes for the run that continues it (from its COMPLETE.json marker).

    The data cursor and the LR schedule count in optimizer updates of `global_batch` samples, so a
    resumed run keeps that global batch, its LR and its warmup on any world; only K is re-derived.
    """

    source: str  # where it was read, e.g. "checkpoint runs/x/checkpoints/step00000120"
    global_batch: int
    peak_lr: float
    base_lr: float
    reference_batch: int
    lr_rule: str
    lr_derivation: str
    warmup_samples: int
    warmup_from_lr: float


@dataclass(frozen=True)
class Origins:
    """Where each input of a request came from, in words for the card (e.g. "preset ds_configs/bs12.json")."""

    batch_size: str = "the request"
    world: str = "the request"
    hold: str = "default"
    lr: str = "the request"  # base_lr, reference_batch and lr_rule
    warmup: str = "the request"


@dataclass(frozen=True)
class PlanRequest:
    batch_size: int  # per-GPU micro-batch (= train_micro_batch_size_per_gpu) this run uses
    num_nodes: int  # the actual world
    gpus_per_node: int
    recipe_accum: AccumSpec  # from the YAML recipe
    cli_accum: AccumSpec = AccumSpec()  # from the command line: any way given here replaces the recipe's
    recipe_batch_size: int | None = None  # the recipe's batch_size, where its accumulation is read (None: batch_size)
    recipe_num_nodes: int = 1  # the world the recipe's accumulation was written for
    recipe_gpus_per_node: int = 2
    hold: str = HOLDS[0]  # or "global_batch"
    base_lr: float = 5e-4  # the LR at reference_batch samples per update
    reference_batch: int = 16
    lr_rule: str = "linear"  # linear | sqrt | none
    warmup_samples: int | str = WARMUP_AUTO  # a number of samples, or "auto" (see auto_warmup_samples)
    warmup_from_command_line: bool = False  # only the command line switches warmup off (0) when k > 1
    adam_beta2: float = 0.999  # sets the automatic warmup's length
    segment_seconds: float = 4.0
    dataset_size: int | None = None  # training examples (crops) per epoch
    resume: ResumeHold | None = None  # a checkpoint this run continues
    recipe_name: str = "recipe"  # e.g. "recipe recipes/train_48k.yaml" or "built-in defaults"
    origins: Origins = Origins()
    notes: tuple[str, ...] = ()  # carried into the plan verbatim


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
    warmup_from_lr: float  # the ramp goes from here to peak_lr (see launcher/training/schedule.py)
    segment_seconds: float
    audio_seconds_per_update: float
    dataset_size: int | None
    steps_per_epoch: int | None  # optimizer steps; the sampler drops the last partial update
    hold: str
    recipe_num_nodes: int
    recipe_gpus_per_node: int
    # (number, where it came from) for micro_batch, accumulation_steps, world_size, global_batch, peak_lr,
    # warmup_samples: "command line …", "recipe FILE …", "preset FILE", "checkpoint …" or "derived: …".
    sources: tuple[tuple[str, str], ...] = ()
    warnings: tuple[str, ...] = ()
    resumed_from: str | None = None  # the checkpoint whose global batch, LR and warmup this plan holds
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

    @property
    def lr_factor(self) -> float:
        """k = peak_lr / base_lr: how far the plan raised the LR over the one tuned at reference_batch."""
        return self.peak_lr / self.base_lr

    def source(self, name: str) -> str:
        """Where the number `name` (a key of `sources`) came from."""
        return dict(self.sources).get(name, "")

    @property
    def accumulation_source(self) -> str:
        return self.source("accumulation_steps")

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
        d["sources"] = dict(self.sources)
        d["warnings"] = list(self.warnings)
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
        optional = ("sources", "warnings", "resumed_from", "notes")
        derived = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "lr")
        unknown = sorted(set(d) - set(names) - set(derived))
        if unknown:
            raise PlanError(f"plan: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(names)}")
        missing = [n for n in names if n not in d and n not in optional]
        if missing:
            raise PlanError(f"plan: missing key(s) {', '.join(missing)}")
        kwargs = {n: d[n] for n in names if n in d}
        kwargs["sources"] = tuple(dict(kwargs.get("sources") or {}).items())
        kwargs["warnings"] = tuple(kwargs.get("warnings", ()))
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


def auto_warmup_samples(reference_batch: int, adam_beta2: float, dataset_size: int | None) -> tuple[int, str]:
    """The automatic warmup length in samples, and how it was reached.

    The shorter of Goyal et al.'s 5 epochs and 2/(1 − β2) optimizer updates at the reference batch
    (2,000 updates of 16 = 32,000 samples for Adam's β2 = 0.999). Goyal et al. keep the warmup fixed
    in data (5 epochs) for every k up to 32, so here too the length is in samples and the number of
    steps falls as the global batch grows. 2/(1 − β2) is Ma & Yarats' (2021) length for an untuned
    Adam warmup: about twice the horizon of Adam's second-moment average, measured where base_lr
    was tuned. It needs no epoch size, so a dry run that does not know the corpus plans the same
    warmup as training on any corpus of more than 2/(1 − β2) × reference_batch / 5 examples (6,400
    for the reference); on a smaller corpus, where 5 epochs are shorter, training uses 5 epochs.
    """
    updates = max(1, round(2 / (1 - adam_beta2)))
    by_adam = updates * reference_batch
    how = f"2/(1 − β2) = {updates} updates × reference batch {reference_batch} = {by_adam} samples"
    if dataset_size is None:
        small = -(-by_adam // WARMUP_EPOCHS)
        return by_adam, f"{how} (or {WARMUP_EPOCHS} epochs on a corpus of fewer than {small} examples)"
    by_epochs = WARMUP_EPOCHS * dataset_size
    epochs = f"{WARMUP_EPOCHS} epochs × {dataset_size} = {by_epochs} samples"
    if by_epochs < by_adam:
        return by_epochs, f"{epochs}, shorter than {how}"
    return by_adam, f"{how}, shorter than {epochs}"


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

    batch_size, num_nodes and hold replace those fields (the recipe's own batch_size stays what it
    was: a new micro-batch does not change how the recipe is read); world_size runs `value` GPUs on
    one node (any split with the same product plans the same); effec_batch_size,
    gradient_accumulation_steps and global_batch become the command line's only accumulation way.
    """
    if key == "batch_size":
        return replace(req, batch_size=value, recipe_batch_size=_recipe_batch(req))
    if key in ("num_nodes", "hold"):
        return replace(req, **{key: value})
    if key == "world_size":
        return replace(req, num_nodes=1, gpus_per_node=value)
    if key in ("effec_batch_size", "gradient_accumulation_steps", "global_batch"):
        return replace(req, cli_accum=AccumSpec(**{key: value}))
    raise KeyError(f"unknown suggestion key {key!r}; valid: {', '.join(SUGGESTION_KEYS)}")


def _recipe_batch(req: PlanRequest) -> int:
    return req.batch_size if req.recipe_batch_size is None else req.recipe_batch_size


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


def _check_resume(hold: Any) -> None:
    if not isinstance(hold, ResumeHold):
        raise PlanError(f"resume must be a ResumeHold, got {type(hold).__name__}", rule="type")
    where = hold.source
    _check_int(f"{where}: global_batch", hold.global_batch)
    _check_int(f"{where}: reference_batch", hold.reference_batch)
    _check_int(f"{where}: warmup_samples", hold.warmup_samples, minimum=0)
    for name in ("peak_lr", "base_lr"):
        _check_real(f"{where}: {name}", getattr(hold, name))
    if isinstance(hold.warmup_from_lr, bool) or not isinstance(hold.warmup_from_lr, (int, float)) \
            or not 0 <= hold.warmup_from_lr <= hold.peak_lr:
        raise PlanError(f"{where}: warmup_from_lr must be a number in [0, peak_lr], got {hold.warmup_from_lr!r}",
                        rule="range")
    if hold.lr_rule not in LR_RULES:
        raise PlanError(f"{where}: lr_rule must be one of {', '.join(LR_RULES)}, got {hold.lr_rule!r}", rule="lr_rule")


def _validate(req: PlanRequest) -> None:
    if not isinstance(req, PlanRequest):
        raise PlanError(f"expected a PlanRequest, got {type(req).__name__}", rule="type")
    for name in ("batch_size", "num_nodes", "gpus_per_node", "recipe_num_nodes", "recipe_gpus_per_node",
                 "reference_batch"):
        _check_int(name, getattr(req, name))
    if req.recipe_batch_size is not None:
        _check_int("recipe_batch_size", req.recipe_batch_size)
    if req.warmup_samples != WARMUP_AUTO:
        if not _is_int(req.warmup_samples):
            raise PlanError(f"warmup_samples must be a whole number or {WARMUP_AUTO!r}, got {req.warmup_samples!r}",
                            rule="type")
        _check_int("warmup_samples", req.warmup_samples, minimum=0)
    if req.dataset_size is not None:
        _check_int("dataset_size", req.dataset_size)
    _check_real("base_lr", req.base_lr)
    _check_real("segment_seconds", req.segment_seconds)
    if isinstance(req.adam_beta2, bool) or not isinstance(req.adam_beta2, (int, float)) \
            or not 0 <= req.adam_beta2 < 1:
        raise PlanError(f"adam_beta2 must be a number in [0, 1), got {req.adam_beta2!r}", rule="range")
    if req.hold not in HOLDS:
        raise PlanError(f"hold must be one of {', '.join(HOLDS)}, got {req.hold!r}", rule="hold")
    if req.lr_rule not in LR_RULES:
        raise PlanError(f"lr_rule must be one of {', '.join(LR_RULES)}, got {req.lr_rule!r}", rule="lr_rule")
    if not isinstance(req.notes, tuple) or not all(isinstance(n, str) for n in req.notes):
        raise PlanError(f"notes must be a tuple of strings, got {req.notes!r}", rule="type")
    _check_spec("recipe", req.recipe_accum)
    _check_spec("command line", req.cli_accum)
    if req.resume is not None:
        _check_resume(req.resume)


@dataclass(frozen=True)
class _Way:
    text: str  # e.g. "effec_batch_size=8"
    global_batch: int  # at the level's micro-batch and world
    steps: int | None  # None: the global batch is not a whole number of micro-batches at that world
    keys: tuple[str, ...] = ()  # the AccumSpec fields that gave it


def _flag(name: str) -> str:
    return f"--{name}"


def _effec_error(req: PlanRequest, level: str, effec: int, world: int) -> PlanError:
    """The reference's own failure, typed on the command line: effec_batch_size not a whole number of micro-batches."""
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


def _recipe_effec_error(req: PlanRequest, effec: int, b_r: int) -> PlanError:
    """A recipe whose effec_batch_size is not a whole number of its own micro-batches contradicts itself."""
    b, w = req.batch_size, req.num_nodes * req.gpus_per_node
    fix_effec = sorted(_nearest([b_r * m for m in range(1, effec // b_r + _SHOWN + 2)], effec)[:_SHOWN])
    effecs = sorted(_keep_feasible(req, "effec_batch_size", _nearest([b * m for m in range(1, effec // b + _SHOWN + 2)],
                                                                      effec), limit=_SHOWN))
    steps = _keep_feasible(req, "gradient_accumulation_steps", list(range(1, _SHOWN + 1)))
    globals_ = sorted(_keep_feasible(req, "global_batch", _multiples_near(b * w, effec * w), limit=_SHOWN))
    lines = [
        f"{req.recipe_name}: effec_batch_size {effec} is not a positive multiple of its batch_size {b_r}: "
        f"{effec}/{b_r} = {effec / b_r:.3g} micro-batches per GPU per update is not a whole number, so the recipe "
        f"contradicts itself (the reference would never step the optimizer).",
        "Rule: a recipe's effec_batch_size counts samples per GPU per update at the recipe's own batch_size, so it "
        "must be a positive multiple of it.",
        "Valid choices:",
        f"  in the recipe: batch_size one of {_join(_divisors(effec))} (divisors of {effec}), or effec_batch_size "
        f"one of {_join(fix_effec, more=True)} (multiples of {b_r})",
        "  or on the command line, which replaces the recipe's accumulation:",
    ]
    if effecs:
        lines.append(f"    {_flag('effec_batch_size')} {_join(effecs)} (multiples of batch_size {b})")
    if steps:
        lines.append(f"    {_flag('gradient_accumulation_steps')} {_join(steps, more=True)}")
    if globals_:
        lines.append(f"    {_flag('global_batch')} {_join(globals_)} (multiples of {b} × {w} GPUs)")
    return PlanError("\n".join(lines), rule="recipe effec_batch_size is a positive multiple of its batch_size",
                     suggestions={"effec_batch_size": effecs, "gradient_accumulation_steps": steps,
                                  "global_batch": globals_})


def _disagreeing_ways_error(level: str, ways: list[_Way], b: int, world_text: str, is_cli: bool) -> PlanError:
    implied = "; ".join(f"{w.text} means {w.global_batch} samples per update" for w in ways)
    if not is_cli:
        fix = "set the others to null in the recipe's batch section, e.g. " + "; ".join(
            f"to keep {w.text}: " + " ".join(f"--set batch.{k}=null" for o in ways if o is not w for k in o.keys)
            for w in ways)
    else:
        fix = "pass only one of them"
    return PlanError(
        f"{level} gives the accumulation in {len(ways)} ways that disagree at {world_text} with "
        f"batch_size {b}: {implied}.\nRule: accumulation is given in exactly one way "
        f"(or in ways that agree).\nValid choices: keep one way and {fix}.",
        rule="one accumulation way per level",
    )


def _reference_way(req: PlanRequest, level: str, spec: AccumSpec, b: int, world: int, suggest: bool,
                   is_cli: bool) -> list[_Way]:
    """The reference's way (accu_grad + effec_batch_size) at one level, if it gives it."""
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
        if effec is None:
            others = spec.gradient_accumulation_steps is not None or spec.global_batch is not None
            recipe_effec = req.recipe_accum.effec_batch_size
            if is_cli and not others and recipe_effec is not None:
                # --accu_grad 1 alone turns on the recipe's accumulation: its number of micro-batches.
                b_r = _recipe_batch(req)
                if recipe_effec % b_r:
                    raise _recipe_effec_error(req, recipe_effec, b_r) if suggest else PlanError("infeasible")
                k = recipe_effec // b_r
                text = (f"accu_grad=1 with {req.recipe_name}'s effec_batch_size {recipe_effec} at batch_size {b_r} "
                        f"({k} micro-batches)")
                ways.append(_Way(text, b * k * world, k, ("accu_grad",)))
            else:
                where = "--effec_batch_size" if is_cli else "batch.effec_batch_size"
                raise PlanError(
                    f"{level}: accu_grad 1 needs effec_batch_size (samples per GPU per update) at the same "
                    f"level" + (" and the recipe gives none" if is_cli else "") + ".\n"
                    f"Rule: the reference's way is accu_grad 1 + effec_batch_size; accu_grad alone says only "
                    f"'accumulate'.\nValid choices: add {where} (a multiple of batch_size {b}, e.g. {2 * b}), "
                    f"or give gradient_accumulation_steps or global_batch instead of accu_grad.",
                    rule="accu_grad 1 needs effec_batch_size",
                )
        else:
            if effec % b != 0:
                if not suggest:
                    raise PlanError("infeasible")
                raise _effec_error(req, level, effec, world) if is_cli else _recipe_effec_error(req, effec, b)
            keys = tuple(k for k in ("accu_grad", "effec_batch_size") if getattr(spec, k) is not None)
            ways.append(_Way(f"effec_batch_size={effec}", effec * world, effec // b, keys))
    return ways


def _level_way(req: PlanRequest, level: str, spec: AccumSpec, b: int, world: int, world_text: str,
               suggest: bool, is_cli: bool) -> _Way | None:
    """The accumulation one level gives, as (global batch, steps) at micro-batch `b` on `world` GPUs."""
    ways = _reference_way(req, level, spec, b, world, suggest, is_cli)
    if spec.gradient_accumulation_steps is not None:
        k = spec.gradient_accumulation_steps
        ways.append(_Way(f"gradient_accumulation_steps={k}", b * k * world, k, ("gradient_accumulation_steps",)))
    if spec.global_batch is not None:
        g = spec.global_batch
        ways.append(_Way(f"global_batch={g}", g, g // (b * world) if g % (b * world) == 0 else None,
                         ("global_batch",)))
    if len({w.global_batch for w in ways}) > 1:
        raise _disagreeing_ways_error(level, ways, b, world_text, is_cli)
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
    # A resumed run holds its global batch: another global batch is no choice there.
    globals_ = [] if req.resume is not None else sorted(
        _keep_feasible(req, "global_batch", _multiples_near(per_update, g), limit=_SHOWN))
    holds = [h for h in HOLDS if h != req.hold and _feasible(replace(req, hold=h))] \
        if not req.cli_accum.is_given() and req.resume is None else []
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


def _resume_conflict_error(req: PlanRequest, cli: _Way) -> PlanError:
    hold = req.resume
    b, w = req.batch_size, req.num_nodes * req.gpus_per_node
    g = hold.global_batch
    k = g // (b * w) if g % (b * w) == 0 else None
    lines = [
        f"command line {cli.text} means {cli.global_batch} samples per update, but this run resumes {hold.source}, "
        f"which was trained with a global batch of {g} (lr {format_lr(hold.peak_lr)}).",
        "Rule: a resumed run keeps its checkpoint's global batch and LR (the data cursor and the LR schedule count "
        "in its updates); only the accumulation is re-derived for the world.",
        "Valid choices: drop the accumulation flag"
        + (f" (this world then runs {b} × {k} × {w} = {g})" if k else "")
        + f", pass --global_batch {g}, or start a new run instead of resuming",
    ]
    return PlanError("\n".join(lines), rule="a resumed run holds its checkpoint's global batch",
                     suggestions={"global_batch": _keep_feasible(req, "global_batch", [g]) if k else ()})


def _recipe_steps_error(req: PlanRequest, way: _Way, b_r: int, w_r: int) -> PlanError:
    b = req.batch_size
    holds = [h for h in HOLDS if h != req.hold and _feasible(replace(req, hold=h))]
    lines = [
        f"{req.recipe_name} {way.text} at {_world_text(req.recipe_num_nodes, req.recipe_gpus_per_node)} with its "
        f"batch_size {b_r} gives {way.global_batch} / ({b_r} × {w_r}) = {way.global_batch / (b_r * w_r):.3g} "
        f"accumulation steps, not a whole number, so hold=accumulation has no accumulation to hold.",
        "Rule: global_batch = batch_size × gradient_accumulation_steps × world_size, all whole numbers.",
        "Valid choices:",
    ]
    if holds:
        lines.append(f"  --hold {holds[0]} (keep the global batch {way.global_batch})")
    lines.append(f"  or give --gradient_accumulation_steps or --global_batch on the command line (batch_size {b})")
    return PlanError("\n".join(lines), rule="whole accumulation steps at the recipe's world",
                     suggestions={"hold": holds})


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


def _learning_rate(req: PlanRequest, g: int) -> tuple[float, float, int, str, str, str]:
    """(peak, base, reference batch, rule, derivation, source) for global batch `g`."""
    if req.resume is not None:
        h = req.resume
        return (h.peak_lr, h.base_lr, h.reference_batch, h.lr_rule,
                f"{format_lr(h.peak_lr)} held from {h.source} ({h.lr_derivation})", f"held from {h.source}")
    base, ref = req.base_lr, req.reference_batch
    if req.lr_rule == "linear":
        peak = float(Fraction(base) * Fraction(g, ref))
        derivation = f"{format_lr(base)} × {g}/{ref} = {format_lr(peak)} (linear)"
    elif req.lr_rule == "sqrt":
        peak = base * math.sqrt(g / ref)
        derivation = f"{format_lr(base)} × √({g}/{ref}) = {format_lr(peak)} (sqrt)"
    else:
        peak = float(base)
        derivation = f"{format_lr(base)} (none: not scaled with the global batch {g}/{ref})"
    return peak, float(base), ref, req.lr_rule, derivation, f"derived: {derivation}; base_lr from {req.origins.lr}"


def _warmup(req: PlanRequest, k: float, base: float) -> tuple[int, float, str]:
    """(warmup samples, the LR the ramp starts from, where the length came from)."""
    if req.resume is not None:
        return req.resume.warmup_samples, req.resume.warmup_from_lr, f"held from {req.resume.source}"
    # Goyal et al.'s gradual warmup ramps from the base LR, the one known to be stable at the reference batch. With
    # k <= 1 there is no lower LR known to be stable, so a warmup asked for there ramps from 0, the usual way.
    start = float(base) if k > 1 else 0.0
    value = req.warmup_samples
    inherited_off = value == 0 and not req.warmup_from_command_line
    if value == WARMUP_AUTO or (inherited_off and k > 1):
        if k <= 1:
            return 0, start, f"automatic: none, the LR is not raised above base_lr (k = {k:.3g})"
        samples, how = auto_warmup_samples(req.reference_batch, req.adam_beta2, req.dataset_size)
        why = f"automatic at k = {k:.3g} > 1: {how}"
        if inherited_off:
            why += (f"; {req.origins.warmup}'s warmup_samples 0 holds for k <= 1 only (pass optim.warmup_samples=0 "
                    f"on the command line to keep it off)")
        return samples, start, why
    return value, start, req.origins.warmup


@dataclass(frozen=True)
class _Accumulation:
    """The global batch and accumulation a request comes to, and where each came from (for the card)."""

    global_batch: int
    steps: int
    steps_source: str
    global_source: str


def _accumulation(req: PlanRequest, fail: Any, suggest: bool) -> _Accumulation:
    """The command line's way if it gives one, else a resumed checkpoint's global batch, else the recipe's way
    applied to this micro-batch and world according to `hold`."""
    b, w = req.batch_size, req.num_nodes * req.gpus_per_node
    held = req.resume
    product = f"{b} × {{k}} × {w}"
    cli = _level_way(req, "command line", req.cli_accum, b, w, _world_text(req.num_nodes, req.gpus_per_node),
                     suggest, is_cli=True)
    if cli is not None:
        g = cli.global_batch
        if held is not None and g != held.global_batch:
            raise fail(_resume_conflict_error, cli)
        if cli.steps is None:
            raise fail(_world_error, g, f"command line {cli.text}")
        g_source = (f"command line {cli.text}" if cli.text.startswith("global_batch")
                    else f"derived: {product.format(k=cli.steps)}")
        return _Accumulation(g, cli.steps, f"command line {cli.text}", g_source)
    if held is not None:
        g = held.global_batch
        if g % (b * w) != 0:
            raise fail(_world_error, g, f"held from {held.source}")
        return _Accumulation(g, g // (b * w), f"derived: global batch {g} held from {held.source} / ({b} × {w} GPUs)",
                             f"held from {held.source} (a resumed run keeps its global batch and LR)")
    b_r, w_r = _recipe_batch(req), req.recipe_num_nodes * req.recipe_gpus_per_node
    recipe_world_text = _world_text(req.recipe_num_nodes, req.recipe_gpus_per_node)
    recipe = _level_way(req, req.recipe_name, req.recipe_accum, b_r, w_r, recipe_world_text, suggest, is_cli=False)
    if recipe is None:
        # No way given anywhere reads as the recipe's accu_grad 0, so `hold` means the same for every recipe.
        recipe = _Way("accumulation not given (accu_grad=0)", b_r * w_r, 1)
    at = f"at its batch_size {b_r}" + (f" on {recipe_world_text}" if recipe.text.startswith("global_batch") else "")
    if req.hold == "accumulation":
        if recipe.steps is None:
            raise fail(_recipe_steps_error, recipe, b_r, w_r)
        k = recipe.steps
        return _Accumulation(b * k * w, k, f"derived: {recipe.text} in {req.recipe_name} {at} = {k} micro-batch"
                                           f"{'es' if k > 1 else ''} per update"
                                           + (f", kept at batch_size {b}" if b != b_r else ""),
                             f"derived: {product.format(k=k)}")
    g = recipe.global_batch
    if g % (b * w) != 0:
        raise fail(_world_error, g, f"{req.recipe_name} {recipe.text} at {recipe_world_text}, held by hold=global_batch")
    return _Accumulation(g, g // (b * w), f"derived: global batch {g} held (hold global_batch) / ({b} × {w} GPUs)",
                         f"{recipe.text} in {req.recipe_name} {at} on {recipe_world_text}, held (hold global_batch)")


def _lr_warnings(req: PlanRequest, g: int, peak: float, base: float, ref: int, rule: str) -> tuple[str, ...]:
    factor = peak / base
    if req.resume is not None or rule != "linear" or factor <= LINEAR_LR_WARN_FACTOR:
        return ()
    sqrt_lr = base * math.sqrt(g / ref)
    return (f"the linear rule raises the LR {factor:.3g}× over base_lr ({format_lr(base)} → {format_lr(peak)}), "
            f"more than {LINEAR_LR_WARN_FACTOR:g}×; Adam does not scale linearly with the batch (Malladi et al. 2022 "
            f"derive square-root scaling for adaptive optimizers): --lr_rule sqrt gives {format_lr(base)} × "
            f"√({g}/{ref}) = {format_lr(sqrt_lr)}",)


def _plan(req: PlanRequest, suggest: bool) -> Plan:
    _validate(req)

    def fail(make: Any, *args: Any) -> PlanError:
        # Suggestions are computed only for the error the caller sees, not while testing them.
        return make(req, *args) if suggest else PlanError("infeasible")

    acc = _accumulation(req, fail, suggest)
    b, k, g = req.batch_size, acc.steps, acc.global_batch
    w = req.num_nodes * req.gpus_per_node
    steps_per_epoch = None
    if req.dataset_size is not None:
        if req.dataset_size < g:
            raise fail(_dataset_error, g, b, w)
        steps_per_epoch = req.dataset_size // g
    peak, base, ref, rule, derivation, lr_source = _learning_rate(req, g)
    warmup_samples, warmup_from, warmup_source = _warmup(req, peak / base, base)
    sources = (("micro_batch", req.origins.batch_size), ("accumulation_steps", acc.steps_source),
               ("world_size", f"{req.origins.world}"), ("global_batch", acc.global_source), ("peak_lr", lr_source),
               ("warmup_samples", warmup_source))
    return Plan(
        world_size=w, num_nodes=req.num_nodes, gpus_per_node=req.gpus_per_node, micro_batch=b,
        accumulation_steps=k, global_batch=g, samples_per_gpu_per_update=b * k, base_lr=base, reference_batch=ref,
        lr_rule=rule, peak_lr=peak, lr_derivation=derivation, warmup_samples=warmup_samples,
        warmup_steps=-(-warmup_samples // g), warmup_from_lr=warmup_from, segment_seconds=float(req.segment_seconds),
        audio_seconds_per_update=g * float(req.segment_seconds), dataset_size=req.dataset_size,
        steps_per_epoch=steps_per_epoch, hold=req.hold, recipe_num_nodes=req.recipe_num_nodes,
        recipe_gpus_per_node=req.recipe_gpus_per_node, sources=sources,
        warnings=_lr_warnings(req, g, peak, base, ref, rule),
        resumed_from=req.resume.source if req.resume is not None else None, notes=req.notes,
    )


def make_plan(req: PlanRequest) -> Plan:
    """The plan for `req`, or PlanError naming the numbers, the rule and valid choices."""
    return _plan(req, suggest=True)

