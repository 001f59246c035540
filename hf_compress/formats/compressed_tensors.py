"""`--format compressed-tensors`: `pack-quantized` int8 / int4 weights that plain `from_pretrained`, `pipeline()` and
vLLM load with only `compressed-tensors` installed. Written by the compressed-tensors quantization backend
([`~hf_compress.quantization.backends.compressed_tensors`]); this module says how it is recognised, loaded, served and
described."""

from __future__ import annotations

import json
import os

from .base import MARLIN_MIN_IN, MARLIN_MIN_OUT, VLLM_ARCHITECTURES_READ, QuantizedFormat

QUANT_METHOD = "compressed-tensors"
_EMBEDDING_NAMES = ("embed_tokens", "word_embeddings", "wte", "wpe", "position_embeddings", "token_type_embeddings",
                    "embed_positions")


def _export_info(folder: str) -> dict:
    from ..quantization.backends import REPORT_FILE

    try:
        with open(os.path.join(folder, REPORT_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def _weight_groups(qconfig: dict) -> list[dict]:
    return [g["weights"] for g in (qconfig.get("config_groups") or {}).values() if g.get("weights")]


class CompressedTensorsFormat(QuantizedFormat):
    """compressed-tensors `pack-quantized` symmetric int weights (per channel or per group)."""

    name = "compressed-tensors"
    backend = "compressed-tensors"
    # The loader dequantizes to exactly the weights `IntFakeQuantize` computes (bit for bit, tested), then runs the same
    # float forward: the dense tolerance.
    relative_logit_tolerance = 1e-5

    @classmethod
    def detect(cls, folder, config: dict) -> bool:
        return (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD

    def evaluation_load_kwargs(self) -> dict:
        # Decompressed on load: the same weights and logits as its compressed forward (the loaders check compares both
        # with the trained model), and the report then counts the model's weights and zeros, not packed int32 words,
        # scales and shapes.
        from transformers import CompressedTensorsConfig

        return {"quantization_config": CompressedTensorsConfig(dequantize=True)}

    def plain_loaders(self, low_bit_embeddings: bool = False) -> dict:
        return {"from_pretrained": True, "pipeline": True, "needs_hf_compress": False, "needs": ["compressed-tensors"]}

    def vllm_support(self, folder: str, config: dict) -> dict:
        from ..model_cards.files import describe_stored
        from ..quantization.config import VLLM_GROUP_SIZES

        out = super().vllm_support(folder, config)
        arch = (config.get("architectures") or [None])[0]
        qc = config.get("quantization_config") or {}
        stored = describe_stored(folder)
        packed = {n: m for n, m in stored["modules"].items() if "shape" in m}
        embeddings = set(_export_info(folder).get("quantized_embeddings") or ())
        embeddings |= {n for n in packed if n.rsplit(".", 1)[-1] in _EMBEDDING_NAMES}
        if embeddings & set(packed):
            name = sorted(embeddings & set(packed))[0]
            return {**out, "serves": False, "why": f"the input embedding is stored quantized (`{name}.weight_packed`): vLLM's "
                    "Llama builds its embedding without a quantization config, so those weights have nowhere to load, and a "
                    "tied `lm_head` reads the embedding's `weight`. Export without `--quantize_embeddings` for vLLM."}
        for group in (qc.get("config_groups") or {}).values():
            w = group.get("weights") or {}
            if w.get("num_bits") not in (4, 8) or not w.get("symmetric", False):
                return {**out, "serves": False, "why": f"{w.get('num_bits')}-bit {'symmetric' if w.get('symmetric') else 'asymmetric'} "
                        "weights: vLLM's WNA16 scheme runs symmetric 4 and 8 bits."}
            if w.get("group_size") not in VLLM_GROUP_SIZES:
                return {**out, "serves": False, "why": f"group_size {w.get('group_size')}: vLLM's Marlin kernels run "
                        + ", ".join("per-channel" if g is None else str(g) for g in VLLM_GROUP_SIZES) + "."}
        bad = sorted(n for n, m in packed.items() if m["shape"][0] % MARLIN_MIN_OUT or m["shape"][1] % MARLIN_MIN_IN)
        if bad:
            return {**out, "serves": None, "why": f"not established: {len(bad)} quantized layers (e.g. `{bad[0]}`) miss Marlin's "
                    f"shape rule (out % {MARLIN_MIN_OUT}, in % {MARLIN_MIN_IN}); vLLM may choose another kernel, not read here."}
        if arch not in VLLM_ARCHITECTURES_READ:
            return {**out, "serves": None, "why": f"the format is one vLLM's WNA16 scheme runs; its `{arch}` model code was not read here."}
        return {**out, "serves": True, "why": "Linear-only pack-quantized int weights with a group size and layer shapes vLLM's "
                "WNA16 / Marlin path runs, embedding and `lm_head` in 16-bit (read in vLLM's code, not run here)."}

    def card_note(self, report: dict, folder, low_bit_embeddings: bool) -> str:
        return ("compressed-tensors `pack-quantized` int weights: plain `from_pretrained`, `pipeline()` and "
                "vLLM load it with `compressed-tensors` installed; hf_compress is not needed.")

    def _snippet_head(self) -> str:
        return "# needs `pip install compressed-tensors` (not hf_compress)\n"

    def tags(self, summary: dict | None) -> list[str]:
        return ["compressed-tensors"]

    def config_bits(self, qconfig: dict) -> list[int]:
        return sorted({w["num_bits"] for w in _weight_groups(qconfig)})

    def summary_fields(self, qconfig: dict, bits, stored_kinds, layer_types) -> dict:
        groups = _weight_groups(qconfig)
        if stored_kinds is not None:  # the stored scheme: transformers rebuilds plain `nn.Linear` / `nn.Embedding` layers
            types = [f"{k} {qconfig.get('format', 'pack-quantized')}" for k in stored_kinds]
        else:
            types = sorted(set(layer_types.values()))
        return {"method": qconfig.get("quant_method", self.name),
                "quant_type": "int (symmetric)" if all(g.get("symmetric") for g in groups) else "int",
                "double_quant": None, "quantized_module_types": types, "skip_modules": list(qconfig.get("ignore") or []),
                "group_size": sorted({g.get("group_size") for g in groups}, key=lambda g: -1 if g is None else g)}
