"""Knowledge-distillation losses as pure functions of tensors.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531:
the student matches the teacher's distribution softened at a temperature `T`; the KL term is multiplied by
`T**2` so that its gradients keep the same scale as the hard-label loss when `T` changes.

Large vocabularies: the logits of a causal LM are `[batch, length, vocab]` (4 x 128 x 49,152 fp32 = 100 MB). The
loss below never makes a full-size float32 copy of them: it walks over the positions in chunks and, from each chunk's
softmaxes, computes both the loss and its gradient in the same pass, written straight into one tensor the size of the
logits (the gradient autograd needs anyway, in the logits' dtype); the backward pass only scales it. Neither model's
logits are held for the backward pass.

Cached top-k teachers: [`teacher_top_k`] keeps the k most probable classes of `softmax(teacher / T)` (the
temperature is applied over the whole vocabulary first) and the loss adds one tail bucket holding the rest of the
probability mass, for the teacher and for the student alike, as TRL's server-side distillation does. The KL over
these k + 1 buckets is zero when the student equals the teacher, whatever k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# Logits per chunk: 8 MB of float32 per temporary (42 positions at vocabulary 49,152), and only one chunk's
# temporaries alive at a time (`_chunk_step` frees them before the next); small next to the logits. Half that
# measured no lower peak in `benchmarks.trl_cost`.
_CHUNK_ELEMENTS = 1 << 21
_TINY = 1e-30


class DistillationLoss(NamedTuple):
    """The mixed loss and its two parts. Only `loss` carries a gradient; the parts are what gets logged."""

    loss: torch.Tensor
    hard_loss: torch.Tensor | None
    soft_loss: torch.Tensor


def teacher_top_k(
    teacher_logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most probable classes of `softmax(teacher_logits / temperature)`: `(log_probs, indices)`.

    The temperature is applied to the full vocabulary *before* truncation, so `log_probs` are the true
    log-probabilities of those classes at `temperature` (they sum to less than 1; the rest of the mass is the tail
    bucket that [`soft_target_kl`] adds back). Both outputs have shape `(..., k)`; `log_probs` are float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    width = teacher_logits.shape[-1]
    k = min(k, width)
    flat = teacher_logits.reshape(-1, width)
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // width)
    values, indices = [], []
    for start in range(0, flat.shape[0], rows):
        logp = F.log_softmax(flat[start : start + rows].float() / temperature, dim=-1)
        v, i = logp.topk(k, dim=-1)
        values.append(v)
        indices.append(i)
    shape = (*teacher_logits.shape[:-1], k)
    if not values:
        return torch.empty(shape), torch.empty(shape, dtype=torch.long)
    return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)


def _soft_parts(z, t, idx, temperature):
    """Per-row `KL(p || q)` at `temperature` (without the T**2), the student's `log q`, its `q` where it was needed
    (else `None`), the teacher's `p` used by the gradient, and the tail masses (top-k teachers only)."""
    logq = F.log_softmax(z if temperature == 1 else z / temperature, dim=-1)
    if idx is None:
        logp = F.log_softmax(t if temperature == 1 else t / temperature, dim=-1)
        p = logp.exp()
        kl = torch.bmm(p[:, None, :], logp.sub_(logq)[:, :, None]).view(-1)  # sum_j p_j (log p_j - log q_j)
        return kl, logq, None, p, None
    # Top-k plus tail bucket: the teacher's k log-probabilities come from the cache, its tail mass is the rest.
    logp_k = t
    p_k = logp_k.exp()
    p_tail = (1 - p_k.sum(-1)).clamp(min=0)
    if idx.shape[-1] >= z.shape[-1]:
        # The k classes are all of them: there is no tail, and `1 - sum` is only float32 rounding, which the
        # student's empty tail (clamped to 1e-30) would multiply by 69.
        p_tail = torch.zeros_like(p_tail)
    logq_k = logq.gather(-1, idx)
    q = logq.exp()
    # The student's tail, summed over the classes outside the teacher's top k (no `1 - sum` cancellation).
    q_tail = q.scatter(-1, idx, 0.0).sum(-1).clamp(min=_TINY)
    kl = (p_k * (logp_k - logq_k)).sum(-1) + torch.xlogy(p_tail, p_tail) - p_tail * q_tail.log()
    return kl, logq, q, p_k, (p_tail, q_tail)


def _chunks(z, t, idx, labels, mask, rows):
    """`(start, sel, student, teacher, top-k ids, labels)` of each chunk of `rows` positions, only where `mask` is set,
    the logits in float32 on the student's device (ids and labels `None` when not given). `sel` is `None` when every
    position of the chunk counts: the chunk is then a view, not a copy."""
    for start in range(0, z.shape[0], rows):
        sel = mask[start : start + rows]
        if not bool(sel.any()):
            continue
        if bool(sel.all()):
            sel, pick = None, slice(None)
        else:
            pick = sel
        zc = z[start : start + rows][pick].float()
        tc = t[start : start + rows][pick].to(zc.device).float()
        ic = None if idx is None else idx[start : start + rows][pick].to(zc.device).long()
        yc = None if labels is None else labels[start : start + rows][pick].long()
        yield start, sel, zc, tc, ic, yc


def _soft_gradient(logq, q, p, idx, tails):
    """`d KL / d(z / T)` of one chunk: `q - p~`, where `p~` is the teacher's distribution; with a tail bucket, the
    classes outside the top k get the student's own shape scaled to the teacher's tail mass (`q_j * p_tail / q_tail`)."""
    if idx is None:
        return logq.exp().sub_(p)
    p_tail, q_tail = tails
    g = q * (1 - p_tail / q_tail)[:, None]
    g.scatter_(-1, idx, q.gather(-1, idx) - p)
    return g


def _chunk_step(zc, tc, ic, yc, temperature, want_hard, w_hard, w_soft, grad, start, sel):
    """One chunk: its summed KL (without the T**2) and CE, and, into `grad[start:]` (where `grad` is given), the
    gradient of `w_hard * CE + w_soft * T**2 * KL`. Its temporaries are freed when it returns, so no more than one
    chunk's are ever alive."""
    kl, logq, q, p, tails = _soft_parts(zc, tc, ic, temperature)
    ce = torch.zeros((), dtype=torch.float32, device=zc.device)
    if want_hard:  # the hard part is at T = 1: at temperature 1 it is the soft part's own log-softmax
        logr = logq if temperature == 1 else F.log_softmax(zc, dim=-1)
        ce = -logr.gather(-1, yc[:, None]).sum()
    if grad is None:
        return kl.sum(), ce
    # d(w_soft T^2 KL)/dz = w_soft T (q - p~); d(w_hard CE)/dz = w_hard (softmax(z) - onehot(y)).
    if w_soft:
        g = _soft_gradient(logq, q, p, ic, tails)
        if w_soft * temperature != 1:
            g.mul_(w_soft * temperature)
    else:
        g = torch.zeros_like(zc)
    del q, p
    if want_hard and w_hard:
        h = logr.exp()
        h.scatter_add_(-1, yc[:, None], torch.full_like(yc[:, None], -1, dtype=h.dtype))
        g.add_(h, alpha=w_hard)
    if sel is None:
        grad[start : start + len(g)] = g
    else:
        grad[start : start + len(sel)][sel] = g.to(grad.dtype)
    return kl.sum(), ce


class _ChunkedDistillation(torch.autograd.Function):
    """`w_hard * hard + w_soft * soft` and its two parts, where `hard` and `soft` are the sums of the hard (CE) and
    soft (`T**2` KL) losses over the rows where `mask` is set, chunk by chunk.

    Only the weighted sum is differentiable. Its gradient is computed in the same pass as the loss, from the same
    softmaxes (each chunk's `log_softmax` is taken once, not again in the backward pass), and written into one tensor
    the size of the logits, the gradient autograd needs anyway; the backward pass only scales it. Neither model's
    logits are kept for the backward pass. `need_grad` is `False` under `torch.no_grad` or for logits that do not
    require grad (evaluation): then no gradient is computed or held.
    """

    @staticmethod
    def forward(ctx, z, t, idx, labels, mask, temperature, rows, want_hard, w_hard, w_soft, need_grad):
        hard = torch.zeros((), dtype=torch.float32, device=z.device)
        soft = torch.zeros((), dtype=torch.float32, device=z.device)
        grad = torch.zeros_like(z) if need_grad else None
        for start, sel, zc, tc, ic, yc in _chunks(z, t, idx, labels, mask, rows):
            kl, ce = _chunk_step(zc, tc, ic, yc, temperature, want_hard, w_hard, w_soft, grad, start, sel)
            soft, hard = soft + kl, hard + ce
        soft = soft * temperature**2
        total = w_hard * hard + w_soft * soft
        ctx.mark_non_differentiable(hard, soft)
        ctx.save_for_backward(grad)
        return total, hard, soft

    @staticmethod
    def backward(ctx, grad_total, _grad_hard, _grad_soft):
        (grad,) = ctx.saved_tensors
        return grad * grad_total, None, None, None, None, None, None, None, None, None, None


def loss_mask(
    shape: torch.Size,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: bool = False,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The positions that count, and the labels aligned with the logits: `(mask, labels)`, both of shape `shape`.

    A position counts when its label is not `ignore_index` (with labels) and it is attended (with an
    `attention_mask`). With `shift_labels` (causal LM) position `i` is scored against label `i + 1` and the last
    position has no label; the logits are never sliced, so no copy of them is made.
    """
    if labels is not None:
        if shift_labels:
            labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
        mask = labels.ne(ignore_index)
    elif attention_mask is not None:
        mask = attention_mask.bool()
        if shift_labels:
            mask = mask & F.pad(attention_mask[..., 1:], (0, 1), value=0).bool()
    else:
        mask = torch.ones(shape, dtype=torch.bool, device=device)
        if shift_labels:
            mask[..., -1] = False
    if attention_mask is not None and labels is not None:
        # A padding position's prediction depends on how much padding its row got: it never counts.
        mask = mask & attention_mask.bool()
    return mask.to(device) if device is not None else mask, labels


def _divide(total: torch.Tensor, count: torch.Tensor, denominator) -> torch.Tensor:
    if denominator is None:
        denominator = count
    return total / torch.as_tensor(denominator, dtype=total.dtype, device=total.device).clamp(min=1)


def _run(student_logits, teacher_logits, labels, mask, temperature, teacher_indices, want_hard, chunk_size,
         w_hard, w_soft):
    """`(w_hard * hard + w_soft * soft, hard, soft)` summed over the masked positions; only the first is differentiable."""
    width = student_logits.shape[-1]
    z = student_logits.reshape(-1, width)
    if teacher_indices is None and teacher_logits.shape[-1] != width:
        raise ValueError(
            f"The student's logits have {width} classes but the teacher's have {teacher_logits.shape[-1]}; "
            "slice both to the shared vocabulary."
        )
    t = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
    idx = None if teacher_indices is None else teacher_indices.reshape(-1, teacher_indices.shape[-1])
    m = mask.reshape(-1).to(t.device)
    # Only the counted positions hold teacher values: a padding position of a placed cache is filler, not a
    # distribution, and is never read by the loss.
    if idx is not None and bool(m.any()) and float(t[m].float().exp().sum(-1).max()) > 1.001:
        raise ValueError(
            "With `teacher_indices`, `teacher_logits` must be the top-k log-probabilities from `teacher_top_k` (their "
            "probabilities sum to at most 1), not raw logits; call `teacher_top_k(logits, k, temperature)`."
        )
    y = labels.reshape(-1) if labels is not None else mask.reshape(-1).long()  # placeholder when there are none
    m = m.to(z.device)
    rows = chunk_size or max(1, _CHUNK_ELEMENTS // width)
    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedDistillation.apply(z, t, idx, y.to(z.device), m, float(temperature), rows, want_hard,
                                      float(w_hard), float(w_soft), need_grad)


def soft_target_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    mask: torch.Tensor | None = None,
    num_items: int | torch.Tensor | None = None,
    teacher_indices: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`T**2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the unmasked positions.

    The teacher is a constant (no gradient flows to it).

    Args:
        student_logits (`torch.Tensor` of shape `(..., num_classes)`): student logits.
        teacher_logits (`torch.Tensor` of shape `(..., num_classes)` or `(..., k)`): teacher logits, or, with
            `teacher_indices`, the teacher's top-k log-probabilities at `temperature` from [`teacher_top_k`].
        temperature (`float`, *optional*, defaults to `2.0`): softening temperature, > 0.
        mask (`torch.Tensor` of shape `(...)`, *optional*): 1 where a position counts, 0 where it is ignored.
        num_items (`int` or `torch.Tensor`, *optional*): divide the summed KL by this instead of the number of
            unmasked positions (the whole accumulated batch's count, so gradient accumulation averages correctly).
        teacher_indices (`torch.Tensor` of shape `(..., k)`, *optional*): the class ids of the top-k
            log-probabilities. The KL is then taken over k + 1 buckets: the k classes and one tail holding the rest
            of each distribution's mass. It is 0 when the student equals the teacher, and with `k == num_classes`
            it equals the dense loss.
        chunk_size (`int`, *optional*): positions per chunk (default: about 2 M logits per chunk).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    mask = (
        torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
        if mask is None else mask.bool()
    )
    soft, _, _ = _run(student_logits, teacher_logits, None, mask, temperature, teacher_indices, False, chunk_size,
                      0.0, 1.0)
    return _divide(soft, mask.sum(), num_items)


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
    chunk_size: int | None = None,
) -> DistillationLoss:
    """`(1 - alpha) * CE(student, labels) + alpha * T**2 * KL(teacher_T || student_T)`.

    Both parts are averaged over the same positions ([`loss_mask`]): those whose label is not `ignore_index` (with
    labels) and that are attended (with an `attention_mask`). Computed in chunks of positions, without a full-size
    float32 copy of the logits (see the module's docstring).

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
        attention_mask (`torch.Tensor`, *optional*): padding positions (0) count in neither part.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): the number of counted positions over the whole
            accumulated batch; both sums are divided by it (the Trainer's gradient-accumulation convention).
        teacher_indices (`torch.Tensor`, *optional*): see [`soft_target_kl`].
        chunk_size (`int`, *optional*): positions per chunk.

    Returns:
        [`DistillationLoss`]: `loss` (differentiable; its gradient is computed with the loss, in the same pass) and
        the parts `hard_loss` (`None` without labels) and `soft_loss`, detached: they are for logging.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    mask, labels = loss_mask(
        student_logits.shape[:-1], labels, attention_mask, ignore_index, shift_labels, student_logits.device
    )
    with_labels = labels is not None
    total, hard_sum, soft_sum = _run(
        student_logits, teacher_logits, labels, mask, temperature, teacher_indices, with_labels, chunk_size,
        (1 - alpha) if with_labels else 0.0, alpha if with_labels else 1.0,
    )
    count = mask.sum()
    loss, soft = _divide(total, count, num_items_in_batch), _divide(soft_sum, count, num_items_in_batch)
    if not with_labels:
        return DistillationLoss(loss, None, soft)
    return DistillationLoss(loss, _divide(hard_sum, count, num_items_in_batch), soft)
