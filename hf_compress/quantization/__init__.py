"""8-bit (LLM.int8) and 4-bit (NF4 / FP4) bitsandbytes export, reload, and quantization-aware fine-tuning.

Nothing here imports bitsandbytes at import time: the backend (`bnb.py`) loads when a model is quantized.
"""

from .config import DEFAULT_HEAD_MODULES, QuantizationArguments
from .export import (
    load_quantized,
    quantization_targets,
    quantize_and_save,
    quantize_model,
    require_bitsandbytes,
    resolve_skip_modules,
    shape_skipped_modules,
    unsupported_4bit_modules,
    use_reference_cpu_kernel,
)
from .functional import (
    dequantize_4bit,
    fake_quantize_weight,
    int8_linear,
    int8_rowwise_quantize,
    quantize_4bit,
    straight_through,
)
from .qat import BnbFakeQuantize, attach_fake_quant, is_fake_quantized, remove_fake_quant

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
