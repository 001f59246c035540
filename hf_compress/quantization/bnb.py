"""The bitsandbytes backend: imported only when a model is actually quantized (never by `import hf_compress`)."""

from __future__ import annotations

import bitsandbytes as bnb
import torch
from torch import nn
from transformers import BitsAndBytesConfig

from .config import QuantizationArguments

EMBEDDING_PREFIX = "hf_compress_embedding."


def bnb_config(args: QuantizationArguments, skip_modules: list[str]) -> BitsAndBytesConfig:
    """The transformers `BitsAndBytesConfig` written to `config.json` as `quantization_config`."""
    if args.bits == 8:
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=args.llm_int8_threshold, llm_int8_skip_modules=skip_modules
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=args.quant_type,
        bnb_4bit_use_double_quant=args.double_quant,
        # The inputs stay float32, so the dequantized weight is multiplied in float32 (what QAT replays).
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip_modules,
    )


def quantized_linear_names(model: nn.Module) -> tuple[list[str], list[str]]:
    """(names of bnb-quantized Linear layers, names of Linear layers left in full precision)."""
    quantized, kept = [], []
    for name, module in model.named_modules():
        if isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            quantized.append(name)
        elif isinstance(module, nn.Linear):
            kept.append(name)
    return quantized, kept


def quantize_embedding_tensors(weight: torch.Tensor, args: QuantizationArguments) -> dict[str, torch.Tensor]:
    """The tensors that store one embedding table in `args.bits` bits, computed by bitsandbytes itself."""
    w = weight.detach().to("cpu", torch.float32).contiguous()
    if args.bits == 8:
        param = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        return {"weight": param.data.clone(), "SCB": param.SCB.clone()}
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type=args.quant_type)
    return {"weight": q, "absmax": state.absmax}


def embedding_module(num: int, dim: int, tensors: dict[str, torch.Tensor], bits: int, quant_type: str, device,
                     dtype: torch.dtype = torch.float32):
    """A bitsandbytes `Embedding8bit` / `Embedding4bit` holding the stored tensors, whose output is cast to `dtype`
    (the model's: a float32 output would reach a bf16/fp16 `lm_head` and fail with a dtype mismatch)."""
    if bits == 8:
        module = bnb.nn.Embedding8bit(num, dim, dtype=dtype)
        module.weight = bnb.nn.Int8Params(
            tensors["weight"].to(device), requires_grad=False, has_fp16_weights=False, SCB=tensors["SCB"].to(device)
        )
        return module
    module = bnb.nn.Embedding4bit(num, dim, dtype=dtype, quant_type=quant_type)
    state = bnb.functional.QuantState(
        absmax=tensors["absmax"].to(device),
        shape=torch.Size((num, dim)),
        dtype=torch.float32,
        blocksize=64,
        code=bnb.functional.get_4bit_type(quant_type, device=device),
        quant_type=quant_type,
    )
    module.weight = bnb.nn.Params4bit(
        tensors["weight"].to(device), requires_grad=False, quant_state=state, blocksize=64,
        compress_statistics=False, quant_type=quant_type, bnb_quantized=True, module=module,
    )
    module.quant_state = state
    return module


def is_linear_4bit(module: nn.Module) -> bool:
    return isinstance(module, bnb.nn.Linear4bit)


def cpu_has_avx512bf16() -> bool:
    """Whether bitsandbytes would use its AVX512-BF16 CPU kernel on this machine."""
    return bool(bnb.functional.has_avx512bf16())


def is_bnb_embedding(module: nn.Module) -> bool:
    return isinstance(module, (bnb.nn.Embedding8bit, bnb.nn.Embedding4bit))
