"""Calibration data: the first batches of a training dataloader, which importance scores and self-checks read."""

from __future__ import annotations

import itertools


def first_batches(dataloader, n: int) -> list[dict]:
    """The first `n` batches of a dataloader, on the CPU (calibration data for the importance scores)."""
    import torch

    out = []
    for batch in itertools.islice(iter(dataloader), n):
        out.append({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out
