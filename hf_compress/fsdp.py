"""FSDP2 (`torch.distributed.fsdp.fully_shard`): the DTensor helpers the pruning, QAT and export paths share.

Under `fully_shard` every parameter is a `DTensor` sharded along dim 0 over the data-parallel mesh; inside a
forward pass FSDP all-gathers them into plain full tensors. What that means for compression:

- Pruning masks are chosen on the FULL weights: [`GatheredTensors`] all-gathers one weight at a time (the
  single-process selection code then runs unchanged on every rank, so the masks are identical to one process's by
  construction), and [`shard_like`] cuts the result back to the parameter's own shard.
- Fake quantization runs in the forward pass, on the weight FSDP has just all-gathered: every scale (per row, per
  group, per 64-entry bitsandbytes block, even one spanning a shard border) sees the full matrix.
- [`full_state_dict`] gathers the whole model onto rank 0 (CPU) for one export; [`gathered_copy`] makes an
  ordinary, unsharded model of it there (structured pruning cuts that copy: a sharded parameter cannot change shape).
- [`shard_teacher`] shards a frozen distillation teacher with the student's mesh (`teacher_placement="shard"`).
- [`unsharded`] holds every FSDP module's full parameters for a block of code that reads whole weights (the
  structured callback's weight-magnitude scores), and [`weighted_mean_over_ranks`] combines per-rank means (the
  activation-based importance scores of each rank's own calibration batches) into the mean over all of them.

All `torch.distributed` imports are lazy: this module costs nothing in a single process.
"""

from __future__ import annotations

import contextlib
import itertools
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


def unsharded_class(model: torch.nn.Module) -> type:
    """The class `model` had before `fully_shard` (which swaps it for a generated `FSDP<Class>` subclass)."""
    if not torch.distributed.is_available():
        return type(model)
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def gathered_copy(model: torch.nn.Module):
    """
    An ordinary (unsharded, CPU) copy of the `fully_shard`-ed transformers `model` on rank 0, `None` on the other
    ranks. Collective: call it on every rank.

    Built on the meta device from `model.config` (no random initialisation, no second copy of the weights), then given
    the gathered [`full_state_dict`] (`assign=True`: each tensor keeps its dtype), the buffers of `model` (FSDP does not
    shard buffers; the rotary tables are not in the state dict), and tied again (`tie_weights`). Buffers that only
    `model` has (hf_compress's non-persistent masks) are not copied.
    """
    import copy

    state = full_state_dict(model)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    with torch.device("meta"):
        plain = unsharded_class(model)(copy.deepcopy(model.config))
    plain.load_state_dict(state, assign=True)
    own = dict(plain.named_buffers())
    for name, buf in model.named_buffers():
        if name in own:
            path, _, leaf = name.rpartition(".")
            plain.get_submodule(path)._buffers[leaf] = buf.detach().cpu().clone()
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    left = [n for n, t in itertools.chain(plain.named_parameters(), plain.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"gathered_copy could not fill {left[:3]} of `{type(plain).__name__}` from the sharded model.")
    return plain.train(model.training)


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """
    Hold the full (all-gathered) parameters of every FSDP module in `model` inside the block (`FSDPModule.unshard()`,
    then `reshard()`); a model without FSDP modules is left as it is. Collective. Inside, `module.weight` is the plain
    full tensor on every rank: memory for the whole model on each rank while it lasts.
    """
    modules = []
    if torch.distributed.is_available():
        from torch.distributed.fsdp import FSDPModule

        modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:
        m.unshard()
    try:
        yield model
    finally:
        for m in reversed(modules):
            m.reshard()


def shard_teacher(teacher: torch.nn.Module, mesh=None, **fully_shard_kwargs) -> torch.nn.Module:
    """
    Freeze `teacher` (eval mode, `requires_grad=False`) and `fully_shard` it in place: each block whose class is in
    its `_no_split_modules` (the decoder / encoder layers, as accelerate's transformer auto-wrap policy picks), then
    the root (embeddings, final norm, head; tied weights stay in the root's group). Collective: call it on every rank.

    Every group uses `reshard_after_forward=True`, the root included: a frozen teacher never runs a backward, so the
    root's usual `False` would keep its all-gathered embeddings and head for good. The forward thus all-gathers one
    block at a time and frees it after use; between steps each rank holds its shard alone. A model without
    `_no_split_modules` gets the root group only, as `trl.models.utils.prepare_fsdp` shards reference models (the
    forward then gathers the whole teacher at once). `mesh=None` is `fully_shard`'s default (the whole world);
    `fully_shard_kwargs` (`mp_policy`, `offload_policy`; `None` values dropped) go to every `fully_shard` call.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    teacher.eval()
    teacher.requires_grad_(False)
    if isinstance(teacher, FSDPModule):  # sharded by hand already
        return teacher
    kwargs = {k: v for k, v in fully_shard_kwargs.items() if v is not None}
    kwargs.update(mesh=mesh, reshard_after_forward=True)
    names = set(getattr(teacher, "_no_split_modules", None) or ())
    blocks = [m for m in teacher.modules() if m is not teacher and type(m).__name__ in names]
    for block in reversed(blocks):  # inner groups before the ones that hold them
        if not isinstance(block, FSDPModule):
            fully_shard(block, **kwargs)
    fully_shard(teacher, **kwargs)
    return teacher.eval()


def world_size() -> int:
    """The number of processes of the default group, 1 outside `torch.distributed`."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def weighted_mean_over_ranks(values: Mapping, weight: float) -> dict:
    """
    `sum_r weight_r * values_r / sum_r weight_r` for every tensor in `values`, over the ranks of the default group
    (float64 sums; non-tensor values are kept), the same bytes on every rank (rank 0's result is broadcast). With
    `values_r` a per-rank mean over `weight_r` items, this is the mean over all the items, as one process with every
    rank's data would compute it (up to the float order of the sums). Collective; identity in one process.
    """
    if world_size() == 1:
        return dict(values)
    dist = torch.distributed
    names = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
    flat = torch.cat([values[k].detach().double().reshape(-1).cpu() * weight for k in names] +
                     [torch.tensor([float(weight)], dtype=torch.float64)])
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat)
    dist.broadcast(flat, src=0)
    flat = flat.cpu()
    total, out, at = flat[-1], dict(values), 0
    for k in names:
        v = values[k]
        out[k] = (flat[at: at + v.numel()] / total).reshape(v.shape).to(v.dtype)
        at += v.numel()
    return out


def save_full_state_dict(model: torch.nn.Module, path: str) -> bool:
    """
    Gather [`full_state_dict`] and write it once, by rank 0, to the safetensors file `path` (a temporary file
    renamed whole; tied weights stored once, as `save_pretrained` does). Collective: call it on every rank; ranks
    wait for the write before returning.

    Returns:
        `bool`: whether this rank wrote the file.
    """
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
        from .atomic import atomic_file

        with atomic_file(path) as tmp:  # whole or absent, ordinary mode, as every other write
            save_file(tensors, tmp, metadata={"format": "pt"})
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
    "gathered_copy",
    "is_dtensor",
    "save_full_state_dict",
    "shard_like",
    "shard_teacher",
    "unsharded",
    "unsharded_class",
    "weighted_mean_over_ranks",
    "world_size",
]
