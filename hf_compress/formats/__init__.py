"""Checkpoint formats, one class each behind one table: `--format` name -> [`CheckpointFormat`].

Each format answers how it is recognised (`detect`), written (`save`, `export`) and read (`load`), which loaders and
engines take it (`plain_loaders`, `own_loader`, `vllm_support`), and what the card and report say (`card_note`,
`usage_snippet`, `tags`, `summary_fields`). The pipeline's export stage, the Hub's reload, the loaders check, the card
and the report's quantization summary ask this table instead of switching on format names (transformers'
`quantizers/auto.py` pattern).

Formats that quantize wrap a quantization backend ([`hf_compress.quantization.backends`]); the bitmask format lives
here ([`save_compressed`] / [`load_compressed`]).
"""

from __future__ import annotations

from .base import CheckpointFormat, QuantizedFormat, auto_class_name, read_config
from .bitmask import BitmaskFormat
from .bitsandbytes import BitsAndBytesFormat
from .compressed_tensors import CompressedTensorsFormat
from .dense import DenseFormat
from .onnx import OnnxFormat

FORMATS: dict[str, type[CheckpointFormat]] = {
    cls.name: cls for cls in (CompressedTensorsFormat, BitsAndBytesFormat, BitmaskFormat, DenseFormat, OnnxFormat)
}
# The order folders are recognised in: a graph first (no torch weights), then the formats named by `config.json`
# (bitmask before the quantized ones: its `quantization_config` loads dense), dense last (claims everything).
DETECTION_ORDER: tuple[type[CheckpointFormat], ...] = (OnnxFormat, BitmaskFormat, CompressedTensorsFormat,
                                                       BitsAndBytesFormat, DenseFormat)


def get_format(name: str) -> CheckpointFormat:
    """The format called `name` (a `--format` value)."""
    if name not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {name!r}.")
    return FORMATS[name]()


def detect_format(folder: str | None = None, config: dict | None = None) -> CheckpointFormat:
    """The format of the checkpoint in `folder` (its `config.json` unless `config` is given), or of a config alone."""
    if config is None:
        config = read_config(folder) if folder else {}
    return next(cls() for cls in DETECTION_ORDER if cls.detect(folder, config))


def quantization_format(qconfig: dict | None) -> CheckpointFormat:
    """The format a `quantization_config` belongs to: by its `quant_method`, bitsandbytes for any other (transformers'
    bitsandbytes configs name no method in older saves)."""
    config = {"quantization_config": qconfig or {}}
    for cls in (BitmaskFormat, CompressedTensorsFormat):
        if cls.detect(None, config):
            return cls()
    return BitsAndBytesFormat()


__all__ = ["DETECTION_ORDER", "FORMATS", "BitmaskFormat", "BitsAndBytesFormat", "CheckpointFormat",
           "CompressedTensorsFormat", "DenseFormat", "OnnxFormat", "QuantizedFormat", "auto_class_name", "detect_format",
           "get_format", "quantization_format", "read_config"]
