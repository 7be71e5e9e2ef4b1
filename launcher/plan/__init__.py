"""Planning, torch-free: the batch/LR rules (`rules`), the resolution of recipe + flags + checkpoint marker into a
request (`request`), DeepSpeed presets and their rendering (`ds_config`), `train.compile` against the preset
(`compiled`), the per-GPU memory estimate (`memory`), the largest micro-batch that fits (`suggest`), the plan card
(`card`) and the dry run (`cli`, `python -m launcher.plan`).

The rules' public names are re-exported here: `from launcher.plan import Plan, PlanError, make_plan`.
"""

from launcher.config.sections import HOLDS, LR_RULES, WARMUP_AUTO
from launcher.plan.rules import (LINEAR_LR_WARN_FACTOR, SUGGESTION_KEYS, AccumSpec, Origins, Plan, PlanError,
                                 PlanRequest, ResumeHold, apply_suggestion, auto_warmup_samples, format_lr, make_plan)

__all__ = ["HOLDS", "LINEAR_LR_WARN_FACTOR", "LR_RULES", "SUGGESTION_KEYS", "WARMUP_AUTO", "AccumSpec", "Origins",
           "Plan", "PlanError", "PlanRequest", "ResumeHold", "apply_suggestion", "auto_warmup_samples", "format_lr",
           "make_plan"]
