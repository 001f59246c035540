"""The distillation loss against hand computations on random tensors."""

import math

import pytest
import torch

from hf_compress.distillation import distillation_loss, soft_target_kl


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


def test_topk_with_full_k_equals_dense_and_smaller_k_is_close():
    torch.manual_seed(7)
    s, t = torch.randn(3, 4, 50), torch.randn(3, 4, 50) * 3
    dense = soft_target_kl(s, t, 2.0)
    vals, idx = t.topk(50, dim=-1)
    assert soft_target_kl(s, vals, 2.0, teacher_indices=idx).item() == pytest.approx(dense.item(), rel=1e-5)
    vals, idx = t.topk(40, dim=-1)
    assert soft_target_kl(s, vals, 2.0, teacher_indices=idx).item() == pytest.approx(dense.item(), rel=0.1)


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
