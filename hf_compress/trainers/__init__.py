"""Trainer subclasses: only distillation changes the loss; everything else is a callback."""

from .distillation import DistillationMixin, DistillationTrainer

__all__ = ["DistillationMixin", "DistillationTrainer"]
