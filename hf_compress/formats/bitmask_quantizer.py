"""`from_pretrained` support for the bitmask format, the way quantization libraries plug into transformers.

A bitmask checkpoint's `config.json` carries `quantization_config = {"quant_method": "hf_compress_bitmask", ...}` and
its `model.safetensors` stores each sparse weight as `<module>.weight` (the nonzero values, 1-D) plus
`<module>.weight_bitmask` (the zero / nonzero pattern, 8 entries a byte). Once hf_compress is imported, the config
and quantizer classes below are registered with transformers (`register_quantization_config`, `register_quantizer`),
and `from_pretrained` / `pipeline()` rebuild the dense weights while loading. Without hf_compress, transformers does
not know the method, and the 1-D values under the weight's own name stop the load with a size-mismatch error: a
bitmask checkpoint is never silently loaded with random weights.

Imports transformers at the top: `hf_compress/__init__.py` imports this module only once transformers imports its
quantizer registry.
"""

from __future__ import annotations

import torch
from transformers.core_model_loading import ConversionOps
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .bitmask import BITMASK_SUFFIX, QUANT_METHOD, bitmask_quantization_config


class BitmaskConfig(QuantizationConfigMixin):
    """
    The `quantization_config` of a bitmask checkpoint written by [`save_compressed`]: the weights are stored as
    their nonzero values and a bitmask, and loaded back dense (bit-identical).

    Args:
        format_version (`int`, *optional*, defaults to `2`): The layout version.
    """

    def __init__(self, format_version: int = 2, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format_version = format_version

    def to_dict(self) -> dict:
        return bitmask_quantization_config(self.format_version)


class BitmaskDecompress(ConversionOps):
    """Dense weight from `weight` (nonzero values, 1-D) and `weight_bitmask`; a weight without a bitmask passes."""

    def __init__(self, hf_quantizer=None):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
        from ..pruning.masks import unpack_bool

        values = input_dict["weight"]
        values = values[0] if isinstance(values, list) else values
        target = full_layer_name if full_layer_name is not None else "weight"
        bits = input_dict.get("weight" + BITMASK_SUFFIX)
        if bits is None:
            return {target: values}
        bits = bits[0] if isinstance(bits, list) else bits
        shape = model.get_parameter(full_layer_name).shape if model is not None and full_layer_name else None
        if shape is None:
            raise ValueError(f"Cannot rebuild {target}: its shape is unknown; load it with `hf_compress.load_compressed`.")
        nz = unpack_bool(bits.cpu(), shape)
        dense = torch.zeros(shape, dtype=values.dtype)
        dense[nz] = values.cpu()
        return {target: dense}

    @property
    def reverse_op(self):
        raise NotImplementedError("A model loaded from a bitmask checkpoint saves dense; use `save_compressed` for bitmask.")


class BitmaskHfQuantizer(HfQuantizer):
    """Loads bitmask checkpoints dense; the loaded model is a plain model (its `quantization_config` is removed)."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", "weight" + BITMASK_SUFFIX]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("hf_compress_bitmask only loads checkpoints written by `hf_compress.save_compressed`.")

    def get_load_operations(self) -> dict:
        return {"deserialize": BitmaskDecompress, "dequantize": BitmaskDecompress}

    def _process_model_before_weight_loading(self, model, **kwargs):
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        # Dense from here on: `save_pretrained` writes a plain checkpoint, and nothing claims it is quantized.
        self.remove_quantization_config(model)
        return model

    def is_serializable(self) -> bool:
        return False

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Register the bitmask method with transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(BitmaskConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(BitmaskHfQuantizer)


register()
