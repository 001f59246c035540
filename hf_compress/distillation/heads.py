"""A causal LM's output head read off the model, so the distillation loss projects the hidden states itself.

During a training step the loss needs each position's logits once, chunk by chunk, and their gradient: building the
full `[positions, vocab]` logits of the student and the teacher (and their gradient) is what makes distillation at
large vocabularies expensive (2 x 8 x 2,048 x 262,144 bf16 = 17 GB at Gemma-3's vocabulary). Here the head's input
is kept while the model runs its own forward (a forward pre-hook hands the head no positions, so the model returns
empty logits), and the loss gets [`~hf_compress.distillation.loss.HeadLogits`] instead.

Exact or not used: a head is read this way only when it is a plain `nn.Linear` of a family whose forward transform is
listed (`architectures.LOGIT_TRANSFORMS`), with ordinary tensors (not sharded, offloaded or quantized), and after
[`check_head`] found the projection equal to the model's own logits on a probe (to the dtype's rounding). Anything
else gets its logits from its forward, as before.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

from ..architectures import LogitTransform, logit_transform
from .loss import HeadLogits

logger = logging.getLogger(__name__)

# Positions of the probe that checks a head against its model's forward.
PROBE_POSITIONS = 8


class OutputHead(NamedTuple):
    """A model's output head module and what its family's forward does to its result."""

    module: torch.nn.Linear
    transform: LogitTransform

    def logits(self, hidden: torch.Tensor, width: int | None = None) -> HeadLogits:
        m, t = self.module, self.transform
        if width is not None and width >= m.weight.shape[0]:
            width = None
        return HeadLogits(hidden, m.weight, m.bias, t.scale, t.divisor, t.softcap, width)


def output_head(model) -> tuple[OutputHead | None, str]:
    """The model's [`OutputHead`], or `None` and why its logits must come from its forward."""
    config = getattr(model, "config", None)
    transform = logit_transform(config)
    if transform is None:
        return None, f"the family `{getattr(config, 'model_type', None)}` is not listed in architectures.LOGIT_TRANSFORMS"
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if type(module) is not torch.nn.Linear:
        return None, f"its output head is a `{type(module).__name__}`, not a plain `nn.Linear`"
    if hasattr(module, "_hf_hook") or module._forward_pre_hooks or module._forward_hooks:
        return None, "its output head has forward hooks (accelerate dispatch or another wrapper)"
    for name, p in module.named_parameters():
        if type(p) not in (torch.nn.Parameter, torch.Tensor) or p.is_meta or p.numel() != _dense_numel(module, name):
            return None, f"its output head's `{name}` is sharded, offloaded or quantized (`{type(p).__name__}`)"
    return OutputHead(module, transform), ""


def _dense_numel(module, name: str) -> int:
    return module.out_features * module.in_features if name == "weight" else module.out_features


def fused_saves_memory(head: OutputHead, positions: int) -> bool:
    """Whether projecting in the loss holds less than the logits path for a batch of `positions` positions.

    The logits path holds the student's and the teacher's logits and their gradient (3 x positions x vocab in the
    head's dtype); the projection holds none of them, but a trained head whose weight is not float32 gets a float32
    `[vocab, hidden]` buffer for its gradient while the chunks add into it (4 bytes a weight, against the 2 of the
    gradient autograd would make)."""
    w = head.module.weight
    if not w.requires_grad or w.dtype == torch.float32:
        return True
    return 3 * positions * w.element_size() > 4 * w.shape[1]


class HeadInputCapture:
    """While active, keeps the input of each call of `head.module` and hands the head no positions instead, so the
    model's forward returns empty logits; `hidden` is the kept input (`None` when the head was not called, or when
    it ran under an autocast that would change its dtype: then it computed its logits as usual).

    Usage: `with HeadInputCapture(head) as cap: out = model(**inputs)`, then `cap.hidden`.
    """

    def __init__(self, head: OutputHead | None):
        self.head, self.hidden, self.calls, self._handle = head, None, 0, None

    def __enter__(self):
        if self.head is not None:
            self._handle = self.head.module.register_forward_pre_hook(self._pre_hook)
        return self

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        return False

    def _pre_hook(self, module, args):
        self.calls += 1
        h = args[0] if args else None
        w = module.weight
        if self.calls > 1 or not torch.is_tensor(h) or h.dim() < 2 or h.dtype != w.dtype or h.device != w.device:
            self.hidden = None
            return None
        kind = h.device.type
        if torch.is_autocast_enabled(kind) and torch.get_autocast_dtype(kind) != h.dtype:
            return None  # autocast would run the head in another dtype: it computes its logits as usual
        self.hidden = h
        return (h[..., :0, :], *args[1:])


def check_head(model, head: OutputHead, input_ids: torch.Tensor, width: int | None = None) -> tuple[bool, str]:
    """Whether [`HeadLogits`] from the captured hidden states equal the model's own logits on `input_ids` (one short
    row), to 4 units of rounding of the head's dtype times the logits' scale. Runs in eval mode without gradients
    (the model's mode is restored)."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ref = model(input_ids=input_ids).logits
            with HeadInputCapture(head) as cap:
                out = model(input_ids=input_ids)
    finally:
        model.train(was)
    if cap.calls != 1 or cap.hidden is None:
        return False, f"its forward called the output head {cap.calls} times or under another dtype"
    if out.logits.numel():
        return False, "its forward still returned logits with the head handed no positions"
    with torch.no_grad():
        got = head.logits(cap.hidden, width).logits()
    if width is not None:
        ref = ref[..., :width]
    if got.shape != ref.shape:
        return False, f"the projected logits have shape {tuple(got.shape)}, its forward's {tuple(ref.shape)}"
    diff = float((got.float() - ref.float()).abs().max())
    bound = 4 * torch.finfo(ref.dtype).eps * max(1.0, float(ref.float().abs().max()))
    if not diff <= bound:
        return False, f"the projected logits differ from its forward's by {diff:.3g} (bound {bound:.3g})"
    return True, ""


def probe_ids(inputs: dict) -> torch.Tensor | None:
    """The first row's first [`PROBE_POSITIONS`] attended token ids of a batch, `None` without `input_ids`."""
    ids = inputs.get("input_ids")
    if not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[1] == 0:
        return None
    row, mask = ids[0], inputs.get("attention_mask")
    if torch.is_tensor(mask) and mask.dim() == 2:
        row = row[mask[0].bool()]
    return row[:PROBE_POSITIONS][None] if row.numel() else None


def checked_output_head(model, inputs: dict, width: int | None, who: str) -> OutputHead | None:
    """The model's [`OutputHead`] if it is exact on a probe from `inputs`; else `None`, with the reason logged once."""
    head, why = output_head(model)
    if head is not None:
        ids = probe_ids(inputs)
        if ids is None:
            head, why = None, "the batch has no `input_ids` to probe it with"
        else:
            ok, why = check_head(model, head, ids.to(head.module.weight.device), width)
            head = head if ok else None
    if head is None:
        logger.info("The %s's logits are built in full by its forward: %s.", who, why)
    else:
        logger.info("The %s's output head is projected in the loss, chunk by chunk (checked on a probe).", who)
    return head


__all__ = ["HeadInputCapture", "OutputHead", "check_head", "checked_output_head", "fused_saves_memory",
           "output_head", "probe_ids"]
