"""Trainer callbacks: each composes with any `transformers.Trainer` (plain, ours or TRL's)."""

import importlib

_LAZY = {
    "GradualPruningCallback": ".pruning",
    "QuantizationCallback": ".quantization",
    "QATCallback": ".quantization",
    "StructuredPruningCallback": ".structured_pruning",
}

__all__ = list(_LAZY)


def __getattr__(name):
    # Imported on first use so that `import hf_compress.callbacks` never pulls in bitsandbytes.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
