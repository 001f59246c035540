"""PEFT glue: merge a LoRA / QLoRA model into a plain one before export, and say how far the merge moved its logits.

Imported only when a model is a `peft.PeftModel` (peft is an optional dependency). Pruning needs nothing from here:
`hf_compress.pruning.default_targets` already picks the base layers (`...q_proj.base_layer`) and never `lora_A` /
`lora_B`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

PROBE_SHAPE = (2, 16)  # default probe: 2 rows of 16 seeded random token ids


def is_peft_model(model) -> bool:
    """Whether `model` is a `peft.PeftModel` (checked by its interface, so peft is not imported for plain models)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _require_peft():
    try:
        import peft  # noqa: F401
    except ImportError as err:
        raise ImportError("Merging a PEFT model needs peft: `pip install peft`.") from err


def probe_inputs(model, shape: tuple[int, int] = PROBE_SHAPE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random `input_ids` inside the model's vocabulary, on its device: a fixed input to compare logits on."""
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    return {"input_ids": torch.randint(0, vocab, shape, generator=g).to(device)}


@torch.no_grad()
def _logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).float().cpu()


def _bnb_kind(weight) -> str | None:
    # By class name: bitsandbytes stays unimported for a full-precision base.
    return {"Params4bit": "4bit", "Int8Params": "8bit"}.get(type(weight).__name__)


def _unpack_cpu_4bit(model: nn.Module) -> None:
    """Undo bitsandbytes' CPU repacking of 4-bit weights and keep its float32 reference path.

    On CPUs with AVX512-BF16, the first eval forward of a `Linear4bit` repacks its weight in place for a bf16 kernel
    (`quant_state.packing_format_for_cpu`); `dequantize_4bit` on that layout returns wrong values (peft's own merge
    included), and the kernel rounds activations to bf16. Merging needs the stored codes and exact logits.
    """
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None and getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _dequantized(linear: nn.Module) -> torch.Tensor:
    """The weight of a Linear as float32, dequantized first when bitsandbytes holds it in 8 or 4 bits."""
    if _bnb_kind(linear.weight) is None:
        return linear.weight.detach().float()
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(linear.weight, state=getattr(linear, "state", None)).float()


def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight.to(dtype))
        if bias is not None:
            layer.bias.copy_(bias.detach().to(dtype))
    return layer


@dataclass
class MergedAdapters:
    """The result of [`merge_adapters`]: the plain `model` and `info` (what was merged and the merge's error).

    `finish(exported)` adds the error of a model made from the merged one (e.g. the re-quantized export) against the
    same adapter-model logits, and returns `info`.
    """

    model: nn.Module
    info: dict
    reference: torch.Tensor = field(repr=False)
    inputs: dict = field(repr=False)

    def finish(self, exported: nn.Module) -> dict:
        device = next(exported.parameters()).device
        logits = _logits(exported, {k: v.to(device) for k, v in self.inputs.items()})
        self.info["export_max_abs_logit_diff"] = float((logits - self.reference).abs().max())
        return self.info


@torch.no_grad()
def merge_adapters(model, example_inputs: dict | None = None, keep_sparsity: bool = False) -> MergedAdapters:
    """
    Merge a PEFT model's adapters into its base weights and return a plain `transformers` model, leaving `model`
    unchanged (a copy is merged).

    A full-precision base is merged by peft's own `merge_and_unload` (any tuner type). A bitsandbytes 8/4-bit base
    (QLoRA) is dequantized to float32, each LoRA delta `B @ A * scaling` is added in float32, and the layer becomes a
    plain `nn.Linear` in the model's dtype (that of its embeddings); the Linear layers without adapters are
    dequantized too and the `quantization_config` removed, so the result can be quantized again (the export does).

    Args:
        model (`peft.PeftModel`): the adapter model.
        example_inputs (`dict`, *optional*): model inputs on which the logits before and after the merge are
            compared; defaults to [`probe_inputs`] (2 x 16 seeded random token ids).
        keep_sparsity (`bool`, *optional*, defaults to `False`): keep every exact zero of a base weight zero after
            the merge. A pruned base (see `GradualPruningCallback`) stays sparse, at the cost of dropping the adapter's
            delta on those entries: that cost shows in the reported logit difference.

    Returns:
        [`MergedAdapters`]: `.model` (plain, eval mode) and `.info` with `adapter_type`, `adapters`,
        `base_quantization` (`None`, `"bitsandbytes 8-bit"` or `"bitsandbytes 4-bit <quant_type>"`), `merged_modules`,
        `dequantized_modules`, `dtype`, `keep_sparsity`, `zeros_kept` and `max_abs_logit_diff` (merged model against
        the adapter model on the probe, float32 logits; a 4-bit base runs bitsandbytes' float32 reference path).
    """
    _require_peft()
    from peft.tuners.tuners_utils import BaseTunerLayer

    if not is_peft_model(model):
        raise TypeError(f"merge_adapters needs a `peft.PeftModel`, got {type(model).__name__}.")
    inputs = example_inputs if example_inputs is not None else probe_inputs(model)
    # Everything happens on a copy: the caller's model keeps its mode, weights and kernels.
    work = copy.deepcopy(model)
    _unpack_cpu_4bit(work)
    work.eval()
    reference = _logits(work, inputs)
    base = work.get_base_model()
    tuners = [(n, m) for n, m in base.named_modules() if isinstance(m, BaseTunerLayer)]
    kinds = {_bnb_kind(m.weight) for m in base.modules() if isinstance(getattr(m, "weight", None), nn.Parameter)}
    kinds.discard(None)
    config = work.peft_config[work.active_adapter]
    info = {
        "adapter_type": str(getattr(config.peft_type, "value", config.peft_type)),
        "adapters": list(work.peft_config),
        "base_quantization": None,
        "merged_modules": len(tuners),
        "dequantized_modules": 0,
        "keep_sparsity": keep_sparsity,
        "zeros_kept": 0,
    }
    if not kinds:
        merged = _merge_full_precision(work, tuners, keep_sparsity, info)
    else:
        merged = _merge_into_quantized_base(base, tuners, keep_sparsity, info)
    merged.eval()
    device = next(merged.parameters()).device
    logits = _logits(merged, {k: v.to(device) for k, v in inputs.items()})
    info["max_abs_logit_diff"] = float((logits - reference).abs().max())
    return MergedAdapters(model=merged, info=info, reference=reference, inputs=inputs)


def _merge_full_precision(work, tuners: list, keep_sparsity: bool, info: dict) -> nn.Module:
    """peft merges a full-precision base exactly (and knows every tuner type); the base's zeros are recorded first
    and restored after when `keep_sparsity`. Updates `info` (`zeros_kept`, `dtype`)."""
    zeros = {n: m.get_base_layer().weight == 0 for n, m in tuners} if keep_sparsity else {}
    merged = work.merge_and_unload()
    for name, mask in zeros.items():
        merged.get_submodule(name).weight.masked_fill_(mask, 0.0)
        info["zeros_kept"] += int(mask.sum())
    info["dtype"] = str(merged.dtype).removeprefix("torch.")
    return merged


def _merge_into_quantized_base(base, tuners: list, keep_sparsity: bool, info: dict) -> nn.Module:
    """QLoRA: each LoRA layer's base weight is dequantized to float32, its delta added, and the layer replaced by a
    plain `nn.Linear` in the model's dtype; the other bitsandbytes Linears are dequantized too and the
    `quantization_config` removed. Updates `info` (`base_quantization`, `zeros_kept`, `dequantized_modules`,
    `dtype`)."""
    dtype = base.get_input_embeddings().weight.dtype
    first4 = next((m.weight for m in base.modules() if _bnb_kind(getattr(m, "weight", None)) == "4bit"), None)
    info["base_quantization"] = (
        f"bitsandbytes 4-bit {first4.quant_state.quant_type}" if first4 is not None else "bitsandbytes 8-bit"
    )
    for name, module in tuners:
        weight, zeros_kept = _merged_lora_weight(name, module, keep_sparsity)
        info["zeros_kept"] += zeros_kept
        base.set_submodule(name, _plain_linear(weight, module.get_base_layer().bias, dtype))
    for name, module in list(base.named_modules()):
        if isinstance(module, nn.Linear) and _bnb_kind(module.weight) is not None:
            base.set_submodule(name, _plain_linear(_dequantized(module), module.bias, dtype))
            info["dequantized_modules"] += 1
    quantizer = getattr(base, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(base)
    else:
        base.config.quantization_config = None
        base.is_quantized = False
    info["dtype"] = str(dtype).removeprefix("torch.")
    return base


def _merged_lora_weight(name: str, module, keep_sparsity: bool) -> tuple[torch.Tensor, int]:
    """`(float32 weight of the base layer plus every active LoRA delta, zeros kept)` of one LoRA layer over a
    bitsandbytes Linear; refuses other tuners and DoRA, which only peft merges (on a dequantized base)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(module, LoraLayer) or not isinstance(module.get_base_layer(), nn.Linear):
        raise ValueError(
            f"{name} is a {type(module).__name__}: merging into a quantized base is done for LoRA on Linear "
            "layers only; dequantize the base (`model.get_base_model().dequantize()`) and merge with peft."
        )
    if any(module.use_dora.get(a, False) for a in module.active_adapters):
        raise ValueError(f"{name} uses DoRA; merge it with peft's `merge_and_unload()` on a dequantized base.")
    weight = _dequantized(module.get_base_layer())
    zeros = weight == 0 if keep_sparsity else None
    for adapter in module.active_adapters:
        if adapter in module.lora_A:
            weight += module.get_delta_weight(adapter).float()
    if zeros is None:
        return weight, 0
    weight.masked_fill_(zeros, 0.0)
    return weight, int(zeros.sum())
