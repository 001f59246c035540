"""The self-check every pruning run ends with: the pruned model against the model it must equal, in memory and
after a reload, relative to the logit scale.

Structured pruning compares the physically cut model with the masked one ([`~hf_compress.pruning.structured.
check_structured_cut`]); unstructured pruning compares the model whose masks were made permanent with the model that
trained under them, and the written folder with it ([`check_permanent`], [`check_reload`]). Beyond the tolerance a
run stops with one line and writes nothing, so a new architecture (or a new save format) can be wrong only loudly.
The helpers here sit below both techniques; neither imports the other.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import torch

INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class SelfCheckError(ValueError):
    """A pruned or reloaded model does not compute what the model it replaces computed (one line, with the figures)."""


def tolerance_for(dtype: torch.dtype) -> float:
    """Largest accepted `max |pruned - masked| / max |masked|` over the checked logits: 1e-4 in float32 (a cut
    only reorders float sums; the tests measure <= 1e-5), 2e-2 in 16-bit types."""
    return 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2


def model_inputs(batch: dict, labels: bool) -> dict:
    """The model's inputs in `batch` (`input_ids`, `attention_mask`, `token_type_ids`, `position_ids`), and its
    labels (`labels` or `label`) when `labels` is set."""
    out = {k: v for k, v in batch.items() if k in INPUT_KEYS}
    if labels:
        lab = batch.get("labels", batch.get("label"))
        if lab is not None:
            out["labels"] = lab
    return out


def forward_batch(model, batch: dict):
    """`model(**batch)` with the batch's tensors on the model's device."""
    device = next(model.parameters()).device
    return model(**{k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})


def check_batch(model, batches=None, rows: int = 2, tokens: int = 64) -> dict:
    """The batch a self-check runs on: the first `rows` x `tokens` of the first calibration batch (small, so that
    three sets of logits over a large vocabulary stay small), else 2 x 16 seeded random token ids."""
    if batches:
        first = model_inputs(batches[0], labels=False)
        return {k: v[:rows, :tokens] if v.dim() >= 2 else v[:rows] for k, v in first.items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def logits_on(model, batch: dict) -> torch.Tensor:
    """`model`'s logits on `batch` in eval mode and without gradients, as float32 on the CPU, at the real tokens only
    (padded positions, by `attention_mask`, are nobody's output); question answering stacks start and end logits.
    The model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = forward_batch(model, batch)
    finally:
        model.train(was_training)
    if getattr(out, "logits", None) is not None:
        logits = out.logits
    else:  # question answering
        logits = torch.stack([out.start_logits, out.end_logits], dim=-1)
    logits = logits.detach().float().cpu()
    mask = batch.get("attention_mask")
    if mask is not None and logits.dim() >= 3 and tuple(logits.shape[:2]) == tuple(mask.shape):
        logits = logits[mask.bool().cpu()]
    return logits


def relative_diff(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """`(max |out - ref| / max |ref|, max |ref|)`; `inf` when the shapes differ."""
    scale = ref.abs().max().item()
    if out.shape != ref.shape:
        return float("inf"), scale
    return (out - ref).abs().max().item() / max(scale, 1e-12), scale


def reload_pretrained(model, folder: str):
    """Save `model` with `save_pretrained` into `folder` and load it back with plain `from_pretrained` (same class,
    dtype and device): the reload the dense checkpoint gets."""
    dtype = next(model.parameters()).dtype
    model.save_pretrained(folder)
    return type(model).from_pretrained(folder, dtype=dtype).to(next(model.parameters()).device)


def raise_if_beyond(figures: dict, model, what: str, advice: str, error: type[Exception] = SelfCheckError) -> dict:
    """Raise `error` in one line when a `*_vs_*` figure in `figures` is beyond `figures["tolerance"]` (NaN counts as
    beyond); returns `figures` otherwise."""
    tolerance = figures["tolerance"]
    bad = {k: v for k, v in figures.items() if "_vs_" in k and v is not None and not v <= tolerance}
    if bad:
        raise error(
            f"{what} self-check failed for `{model.config.model_type}`: "
            + ", ".join(f"{k.replace('_', ' ')} {v:.3g}" for k, v in bad.items())
            + f" (relative to the logit scale {figures['logit_scale']:.3g}; tolerance {tolerance:g}); nothing was "
            f"written. {advice}".rstrip()
        )
    return figures


def compare(model, batch: dict, expected: torch.Tensor, name: str, reference: str, tolerance: float | None = None,
            reload: Callable | None = None) -> dict:
    """
    The self-check's figures for `model` against the logits `expected` of the model it must equal.

    Args:
        model: the model to check (pruned, or with its masks made permanent).
        batch (`dict`): model inputs.
        expected (`torch.Tensor`): the reference's logits on `batch` (as [`logits_on`] returns them).
        name (`str`): what `model` is, e.g. `"pruned"`; the figure is `<name>_vs_<reference>`.
        reference (`str`): what `expected` came from, e.g. `"masked"`.
        tolerance (`float`, *optional*): defaults to [`tolerance_for`] the model's dtype.
        reload (`Callable`, *optional*): `reload(model, folder) -> model` saves into a temporary folder (deleted
            afterwards) and loads back (e.g. [`reload_pretrained`]); its figure is `reloaded_vs_<reference>`. Skipped
            when the in-memory figure is already beyond the tolerance.

    Returns:
        `dict` with `logit_scale`, `tolerance`, `<name>_vs_<reference>` and, with `reload`, `reloaded_vs_<reference>`.
    """
    tolerance = tolerance_for(next(model.parameters()).dtype) if tolerance is None else tolerance
    diff, scale = relative_diff(logits_on(model, batch), expected)
    out = {"logit_scale": scale, "tolerance": tolerance, f"{name}_vs_{reference}": diff}
    if reload is not None and diff <= tolerance:
        with tempfile.TemporaryDirectory(prefix="hf-compress-self-check-") as tmp:
            reloaded = reload(model, tmp)
            out[f"reloaded_vs_{reference}"] = relative_diff(logits_on(reloaded, batch), expected)[0]
            del reloaded
    return out


UNSTRUCTURED_ADVICE = "Please report this model type; the masks are in `get_masks(model)` until then."


def check_permanent(model, batch: dict, make_permanent: Callable, tolerance: float | None = None) -> dict:
    """
    Unstructured pruning made permanent, checked: `model`'s logits on `batch` under its masks, then
    `make_permanent(model)` (e.g. [`~hf_compress.pruning.remove_masks`]), then the logits again.

    Returns:
        `dict` with `logit_scale`, `tolerance` and `permanent_vs_masked`.

    Raises:
        [`SelfCheckError`]: beyond the tolerance (one line: the model type and the figures).
    """
    expected = logits_on(model, batch)
    make_permanent(model)
    figures = compare(model, batch, expected, "permanent", "masked", tolerance)
    return raise_if_beyond(figures, model, "unstructured pruning", UNSTRUCTURED_ADVICE)


def check_reload(model, reloaded, batch: dict, tolerance: float | None = None) -> dict:
    """
    The written checkpoint, as loaded back (`reloaded`), against the in-memory `model` that was written.

    Returns:
        `dict` with `logit_scale`, `tolerance` and `reloaded_vs_permanent`.

    Raises:
        [`SelfCheckError`]: beyond the tolerance (one line: the model type and the figures).
    """
    expected = logits_on(model, batch)
    figures = compare(reloaded, batch, expected, "reloaded", "permanent", tolerance)
    return raise_if_beyond(figures, model, "unstructured pruning", "Please report this model type and format.")
