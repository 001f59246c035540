"""The distillation loss against hand computations on random tensors."""

import math

import pytest
import torch

from hf_compress.distillation import distillation_loss, soft_target_kl, teacher_top_k


def hand_kl(s, t, T):
    """KL(p_t || p_s) * T^2 for one row, written out from the definition."""
    ps = [math.exp(x / T) for x in s]
    pt = [math.exp(x / T) for x in t]
    zs, zt = sum(ps), sum(pt)
    return T * T * sum((b / zt) * math.log((b / zt) / (a / zs)) for a, b in zip(ps, pt))


def hand_ce(s, y):
    return -(s[y] - math.log(sum(math.exp(x) for x in s)))


@pytest.mark.parametrize("T", [1.0, 2.0, 4.5])
def test_soft_loss_matches_hand_computation(T):
    torch.manual_seed(0)
    s, t = torch.randn(5, 7), torch.randn(5, 7)
    expected = sum(hand_kl(s[i].tolist(), t[i].tolist(), T) for i in range(5)) / 5
    assert soft_target_kl(s, t, T).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mixed_loss_and_alpha_limits(alpha):
    torch.manual_seed(1)
    s, t, y = torch.randn(6, 4), torch.randn(6, 4), torch.tensor([0, 3, 1, 2, 2, 0])
    T = 3.0
    hard = sum(hand_ce(s[i].tolist(), y[i].item()) for i in range(6)) / 6
    soft = sum(hand_kl(s[i].tolist(), t[i].tolist(), T) for i in range(6)) / 6
    out = distillation_loss(s, t, y, temperature=T, alpha=alpha)
    assert out.hard_loss.item() == pytest.approx(hard, rel=1e-5)
    assert out.soft_loss.item() == pytest.approx(soft, rel=1e-5)
    assert out.loss.item() == pytest.approx((1 - alpha) * hard + alpha * soft, rel=1e-5)


def test_alpha_zero_is_plain_cross_entropy_and_identical_teacher_gives_zero_kl():
    torch.manual_seed(2)
    s, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    out = distillation_loss(s, torch.randn(8, 5), y, alpha=0.0)
    assert out.loss.item() == pytest.approx(torch.nn.functional.cross_entropy(s, y).item(), rel=1e-6)
    assert distillation_loss(s, s.clone(), y, alpha=1.0).loss.item() == pytest.approx(0.0, abs=1e-6)


def test_ignored_positions_count_in_neither_part():
    torch.manual_seed(3)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 1] = y[1, 4] = -100
    keep = y.ne(-100)
    out = distillation_loss(s, t, y, temperature=2.0, alpha=0.5)
    ref = distillation_loss(s[keep], t[keep], y[keep], temperature=2.0, alpha=0.5)
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)
    # Changing the logits at ignored positions changes nothing.
    s2 = s.clone()
    s2[0, 1] += 100
    assert distillation_loss(s2, t, y).loss.item() == pytest.approx(out.loss.item(), rel=1e-6)


def test_gradient_accumulation_normalisation_equals_one_big_batch():
    """Two micro-batches each divided by the whole batch's label count sum to the one-batch loss."""
    torch.manual_seed(4)
    s, t = torch.randn(4, 6, 9), torch.randn(4, 6, 9)
    y = torch.randint(0, 9, (4, 6))
    y[0, :4] = -100  # unequal label counts per micro-batch: a per-micro-batch mean would be wrong
    n = y.ne(-100).sum()
    full = distillation_loss(s, t, y, num_items_in_batch=None).loss
    parts = sum(distillation_loss(s[i : i + 2], t[i : i + 2], y[i : i + 2], num_items_in_batch=n).loss for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), rel=1e-5)
    naive = sum(distillation_loss(s[i : i + 2], t[i : i + 2], y[i : i + 2]).loss for i in (0, 2)) / 2
    assert naive.item() != pytest.approx(full.item(), rel=1e-3)


def test_causal_shift_drops_last_logit_and_first_label():
    torch.manual_seed(5)
    s, t, y = torch.randn(2, 6, 13), torch.randn(2, 6, 13), torch.randint(0, 13, (2, 6))
    out = distillation_loss(s, t, y, shift_labels=True)
    ref = distillation_loss(s[:, :-1], t[:, :-1], y[:, 1:])
    assert out.loss.item() == pytest.approx(ref.loss.item(), rel=1e-6)


def test_without_labels_the_loss_is_the_soft_part_over_attended_positions():
    torch.manual_seed(6)
    s, t = torch.randn(2, 5, 7), torch.randn(2, 5, 7)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = distillation_loss(s, t, None, alpha=0.2, attention_mask=mask)
    assert out.hard_loss is None
    assert out.loss.item() == pytest.approx(soft_target_kl(s[mask.bool()], t[mask.bool()]).item(), rel=1e-6)


def test_topk_with_full_k_equals_dense():
    torch.manual_seed(7)
    s, t = torch.randn(3, 4, 50), torch.randn(3, 4, 50) * 3
    dense = soft_target_kl(s, t, 2.0)
    logp, idx = teacher_top_k(t, 50, 2.0)
    assert soft_target_kl(s, logp, 2.0, teacher_indices=idx).item() == pytest.approx(dense.item(), rel=1e-5)


@pytest.mark.parametrize("k", [1, 5, 20])
def test_topk_student_equal_to_teacher_has_zero_soft_loss(k):
    """The tail bucket keeps the rest of the mass: renormalising over the top k would give log(1 / mass) > 0."""
    torch.manual_seed(8)
    t = torch.randn(2, 6, 50) * 2
    logp, idx = teacher_top_k(t, k, 3.0)
    assert soft_target_kl(t.clone(), logp, 3.0, teacher_indices=idx).item() == pytest.approx(0.0, abs=1e-5)
    out = distillation_loss(t.clone(), logp, torch.randint(0, 50, (2, 6)), 3.0, 1.0, teacher_indices=idx)
    assert out.soft_loss.item() == pytest.approx(0.0, abs=1e-5)


def test_topk_applies_temperature_before_truncation_and_matches_hand_kl():
    torch.manual_seed(9)
    s, t, T, k = torch.randn(4, 12), torch.randn(4, 12) * 2, 2.5, 3
    logp, idx = teacher_top_k(t, k, T)
    expected = 0.0
    for r in range(4):
        pt = torch.softmax(t[r] / T, -1).tolist()  # softened over all 12 classes, then truncated
        ps = torch.softmax(s[r] / T, -1).tolist()
        top = sorted(range(12), key=lambda j: -pt[j])[:k]
        assert idx[r].tolist() == top
        assert logp[r].tolist() == pytest.approx([math.log(pt[j]) for j in top], rel=1e-5)
        p_tail, q_tail = 1 - sum(pt[j] for j in top), 1 - sum(ps[j] for j in top)
        kl = sum(pt[j] * math.log(pt[j] / ps[j]) for j in top) + p_tail * math.log(p_tail / q_tail)
        expected += T * T * kl / 4
    assert soft_target_kl(s, logp, T, teacher_indices=idx).item() == pytest.approx(expected, rel=1e-5)


def _reference(s, t, y, T, alpha, idx=None):
    """The loss written with plain autograd ops on full float32 tensors (no chunks, no custom backward)."""
    logq = torch.log_softmax(s.float() / T, -1)
    if idx is None:
        logp = torch.log_softmax(t.float() / T, -1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
    else:
        p_k = t.exp()
        p_tail = 1 - p_k.sum(-1)
        q_tail = 1 - logq.exp().gather(-1, idx).sum(-1)
        kl = (p_k * (t - logq.gather(-1, idx))).sum(-1) + p_tail * (p_tail.log() - q_tail.log())
    keep = y.ne(-100)
    ce = torch.nn.functional.cross_entropy(s.float()[keep], y[keep])
    return (1 - alpha) * ce + alpha * T * T * kl[keep].mean()


@pytest.mark.parametrize("top_k", [None, 7])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_chunked_loss_and_gradient_equal_plain_autograd(top_k, chunk_size):
    torch.manual_seed(10)
    s = torch.randn(3, 5, 40, requires_grad=True)
    t = torch.randn(3, 5, 40) * 2
    y = torch.randint(0, 40, (3, 5))
    y[0, :2] = y[2, 4] = -100
    idx = None
    if top_k:
        t, idx = teacher_top_k(t, top_k, 2.0)
    out = distillation_loss(s, t, y, 2.0, 0.3, teacher_indices=idx, chunk_size=chunk_size)
    (grad,) = torch.autograd.grad(out.loss * 1.7, s)
    s2 = s.detach().clone().requires_grad_(True)
    ref = _reference(s2, t, y, 2.0, 0.3, idx)
    (ref_grad,) = torch.autograd.grad(ref * 1.7, s2)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert grad[0, :2].abs().sum() == 0 and grad[2, 4].abs().sum() == 0  # ignored positions get no gradient


def test_bf16_logits_get_a_bf16_gradient_close_to_float32():
    torch.manual_seed(11)
    s = torch.randn(2, 6, 64)
    t, y = torch.randn(2, 6, 64), torch.randint(0, 64, (2, 6))
    s16 = s.bfloat16().requires_grad_(True)
    s32 = s.bfloat16().float().requires_grad_(True)
    distillation_loss(s16, t, y).loss.backward()
    distillation_loss(s32, t, y).loss.backward()
    assert s16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s16.grad.float(), s32.grad, rtol=2e-2, atol=1e-3)


def test_gradient_flows_to_student_only():
    s = torch.randn(4, 3, requires_grad=True)
    t = torch.randn(4, 3, requires_grad=True)
    distillation_loss(s, t.detach(), torch.tensor([0, 1, 2, 0])).loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0 and t.grad is None


@pytest.mark.parametrize(
    "kwargs, message",
    [({"temperature": 0.0}, "temperature must be > 0, got 0.0"), ({"alpha": 1.5}, r"alpha must be in \[0, 1\], got 1.5")],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), **kwargs)


def test_raw_topk_logits_are_refused_in_one_line():
    t = torch.randn(2, 10) * 3
    values, idx = t.topk(4, dim=-1)
    with pytest.raises(ValueError, match=r"^With `teacher_indices`, `teacher_logits` must be the top-k log-probabilities"):
        soft_target_kl(torch.randn(2, 10), values + 5, teacher_indices=idx)


@pytest.mark.parametrize("alpha, T, top_k", [(0.0, 2.0, None), (1.0, 2.0, None), (1.0, 1.0, None), (0.6, 1.0, None),
                                              (1.0, 1.0, 7), (0.0, 1.5, 7)])
def test_one_pass_gradient_equals_plain_autograd_at_every_mix_and_temperature(alpha, T, top_k):
    """The gradient is computed in the forward pass (the soft part's log-softmax reused for the hard part at T = 1,
    either part skipped at weight 0) and only scaled in the backward pass: equal to autograd's for every mix."""
    torch.manual_seed(11)
    s = torch.randn(2, 6, 33, requires_grad=True)
    t = torch.randn(2, 6, 33) * 3
    y = torch.randint(0, 33, (2, 6))
    y[1, 0] = -100
    idx = None
    if top_k:
        t, idx = teacher_top_k(t, top_k, T)
    out = distillation_loss(s, t, y, T, alpha, teacher_indices=idx, chunk_size=5)
    (grad,) = torch.autograd.grad(out.loss * 0.37, s)
    s2 = s.detach().clone().requires_grad_(True)
    ref = _reference(s2, t, y, T, alpha, idx)
    (ref_grad,) = torch.autograd.grad(ref * 0.37, s2)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-7)
    assert grad.abs().sum() > 0 and grad[1, 0].abs().sum() == 0
    # the logged parts are the two losses, and carry no gradient
    keep = y.ne(-100)
    ce = torch.nn.functional.cross_entropy(s.detach()[keep], y[keep])
    assert out.hard_loss.item() == pytest.approx(ce.item(), rel=1e-5)
    assert not out.hard_loss.requires_grad and not out.soft_loss.requires_grad
    assert out.loss.item() == pytest.approx((1 - alpha) * out.hard_loss.item() + alpha * out.soft_loss.item(), rel=1e-5)


def test_no_gradient_is_computed_or_held_without_grad_and_a_retained_graph_backpropagates_twice():
    torch.manual_seed(12)
    s = torch.randn(4, 9, requires_grad=True)
    t, y = torch.randn(4, 9), torch.tensor([0, 3, 8, 1])
    with torch.no_grad():
        out = distillation_loss(s, t, y, 2.0, 0.5)
    assert not out.loss.requires_grad and out.loss.grad_fn is None
    held = distillation_loss(s, t, y, 2.0, 0.5).loss
    node = held.grad_fn  # the loss is divided inside the function: its node is the loss's own
    assert type(node).__name__ == "_ChunkedDistillationBackward"
    saved = [tuple(x.shape) for x in node.saved_tensors if x is not None]
    assert saved == [tuple(s.shape)]  # one logits-size gradient, no logits
    kept = distillation_loss(s.detach(), t, y, 2.0, 0.5).loss  # logits without grad: nothing to hold
    assert kept.grad_fn is None
    held.backward(retain_graph=True)
    first = s.grad.clone()
    held.backward()
    torch.testing.assert_close(s.grad, 2 * first)  # the saved gradient is scaled, never modified in place
