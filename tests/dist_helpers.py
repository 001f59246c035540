"""Mask synchronisation helpers the distributed tests use: a digest of a `{name: tensor}` dict, a check that every
rank holds the same one, and a broadcast of rank 0's pruning masks (the repair the DDP test exercises)."""

from __future__ import annotations

import hashlib

import torch


def _initialized_dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def tensors_digest(tensors: dict) -> str:
    """A SHA-256 over the names, shapes, dtypes and bytes of a `{name: tensor}` dict (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_same_across_ranks(tensors: dict, what: str = "masks") -> str:
    """Raise when `tensors` differ between ranks (compared by `tensors_digest`); returns this rank's digest. A no-op
    in a single process."""
    digest = tensors_digest(tensors)
    dist = _initialized_dist()
    if dist is None:
        return digest
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"The {what} of ranks {differ} differ from rank 0's; call `broadcast_masks(model)`.")
    return digest


def broadcast_masks(model, src: int = 0) -> int:
    """Overwrite every rank's pruning masks (the `<param>_mask` buffers) with those of rank `src`, in place; returns
    how many were broadcast (0 outside `torch.distributed`)."""
    from hf_compress.pruning.masks import get_masks

    masks = get_masks(model)
    dist = _initialized_dist()
    if dist is None:
        return 0
    for name in sorted(masks):
        mask = masks[name]
        buf = mask.to(dtype=torch.uint8)
        if dist.get_backend() == "nccl" and not buf.is_cuda:
            raise ValueError(f"The mask of {name} is on {buf.device} but the backend is nccl; move the model to CUDA.")
        dist.broadcast(buf, src=src)
        mask.copy_(buf.bool())
    return len(masks)
