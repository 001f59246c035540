"""`QuantizationArguments`: the bitsandbytes export and quantization-aware fine-tuning options."""

from __future__ import annotations

from dataclasses import dataclass, field

BITS = (4, 8)
QUANT_TYPES = ("nf4", "fp4")
# `compressed-tensors` (pack-quantized int8/int4, loads with plain `from_pretrained` and vLLM) or `bitsandbytes`.
BACKENDS = ("bitsandbytes", "compressed-tensors")
# Task heads kept in full precision by default: a bnb-quantized head that was newly initialised breaks the
# forward pass on CPU, and the head is a tiny share of the parameters anyway.
DEFAULT_HEAD_MODULES = ("classifier", "qa_outputs", "lm_head", "score")
# compressed-tensors group sizes that vLLM's WNA16 path runs: its Marlin kernels take `MARLIN_SUPPORTED_GROUP_SIZES =
# [-1, 32, 64, 128]` (-1 is one scale per row, `None` here), vllm/model_executor/layers/quantization/utils/
# marlin_utils.py at commit 007d50058a06dec0f82472d63c819244d460c40d. Others are refused: no engine we checked runs them.
VLLM_GROUP_SIZES = (None, 32, 64, 128)


@dataclass
class QuantizationArguments:
    r"""
    Options of [`quantize_and_save`], [`QuantizationCallback`] and [`QATCallback`]. Field names do not clash with
    [`TrainingArguments`], so both parse with one `HfArgumentParser`.

    Parameters:
        backend (`str`, *optional*, defaults to `"bitsandbytes"`):
            `bitsandbytes` (LLM.int8 / NF4 / FP4, the format QLoRA fine-tunes on) or `compressed-tensors`
            (symmetric int8 / int4 in the `pack-quantized` format: plain `from_pretrained`, `pipeline()` and vLLM load
            it with only `compressed-tensors` installed).
        bits (`int`, *optional*, defaults to `8`):
            `8` for LLM.int8 (row-wise absmax int8 weights) or `4` for block-wise NF4 / FP4 (QLoRA).
        quant_type (`str`, *optional*, defaults to `"nf4"`):
            4-bit data type, `nf4` or `fp4`. Ignored with `bits=8`.
        group_size (`int`, *optional*):
            `compressed-tensors` only: one scale per `group_size` consecutive input weights of a row; `None` is one
            scale per output channel (row). 32, 64, 128 or `None`: the group sizes vLLM's int kernels run
            ([`VLLM_GROUP_SIZES`]); others are refused. Layers whose input width is not a multiple stay in full
            precision.
        double_quant (`bool`, *optional*, defaults to `False`):
            4-bit only: also quantize the per-block absmax values (8-bit, blocks of 256).
        quantize_embeddings (`bool`, *optional*, defaults to `False`):
            Also store the input embeddings in `bits` bits (bitsandbytes `Embedding8bit` / `Embedding4bit`,
            no double quantization: reload with [`load_quantized`]; compressed-tensors: the tables, a tied one
            included, which vLLM does not load). Off by default, so a compressed-tensors export keeps the embeddings
            and `lm_head` in the model's dtype.
        skip_modules (`list[str]`, *optional*):
            Module names (or suffixes) to keep in full precision. Defaults to the task heads (`classifier`,
            `qa_outputs`, `lm_head`, `score`) plus the output embeddings.
        llm_int8_threshold (`float`, *optional*, defaults to `6.0`):
            8-bit only: activations at least this large are multiplied in full precision (LLM.int8 outliers).
        qat_fraction (`float`, *optional*, defaults to `0.25`):
            [`QATCallback`]: fake-quantize during the last `qat_fraction` of the optimizer steps (in (0, 1]).
    """

    backend: str = field(
        default="bitsandbytes",
        metadata={"help": "Quantized format: bitsandbytes (LLM.int8/NF4/FP4) or compressed-tensors (int8/int4 pack-quantized)."},
    )
    bits: int = field(default=8, metadata={"help": "Bits per weight: 8 (LLM.int8 / int8) or 4 (NF4/FP4 / int4)."})
    group_size: int | None = field(
        default=None, metadata={"help": "compressed-tensors: weights per scale along a row (default: one scale per row)."}
    )
    quant_type: str = field(default="nf4", metadata={"help": "4-bit data type: nf4 or fp4."})
    double_quant: bool = field(
        default=False, metadata={"help": "4-bit only: also quantize the per-block absmax values."}
    )
    quantize_embeddings: bool = field(
        default=False, metadata={"help": "Also store the input embeddings in `bits` bits."}
    )
    skip_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules kept in full precision (default: the task heads and output embeddings)."},
    )
    llm_int8_threshold: float = field(
        default=6.0, metadata={"help": "8-bit only: outlier threshold of LLM.int8 (0 disables outliers)."}
    )
    qat_fraction: float = field(
        default=0.25, metadata={"help": "Quantization-aware fine-tuning over the last fraction of steps, in (0, 1]."}
    )
    quant_method: str = field(
        default="rtn",
        metadata={"help": "How the export rounds the weights: `rtn` (to nearest, what QAT replays) or `gptq` (one-shot "
                          "GPTQ with act-order and MSE scales on calibration batches; compressed-tensors, causal LMs, "
                          "no QAT)."},
    )
    gptq_calibration_batches: int = field(
        default=16, metadata={"help": "`--quant_method gptq`: training batches GPTQ measures the layer inputs on."}
    )

    def __post_init__(self):
        # Types first, so that a string from a YAML recipe gets this message rather than Python's own.
        for name in ("llm_int8_threshold", "qat_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__}).")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}.")
        if self.group_size is not None:
            if self.backend != "compressed-tensors":
                raise ValueError(f"group_size applies to backend='compressed-tensors', got backend={self.backend!r}; drop it or set `backend='compressed-tensors'`.")
            if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive integer (e.g. 32, 64, 128) or None for per-channel, got {self.group_size!r}.")
            if self.group_size not in VLLM_GROUP_SIZES:
                raise ValueError(f"group_size {self.group_size} is not one vLLM's int kernels run; use 32, 64, 128 or None (per-channel).")
        if self.backend == "compressed-tensors" and self.double_quant:
            raise ValueError("double_quant is a bitsandbytes option, got backend='compressed-tensors'; drop it.")
        if isinstance(self.bits, bool) or self.bits not in BITS:
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}; use 8 for LLM.int8 or 4 for NF4/FP4.")
        if self.quant_type not in QUANT_TYPES:
            raise ValueError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {self.quant_type!r}.")
        if self.double_quant and self.bits != 4:
            raise ValueError(f"double_quant only applies to 4-bit, got bits={self.bits}; set `bits=4` or drop it.")
        if self.llm_int8_threshold < 0:
            raise ValueError(f"llm_int8_threshold must be >= 0, got {self.llm_int8_threshold}.")
        if not 0.0 < self.qat_fraction <= 1.0:
            raise ValueError(f"qat_fraction must be in (0, 1], got {self.qat_fraction}.")
        if self.quant_method not in ("rtn", "gptq"):
            raise ValueError(f"quant_method must be 'rtn' or 'gptq', got {self.quant_method!r}.")
        if isinstance(self.gptq_calibration_batches, bool) or not isinstance(self.gptq_calibration_batches, int) \
                or self.gptq_calibration_batches < 1:
            raise ValueError(f"gptq_calibration_batches must be a positive integer, got {self.gptq_calibration_batches!r}.")
        if self.skip_modules is not None and isinstance(self.skip_modules, str):
            self.skip_modules = [self.skip_modules]
