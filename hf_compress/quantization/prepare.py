"""The full-precision model an export starts from: PEFT adapters merged, fake quantizers and pruning masks resolved,
and its size; shared by every backend, so it lives below them."""

from __future__ import annotations

import copy

import torch

from .qat import FakeQuantize


def merge_adapters(model):
    """`(model, merge)`: a PEFT model merged into a plain one ([`hf_compress.peft_utils.merge_adapters`], whose
    `merge` records the merge's error), or `(model, None)`; peft is imported only when the model is one."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        return model, None
    from ..peft_utils import merge_adapters as merge_peft

    merge = merge_peft(model)
    return merge.model, merge


def plain_copy(model):
    """A parametrization-free copy: fake-quantized weights as their full-precision originals (which the export
    quantizes exactly as QAT did), any other parametrization (pruning masks) baked into the weight.

    Built as a fresh model plus a state dict, not by `deepcopy`: a deep-copied parametrized module shares its
    generated class with the original, so removing parametrizations from the copy would break the original.
    """
    from torch.nn.utils import parametrize

    state = model.state_dict()
    with torch.no_grad():
        for prefix, module in model.named_modules():
            if not parametrize.is_parametrized(module):
                continue
            prefix = f"{prefix}." if prefix else ""
            for name, plist in module.parametrizations.items():
                value = plist.original
                for p in plist:
                    if not isinstance(p, FakeQuantize):
                        value = p(value)
                inner = f"{prefix}parametrizations.{name}."
                state = {k: v for k, v in state.items() if not k.startswith(inner)}
                state[f"{prefix}{name}"] = value.detach()
    plain = type(model)(copy.deepcopy(model.config))
    plain.load_state_dict(state)
    return plain.to(next(model.parameters()).dtype)


def weight_bytes(model) -> int:
    """Bytes of `model`'s state dict at its dtypes (tied tensors counted at each name)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
