"""Knowledge-distillation losses as pure functions of tensors.

Hinton, Vinyals & Dean (2015), "Distilling the Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531:
the student matches the teacher's distribution softened at a temperature `T`; the KL term is multiplied by
`T**2` so that its gradients keep the same scale as the hard-label loss when `T` changes.

Large vocabularies: the logits of a causal LM are `[batch, length, vocab]` (4 x 128 x 49,152 fp32 = 100 MB). The
loss below never makes a full-size float32 copy of them: it walks over the positions in chunks and, from each chunk's
softmaxes, computes both the loss and its gradient in the same pass, written straight into one tensor the size of the
logits (the gradient autograd needs anyway, in the logits' dtype); the backward pass only scales it. Neither model's
logits are held for the backward pass.

Causal LMs' output heads: given as [`HeadLogits`] (the hidden states the output head reads, and the head), the
logits are never built at all: each chunk is projected, its loss and gradient computed, and the gradient taken on
through the head at once, into the hidden states' gradient and the head's own (kept in float32 while chunks add
into it). What is held for the backward pass is then hidden-sized, not vocabulary-sized.

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


class HeadLogits(NamedTuple):
    """A causal LM's logits, not yet computed: `transform(hidden @ weight[:width].T + bias[:width])`, where the
    transform is the family's (multiply by `scale`, divide by `divisor`, then `tanh(x / softcap) * softcap`; each
    skipped when `None`), in the head's dtype, as the model's own forward computes them. Pass one wherever the losses
    below take logits: the chunks are projected one at a time and the gradient reaches `hidden`, `weight` and `bias`
    (where they require it) without the `[positions, vocab]` logits ever existing.

    `hf_compress.distillation.heads` reads these off a model and checks them against its forward.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float | None = None
    divisor: float | None = None
    softcap: float | None = None
    width: int | None = None

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.hidden.shape[:-1], self.width or self.weight.shape[0]))

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of `hidden` (any leading shape), computed as the family's forward does."""
        w, b = self.weight, self.bias
        if self.width is not None:
            w, b = w[: self.width], None if b is None else b[: self.width]
        z = F.linear(hidden, w, b)
        if self.scale is not None:
            z = z * self.scale
        if self.divisor is not None:
            z = z / self.divisor
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def logits(self) -> torch.Tensor:
        """All the logits at once (what the model's forward returns; for checks and small inputs)."""
        return self.project(self.hidden)

    def chain(self, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """`d loss / d(hidden @ weight.T + bias)` from `d loss / d logits` (`grad`, float32) and the logits `z`."""
        if self.softcap is not None:
            grad = grad * (1 - (z.float() / self.softcap) ** 2)  # d/dx tanh(x / c) * c = 1 - tanh^2
        if self.divisor is not None:
            grad = grad / self.divisor
        if self.scale is not None:
            grad = grad * self.scale
        return grad


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


def _chunks(mask, rows):
    """`(start, sel, pick)` of each chunk of `rows` positions that has a counted position: `pick` selects the counted
    rows of the chunk; `sel` is `None` (and `pick` a full slice, so chunks are views) when every position counts."""
    for start in range(0, mask.shape[0], rows):
        sel = mask[start : start + rows]
        if not bool(sel.any()):
            continue
        if bool(sel.all()):
            yield start, None, slice(None)
        else:
            yield start, sel, sel


def _soft_gradient(logq, q, p, idx, tails):
    """`d KL / d(z / T)` of one chunk: `q - p~`, where `p~` is the teacher's distribution; with a tail bucket, the
    classes outside the top k get the student's own shape scaled to the teacher's tail mass (`q_j * p_tail / q_tail`)."""
    if idx is None:
        return logq.exp().sub_(p)
    p_tail, q_tail = tails
    g = q * (1 - p_tail / q_tail)[:, None]
    g.scatter_(-1, idx, q.gather(-1, idx) - p)
    return g


def _chunk_step(zc, tc, ic, yc, temperature, want_hard, w_hard, w_soft, need_grad):
    """One chunk (float32 logits): its summed KL (without the T**2), its summed CE, and, with `need_grad`, the
    gradient of `w_hard * CE + w_soft * T**2 * KL` with respect to `zc` (else `None`). Its temporaries are freed when
    it returns, so no more than one chunk's are ever alive."""
    kl, logq, q, p, tails = _soft_parts(zc, tc, ic, temperature)
    ce = torch.zeros((), dtype=torch.float32, device=zc.device)
    if want_hard:  # the hard part is at T = 1: at temperature 1 it is the soft part's own log-softmax
        logr = logq if temperature == 1 else F.log_softmax(zc, dim=-1)
        ce = -logr.gather(-1, yc[:, None]).sum()
    if not need_grad:
        return kl.sum(), ce, None
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
    return kl.sum(), ce, g


class _Options(NamedTuple):
    temperature: float
    rows: int
    want_hard: bool
    w_hard: float
    w_soft: float
    need_grad: bool
    denominator: float
    student_head: HeadLogits | None  # without its tensors: `hidden`, `weight`, `bias` are the Function's inputs
    teacher_head: HeadLogits | None


def _rows_of(x, start, rows, pick):
    if torch.is_tensor(pick) and pick.device != x.device:
        pick = pick.to(x.device)
    return x[start : start + rows][pick]


class _ChunkedDistillation(torch.autograd.Function):
    """`(w_hard * hard + w_soft * soft) / denominator` and its two parts (each divided by `denominator` too), where
    `hard` and `soft` are the sums of the hard (CE) and soft (`T**2` KL) losses over the rows where `mask` is set,
    chunk by chunk.

    Only the first output is differentiable. Its gradient is computed in the same pass as the loss, from the same
    softmaxes (each chunk's `log_softmax` is taken once, not again in the backward pass), and held for the backward
    pass, which returns it as it is (a loss backpropagated as it is, `d output = 1`) or scaled. Neither model's logits
    are kept. With logits (`opts.student_head` `None`) the held gradient is the logits'; with a head, `z` is the
    hidden states and the held gradients are those of `z`, `weight` and `bias` (float32 for the head's while chunks
    add into it). `opts.need_grad` is `False` under `torch.no_grad` or for inputs that do not require grad
    (evaluation): then no gradient is computed or held.
    """

    @staticmethod
    def forward(ctx, z, weight, bias, t, t_weight, t_bias, idx, labels, mask, opts):
        sh, th = opts.student_head, opts.teacher_head
        hard = torch.zeros((), dtype=torch.float32, device=z.device)
        soft = torch.zeros((), dtype=torch.float32, device=z.device)
        need_w = opts.need_grad and sh is not None and weight.requires_grad
        need_b = opts.need_grad and sh is not None and bias is not None and bias.requires_grad
        grad = torch.zeros_like(z) if opts.need_grad else None
        # Written by the first chunk, added into by the others (no pass to zero it); zeroed only if no chunk counts.
        grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        first = True
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # The gradient's multipliers include 1 / denominator, so that a loss backpropagated as it is needs no copy.
        w_hard, w_soft = opts.w_hard / opts.denominator, opts.w_soft / opts.denominator
        rows = opts.rows
        for start, sel, pick in _chunks(mask, rows):
            zin = _rows_of(z, start, rows, pick)
            zm = zin if sh is None else sh._replace(weight=weight, bias=bias).project(zin)
            tin = _rows_of(t, start, rows, pick)  # a teacher head projects on the teacher's device
            tc = (tin if th is None else th._replace(weight=t_weight, bias=t_bias).project(tin)).to(z.device).float()
            ic = None if idx is None else _rows_of(idx, start, rows, pick).to(z.device).long()
            yc = None if labels is None else _rows_of(labels, start, rows, pick).long()
            kl, ce, g = _chunk_step(zm.float(), tc, ic, yc, opts.temperature, opts.want_hard, w_hard, w_soft,
                                    opts.need_grad)
            del tc
            soft, hard = soft + kl, hard + ce
            if g is None:
                continue
            if sh is not None:  # on through the head: d hidden = d u @ W, d W += d u^T hidden, d b += sum d u
                g = sh.chain(zm, g)
                w = weight if sh.width is None else weight[: sh.width]
                if need_w:
                    if first and sh.width is not None:
                        grad_w[sh.width :].zero_()
                    gw = grad_w if sh.width is None else grad_w[: sh.width]
                    if first:
                        torch.mm(g.t(), zin.float(), out=gw)
                    else:
                        gw.addmm_(g.t(), zin.float())
                    first = False
                if need_b:
                    (grad_b if sh.width is None else grad_b[: sh.width]).add_(g.sum(0))
                g = g.to(w.dtype) @ w
            del zm
            if sel is None:
                grad[start : start + len(g)] = g
            else:
                grad[start : start + len(sel)][sel] = g.to(grad.dtype)
        soft = soft * opts.temperature**2
        total = (opts.w_hard * hard + opts.w_soft * soft) / opts.denominator
        hard, soft = hard / opts.denominator, soft / opts.denominator
        ctx.mark_non_differentiable(hard, soft)
        if grad_w is not None and first:
            grad_w.zero_()
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None and grad_b.dtype != bias.dtype:
            grad_b = grad_b.to(bias.dtype)
        ctx.save_for_backward(grad, grad_w, grad_b)
        return total, hard, soft

    @staticmethod
    def backward(ctx, grad_total, _grad_hard, _grad_soft):
        grads = ctx.saved_tensors
        # `loss.backward()` on the loss as it is (d output = 1): the held gradients are returned as they are, no copy;
        # a scaled loss (gradient accumulation, a multiplied loss) gets scaled copies.
        if not bool(grad_total == 1):
            grads = [None if g is None else g * grad_total for g in grads]
        return (*grads, None, None, None, None, None, None, None)


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


def _denominator(count: torch.Tensor, denominator) -> float:
    return max(1.0, float(count if denominator is None else denominator))


def _head_rows(logits) -> int:
    """Positions per chunk: about 2 M logits; for a projected head ([`HeadLogits`]) at least a quarter of the hidden
    size. Each chunk reads the whole head weight (`[vocab, hidden]`) two or three times, and a trained head adds the
    chunk's `d W` into its gradient: with chunks of `hidden / 4` positions that traffic stays small next to the
    products (measured at SmolLM2's and Gemma-3's vocabularies: 42- and 8-position chunks made the loss 25% slower
    than the full logits, 144-position chunks 2-7%), and the chunk's few float32 temporaries (`rows x vocab` each)
    stay within about one `[vocab, hidden]` gradient, which the backward pass holds anyway."""
    rows = max(1, _CHUNK_ELEMENTS // logits.shape[-1])
    if isinstance(logits, HeadLogits):
        rows = max(rows, logits.hidden.shape[-1] // 4)
    return rows


def _run(student_logits, teacher_logits, labels, mask, temperature, teacher_indices, want_hard, chunk_size,
         w_hard, w_soft, denominator):
    """`((w_hard * hard + w_soft * soft) / denominator, hard / denominator, soft / denominator)`, the sums over the
    masked positions; only the first is differentiable. Either model's logits may be [`HeadLogits`]."""
    width = student_logits.shape[-1]
    sh = student_logits if isinstance(student_logits, HeadLogits) else None
    th = teacher_logits if isinstance(teacher_logits, HeadLogits) else None
    if th is not None and teacher_indices is not None:
        raise ValueError("`teacher_indices` go with cached top-k log-probabilities, not with a teacher's `HeadLogits`.")
    if teacher_indices is None and teacher_logits.shape[-1] != width:
        raise ValueError(
            f"The student's logits have {width} classes but the teacher's have {teacher_logits.shape[-1]}; "
            "slice both to the shared vocabulary."
        )
    z = (student_logits if sh is None else sh.hidden)
    z = z.reshape(-1, z.shape[-1])
    t = teacher_logits if th is None else th.hidden
    t = t.detach().reshape(-1, t.shape[-1])
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
    rows = chunk_size or _head_rows(student_logits)
    grads_in = [z] if sh is None else [z, sh.weight, *([] if sh.bias is None else [sh.bias])]
    need_grad = torch.is_grad_enabled() and any(x.requires_grad for x in grads_in)
    opts = _Options(float(temperature), rows, want_hard, float(w_hard), float(w_soft), need_grad, denominator,
                    None if sh is None else sh._replace(hidden=None, weight=None, bias=None),
                    None if th is None else th._replace(hidden=None, weight=None, bias=None))
    return _ChunkedDistillation.apply(
        z, None if sh is None else sh.weight, None if sh is None else sh.bias, t,
        None if th is None else th.weight.detach(), None if th is None or th.bias is None else th.bias.detach(),
        idx, y.to(z.device), m, opts,
    )


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
        student_logits (`torch.Tensor` of shape `(..., num_classes)` or [`HeadLogits`]): student logits.
        teacher_logits (`torch.Tensor` of shape `(..., num_classes)` or `(..., k)`, or [`HeadLogits`]): teacher
            logits, or, with `teacher_indices`, the teacher's top-k log-probabilities at `temperature` from
            [`teacher_top_k`].
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
                      0.0, 1.0, _denominator(mask.sum(), num_items))
    return soft


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
        student_logits (`torch.Tensor` of shape `(batch, [seq,] num_classes)` or [`HeadLogits`]): student logits, or
            the hidden states and output head that give them (projected chunk by chunk; the gradient reaches the
            hidden states and the head).
        teacher_logits (`torch.Tensor` or [`HeadLogits`]): teacher logits of the same shape (or top-k, see
            `teacher_indices`), or the teacher's hidden states and head.
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
    loss, hard, soft = _run(
        student_logits, teacher_logits, labels, mask, temperature, teacher_indices, with_labels, chunk_size,
        (1 - alpha) if with_labels else 0.0, alpha if with_labels else 1.0, _denominator(mask.sum(), num_items_in_batch),
    )
    return DistillationLoss(loss, hard if with_labels else None, soft)
