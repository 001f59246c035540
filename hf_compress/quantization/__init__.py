"""Quantization: the numerics of each backend as pure functions (`numerics.py`), what is quantized (`targets.py`),
quantization-aware fine-tuning on those numerics (`qat.py`), and the backends that write the files
(`backends/`: bitsandbytes 8-bit / 4-bit, compressed-tensors int8 / int4), behind `quantize_and_save` /
`load_quantized` (`export.py`).

Nothing here imports bitsandbytes or compressed-tensors at import time: a backend's library loads when a model is
quantized.
"""

from .backends.bitsandbytes import require_bitsandbytes, use_reference_cpu_kernel
from .config import DEFAULT_HEAD_MODULES, QuantizationArguments
from .export import load_quantized, quantize_and_save, quantize_model
from .numerics import (
    dequantize_4bit,
    fake_quantize_weight,
    int8_linear,
    int8_rowwise_quantize,
    quantize_4bit,
    straight_through,
)
from .qat import BnbFakeQuantize, attach_fake_quant, is_fake_quantized, remove_fake_quant
from .targets import quantization_targets, resolve_skip_modules, shape_skipped_modules, unsupported_4bit_modules

__all__ = [
    "DEFAULT_HEAD_MODULES",
    "BnbFakeQuantize",
    "QuantizationArguments",
    "attach_fake_quant",
    "dequantize_4bit",
    "fake_quantize_weight",
    "int8_linear",
    "int8_rowwise_quantize",
    "is_fake_quantized",
    "load_quantized",
    "quantization_targets",
    "quantize_4bit",
    "quantize_and_save",
    "quantize_model",
    "remove_fake_quant",
    "require_bitsandbytes",
    "resolve_skip_modules",
    "shape_skipped_modules",
    "straight_through",
    "unsupported_4bit_modules",
    "use_reference_cpu_kernel",
]
