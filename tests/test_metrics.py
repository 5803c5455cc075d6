"""training/metrics.py: hand-made maps with known scores, and cross-checks against Quantus 0.6.0."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from xaiserve.errors import InvalidArgument
from xaiserve.training import metrics as M

H = W = 8


def _gt_box(y0=2, y1=4, x0=3, x1=6) -> np.ndarray:
    g = np.zeros((1, H, W), bool)
    g[0, y0:y1, x0:x1] = True
    return g


# -- hand-made maps ---------------------------------------------------------------------------------


def test_map_exactly_on_ground_truth_scores_perfectly():
    gt = _gt_box()
    a = gt.astype(np.float32)
    assert M.pointing_game(a, gt)[0] == 1.0
    assert M.relevance_rank(a, gt)[0] == 1.0
    assert M.relevance_mass(a, gt)[0] == 1.0


def test_map_outside_ground_truth_scores_zero():
    gt = _gt_box()
    a = (~gt).astype(np.float32)
    assert M.pointing_game(a, gt)[0] == 0.0
    assert M.relevance_rank(a, gt)[0] == 0.0
    assert M.relevance_mass(a, gt)[0] == 0.0


def test_constant_map_scores_chance_and_maximal_entropy():
    gt = _gt_box()  # 6 of 64 pixels
    a = np.full((1, H, W), 0.3)
    assert M.pointing_game(a, gt)[0] == pytest.approx(6 / 64)
    assert M.relevance_mass(a, gt)[0] == pytest.approx(6 / 64)
    assert M.complexity(a)[0] == pytest.approx(np.log(64))
    assert M.sparseness(a)[0] == pytest.approx(0.0, abs=1e-12)


def test_hand_computed_values():
    gt = np.zeros((1, 2, 2), bool)
    gt[0, 0, :] = True  # the top row
    a = np.array([[[4.0, 1.0], [3.0, 2.0]]])  # min-max -> [[1, 0], [2/3, 1/3]]
    assert M.pointing_game(a, gt)[0] == 1.0
    assert M.relevance_rank(a, gt)[0] == 0.5  # top-2 = {4, 3}: one inside
    assert M.relevance_mass(a, gt)[0] == pytest.approx(1.0 / 2.0)  # (1 + 0) / (1 + 0 + 2/3 + 1/3)
    p = np.array([1, 0, 2 / 3, 1 / 3]) / 2.0
    nz = p[p > 0]
    assert M.complexity(a)[0] == pytest.approx(-(nz * np.log(nz)).sum())
    # Gini of sorted [0, 1/3, 2/3, 1]: sum (2i - n - 1) v_i / (n sum v) = (-3*0 - 1/3 + 2/3 + 3) / (4 * 2)
    assert M.sparseness(a)[0] == pytest.approx((-1 / 3 + 2 / 3 + 3) / 8)
    one_pixel = np.zeros((1, 4, 4))
    one_pixel[0, 1, 2] = 5.0
    assert M.complexity(one_pixel)[0] == pytest.approx(0.0, abs=1e-12)
    assert M.sparseness(one_pixel)[0] == pytest.approx(15 / 16)


def test_scores_invariant_to_affine_rescaling_and_ground_truth_is_a_union():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(3, H, W))
    objs = np.zeros((3, 2, H, W), bool)
    objs[:, 0, 1:3, 1:4] = True
    objs[:, 1, 5:7, 4:8] = True
    union = objs.any(axis=1)
    for f in (M.pointing_game, M.top_k_intersection, M.relevance_rank, M.relevance_mass):
        np.testing.assert_allclose(f(a, objs), f(3.0 * a + 7.0, union))
    for f in (M.complexity, M.sparseness):
        np.testing.assert_allclose(f(a), f(0.5 * a - 2.0))


def test_relevance_rank_counts_ties_at_the_kth_value_at_their_expectation():
    gt = _gt_box()  # 6 pixels: k = 6
    a = np.zeros((1, H, W))
    a[0, 2, 3:6] = 1.0  # 3 top pixels inside
    a[0, 6:8, :] = 0.5  # 16 tied pixels outside ...
    a[0, 3, 3:7] = 0.5  # ... and 3 tied inside (plus (3, 6) just outside the box)
    # 3 slots left for 20 tied pixels of which 3 are inside: 3 + 3 * 3/20 hits out of 6
    assert M.relevance_rank(a, gt)[0] == pytest.approx((3 + 3 * 3 / 20) / 6)
    # the same map flipped upside down (objects at the bottom): the same score
    assert M.relevance_rank(a[:, ::-1], gt[:, ::-1])[0] == pytest.approx((3 + 3 * 3 / 20) / 6)


def test_top_k_intersection_hand_computed_and_ties():
    gt = _gt_box()  # 6 pixels
    a = np.zeros((1, H, W))
    a[0, 2, 3:6] = 3.0  # 3 inside
    a[0, 0, 0] = 2.0  # 1 outside
    a[0, 3, 3:6] = 1.0  # 3 tied inside ...
    a[0, 7, :] = 1.0  # ... and 8 tied outside
    assert M.top_k_intersection(a, gt, k=4)[0] == pytest.approx(3 / 4)
    # k = 6: 4 strictly above, 2 slots for 11 tied pixels of which 3 inside
    assert M.top_k_intersection(a, gt, k=6)[0] == pytest.approx((3 + 2 * 3 / 11) / 6)
    # k larger than the ground truth caps the score at |GT| / k, as in Quantus
    assert M.top_k_intersection(gt.astype(float), gt, k=12)[0] == pytest.approx(6 / 12)
    # a constant map scores chance level for any k
    for k in (1, 5, 64):
        assert M.top_k_intersection(np.full((1, H, W), 0.2), gt, k=k)[0] == pytest.approx(6 / 64)


def test_top_k_intersection_with_k_equal_to_gt_size_is_relevance_rank():
    rng = np.random.default_rng(3)
    a = np.round(rng.random((4, H, W)), 1)  # many ties at the k-th value
    gt = np.zeros((4, H, W), bool)
    for i, (y, x, s) in enumerate([(0, 0, 2), (3, 2, 3), (1, 4, 4), (5, 5, 3)]):
        gt[i, y : y + s, x : x + s] = True
    rr = M.relevance_rank(a, gt)
    for i in range(4):
        k = int(gt[i].sum())
        assert M.top_k_intersection(a[i : i + 1], gt[i : i + 1], k=k)[0] == pytest.approx(rr[i])


def test_top_k_default_scales_quantus_k_by_area():
    assert M.top_k_for(224, 224) == 1000
    assert M.top_k_for(64, 64) == 82  # round(1000 * 4096 / 50176) = round(81.6)
    assert M.top_k_for(2, 2) == 1
    gt = _gt_box()
    a = np.random.default_rng(0).random((1, H, W))
    np.testing.assert_array_equal(M.top_k_intersection(a, gt), M.top_k_intersection(a, gt, k=M.top_k_for(H, W)))
    assert "top_k_intersection" in M.map_scores(a, gt) and "top_k_intersection" in M.LOCALISATION
    with pytest.raises(InvalidArgument, match="1 <= k <= 64"):
        M.top_k_intersection(a, gt, k=65)
    with pytest.raises(InvalidArgument, match="1 <= k"):
        M.top_k_intersection(a, gt, k=0)


def test_pointing_game_ties_count_the_fraction_of_maxima_inside():
    gt = _gt_box()
    a = np.zeros((1, H, W))
    a[0, 2, 3] = 1.0  # inside
    a[0, 7, 7] = 1.0  # outside
    assert M.pointing_game(a, gt)[0] == 0.5


def test_bad_input_is_invalid_argument():
    gt = _gt_box()
    with pytest.raises(InvalidArgument, match="differ in shape"):
        M.relevance_mass(np.zeros((1, 4, 4)), gt)
    with pytest.raises(InvalidArgument, match="empty"):
        M.pointing_game(np.ones((1, H, W)), np.zeros((1, H, W), bool))
    with pytest.raises(InvalidArgument, match="NaN"):
        M.complexity(np.full((1, H, W), np.nan))
    with pytest.raises(InvalidArgument, match="B,H,W"):
        M.sparseness(np.zeros((2, 3, H, W)))


# -- faithfulness -----------------------------------------------------------------------------------


class _Linear(nn.Module):
    def __init__(self, c: int, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(d, c * H * W, generator=g), requires_grad=False)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_fidelity_is_cosine_of_masked_and_original_representation():
    f = _Linear(3, 5)
    x = torch.randn(2, 3, H, W)
    a = np.random.default_rng(0).random((2, H, W))
    m = torch.from_numpy(M.normalise_maps(a)).float()[:, None]
    expected = torch.nn.functional.cosine_similarity(f(x), f(x * m), dim=1).double().numpy()
    np.testing.assert_allclose(M.fidelity(f, x, a), expected, rtol=1e-5)
    # a constant map keeps everything: the representation is unchanged
    np.testing.assert_allclose(M.fidelity(f, x, np.ones((2, H, W))), 1.0, rtol=1e-6)


def test_classifier_fidelity_is_the_target_probability_on_the_masked_image():
    f = _Linear(3, 4)
    x = torch.randn(2, 3, H, W)
    a = np.random.default_rng(1).random((2, H, W))
    m = torch.from_numpy(M.normalise_maps(a)).float()[:, None]
    targets = np.array([3, 1])
    expected = torch.softmax(f(x * m).double(), dim=1)[torch.arange(2), torch.as_tensor(targets)].detach().numpy()
    got = M.fidelity(f, x, a, kind="classifier", targets=targets)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert ((got > 0) & (got < 1)).all()  # a probability, never a (possibly negative) logit cosine
    with pytest.raises(InvalidArgument, match="target"):
        M.fidelity(f, x, a, kind="classifier")


def test_accuracy_per_complexity_reproduces_table3_arithmetic():
    quarter = np.zeros((1, H, W))
    quarter[0, :4, :4] = 1.0  # 16 of 64 pixels: ||m||_1 / HW = 0.25
    half = np.zeros((1, H, W))
    half[0, :, :4] = 1.0
    assert M.mask_size(quarter)[0] == 0.25 and M.mask_size(half)[0] == 0.5
    # [NEM-U] Table 3, NEM-U supervised VOC: accuracy 0.87, complexity 0.25 -> 3.48
    assert M.accuracy_per_complexity(np.array([0.87]), quarter)[0] == pytest.approx(3.48)
    # the naive solution (remove half the pixels): 0.70 / 0.50 = 1.40 (Table 3 prints 1.41 from unrounded values)
    assert M.accuracy_per_complexity(np.array([0.70]), half)[0] == pytest.approx(1.40)


class _OnePixelClassifier(nn.Module):
    """Two classes whose logit gap is a nonlinear function of the single pixel (py, px)."""

    def __init__(self, py: int, px: int):
        super().__init__()
        self.py, self.px = py, px

    def forward(self, x):
        v = x[:, 0, self.py, self.px]
        z = 3.0 * torch.tanh(v) + 0.5
        return torch.stack([z, -z], dim=1)


def test_monotonicity_rewards_attribution_on_the_influential_feature():
    clf = _OnePixelClassifier(2, 5)
    x = torch.randn(2, 1, H, W)
    x[:, 0, 2, 5] = 1.0
    good = np.zeros((2, H, W))
    good[:, 2, 5] = 1.0
    good += 1e-3 * np.random.default_rng(0).random((2, H, W))
    bad = 1.0 - good
    cfg = M.MonotonicityConfig(patch=1, baseline="noise", n_samples=2)
    mg = M.monotonicity(clf, x, good, torch.tensor([0, 0]), cfg)
    mb = M.monotonicity(clf, x, bad, torch.tensor([0, 0]), cfg)
    assert np.all(mg > 0) and np.all(mb < 0)


# -- Quantus cross-checks -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample():
    """Random continuous maps (no ties; negative values too) and box ground truths."""
    rng = np.random.default_rng(42)
    b, h, w = 10, 16, 16
    a = rng.normal(size=(b, h, w))
    gt = np.zeros((b, h, w), bool)
    for i in range(b):
        y, x = rng.integers(0, 10, 2)
        gt[i, y : y + rng.integers(3, 7), x : x + rng.integers(3, 7)] = True
    x = rng.normal(size=(b, 3, h, w)).astype(np.float32)
    return a, gt, x


@pytest.fixture(scope="module")
def quantus():
    """The reference library, imported only by the tests that compare with it (its import, with
    pandas, scikit-learn and OpenCV, takes seconds)."""
    import quantus

    return quantus


def _quantus(metric, a, gt, x) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.asarray(
            metric(disable_warnings=True)(
                model=None,
                x_batch=x,
                y_batch=np.zeros(len(a), int),
                a_batch=a[:, None].astype(np.float64),
                s_batch=gt[:, None].astype(np.float64),
            ),
            dtype=np.float64,
        )


@pytest.mark.slow  # compares with quantus
def test_localisation_matches_quantus(sample, quantus):
    a, gt, x = sample
    # unique maxima, no ties: the same numbers on the raw maps (Quantus normalises by the max)
    np.testing.assert_array_equal(M.pointing_game(a, gt), _quantus(quantus.PointingGame, a, gt, x))
    np.testing.assert_array_equal(M.relevance_rank(a, gt), _quantus(quantus.RelevanceRankAccuracy, a, gt, x))
    # top-k intersection: Quantus's default k = 1000 does not fit 16 x 16 maps; the area-scaled default
    # (k = 5 here) and larger k, all below Quantus's limit of the input size
    for k in (M.top_k_for(16, 16), 20, 60):
        np.testing.assert_allclose(
            M.top_k_intersection(a, gt, k=k),
            _quantus(lambda **kw: quantus.TopKIntersection(k=k, **kw), a, gt, x),
            atol=1e-12,
        )
    # relevance mass: Quantus sums signed attributions; on the min-max normalised map (our first step) they agree
    m = M.normalise_maps(a)
    np.testing.assert_allclose(M.relevance_mass(a, gt), _quantus(quantus.RelevanceMassAccuracy, m, gt, x), atol=1e-9)


@pytest.mark.slow  # compares with quantus
def test_complexity_and_sparseness_match_quantus_on_normalised_maps(sample, quantus):
    a, gt, x = sample
    m = M.normalise_maps(a)
    np.testing.assert_allclose(M.complexity(a), _quantus(quantus.Complexity, m, gt, x), atol=1e-5)
    np.testing.assert_allclose(M.sparseness(a), _quantus(quantus.Sparseness, m, gt, x), atol=1e-5)
    # Quantus takes |a| of the raw map instead of min-max normalising it: a different number
    assert np.abs(M.sparseness(a) - _quantus(quantus.Sparseness, a, gt, x)).max() > 1e-2


@pytest.mark.slow  # compares with quantus
def test_pointing_game_with_ties_is_never_above_quantus(sample, quantus):
    a, gt, x = sample
    tied = np.round(M.normalise_maps(a), 1)  # many ties, including for the maximum
    tied[0] = 0.5  # constant map: Quantus always scores a hit, we score chance level
    ours = M.pointing_game(tied, gt)
    theirs = _quantus(quantus.PointingGame, tied, gt, x)
    assert np.all(ours <= theirs + 1e-12)
    assert theirs[0] == 1.0 and ours[0] == pytest.approx(gt[0].mean())
    unique = (tied == tied.max(axis=(1, 2), keepdims=True)).sum(axis=(1, 2)) == 1
    np.testing.assert_array_equal(ours[unique], theirs[unique])


class _TinyClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@pytest.mark.slow  # compares with quantus
def test_monotonicity_matches_quantus_per_pixel(quantus):
    clf = _TinyClassifier().eval()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 1, 6, 6)).astype(np.float32)
    y = np.array([0, 1, 2])
    a = M.normalise_maps(rng.random((3, 6, 6)))
    ours = M.monotonicity(
        clf, torch.from_numpy(x), a, torch.from_numpy(y), M.MonotonicityConfig(patch=1, baseline="zero", n_samples=1)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = quantus.MonotonicityCorrelation(
            nr_samples=1, features_in_step=1, perturb_baseline=0.0, disable_warnings=True
        )(model=clf, x_batch=x, y_batch=y, a_batch=a[:, None].astype(np.float32), softmax=True, device="cpu")
    np.testing.assert_allclose(ours, np.asarray(theirs, dtype=np.float64), atol=1e-6)


def test_monotonicity_with_shared_variance_equals_the_direct_computation():
    clf = _TinyClassifier().eval()
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(2, 1, 6, 6)).astype(np.float32))
    y = torch.tensor([1, 2])
    cfg = M.MonotonicityConfig(patch=2, baseline="noise", n_samples=3, seed=4)
    var = M.perturbation_variance(clf, x, y, cfg)
    assert var.shape == (2, 9) and np.all(var >= 0)
    for a in (rng.random((2, 6, 6)), rng.normal(size=(2, 6, 6))):
        np.testing.assert_array_equal(
            M.monotonicity(clf, x, a, y, cfg), M.monotonicity(None, x, a, config=cfg, variance=var)
        )
    with pytest.raises(InvalidArgument, match="precomputed variance"):
        M.monotonicity(None, x, rng.random((2, 6, 6)), config=cfg)


def test_fidelity_vs_random_is_one_for_a_permutation_invariant_model():
    """A model that only sees the image's mean cannot tell a map from its pixel permutation: ratio 1."""

    class MeanOnly(torch.nn.Module):
        def forward(self, x):
            return torch.stack([x.mean(dim=(1, 2, 3)), 1 + 0 * x.mean(dim=(1, 2, 3))], dim=1)

    x = torch.full((3, 3, H, W), 0.7)  # a uniform image: only the map's values matter, not their places
    a = np.random.default_rng(2).random((3, H, W))
    ratio = M.fidelity_vs_random(MeanOnly(), x, a, kind="classifier", targets=[0, 0, 0])
    assert float(ratio.mean()) == pytest.approx(1.0, rel=1e-4)  # the ratio of the means

    # a model that reads one pixel: a map that keeps that pixel beats its permutation
    class OnePixel(torch.nn.Module):
        def forward(self, x):
            v = x[:, 0, 0, 0]
            return torch.stack([4 * v, torch.zeros_like(v)], dim=1)

    keep = np.zeros((3, H, W))
    keep[:, 0, 0] = 1.0
    keep[:, 1:4, 1:4] = 1.0
    ratio = M.fidelity_vs_random(OnePixel(), torch.ones(3, 3, H, W), keep, kind="classifier", targets=[0, 0, 0])
    assert (ratio > 1.5).all()
