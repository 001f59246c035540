"""What precision every weight of a (partly) quantized model is stored in, for the export report and the card."""

from __future__ import annotations

import re

import torch
from torch import nn


def _storage(p: torch.Tensor) -> tuple[str, int]:
    """(storage kind, logical number of weights) of a parameter; bitsandbytes' packed tensors by class name, so
    bitsandbytes stays unimported."""
    cls = type(p).__name__
    if cls == "Params4bit" and getattr(p, "quant_state", None) is not None:
        return f"{p.quant_state.quant_type} (4-bit)", int(torch.Size(p.quant_state.shape).numel())
    if cls == "Int8Params":
        return "int8", p.numel()
    return str(p.dtype).removeprefix("torch."), p.numel()


def precision_summary(model: nn.Module) -> dict[str, dict]:
    """
    Parameters of `model` grouped by how they are stored.

    Returns:
        `dict`: `{kind: {"parameters": int, "modules": [str]}}`, kind being `"int8"`, `"nf4 (4-bit)"`,
        `"fp4 (4-bit)"` or a torch dtype name (`"bfloat16"`, `"float32"`, ...). Module names have their layer index
        replaced by `*` (`model.layers.*.mlp.up_proj`); a module whose weight is tied to another one's (an `lm_head`
        tied to the input embedding) is listed as `"lm_head (tied to model.embed_tokens)"` and counted once.
    """
    groups: dict[str, dict] = {}
    owner: dict[int, tuple[str, str]] = {}
    for mod_name, module in model.named_modules():
        for _, p in module.named_parameters(recurse=False):
            if id(p) in owner:
                kind, first = owner[id(p)]
                label = f"{mod_name} (tied to {first})"
                if label not in groups[kind]["modules"]:
                    groups[kind]["modules"].append(label)
                continue
            kind, numel = _storage(p)
            owner[id(p)] = (kind, mod_name)
            group = groups.setdefault(kind, {"parameters": 0, "modules": []})
            group["parameters"] += numel
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", mod_name)
            if pattern not in group["modules"]:
                group["modules"].append(pattern)
    return groups
