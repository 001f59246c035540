"""hf_compress: smaller Hugging Face models that stay accurate, with the proof in the model card.

The public names below are imported lazily (as transformers does), so `import hf_compress` stays light: it imports
neither torch, transformers nor bitsandbytes. It also arranges for the `hf_compress_bitmask` quantization method to
be registered with transformers as soon as transformers' quantizer registry is imported, so that
`AutoModelFor*.from_pretrained` and `pipeline()` read checkpoints written by `save_compressed`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_LAZY = {
    "DistillationTrainer": "hf_compress.trainers",
    "DistillationArguments": "hf_compress.distillation",
    "GradualPruningCallback": "hf_compress.callbacks",
    "QATCallback": "hf_compress.callbacks",
    "QuantizationCallback": "hf_compress.callbacks",
    "QuantizationArguments": "hf_compress.quantization.config",
    "PruningArguments": "hf_compress.pruning.config",
    "quantize_and_save": "hf_compress.quantization.export",
    "load_quantized": "hf_compress.quantization.export",
    "save_compressed": "hf_compress.formats.bitmask",
    "load_compressed": "hf_compress.formats.bitmask",
    "push_to_hub": "hf_compress.hub",
    "compress": "hf_compress.pipeline.runner",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_compress' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


# --- register the bitmask format with transformers, without importing transformers here -------------------------

_REGISTRY = "transformers.quantizers.auto"


def _register_bitmask() -> None:
    importlib.import_module("hf_compress.formats.bitmask_quantizer")  # registers on import


class _RegisterWhenImported(importlib.abc.MetaPathFinder):
    """Runs `_register_bitmask` right after transformers imports its quantizer registry (which `from_pretrained`
    always does), so registering costs nothing until transformers is in use."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register_bitmask()

        spec.loader.exec_module = exec_and_register
        return spec


if _REGISTRY in sys.modules:
    _register_bitmask()
elif not any(isinstance(f, _RegisterWhenImported) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWhenImported())
