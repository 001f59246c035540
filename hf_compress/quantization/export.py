"""Quantize a trained model and save it so that `from_pretrained` reloads it: the public entry points, which ask the
backend table ([`~hf_compress.quantization.backends.get_backend`]) by `QuantizationArguments.backend`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .backends import backend_for_config, get_backend
from .config import QuantizationArguments
from .prepare import merge_adapters, plain_copy
from .qat import attach_fake_quant
from .targets import quantization_targets


def fake_quantized_copy(model, args: QuantizationArguments):
    """
    A copy of `model` (the caller's is not changed) whose forward pass is what the export of `model` with `args` must
    compute: the export's fake quantizers ([`attach_fake_quant`] on [`quantization_targets`], QAT's exact numerics)
    on its full-precision weights, in eval mode. The reference the loaders check compares a written checkpoint with.
    """
    plain, _ = merge_adapters(model)
    plain = plain_copy(plain).eval()
    attach_fake_quant(plain, args, *quantization_targets(plain, args))
    return plain


def quantize_model(model, args: QuantizationArguments):
    """
    Quantize `model` in memory exactly as [`quantize_and_save`] stores it (the model itself is not changed).

    Returns:
        `(quantized_model, info)`: the quantized model in eval mode and a dict saying what was quantized.
    """
    model, merge = merge_adapters(model)
    return get_backend(getattr(args, "backend", "bitsandbytes")).quantize(model, args, merge=merge)


def quantize_and_save(model, output_dir, args: QuantizationArguments, tokenizer=None, precomputed: dict | None = None) -> dict:
    """
    Quantize `model` with `args.backend` (bitsandbytes, or compressed-tensors' `pack-quantized` int8/int4) and save it
    so that `AutoModelFor*.from_pretrained(output_dir)` reloads the quantized model with no extra argument
    (`config.json` carries `quantization_config`).

    The task head (`classifier`, `qa_outputs`, `lm_head`, `score`) and the output embeddings stay unquantized, in
    the model's own dtype (a bf16 model's stay bf16), unless `args.skip_modules` says otherwise; the report's
    `precision` says what is stored in which precision. A PEFT model (LoRA, or QLoRA over a bitsandbytes base) is
    merged first ([`hf_compress.peft_utils.merge_adapters`]) and the report's `peft_merge` gives the merge's error. A
    model under [`QATCallback`] fake quantization is exported from its full-precision weights, which gives exactly
    the fake-quantized forward pass. With bitsandbytes and `args.quantize_embeddings` the embedding tables go to
    `quantized_embeddings.safetensors`, which transformers does not read: reload those with [`load_quantized`].

    The folder is written next to `output_dir` under a temporary name and renamed into place at the end, so
    an interrupted export never leaves a half-written checkpoint.

    Args:
        model ([`PreTrainedModel`]): The full-precision model (pruned, distilled, fake-quantized: any).
        output_dir (`str` or `os.PathLike`): Where to save; replaced if it exists.
        args ([`QuantizationArguments`]): Backend, bits, data type, embeddings, modules to skip.
        tokenizer (*optional*): Saved alongside when given.
        precomputed (`dict`, *optional*): compressed-tensors only: `{module name: result with .q and .scales}`
            (e.g. [`~hf_compress.quantization.gptq.gptq_quantize`]'s), stored as they are instead of round-to-nearest.

    Returns:
        `dict`: bits and data type, the quantized and full-precision module names, the quantized embeddings,
        `bytes_on_disk` (whole folder), `weight_bytes_on_disk` (safetensors files), `source_weight_bytes`
        (the full-precision state dict), `output_dir` and `reload` (how to load it back).
    """
    backend = getattr(args, "backend", "bitsandbytes")
    if precomputed is not None and backend != "compressed-tensors":
        raise ValueError(f"precomputed integers (GPTQ) are stored by the compressed-tensors backend, not {backend!r}; pass "
                         "`QuantizationArguments(backend=\"compressed-tensors\", ...)`.")
    model, merge = merge_adapters(model)
    extra = {} if precomputed is None else {"precomputed": precomputed}
    return get_backend(backend).save(model, output_dir, args, tokenizer=tokenizer, merge=merge, **extra)


def load_quantized(path, model_class=None, device=None, cpu_bf16_kernel: bool = False, **kwargs):
    """
    Load a folder written by [`quantize_and_save`]: `from_pretrained`, then what transformers does not restore by
    itself (bitsandbytes' low-bit embedding tables, `Embedding8bit` / `Embedding4bit`).

    Args:
        path (`str` or `os.PathLike`): The exported folder, or a Hub repo id (downloaded with `snapshot_download`,
            as `from_pretrained` would; `HF_ENDPOINT` and the saved token apply).
        model_class (*optional*): The model class; defaults to `config.architectures[0]` from transformers.
        device (*optional*): Device to load on (default: CPU).
        cpu_bf16_kernel (`bool`, *optional*, defaults to `False`):
            Let bitsandbytes run 4-bit layers through its AVX512-BF16 CPU kernel where the CPU has one (faster,
            logits within bf16 rounding). The default keeps its float32 reference path, whose logits are the ones
            quantization-aware training produced (see [`use_reference_cpu_kernel`]).
        kwargs: Passed to `from_pretrained`.
    """
    import transformers

    if not Path(path).is_dir():  # a Hub id, as the model card's snippet passes it
        from huggingface_hub import snapshot_download

        path = snapshot_download(str(path), revision=kwargs.pop("revision", None))
    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if model_class is None:
        model_class = getattr(transformers, config["architectures"][0])
    device = torch.device(device or "cpu")
    return backend_for_config(config).load(path, config, model_class, device, cpu_bf16_kernel=cpu_bf16_kernel, **kwargs)
