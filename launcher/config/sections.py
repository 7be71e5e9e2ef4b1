"""The recipe's sections: one small frozen dataclass each, with the valid range of every key.

Each component receives only its own section (`build_model(cfg.model.preset)`, the data pipeline gets
`cfg.data`, ...). A value outside its range is refused when the section is built, naming the key, the value
and the range; `launcher.config.load` says which layer (recipe file, command line) set it. Only the standard
library and data/mixing_config.py (standard library only) are imported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from data.errors import DataError
from data.mixing_config import CHOICES as MIXING_CHOICES
from data.mixing_config import LIMITS as MIXING_LIMITS
from data.mixing_config import MixingConfig

# The planner's vocabulary, as the recipe spells it (launcher/plan/rules.py gives each its meaning).
HOLDS = ("accumulation", "global_batch")  # what a new micro-batch or world keeps; the first is the default
LR_RULES = ("linear", "sqrt", "none")  # how the LR follows the global batch
WARMUP_AUTO = "auto"  # optim.warmup_samples: a warmup whenever the plan raises the LR above base_lr
# train.compile: what model/compile.py compiles of the training micro-batch (its REGIONS; a test keeps them equal).
COMPILE_REGIONS = ("off", "blocks", "model")
# Keys whose word YAML 1.1 reads as a boolean: a bare `compile: off` (recipe) or `train.compile=off` (command
# line) arrives as False, which here means the word the user typed; True (`on`, `yes`, `true`) names no region and
# is refused by the key's range as 'true'.
YAML_BOOLEAN_WORDS: dict[tuple[str, str], dict[bool, str]] = {("train", "compile"): {False: "off", True: "true"}}


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message says which key and why."""

    def __init__(self, message: str, key: tuple[str, str] | None = None):
        super().__init__(message)
        self.key = key  # (section, key) of a value out of range, so that the caller can name where it came from


@dataclass(frozen=True)
class Range:
    """The valid values of one recipe key: a closed or open interval, or a set of choices."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low < x rather than low <= x
    high_open: bool = False
    choices: tuple[Any, ...] = ()
    also: tuple[Any, ...] = ()  # values valid besides the interval (e.g. "auto")

    def holds(self, value: Any) -> bool:
        if value in self.also and not isinstance(value, bool):
            return True
        if self.choices:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def text(self) -> str:
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        low, high = _number(self.low), _number(self.high)
        if self.low is not None and self.high is not None:
            if not self.low_open and not self.high_open:
                span = f"between {low} and {high}"
            else:
                span = f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            span = f"{'>' if self.low_open else '>='} {low}"
        else:
            span = f"{'<' if self.high_open else '<='} {high}"
        return span + "".join(f" or {a!r}" for a in self.also)


def _number(x: float | None) -> str:
    if x is None:
        return ""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _at_least(low: int) -> Range:
    return Range(low=low)


_POSITIVE = Range(low=0, low_open=True)
_FRACTION = Range(low=0, high=1, high_open=True)  # Adam's betas
_UNIT = Range(low=0, high=1)
# Seeds feed numpy, torch and Python generators alike; 32 bits is what all of them accept.
_SEED = Range(low=0, high=2**32 - 1)
_NON_EMPTY = "non-empty"  # a string key that must not be empty when set

# The valid range of every recipe key that is not free text (section → key → Range, or _NON_EMPTY for paths
# and names). A key that is None where its type allows it means "not set" and is not checked.
RANGES: dict[str, dict[str, Range | str]] = {
    "model": {"preset": _NON_EMPTY},
    "data": {
        "train_list": _NON_EMPTY, "valid_list": _NON_EMPTY, "cache_dir": _NON_EMPTY,
        "sample_rate_hz": _at_least(1), "segment_seconds": _POSITIVE, "num_workers": _at_least(0),
        "prefetch_factor": _at_least(1), "thread_prefetch": _at_least(0), "loader_nice": Range(low=0, high=19),
    },
    "batch": {
        "batch_size": _at_least(1), "accu_grad": Range(choices=(0, 1)), "effec_batch_size": _at_least(1),
        "gradient_accumulation_steps": _at_least(1), "global_batch": _at_least(1),
        "recipe_num_nodes": _at_least(1), "recipe_gpus_per_node": _at_least(1), "hold": Range(choices=HOLDS),
    },
    "optim": {
        "base_lr": _POSITIVE, "reference_batch": _at_least(1), "lr_rule": Range(choices=LR_RULES),
        "warmup_samples": Range(low=0, also=(WARMUP_AUTO,)), "betas": _FRACTION, "eps": _POSITIVE,
        "weight_decay": Range(low=0),
    },
    "schedule": {
        "kind": Range(choices=("plateau", "cosine")), "halve_after": _at_least(1), "stop_after": _at_least(1),
        "factor": Range(low=0, high=1, low_open=True), "min_lr_ratio": _UNIT,
    },
    "train": {
        "max_epoch": _at_least(1), "max_steps": _at_least(1), "seed": _SEED, "run_dir": _NON_EMPTY,
        "log_interval_steps": _at_least(1), "save_interval_steps": _at_least(1), "keep_last": _at_least(1),
        "valid_interval_steps": _at_least(1), "max_consecutive_nonfinite": _at_least(1),
        "init_from": _NON_EMPTY, "eval_interval_epochs": _at_least(0), "eval_max_pairs": _at_least(1),
        "eval_metric_workers": _at_least(0), "step_timeout_s": _POSITIVE, "slow_phase_timeout_s": _POSITIVE,
        "compile": Range(choices=COMPILE_REGIONS),
    },
    "cuda": {},  # true/false switches only
    # Dynamic mixing: the numbers of data/mixing_config.py, whose own checks then add what spans keys (low <=
    # high, weights per noise list, a target that needs impulse responses).
    "mixing": {
        **{key: _NON_EMPTY for key in ("clean_lists", "clean_pair_lists", "noise_lists", "rir_lists", "valid_clean_lists",
                                       "valid_clean_pair_lists", "valid_noise_lists", "valid_rir_lists")},
        **{key: Range(low=low, high=high, low_open=low_open, high_open=high_open)
           for key, (low, high, low_open, high_open) in MIXING_LIMITS.items()},
        **{key: Range(choices=choices) for key, choices in MIXING_CHOICES.items()},
    },
}


def _check_ranges(section_obj: Any, section: str) -> None:
    """Refuse a value outside its key's range, naming the key, the value and the range."""
    for key, rule in RANGES.get(section, {}).items():
        value = getattr(section_obj, key)
        if value is None:
            continue
        if rule == _NON_EMPTY:
            if any(not str(item).strip() for item in (value if isinstance(value, tuple) else (value,))):
                what = "a list of non-empty strings" if isinstance(value, tuple) else "a non-empty string"
                raise ConfigError(f"{section}.{key} must be {what}, got {value!r}", (section, key))
            continue
        for item in (value if isinstance(value, tuple) else (value,)):
            if not rule.holds(item):
                finite = "a finite number " if isinstance(item, float) and not math.isfinite(item) else ""
                raise ConfigError(f"{section}.{key} must be {finite}{rule.text()}, got {value!r}", (section, key))


@dataclass(frozen=True)
class ModelSection:
    preset: str = "mossformer2_se_48k"

    def __post_init__(self) -> None:
        _check_ranges(self, "model")


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
        _check_ranges(self, "data")


@dataclass(frozen=True)
class BatchSection:
    """Per-GPU micro-batch and accumulation, given in exactly one way (see launcher/plan/rules.py)."""

    batch_size: int = 4
    accu_grad: int | None = 1
    effec_batch_size: int | None = 8
    gradient_accumulation_steps: int | None = None
    global_batch: int | None = None
    # The world the recipe's accumulation was written for (the reference: 2 GPUs on one node).
    recipe_num_nodes: int = 1
    recipe_gpus_per_node: int = 2
    # On another micro-batch or world: keep the accumulation (the global batch and LR follow) or the global batch.
    hold: str = HOLDS[0]

    def __post_init__(self) -> None:
        _check_ranges(self, "batch")


@dataclass(frozen=True)
class OptimSection:
    base_lr: float = 5e-4
    reference_batch: int = 16
    lr_rule: str = "linear"
    # "auto": a warmup from base_lr whenever the plan raises the LR above it (launcher/plan/rules.py auto_warmup_samples).
    warmup_samples: int | Literal["auto"] = WARMUP_AUTO
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _check_ranges(self, "optim")


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

    def __post_init__(self) -> None:
        _check_ranges(self, "schedule")


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
    # Abort after this many consecutive optimizer steps skipped for a non-finite loss or gradients.
    max_consecutive_nonfinite: int = 5
    progress_bar: bool = True
    # Start from these weights (launcher/checkpoint/weights.py): a ClearerVoice checkpoint, a launcher.export file or a
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
    # A rank without progress for this long ends the job, naming the rank that stopped (launcher/training/watchdog.py):
    # between micro-batches once warm, and in phases that may legitimately take long (the first step after a
    # start, validation, checkpoint saves, the epoch end). Both stay below the 1800 s collective timeout.
    step_timeout_s: float = 300.0
    slow_phase_timeout_s: float = 1500.0
    # torch.compile of the training micro-batch (model/compile.py): "off" (eager), "blocks" (each attention unit
    # and FSMN block on its own, features and loss as functions) or "model" (the mask network as one region).
    # ZeRO 0-2 only (launcher/plan/compiled.py); the first step after every start compiles, a slow phase.
    compile: str = COMPILE_REGIONS[0]

    def __post_init__(self) -> None:
        _check_ranges(self, "train")
        if self.slow_phase_timeout_s < self.step_timeout_s:
            raise ConfigError(f"train.slow_phase_timeout_s ({self.slow_phase_timeout_s:g}) must be >= "
                              f"train.step_timeout_s ({self.step_timeout_s:g})", ("train", "slow_phase_timeout_s"))


@dataclass(frozen=True)
class CudaSection:
    """Speed switches applied on CUDA ranks at device set-up (launcher/dist/device.py); ignored on CPU.

    `allow_tf32`: fp32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa inputs, fp32
    accumulation; about 7× the strict-fp32 peak on an H100). `cudnn_benchmark`: cuDNN times its algorithms
    for each new input shape once and keeps the fastest (training crops have one shape).
    """

    allow_tf32: bool = True
    cudnn_benchmark: bool = True

    def __post_init__(self) -> None:
        for key in ("allow_tf32", "cudnn_benchmark"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"cuda.{key} must be true or false, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class MixingSection(MixingConfig):
    """Dynamic mixing (off unless clean lists are named): the keys and their meaning are data/mixing_config.py's
    MixingConfig, the README's "Dynamic mixing" lists them with their defaults.

    Each key's range is checked first (the error names the key and the layer that set it), then MixingConfig's
    own checks across keys; the first key such a check names is the one whose layer the error names.
    """

    def __post_init__(self) -> None:
        _check_ranges(self, "mixing")
        try:
            super().__post_init__()
        except DataError as e:
            text = str(e)
            named = text.split("mixing.", 1)[1].split(":", 1)[0].split(" ", 1)[0] if "mixing." in text else None
            raise ConfigError(text, ("mixing", named) if named in _MIXING_KEYS else None) from None


_MIXING_KEYS = frozenset(RANGES["mixing"]) | {"renormalize", "allow_changed_lists"}


@dataclass(frozen=True)
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    batch: BatchSection = field(default_factory=BatchSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    cuda: CudaSection = field(default_factory=CudaSection)
    mixing: MixingSection = field(default_factory=MixingSection)

    def __post_init__(self) -> None:
        _check_training_data(self.data, self.mixing, self.train)


def _check_training_data(d: DataSection, m: MixingSection, t: TrainSection) -> None:
    """Refuse a list or mixing key that the run would not use: what the recipe says it trains on is what it
    trains on."""
    if not m.enabled:
        for key, off in (("premixed_share", 0.0), ("samples_per_epoch", 0)):
            if getattr(m, key) != off:
                raise ConfigError(f"mixing.{key} is {getattr(m, key)!r} but mixing is off (no mixing.clean_lists or "
                                  f"mixing.clean_pair_lists): name the clean speech, or leave mixing.{key} at {off!r}",
                                  ("mixing", key))
        return
    if m.premixed_share > 0 and not d.train_list:
        raise ConfigError(f"mixing.premixed_share {m.premixed_share:g} asks for that share of pre-mixed pairs per "
                          "epoch, but data.train_list (the pairs) is not set: name it, or set mixing.premixed_share=0",
                          ("mixing", "premixed_share"))
    if m.premixed_share == 0 and d.train_list:
        raise ConfigError(f"data.train_list {d.train_list} would not be used: with mixing on, every training pair is "
                          "mixed unless mixing.premixed_share > 0 asks for a share of pre-mixed pairs; set "
                          "data.train_list=none, or mixing.premixed_share in (0, 1)", ("data", "train_list"))
    if m.valid_enabled and d.valid_list and not t.eval_interval_epochs:
        raise ConfigError(f"data.valid_list {d.valid_list} would not be used: validation mixes mixing.valid_clean_lists"
                          "/valid_clean_pair_lists, and only train.eval_interval_epochs (0 here) scores the files of "
                          "data.valid_list; set data.valid_list=none, or train.eval_interval_epochs",
                          ("data", "valid_list"))
