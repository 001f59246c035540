"""Quantization-aware fine-tuning: the export's exact numerics (bitsandbytes or compressed-tensors) as
`torch.nn.utils.parametrize` fake quantizers.

Depends on the numerics only (`numerics.py`): which weights to fake-quantize comes from `targets.py`, chosen by the
caller ([`QATCallback`]), and no backend is imported."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..architectures import is_conv1d
from ..fsdp import check_not_sharded
from .config import QuantizationArguments
from .numerics import fake_quantize_int, fake_quantize_weight, int8_linear, int8_rowwise_quantize, straight_through

_HOOK_ATTR = "_hf_compress_int8_hook"
_STATE_HOOKS_ATTR = "_hf_compress_state_dict_hooks"
_ORIGINAL = "parametrizations.weight.original"


def _only_fake_quant(module: nn.Module) -> bool:
    return all(isinstance(p, FakeQuantize) for p in module.parametrizations.weight)


def _save_plain_names(module, state_dict, prefix, local_metadata):
    # Checkpoints saved during QAT hold the fp32 master weight under its usual name (`...weight`), so that
    # `from_pretrained` and a resumed run (which re-attaches the fake quantizers) read them.
    if prefix + _ORIGINAL in state_dict and _only_fake_quant(module):
        state_dict[prefix + "weight"] = state_dict.pop(prefix + _ORIGINAL)


def _load_plain_names(module, state_dict, prefix, *args):
    if prefix + "weight" in state_dict and prefix + _ORIGINAL not in state_dict and _only_fake_quant(module):
        state_dict[prefix + _ORIGINAL] = state_dict.pop(prefix + "weight")


class FakeQuantize(nn.Module):
    """Base class of the fake quantizers: what [`remove_fake_quant`] and the export recognise."""


class BnbFakeQuantize(FakeQuantize):
    r"""
    Parametrization of a `weight`: in the forward pass the value bitsandbytes would multiply by after export,
    in the backward pass the gradient of the full-precision weight (straight-through estimator). The optimizer
    keeps updating the full-precision `parametrizations.weight.original`.

    Args:
        bits (`int`): 8 or 4.
        quant_type (`str`, *optional*, defaults to `"nf4"`): 4-bit data type.
        double_quant (`bool`, *optional*, defaults to `False`): 4-bit absmax quantized too.
        embedding (`bool`, *optional*, defaults to `False`): The weight of an embedding table.
        transposed (`bool`, *optional*, defaults to `False`): The weight of a `Conv1D` ([in, out]), which bitsandbytes
            quantizes transposed.
    """

    def __init__(
        self, bits: int, quant_type: str = "nf4", double_quant: bool = False, embedding: bool = False,
        transposed: bool = False,
    ):
        super().__init__()
        self.bits, self.quant_type, self.double_quant, self.embedding = bits, quant_type, double_quant, embedding
        self.transposed = transposed

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        # A Conv1D weight [in, out] is quantized as bitsandbytes stores it: transposed to [out, in].
        w = weight.t() if self.transposed else weight
        quantized = fake_quantize_weight(w, self.bits, self.quant_type, self.double_quant, embedding=self.embedding)
        return straight_through(weight, quantized.t() if self.transposed else quantized)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, quant_type={self.quant_type}, double_quant={self.double_quant}"


class IntFakeQuantize(FakeQuantize):
    r"""
    Parametrization of a `weight`: in the forward pass the weight a compressed-tensors `pack-quantized` checkpoint
    reloads to (symmetric int8 / int4, per channel or per group, [`fake_quantize_int`]), in the backward pass the
    gradient of the full-precision weight (straight-through estimator).

    Args:
        bits (`int`): 8 or 4.
        group_size (`int`, *optional*): Weights per scale along a row; `None` is one scale per row.
    """

    def __init__(self, bits: int, group_size: int | None = None):
        super().__init__()
        self.bits, self.group_size = bits, group_size

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return straight_through(weight, fake_quantize_int(weight, self.bits, self.group_size))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, group_size={self.group_size}"


def _int8_activation_hook(threshold: float):
    """Forward hook replaying LLM.int8 inference (int8 activations, outliers in full precision) on a
    fake-quantized Linear; the gradient still flows through the plain product."""

    def hook(module, inputs, output):
        weight = module.parametrizations.weight.original
        if is_conv1d(module):
            weight = weight.t()
        cb, scb = int8_rowwise_quantize(weight)
        bias = module.bias.detach() if module.bias is not None else None
        with torch.no_grad():
            exact = int8_linear(inputs[0].detach(), cb, scb, bias, threshold)
        return straight_through(output, exact)

    return hook


def is_fake_quantized(module: nn.Module) -> bool:
    return parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, FakeQuantize) for p in module.parametrizations.weight
    )


def attach_fake_quant(model: nn.Module, args: QuantizationArguments, linear_names: list[str], embedding_names=()) -> int:
    """Register the export's fake quantizer on the weights of `linear_names` (and `embedding_names`):
    [`BnbFakeQuantize`] (in 8-bit also replaying LLM.int8's activation quantization) or, with
    `args.backend="compressed-tensors"`, [`IntFakeQuantize`]. Returns the number of modules now fake-quantized."""
    bnb = getattr(args, "backend", "bitsandbytes") == "bitsandbytes"
    count = 0
    modules = dict(model.named_modules())
    for name in list(linear_names) + list(embedding_names):
        module = modules[name]
        if is_fake_quantized(module):
            continue
        embedding = name in embedding_names
        # FSDP2: the quantizer must be registered before `fully_shard` (which then shards `...original` and gathers it
        # for every forward, so the scales see the full weight); after it, rebinding the weight would break FSDP.
        check_not_sharded(name, module.weight, "registering a fake quantizer")
        if bnb:
            fake = BnbFakeQuantize(
                args.bits, args.quant_type, args.double_quant and not embedding, embedding, transposed=is_conv1d(module)
            )
        else:
            fake = IntFakeQuantize(args.bits, args.group_size)
        parametrize.register_parametrization(module, "weight", fake)
        if bnb and args.bits == 8 and not embedding:
            setattr(module, _HOOK_ATTR, module.register_forward_hook(_int8_activation_hook(args.llm_int8_threshold)))
        setattr(module, _STATE_HOOKS_ATTR, [
            module._register_state_dict_hook(_save_plain_names),
            module.register_load_state_dict_pre_hook(_load_plain_names),
        ])
        count += 1
    return count


def remove_fake_quant(model: nn.Module) -> int:
    """Remove every fake quantizer (and int8 hook), keeping the full-precision weights and any other
    parametrization (e.g. pruning masks) in place. Returns the number of modules restored."""
    count = 0
    for module in model.modules():
        handle = getattr(module, _HOOK_ATTR, None)
        if handle is not None:
            handle.remove()
            delattr(module, _HOOK_ATTR)
        for handle in getattr(module, _STATE_HOOKS_ATTR, ()):
            handle.remove()
        if hasattr(module, _STATE_HOOKS_ATTR):
            delattr(module, _STATE_HOOKS_ATTR)
        if not is_fake_quantized(module):
            continue
        plist = module.parametrizations.weight
        others = [p for p in plist if not isinstance(p, FakeQuantize)]
        original = plist.original
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight = original
        for p in others:
            parametrize.register_parametrization(module, "weight", p)
        count += 1
    return count
