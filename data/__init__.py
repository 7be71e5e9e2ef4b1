"""48 kHz noisy/clean audio data: list files, validation, crops, resumable rank sharding, demo corpus.

Imports neither ``deepspeed`` nor ``launcher``: ranks and sizes come in as plain numbers. Names are imported
on first use, so ``python -m data.validate`` and ``python -m data.demo`` start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CropDataset": "dataset",
    "CursorSampler": "sampler",
    "DataError": "errors",
    "EvalSampler": "sampler",
    "PairIndex": "index",
    "Problem": "validation",
    "ThreadPrefetcher": "loader",
    "ValidationReport": "validation",
    "batches_per_epoch": "sampler",
    "build_loader": "loader",
    "make_demo_corpus": "demo_corpus",
    "validate": "validation",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .dataset import CropDataset
    from .demo_corpus import make_demo_corpus
    from .errors import DataError
    from .index import PairIndex
    from .loader import ThreadPrefetcher, build_loader
    from .sampler import CursorSampler, EvalSampler, batches_per_epoch
    from .validation import Problem, ValidationReport, validate


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
