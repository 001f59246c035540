"""Trainer subclasses: only distillation changes the loss; everything else is a callback."""

import importlib

from .distillation import DistillationMixin, DistillationTrainer

_LAZY = {"SFTDistillationConfig": ".sft", "SFTDistillationTrainer": ".sft"}

__all__ = ["DistillationMixin", "DistillationTrainer", *_LAZY]


def __getattr__(name):
    # Imported on first use: `trl` is an optional dependency (the `llm` extra).
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
