"""DeepSpeed ZeRO-3 parameters, read and written whole, for the callbacks that select on whole weights.

ZeRO-3 partitions every parameter (it has a `ds_id`): outside a forward `param.data` is empty, each rank holds a flat
slice of the compute copy (`param.ds_tensor`) and, in the ZeRO-3 optimizer, a slice of the fp32 master weight and
of each optimizer state. A magnitude selection on a slice is not the full weight's, and zeroing only the compute copy
is undone by the next step (the optimizer writes the master weight back). So:

- [`FullFP32Weights`]: a `{name: weight}` view whose values are the fp32 master weights all-gathered on access
  (`deepspeed.utils.safe_get_full_fp32_param`), the same on every rank: the pruning selection runs the
  single-process code on them, one weight at a time;
- [`masked_fill_`]: zero the masked entries of the master weight, of every optimizer state of its shape
  (`safe_set_full_optimizer_state`) and of the compute copy (`GatheredParameters(..., modifier_rank=0)`, which
  re-partitions rank 0's full tensor on exit), identically on every rank;
- [`gathered`]: the full compute copies for reading (shapes, zeros).

Every function here is collective: all ranks call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager

import torch


def is_partitioned(param) -> bool:
    """A parameter DeepSpeed ZeRO-3 manages (it has a `ds_id`)."""
    return hasattr(param, "ds_id")


def any_partitioned(params) -> bool:
    return any(is_partitioned(p) for p in params)


@contextmanager
def gathered(params, modifier_rank: int | None = None):
    """`deepspeed.zero.GatheredParameters`: inside, each parameter's `data` is the full tensor on every rank; with
    `modifier_rank`, that rank's changes are re-partitioned on exit."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank):
        yield


def _in_optimizer(param) -> bool:
    return param.requires_grad and getattr(param, "_z3_optimizer", None) is not None


def full_fp32(param) -> torch.Tensor:
    """The whole fp32 master weight of `param` (the optimizer's), or the gathered compute copy for a parameter the
    optimizer does not hold (frozen)."""
    if _in_optimizer(param):
        from deepspeed.utils import safe_get_full_fp32_param

        return safe_get_full_fp32_param(param).reshape(param.ds_shape)
    with gathered([param]):
        return param.data.detach().float().clone()


def state_keys(param) -> list[str]:
    """The optimizer states of `param` that hold one value per entry (`exp_avg`, `exp_avg_sq`, `momentum_buffer`,
    ...); none before the optimizer's first step."""
    opt = param._z3_optimizer
    group, _, _ = opt.grad_position[opt.get_param_id(param)]
    flat = opt.fp32_partitioned_groups_flat[group]
    state = opt.optimizer.state.get(flat, {})
    return [k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape]


@torch.no_grad()
def masked_fill_(param, mask: torch.Tensor) -> None:
    """Zero the entries of `param` where the full-shape `mask` is False: master weight, its per-entry optimizer
    states and the compute copy."""
    if _in_optimizer(param):
        from deepspeed.utils import (
            safe_get_full_optimizer_state,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        safe_set_full_fp32_param(param, full_fp32(param).masked_fill(~mask, 0.0))
        for key in state_keys(param):
            value = safe_get_full_optimizer_state(param, key).reshape(param.ds_shape)
            safe_set_full_optimizer_state(param, value.masked_fill(~mask, 0.0), key)
    with gathered([param], modifier_rank=0):
        param.data.masked_fill_(~mask.to(param.device), 0.0)


class FullFP32Weights(Mapping):
    """A read-only `{name: parameter}` view whose values are [`full_fp32`] on access (all-gathered each time)."""

    def __init__(self, params: Mapping):
        self._params = params

    def __getitem__(self, name):
        return full_fp32(self._params[name])

    def __iter__(self):
        return iter(self._params)

    def __len__(self):
        return len(self._params)
