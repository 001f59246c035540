"""The quantization backends, by `QuantizationArguments.backend`: one class each ([`QuantizationBackend`]).

Importing this table imports neither bitsandbytes nor compressed-tensors: each backend imports its library inside its
methods.
"""

from __future__ import annotations

from .base import REPORT_FILE, QuantizationBackend, folder_bytes
from .bitsandbytes import BitsAndBytesBackend
from .compressed_tensors import CompressedTensorsBackend

BACKENDS: dict[str, type[QuantizationBackend]] = {
    BitsAndBytesBackend.name: BitsAndBytesBackend,
    CompressedTensorsBackend.name: CompressedTensorsBackend,
}


def get_backend(name: str) -> QuantizationBackend:
    """The backend called `name` (`bitsandbytes` or `compressed-tensors`)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {name!r}.")
    return BACKENDS[name]()


def backend_for_config(config: dict) -> QuantizationBackend:
    """The backend that wrote a folder, from its `config.json`: compressed-tensors by its `quant_method`, else
    bitsandbytes (whose loader also reads a plain folder)."""
    method = (config.get("quantization_config") or {}).get("quant_method")
    return get_backend(CompressedTensorsBackend.name if method == CompressedTensorsBackend.name else BitsAndBytesBackend.name)


__all__ = ["BACKENDS", "REPORT_FILE", "QuantizationBackend", "backend_for_config", "folder_bytes", "get_backend"]
