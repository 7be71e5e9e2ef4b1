"""48 kHz noisy/clean audio data: list files, validation, crops, dynamic mixing, resumable rank sharding, demo corpus.

Imports neither ``deepspeed`` nor ``launcher``: ranks and sizes come in as plain numbers. Names are imported
on first use, so ``python -m data.validate`` and ``python -m data.demo`` start without loading torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CorpusStats": "mix_lists",
    "CropDataset": "dataset",
    "CursorSampler": "sampler",
    "DataError": "errors",
    "EvalSampler": "sampler",
    "FileIndex": "index",
    "JoinedDataset": "mixing",
    "MixingConfig": "mixing_config",
    "MixingCorpus": "mix_lists",
    "MixingDataset": "mixing",
    "MixingReport": "mix_lists",
    "PairIndex": "index",
    "Problem": "validation",
    "ThreadPrefetcher": "loader",
    "ValidationReport": "validation",
    "batches_per_epoch": "sampler",
    "build_loader": "loader",
    "compare_records": "mix_lists",
    "corpus_summary": "mix_lists",
    "epoch_layout": "mixing_config",
    "flag_counts": "mixing",
    "list_digests": "mix_lists",
    "load_mixing_lists": "mix_lists",
    "make_demo_corpus": "demo_corpus",
    "mixing_record": "mix_lists",
    "mixing_training_set": "mixing",
    "validate": "validation",
    "validate_mixing": "mix_lists",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .dataset import CropDataset
    from .demo_corpus import make_demo_corpus
    from .errors import DataError
    from .index import FileIndex, PairIndex
    from .loader import ThreadPrefetcher, build_loader
    from .mix_lists import (CorpusStats, MixingCorpus, MixingReport, compare_records, corpus_summary, list_digests,
                            load_mixing_lists, mixing_record, validate_mixing)
    from .mixing import JoinedDataset, MixingDataset, flag_counts, mixing_training_set
    from .mixing_config import MixingConfig, epoch_layout
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
