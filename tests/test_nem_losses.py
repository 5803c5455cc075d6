"""Losses against hand-computed values on tiny tensors; the smoothing operator."""

from __future__ import annotations

import math

import pytest
import torch

from xaiserve.handlers.nem.losses import NemULossConfig, mask_l1, nemt_deletion_loss, nemt_preservation_loss, nemu_loss
from xaiserve.handlers.nem.smoothing import (
    box_kernel,
    box_smooth,
    random_kernels,
    scaled_size,
    smooth_with,
    stochastic_smooth,
)

MASK = torch.tensor([[[[0.5, 1.0], [0.0, 0.5]]]])  # ||m||_1 as the pixel mean = 0.5


def test_mask_l1_is_the_pixel_mean():
    assert mask_l1(MASK).tolist() == [0.5]


def test_nemu_loss_matches_eq_5_by_hand():
    z = torch.tensor([[1.0, 0.0]])
    z_m = torch.tensor([[1.0, 1.0]])
    z_bar = torch.tensor([[0.0, 1.0]])
    loss, parts = nemu_loss(z, z_m, z_bar, MASK)
    r = 1 / math.sqrt(2)
    p_d, n_d = -r, -r  # eq. 8 and 9
    expected = (1.5 - n_d) * p_d + 1.0 * 0.5  # eq. 5, lambda1 = 1.5, lambda2 = 1
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert parts["P_d"].item() == pytest.approx(p_d, abs=1e-6)
    assert parts["N_d"].item() == pytest.approx(n_d, abs=1e-6)
    # other weights enter as written
    loss2, _ = nemu_loss(z, z_m, z_bar, MASK, NemULossConfig(lambda1=2.0, lambda2=0.0))
    assert loss2.item() == pytest.approx((2.0 + r) * -r, abs=1e-6)


def test_nemu_loss_prefers_a_sparse_faithful_mask():
    z = torch.tensor([[1.0, 0.0]])
    faithful, _ = nemu_loss(z, z, torch.tensor([[0.0, 1.0]]), torch.full((1, 1, 2, 2), 0.25))
    unfaithful, _ = nemu_loss(z, torch.tensor([[0.0, 1.0]]), z, torch.full((1, 1, 2, 2), 0.25))
    dense, _ = nemu_loss(z, z, torch.tensor([[0.0, 1.0]]), torch.ones(1, 1, 2, 2))
    assert faithful < unfaithful and faithful < dense


def test_nemt_preservation_loss_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    logits_m = torch.tensor([[0.0, 0.0]])  # softmax = [0.5, 0.5]
    loss, parts = nemt_preservation_loss(logits, logits_m, MASK, torch.tensor([1]))
    assert parts["dist"].item() == pytest.approx(0.0625, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 + 2 * 0.0625, abs=1e-6)
    loss0, _ = nemt_preservation_loss(logits, logits_m, MASK, torch.tensor([0]))
    assert loss0.item() == pytest.approx(0.5 + 2 * 0.0625, abs=1e-6)  # |0.5 - 0.25| as well


def test_nemt_deletion_loss_by_hand():
    """On softmax probabilities (the authors' inverse option): with two classes p_0 = sigmoid(l_0 - l_1)."""
    logits = torch.tensor([[2.0, -1.0], [0.0, 3.0]])
    logits_del = torch.tensor([[0.5, -1.0], [0.0, 1.0]])
    mask = torch.cat([MASK, torch.ones(1, 1, 2, 2)])
    loss, parts = nemt_deletion_loss(logits, logits_del, mask, torch.tensor([0, 1]), lambda1=0.5)
    sig = lambda v: 1.0 / (1.0 + math.exp(-v))
    # image 0, target 0: p(x) = sigmoid(3) = 0.952574, p(x*(1-m)) = sigmoid(1.5) = 0.817574
    # image 1, target 1: p(x) = sigmoid(3) = 0.952574, p(x*(1-m)) = sigmoid(1) = 0.731059
    d0, d1 = (sig(3.0) - sig(1.5)) ** 2, (sig(3.0) - sig(1.0)) ** 2
    assert d0 == pytest.approx(0.018225, abs=1e-6) and d1 == pytest.approx(0.049069, abs=1e-6)
    per = [-d0 + 0.5 * 0.5, -d1 + 0.5 * 1.0]  # ||m||_1 = 0.5 and 1.0 (means over pixels)
    assert loss.item() == pytest.approx(sum(per) / 2, abs=1e-6)
    assert parts["dist"].item() == pytest.approx((d0 + d1) / 2, abs=1e-6)


def test_nemt_deletion_loss_is_bounded():
    """A target-logit drop of 100 gave -9999.95 on logits; on probabilities the loss stays in [-1, lambda1]."""
    logits = torch.tensor([[100.0, 0.0]])
    logits_del = torch.tensor([[0.0, 0.0]])
    empty, full = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    loss, parts = nemt_deletion_loss(logits, logits_del, empty, torch.tensor([0]), lambda1=0.5)
    assert loss.item() == pytest.approx(-((1.0 - 0.5) ** 2), abs=1e-6)  # p: 1 -> 0.5
    worst, _ = nemt_deletion_loss(
        torch.tensor([[100.0, -100.0]]), torch.tensor([[-100.0, 100.0]]), empty, torch.tensor([0]), lambda1=0.5
    )
    assert worst.item() == pytest.approx(-1.0, abs=1e-6)
    most, _ = nemt_deletion_loss(logits, logits, full, torch.tensor([0]), lambda1=0.5)
    assert most.item() == pytest.approx(0.5, abs=1e-6)


def test_one_sided_nemt_losses_count_only_a_drop_of_the_target():
    """one_sided (two-finding images): a RISE of the target probability is neither rewarded (deletion)
    nor penalised (preservation); a drop counts as in the two-sided form."""
    logits = torch.tensor([[0.0, math.log(3.0)]])  # softmax = [0.25, 0.75]
    other = torch.tensor([[0.0, 0.0]])  # softmax = [0.5, 0.5]: target 0 rises 0.25 -> 0.5, target 1 drops 0.75 -> 0.5
    rise, drop = torch.tensor([0]), torch.tensor([1])
    # preservation: ||m||_1 = 0.5 plus 2 relu(p - p_m)^2
    lr, pr = nemt_preservation_loss(logits, other, MASK, rise, one_sided=True)
    ld, pd = nemt_preservation_loss(logits, other, MASK, drop, one_sided=True)
    assert pr["dist"].item() == 0.0 and lr.item() == pytest.approx(0.5, abs=1e-6)
    assert pd["dist"].item() == pytest.approx(0.0625, abs=1e-6) and ld.item() == pytest.approx(0.625, abs=1e-6)
    # deletion: -relu(p - p_del)^2 + 0.5 ||m||_1
    lr, pr = nemt_deletion_loss(logits, other, MASK, rise, lambda1=0.5, one_sided=True)
    ld, pd = nemt_deletion_loss(logits, other, MASK, drop, lambda1=0.5, one_sided=True)
    assert pr["dist"].item() == 0.0 and lr.item() == pytest.approx(0.25, abs=1e-6)
    assert ld.item() == pytest.approx(-0.0625 + 0.25, abs=1e-6)
    two_sided, _ = nemt_deletion_loss(logits, other, MASK, rise, lambda1=0.5)
    assert two_sided.item() == pytest.approx(-0.0625 + 0.25, abs=1e-6)  # the two-sided form rewards the rise


def test_random_kernels_are_positive_and_sum_to_one():
    k = random_kernels(16, 21, torch.Generator().manual_seed(0))
    assert k.shape == (16, 1, 21, 21)
    assert (k > 0).all()
    torch.testing.assert_close(k.sum(dim=(2, 3)), torch.ones(16, 1))
    assert not torch.allclose(k[0], k[1])  # a fresh draw per sample


def test_smoothing_keeps_constants_and_range():
    const = torch.full((2, 1, 32, 32), 0.3)
    torch.testing.assert_close(smooth_with(const, random_kernels(2, 21)), const)
    torch.testing.assert_close(box_smooth(const), const)
    m = torch.rand(2, 1, 32, 32)
    s = smooth_with(m, random_kernels(2, 21))
    assert s.min() >= m.min() - 1e-6 and s.max() <= m.max() + 1e-6  # a convex combination


@pytest.mark.slow
def test_inference_smoothing_is_deterministic_and_the_expected_kernel():
    m = torch.rand(3, 1, 32, 32)
    a = stochastic_smooth(m, 21, training=False)
    b = stochastic_smooth(m, 21, training=False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, smooth_with(m, box_kernel(21).expand(3, 1, 21, 21)), atol=1e-6, rtol=0)
    t1 = stochastic_smooth(m, 21, training=True)
    t2 = stochastic_smooth(m, 21, training=True)
    assert not torch.allclose(t1, t2)
    # the average of many random-kernel smoothings converges to the box smoothing (E[kernel] = box)
    g = torch.Generator().manual_seed(1)
    mean = torch.stack([smooth_with(m[:1], random_kernels(1, 21, g)) for _ in range(400)]).mean(0)
    assert (mean - a[:1]).abs().max() < 0.01


def test_scaled_neighbourhood_keeps_the_papers_relative_extent():
    # 21 px at the paper's 224 px input; odd sizes only, so the box has a centre pixel
    assert scaled_size(224) == 21
    assert scaled_size(64) == 7
    assert scaled_size(128) == 13
    assert scaled_size(16) == 3  # never below 3: a 1 x 1 "neighbourhood" would switch the averaging off
    assert all(scaled_size(s) % 2 == 1 for s in range(1, 600))
    with pytest.raises(ValueError, match="image size"):
        scaled_size(0)
