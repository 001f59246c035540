"""The protocol every quantization backend implements, and what their exports share (the report file, byte counts).

A backend is one class with four fixed methods (transformers' `HfQuantizer` pattern): `require` (the library is
installed, or a one-line `ImportError` naming the fix), `quantize` (in memory), `save` (the folder, written beside its
place and swapped in whole) and `load` (what `from_pretrained` does not restore by itself). The table of backends is
`backends/__init__.py`; callers ask it by `QuantizationArguments.backend` instead of switching on names.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "quantization_report.json"


def folder_bytes(folder) -> dict[str, int]:
    """`bytes_on_disk` (every file of `folder`) and `weight_bytes_on_disk` (its safetensors files)."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    return {
        "bytes_on_disk": sum(p.stat().st_size for p in files),
        "weight_bytes_on_disk": sum(p.stat().st_size for p in files if p.suffix == ".safetensors"),
    }


def write_export_report(tmp: Path, info: dict, output_dir) -> None:
    """Complete `info` with the folder's byte counts and final path, and write it as `REPORT_FILE` into `tmp` (the
    folder being written, renamed to `output_dir` afterwards)."""
    info.update(folder_bytes(tmp))
    info["output_dir"] = str(output_dir)
    (tmp / REPORT_FILE).write_text(json.dumps(info, indent=2))


class QuantizationBackend:
    """
    One quantization backend. `name` is its `QuantizationArguments.backend` value and the `method` of its export info.

    `merge` in `quantize` / `save` is the PEFT merge the caller made first ([`hf_compress.peft_utils.merge_adapters`]),
    or `None`; the backend records its error in the info as `peft_merge`.
    """

    name: str = ""

    def require(self, bits: int = 8) -> None:
        """Raise a one-line `ImportError` naming the fix when the backend's library is not installed."""
        raise NotImplementedError

    def quantize(self, model, args, merge=None):
        """`(quantized_model, info)`: `model` quantized in memory exactly as [`save`] stores it (`model` unchanged)."""
        raise NotImplementedError

    def save(self, model, output_dir, args, tokenizer=None, merge=None) -> dict:
        """Quantize `model` and write `output_dir` (replaced whole); returns the export info."""
        raise NotImplementedError

    def load(self, path: Path, config: dict, model_class, device, **kwargs):
        """The model of the exported folder `path` (whose `config.json` is `config`), in eval mode."""
        raise NotImplementedError
