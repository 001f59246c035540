"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the DTensor helpers the pruning, QAT and export paths share.

Under `fully_shard` every parameter is a `DTensor` sharded along dim 0 over the data-parallel mesh; inside a
forward pass FSDP all-gathers them into plain full tensors. What that means for compression:

- Pruning masks are chosen on the FULL weights: [`GatheredTensors`] all-gathers one weight at a time (the
  single-process selection code then runs unchanged on every rank, so the masks are identical to one process's by
  construction), and [`shard_like`] cuts the result back to the parameter's own shard.
- Fake quantization runs in the forward pass, on the weight FSDP has just all-gathered: every scale (per row, per
  group, per 64-entry bitsandbytes block, even one spanning a shard border) sees the full matrix.
- [`full_state_dict`] gathers the whole model onto rank 0 (CPU) for one export.

All `torch.distributed` imports are lazy: this module costs nothing in a single process.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def is_dtensor(tensor) -> bool:
    """Whether `tensor` is a `torch.distributed.tensor.DTensor` (a sharded FSDP2 parameter or its state)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def any_dtensor(tensors) -> bool:
    """Whether any of `tensors` is a DTensor."""
    return any(is_dtensor(t) for t in tensors)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather) for a DTensor, `tensor` itself otherwise.

    Boolean DTensors travel as uint8 (gloo has no boolean all-gather)."""
    if not is_dtensor(tensor):
        return tensor
    if tensor.dtype == torch.bool:
        return tensor.to(torch.uint8).full_tensor().bool()
    return tensor.full_tensor()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`full` (the same whole tensor on every rank) as a DTensor laid out like the DTensor `like`, cut locally
    (no communication: every rank keeps its own shard). A plain `like` gets `full` back."""
    if not is_dtensor(like):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


class GatheredTensors(Mapping):
    """A read-only `{name: tensor}` view whose DTensor values are all-gathered on access ([`full_tensor`]).

    Passed to the single-process selection functions (`magnitude_masks`, `global_keep_masks`, `nm_masks`), it
    gives them the full weights one at a time, so at most one gathered weight is alive beyond what the function
    itself keeps (its boolean result masks). A value read twice is gathered twice.
    """

    def __init__(self, tensors: Mapping):
        self._tensors = tensors

    def __getitem__(self, name):
        return full_tensor(self._tensors[name])

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self):
        return len(self._tensors)


def count_zeros(tensor: torch.Tensor) -> int:
    """Exact zeros of the whole tensor: counted on each shard and summed over the mesh for a DTensor."""
    if not is_dtensor(tensor):
        return int((tensor == 0).sum())
    local = (tensor.to_local() == 0).sum().reshape(1).to(torch.int64)
    torch.distributed.all_reduce(local, group=tensor.device_mesh.get_group())
    return int(local)


def check_not_sharded(module_name: str, weight: torch.Tensor, what: str) -> None:
    """Refuse, in one line, to rewrite a weight that `fully_shard` already sharded (`what`: the operation)."""
    if is_dtensor(weight):
        raise ValueError(
            f"{module_name}.weight is already sharded by `fully_shard` (a DTensor), so {what} would rebind a parameter "
            "FSDP manages; call `attach_fake_quant(model, ...)` BEFORE `fully_shard(model)` (QATCallback then finds "
            "the quantizers in place and only removes them at the end)."
        )


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """
    The whole model's state dict on rank 0, on the CPU (`torch.distributed.checkpoint.state_dict` with
    `full_state_dict=True, cpu_offload=True`); the other ranks get `{}`. Collective: call it on every rank. A model
    that is not sharded gets its own `state_dict()` (detached CPU copies).
    """
    if not any_dtensor(model.parameters()):
        return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_full_state_dict(model: torch.nn.Module, path: str) -> bool:
    """
    Gather [`full_state_dict`] and write it once, by rank 0, to the safetensors file `path` (a temporary file
    renamed whole; tied weights stored once, as `save_pretrained` does). Collective: call it on every rank; ranks
    wait for the write before returning.

    Returns:
        `bool`: whether this rank wrote the file.
    """
    import os

    from safetensors.torch import save_file

    state = full_state_dict(model)
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    wrote = False
    if rank == 0:
        seen, tensors = {}, {}
        for name, t in state.items():
            key = (t.data_ptr(), t.shape, t.stride()) if t.numel() else None
            if key is not None and key in seen:
                continue  # a tied weight: written once, under its first name
            seen[key] = name
            tensors[name] = t.contiguous()
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
        wrote = True
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return wrote


__all__ = [
    "GatheredTensors",
    "any_dtensor",
    "check_not_sharded",
    "count_zeros",
    "full_state_dict",
    "full_tensor",
    "is_dtensor",
    "save_full_state_dict",
    "shard_like",
]
