"""`--format bitsandbytes`: LLM.int8 / NF4 / FP4 weights that `from_pretrained` loads with bitsandbytes installed;
low-bit embedding tables need [`~hf_compress.quantization.load_quantized`]. Written by the bitsandbytes quantization
backend ([`~hf_compress.quantization.backends.bitsandbytes`]); this module says how it is recognised, loaded, served and
described."""

from __future__ import annotations

from .base import QuantizedFormat, pipeline_snippet

QUANT_METHOD = "bitsandbytes"
# bitsandbytes 4-bit through plain `from_pretrained` / `pipeline()`: those may take bitsandbytes' AVX512-BF16 CPU kernel,
# which rounds activations and block scales to bfloat16 (8-bit mantissa, 2^-8 ~ 4e-3 per product, accumulated over a
# layer stack), relative to the logit scale (the loaders check, [`BitsAndBytesFormat.logit_tolerance`]).
BNB_4BIT_BF16_KERNEL_TOLERANCE = 2e-2


class BitsAndBytesFormat(QuantizedFormat):
    """transformers' bitsandbytes checkpoints (`BitsAndBytesConfig` in `config.json`)."""

    name = "bitsandbytes"
    backend = "bitsandbytes"
    own_loader = "load_quantized"
    # Through `load_quantized`: the float32 reference path that `BnbFakeQuantize` replays op for op; LLM.int8 rounds
    # activations to int8 per row at run time, so a one-ulp float difference upstream can move an activation one int8
    # step. 8-bit through the plain loaders runs the same LLM.int8 kernels.
    relative_logit_tolerance = 1e-4

    @classmethod
    def detect(cls, folder, config: dict) -> bool:
        qc = config.get("quantization_config") or {}
        return bool(qc.get("load_in_8bit") or qc.get("load_in_4bit") or qc.get("quant_method") == QUANT_METHOD)

    def bits(self, folder: str, config: dict) -> int | None:
        return (self.config_bits(config.get("quantization_config") or {}) or [None])[0]

    def logit_tolerance(self, plain_loader: bool, bits: int | None = None, dtype=None) -> float:
        import torch

        relative = BNB_4BIT_BF16_KERNEL_TOLERANCE if bits == 4 and plain_loader else self.relative_logit_tolerance
        if dtype in (torch.bfloat16, torch.float16):
            # In a bf16 / fp16 model the replay and bitsandbytes' kernels round the 16-bit activations at different
            # points (LLM.int8 casts them to float16 first), so they differ by a few units in the last place of the
            # model's dtype: at least 2 x its machine epsilon (bf16: 1.6e-2, fp16: 2e-3; 3.9e-3 measured on a tiny
            # bf16 Llama).
            relative = max(relative, 2 * torch.finfo(dtype).eps)
        return relative

    def low_bit_embeddings(self, config: dict, report: dict | None = None) -> bool:
        from ..quantization.backends.bitsandbytes import EMBEDDINGS_CONFIG_KEY, EMBEDDINGS_FILE

        weight_files = ((report or {}).get("size") or {}).get("compressed_weight_files") or []
        return bool(config.get(EMBEDDINGS_CONFIG_KEY)) or any(f.endswith(EMBEDDINGS_FILE) for f in weight_files)

    def plain_loaders(self, low_bit_embeddings: bool = False) -> dict:
        # Plain loaders stop on the embedding sentinel (loudly) when the tables are stored in low bits.
        return {"from_pretrained": not low_bit_embeddings, "pipeline": not low_bit_embeddings,
                "needs_hf_compress": low_bit_embeddings, "needs": ["bitsandbytes"]}

    def vllm_support(self, folder: str, config: dict) -> dict:
        out = super().vllm_support(folder, config)
        if self.low_bit_embeddings(config):
            return {**out, "serves": False, "why": "the low-bit embedding tables sit in `quantized_embeddings.safetensors`, "
                                                  "hf_compress' own file, behind empty sentinels in `model.safetensors`."}
        return out

    def card_note(self, report: dict, folder, low_bit_embeddings: bool) -> str:
        return ("bitsandbytes weights: `from_pretrained` loads them with bitsandbytes installed"
                + ("; the low-bit embedding tables need `hf_compress.quantization.load_quantized` (plain "
                   "`from_pretrained` stops with a size-mismatch error)." if low_bit_embeddings else "."))

    def usage_snippet(self, ref: str, report: dict, low_bit_embeddings: bool) -> str:
        if not low_bit_embeddings:
            return super().usage_snippet(ref, report, low_bit_embeddings)
        tail = pipeline_snippet(report.get("architecture"))
        # Plain from_pretrained stops on the embedding sentinel (loudly); load_quantized restores the 8/4-bit tables.
        return (f"from hf_compress.quantization import load_quantized\nfrom transformers import AutoTokenizer, pipeline\n\n"
                f"model = load_quantized({ref!r})  # restores the 8/4-bit embeddings\n"
                f"tokenizer = AutoTokenizer.from_pretrained({ref!r}){tail}")

    def tags(self, summary: dict | None) -> list[str]:
        return ["bitsandbytes"] + [f"{b}-bit" for b in (summary or {}).get("bits") or []]

    def config_bits(self, qconfig: dict) -> list[int]:
        return [4] if qconfig.get("load_in_4bit") else [8] if qconfig.get("load_in_8bit") else []

    def summary_fields(self, qconfig: dict, bits, stored_kinds, layer_types) -> dict:
        # The bitsandbytes layer classes a user gets back; from the files' storage kinds without a loaded model.
        types = sorted(set(layer_types.values())) if layer_types or stored_kinds is None else list(stored_kinds)
        return {"method": qconfig.get("quant_method", self.name),
                "quant_type": qconfig.get("bnb_4bit_quant_type") if 4 in bits else "int8" if 8 in bits else None,
                "double_quant": qconfig.get("bnb_4bit_use_double_quant") if 4 in bits else None,
                "quantized_module_types": types, "skip_modules": list(qconfig.get("llm_int8_skip_modules") or [])}
