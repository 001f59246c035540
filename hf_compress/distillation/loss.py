"""Knowledge-distillation losses as pure functions of tensors.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531:
the student matches the teacher's distribution softened at a temperature `T`; the KL term is multiplied by
`T**2` so that its gradients keep the same scale as the hard-label loss when `T` changes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class DistillationLoss(NamedTuple):
    """The mixed loss and its two parts (the parts are what gets logged)."""

    loss: torch.Tensor
    hard_loss: torch.Tensor | None
    soft_loss: torch.Tensor


def _reduce(per_item: torch.Tensor, mask: torch.Tensor | None, denominator) -> torch.Tensor:
    if mask is not None:
        per_item = per_item * mask
        count = mask.sum()
    else:
        count = per_item.numel()
    total = per_item.sum()
    if denominator is None:
        denominator = count
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device, total.dtype)
    return total / torch.clamp(torch.as_tensor(denominator, dtype=total.dtype, device=total.device), min=1)


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
) -> torch.Tensor:
    """`T**2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the unmasked positions.

    Args:
        student_logits (`torch.Tensor` of shape `(..., num_classes)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(..., num_classes)` or `(..., k)`): teacher logits, or the
            teacher's top-k logits when `teacher_indices` is given.
        temperature (`float`, *optional*, defaults to `2.0`): softening temperature, > 0.
        mask (`torch.Tensor` of shape `(...)`, *optional*): 1 where a position counts, 0 where it is ignored.
        num_items (`int` or `torch.Tensor`, *optional*): divide the summed KL by this instead of the number of
            unmasked positions (the whole accumulated batch's count, so gradient accumulation averages correctly).
        teacher_indices (`torch.Tensor` of shape `(..., k)`, *optional*): the class ids of cached top-k teacher
            logits. The teacher distribution is renormalised over its top k, and the student's full-vocabulary
            log-probabilities are gathered at those ids; with `k == num_classes` this equals the dense loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if teacher_indices is not None:
        student_logp = student_logp.gather(-1, teacher_indices.long())
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    return _reduce(kl, None if mask is None else mask.to(kl.dtype), num_items) * temperature**2


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
    ignore_index: int = -100,
    shift_labels: bool = False,
    attention_mask: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
) -> DistillationLoss:
    """`(1 - alpha) * CE(student, labels) + alpha * T**2 * KL(teacher_T || student_T)`.

    Both parts are averaged over the same positions: those whose label is not `ignore_index` (with labels),
    or those with `attention_mask == 1` (without labels, when the loss is the soft part alone).

    Args:
        student_logits (`torch.Tensor` of shape `(batch, [seq,] num_classes)`): student logits.
        teacher_logits (`torch.Tensor`): teacher logits of the same shape (or top-k, see `teacher_indices`).
        labels (`torch.Tensor` of shape `(batch, [seq])`, *optional*): hard labels; `ignore_index` positions
            count in neither part. Without labels the loss is the soft part alone, whatever `alpha`.
        temperature (`float`, *optional*, defaults to `2.0`): softening temperature.
        alpha (`float`, *optional*, defaults to `0.5`): weight of the soft (teacher) part, in `[0, 1]`.
        ignore_index (`int`, *optional*, defaults to `-100`): label value that is ignored.
        shift_labels (`bool`, *optional*, defaults to `False`): causal LM: logits at position `i` predict
            label `i + 1`, so the last logit and the first label are dropped.
        attention_mask (`torch.Tensor`, *optional*): the positions that count when there are no labels.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): the number of counted positions over the whole
            accumulated batch; both sums are divided by it (the Trainer's gradient-accumulation convention).
        teacher_indices (`torch.Tensor`, *optional*): see [`soft_target_kl`].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if shift_labels:
        student_logits = student_logits[..., :-1, :]
        teacher_logits = teacher_logits[..., :-1, :]
        teacher_indices = None if teacher_indices is None else teacher_indices[..., :-1, :]
        if labels is not None:
            labels = labels[..., 1:]
        elif attention_mask is not None:
            attention_mask = attention_mask[..., 1:]
    if labels is None:
        soft = soft_target_kl(
            student_logits, teacher_logits, temperature, attention_mask, num_items_in_batch, teacher_indices
        )
        return DistillationLoss(soft, None, soft)

    mask = labels.ne(ignore_index)
    soft = soft_target_kl(student_logits, teacher_logits, temperature, mask, num_items_in_batch, teacher_indices)
    ce = F.cross_entropy(
        student_logits.float().reshape(-1, student_logits.shape[-1]),
        labels.reshape(-1).long(),
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(labels.shape)
    hard = _reduce(ce, mask.to(ce.dtype), num_items_in_batch)
    return DistillationLoss((1 - alpha) * hard + alpha * soft, hard, soft)
