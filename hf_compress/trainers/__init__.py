"""Trainer subclasses: only distillation changes the loss; everything else is a callback."""

from .distillation import DistillationTrainer

__all__ = ["DistillationTrainer"]
