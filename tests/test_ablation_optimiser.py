"""Algorithm 2 ([THESIS], sec. 2.6.3) on a classifier whose evidence is known: a bright-blob detector.

Every returned path satisfies the axioms (Definition 1); the heatmaps of all four scores point into
the blob; the blurred baseline is the smallest blur that changes the decision (sec. 2.7.1); a
classifier without usable gradients fails with that reason; should_stop ends the run within one
iteration; each iteration is one batched classifier pass; the reductions follow eq. 2.33-2.37."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.ablation import AblationConfig, AblationPath
from xaiserve.handlers.ablation import path as P
from xaiserve.handlers.ablation import reductions as R
from xaiserve.handlers.ablation import scores as S
from xaiserve.handlers.ablation.baseline import blur_baseline

torch.set_num_threads(1)

SIZE = 32
BLOB = (slice(6, 14), slice(19, 27))  # rows, cols: off-centre, so a centre bias cannot pass


class BlobDetector(nn.Module):
    """Class 1 ("bright blob") when some 5x5 neighbourhood is bright, class 0 otherwise; 3 classes
    so that "dominated by the target" differs from "F > 1/2" (class 2 is a weak constant)."""

    def __init__(self, threshold: float = 0.3, gain: float = 20.0):
        super().__init__()
        self.threshold, self.gain = threshold, gain
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        local = F.avg_pool2d(x.mean(dim=1, keepdim=True), 5, stride=1, padding=2)
        evidence = F.softplus(8.0 * (local - self.threshold)).mean(dim=(1, 2, 3))
        return (
            torch.stack([torch.full_like(evidence, 0.05), evidence, torch.full_like(evidence, 0.02)], dim=1) * self.gain
        )


def blob_image() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = -1.0 + 0.1 * torch.randn(3, SIZE, SIZE, generator=g)
    x[:, BLOB[0], BLOB[1]] = 1.0
    return x


def in_blob(heat: torch.Tensor) -> bool:
    r, c = divmod(int(heat.argmax()), heat.shape[1])
    return BLOB[0].start <= r < BLOB[0].stop and BLOB[1].start <= c < BLOB[1].stop


def config(**kw) -> AblationConfig:
    # saturation off and no iteration floor unless a test asks: these tests count iterations
    base = dict(
        num_slices=8,
        mask_size=16,
        sigma_regu=1.5,
        max_iterations=25,
        saturation=0.0,
        ramp_saturation=False,
        min_iterations=0,
    )
    base.update(kw)
    return AblationConfig(**base)


def assert_axioms(phi: torch.Tensor, tol: float) -> None:
    full = P.with_boundaries(phi)
    assert float(full.min()) >= 0.0 and float(full.max()) <= 1.0
    assert bool((full[1:] >= full[:-1] - 1e-6).all()), "not monotone in t"
    speed = (phi.mean(dim=(1, 2)) - P.interior_times(phi.shape[0])).abs().max()
    assert float(speed) < tol, f"not constant speed: {float(speed)}"


CASES = [
    ("retaining", "transition"),
    ("retaining", "average"),
    ("retaining", "influence"),
    ("dissipating", "transition"),
    ("contrastive", "transition"),
    ("straddling", "contrastive"),
    ("straddling", "influence"),
]


@pytest.mark.parametrize("score,reduction", CASES)
def test_paths_satisfy_the_axioms_and_point_into_the_blob(score, reduction):
    model = BlobDetector().eval()
    x = blob_image()
    out = AblationPath(model, config(score=score, reduction=reduction)).attribute(x)
    assert out.target == 1 and out.baseline_changes_class and 4.0 <= out.baseline_sigma <= 100.0
    assert_axioms(out.path, 1e-5)
    assert_axioms(out.path_image, 0.02)  # bilinear upsampling moves the mass slightly at the border
    if score == "straddling":
        assert out.path_down is not None and out.probabilities_down is not None
        assert_axioms(out.path_down, 1e-5)
    assert out.path.shape == (8, 16, 16) and out.path_image.shape == (8, SIZE, SIZE)
    assert out.probabilities.shape == (10, 3)
    assert torch.allclose(out.probabilities.sum(dim=1), torch.ones(10), atol=1e-5)
    assert out.iterations == len(out.score_history) == len(out.saturation_history) == 25
    assert out.stop_reason == "max_iterations"
    # projected gradient ascent improves the score of the affine start
    assert out.score > out.score_history[0] + 0.01
    assert float(out.heatmap.min()) >= 0.0 and float(out.heatmap.max()) <= 1.0
    assert in_blob(out.heatmap), (score, reduction)
    raw, unit = out.heatmap_for(reduction)  # re-reducing the finished path gives the same map
    assert torch.allclose(raw, out.heatmap_raw) and torch.allclose(unit, out.heatmap)


def test_requested_target_and_saturation_stop():
    model = BlobDetector().eval()
    x = blob_image()
    out = AblationPath(model, config(saturation=3.0, max_iterations=60)).attribute(x, target=0)
    assert out.target == 0
    assert out.stop_reason == "saturation" and out.iterations < 60
    assert out.saturation_history[-1] > 0.8 >= max(out.saturation_history[:-1])
    assert_axioms(out.path, 1e-5)
    ramp = AblationPath(model, config(saturation=3.0, ramp_saturation=True, max_iterations=5)).attribute(x)
    assert_axioms(ramp.path, 1e-5)
    # the saturation stop waits for min_iterations
    late = AblationPath(model, config(saturation=3.0, max_iterations=60, min_iterations=out.iterations + 3)).attribute(
        x, target=0
    )
    assert late.stop_reason == "saturation" and late.iterations == out.iterations + 3
    with pytest.raises(InvalidArgument, match="target label 3 is out of range"):
        AblationPath(model, config()).attribute(x, target=3)


def test_each_iteration_is_one_batched_classifier_pass():
    for score, batch in (("retaining", 8), ("contrastive", 16), ("straddling", 16)):
        model = BlobDetector().eval()
        x = blob_image()
        out = AblationPath(
            model,
            config(score=score, max_iterations=6, reduction="contrastive" if score == "straddling" else "transition"),
        ).attribute(x, baseline=torch.zeros_like(x) - 1.0)
        # 1 check at x, 1 baseline, then one pass per iteration and one for the final path
        assert model.calls[:2] == [1, 1] and model.calls[2:] == [batch] * (out.iterations + 1), (score, model.calls)


def test_progress_and_should_stop_end_within_one_iteration():
    model = BlobDetector().eval()
    seen = []

    def progress(p):
        seen.append(p)
        assert p.heatmap.shape == (SIZE, SIZE)
        assert 0.0 <= float(p.heatmap.min()) and float(p.heatmap.max()) <= 1.0

    out = AblationPath(model, config(max_iterations=50)).attribute(
        blob_image(), progress=progress, should_stop=lambda: len(seen) >= 3
    )
    assert out.stop_reason == "stopped" and out.iterations == 3 and len(seen) == 3
    assert [p.iteration for p in seen] == [1, 2, 3] and math.isclose(seen[-1].fraction, 3 / 50)
    assert_axioms(out.path, 1e-5)  # a stopped path is still an ablation path


class Constant(nn.Module):
    def forward(self, x):
        return torch.tensor([[1.0, 0.0]]).expand(x.shape[0], 2) + 0.0 * x.sum(dim=(1, 2, 3))[:, None]


class NaNGrad(nn.Module):
    def forward(self, x):
        return torch.stack([x.mean(dim=(1, 2, 3)), torch.sqrt(x.mean(dim=(1, 2, 3)).abs() - 10.0)], dim=1)


class DeadAlongPath(nn.Module):
    """Responds to the image only where it is exactly the target (a ReLU that dies under ablation)."""

    def __init__(self, x):
        super().__init__()
        self.x = x

    def forward(self, x):
        z = F.relu(1e-3 - (x - self.x).abs().amax(dim=(1, 2, 3)))
        s = (x * 1e-3).sum(dim=(1, 2, 3)) * (z > 0)
        return torch.stack([s, -s], dim=1)


def test_classifiers_without_usable_gradients_fail_with_the_reason():
    x = blob_image()
    with pytest.raises(FailedPrecondition, match="all zero"):
        AblationPath(Constant(), config()).attribute(x)
    with pytest.raises(FailedPrecondition, match="NaN"):
        AblationPath(NaNGrad(), config()).attribute(x)
    with pytest.raises(FailedPrecondition, match="all zero at iteration 1"):
        AblationPath(DeadAlongPath(x), config()).attribute(x, baseline=torch.zeros_like(x))


class Peak(nn.Module):
    """Class 1 iff the image's brightest value exceeds a threshold: blurring lowers the peak, so
    the decision changes at exactly one sigma (a smooth max via logsumexp)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        peak = torch.logsumexp(60.0 * x.mean(dim=1).flatten(1), dim=1) / 60.0
        return torch.stack([torch.zeros_like(peak), 50.0 * (peak - self.threshold)], dim=1)


def test_blur_baseline_is_the_smallest_sigma_that_changes_the_class():
    x = torch.zeros(3, 48, 48)
    x[:, 20:28, 20:28] = 1.0
    x[:, 22:26, 22:26] = 3.0
    for threshold in (0.2, 0.3, 0.5):  # the smooth peak falls from 0.78 (sigma 4) to 0.17 (sigma >= 20)
        model = Peak(threshold)
        bl = blur_baseline(model, x)
        assert bl.changes_class
        label = lambda s: int(model(P.gaussian_blur(x, s)[None]).argmax())
        assert label(bl.sigma) == 0
        if bl.sigma > 4.0:
            assert label(bl.sigma / 1.012) == 1  # bisection tolerance 1 %
        assert torch.allclose(bl.image, P.gaussian_blur(x, bl.sigma))
    small = blur_baseline(Peak(2.0), x)  # already sigma 4 lowers the peak below 2
    assert small.sigma == 4.0 and small.changes_class
    never = blur_baseline(Peak(-1.0), x)
    assert not never.changes_class and never.sigma == 100.0
    with pytest.raises(FailedPrecondition, match="params.baseline"):
        AblationPath(Peak(-1.0), config()).attribute(x)


def test_score_is_the_trapezoid_integral_along_the_path():
    model = BlobDetector().eval()
    x, xb = blob_image(), torch.zeros(3, SIZE, SIZE) - 1.0
    T = 6
    paths = P.affine_path(T, 16, 16)[None]
    with torch.no_grad():
        p0 = torch.softmax(model(x[None]), 1)[0, 1]
        p1 = torch.softmax(model(xb[None]), 1)[0, 1]
        value, probs = S.evaluate("retaining", model, x, xb, paths, 1, float(p0), float(p1))
        t = P.interior_times(T)
        explicit = [torch.softmax(model(((1 - tk) * x + tk * xb)[None]), 1)[0, 1] for tk in t]
    f = torch.stack([p0, *explicit, p1])
    assert math.isclose(float(value), float(torch.trapezoid(f, dx=1 / (T + 1))), rel_tol=1e-5)
    with torch.no_grad():
        diss, _ = S.evaluate("dissipating", model, x, xb, paths, 1, float(p0), float(p1))
        contr, _ = S.evaluate("contrastive", model, x, xb, paths, 1, float(p0), float(p1))
    assert math.isclose(float(diss), 1 - float(value), rel_tol=1e-5)
    # the affine path is symmetric: 1 - phi(t) = phi(1 - t), so P_down(1 - phi) = 1 - P_up(phi)
    assert math.isclose(float(contr), 1.0, rel_tol=1e-5)


def test_window_reproduces_eq_2_37():
    heat = torch.rand(20, 30)
    x = (torch.arange(30) + 0.5) / 30
    y = (torch.arange(20) + 0.5) / 20
    expected = heat * torch.sqrt(torch.sin(math.pi * y)[:, None] * torch.sin(math.pi * x)[None, :])
    for size in (15, 100):
        assert torch.allclose(R.window(heat, size), expected, atol=1e-6)
    narrow = R.window(heat, 3)
    assert torch.equal(narrow[3:-3, 3:-3], heat[3:-3, 3:-3]) and bool((narrow[0] < heat[0]).all())
    assert torch.equal(R.window(heat, 0), heat)


def test_transition_index_rules():
    def probs(targets):
        p = torch.full((len(targets), 3), 0.1)
        for i, t in enumerate(targets):
            p[i, t] = 0.8
        return p

    # retaining: the largest interior t still dominated by the target (t_0 and t_{T+1} excluded)
    assert R.transition_index(probs([1, 1, 1, 0, 1, 0, 0]), 1) == 4
    # nothing interior dominated: argmax of F
    p = probs([1, 0, 0, 0, 0])
    p[2, 1] = 0.5
    assert R.transition_index(p, 1) == 2
    # dissipating: the smallest interior t no longer dominated
    assert R.transition_index(probs([1, 1, 0, 1, 0, 0]), 1, dissipating=True) == 2
    phi = P.affine_path(5, 4, 4)
    heat, k = R.transition(phi, probs([1, 1, 1, 0, 0, 0, 0]), 1)
    assert k == 2 and torch.allclose(heat, 1 - phi[1])
    # the authors' floor: never below 25 % of the path (T = 5: t_k >= 0.25 means k >= 2; T = 14: k >= 4)
    assert R.transition_index(probs([1, 1, 0, 0, 0, 0, 0]), 1, floor=0.25) == 2
    p16 = probs([1, 1, 1] + [0] * 13)
    assert R.transition_index(p16, 1) == 2 and R.transition_index(p16, 1, floor=0.25) == 4
    assert R.transition_index(probs([1, 1, 1, 1, 1, 1, 0]), 1, floor=0.25) == 5  # above the floor: unchanged
    # dissipating mirrors it: never above 75 % (T = 14: k <= 11)
    p16 = probs([1] * 13 + [0] * 3)  # first interior slice no longer dominated: k = 13
    assert R.transition_index(p16, 1, dissipating=True) == 13
    assert R.transition_index(p16, 1, dissipating=True, floor=0.25) == 11
    heat, k = R.transition(phi, probs([1, 1, 0, 0, 0, 0, 0]), 1, floor=0.25)
    assert k == 2 and torch.allclose(heat, 1 - phi[1])


def test_reductions_orientation_and_units():
    T = 4
    phi = torch.zeros(T, 2, 2)
    phi[:, 0, 0] = torch.tensor([0.0, 0.0, 0.0, 0.0])  # kept until t = 1: the evidence
    phi[:, 1, 1] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # removed at once
    phi[:, 0, 1] = phi[:, 1, 0] = P.interior_times(T)
    avg = R.average(phi)
    assert float(avg[0, 0]) == pytest.approx(1 - 0.5 / 5) and float(avg[1, 1]) == pytest.approx(1 - 4.5 / 5)
    f = torch.tensor([1.0, 0.9, 0.5, 0.4, 0.3, 0.3])
    infl = R.influence(phi, f)
    # eq. 2.35 discretised: -sum_k dphi_k dF_k (T + 1)
    assert float(infl[1, 1]) == pytest.approx(0.1 * 5)  # removed while F fell by 0.1
    assert float(infl[0, 0]) == pytest.approx(0.0)  # removed last, when F no longer changed
    assert float(infl[0, 1]) == pytest.approx(0.2 * 0.7 * 5)  # removed evenly while F fell by 0.7
    signed = R.to_unit(torch.tensor([[-2.0, 0.0], [1.0, 2.0]]), signed=True)
    assert torch.allclose(signed, torch.tensor([[0.0, 0.5], [0.75, 1.0]]))
    assert torch.equal(R.to_unit(torch.zeros(2, 2), signed=True), torch.full((2, 2), 0.5))
    down = phi.clone()
    down[:, 0, 0] = 1.0
    assert float(R.contrastive(phi, down)[0, 0]) == pytest.approx(T / (T + 1))


@pytest.mark.parametrize(
    "kw,word",
    [
        (dict(score="retain"), "score"),
        (dict(reduction="max"), "reduction"),
        (dict(reduction="contrastive"), "straddling"),
        (dict(num_slices=1), "num_slices"),
        (dict(mask_size=1), "mask_size"),
        (dict(sigma_regu=0.0), "sigma_regu"),
        (dict(sigma_regu=float("nan")), "sigma_regu"),
        (dict(step_size=-0.1), "step_size"),
        (dict(step_size=2.0), "step_size"),
        (dict(saturation=-1.0), "saturation"),
        (dict(min_iterations=-1), "min_iterations"),
        (dict(transition_floor=1.0), "transition_floor"),
        (dict(max_iterations=0), "max_iterations"),
        (dict(stop_saturation=0.0), "stop_saturation"),
        (dict(window=-1), "window"),
    ],
)
def test_config_errors_name_the_parameter(kw, word):
    with pytest.raises(InvalidArgument, match=word):
        AblationConfig(**kw).check()


def test_defaults_are_the_thesis_and_authors_values():
    cfg = AblationConfig()
    assert (cfg.step_size, cfg.min_iterations, cfg.max_iterations, cfg.transition_floor) == (0.5, 6, 100, 0.25)
    assert cfg.ramp_saturation and cfg.saturation > 0 and cfg.sigma_regu is None
    # sigma in image pixels: 7 px at 224 px, scaled with the image side
    assert cfg.image_sigma(224, 224) == pytest.approx(7.0) and cfg.image_sigma(64, 64) == pytest.approx(2.0)
    # ... and to the mask grid by sqrt(mask area / image area): 64 x 64 masks get 2 mask px at any image size
    assert cfg.mask_sigma(224, 224) == pytest.approx(2.0) and cfg.mask_sigma(64, 64) == pytest.approx(2.0)
    given = AblationConfig(mask_size=32, sigma_regu=7.0)
    assert given.mask_sigma(64, 128) == pytest.approx(7.0 * math.sqrt(32 * 32 / (64 * 128)))


def test_mask_larger_than_image_is_rejected():
    with pytest.raises(InvalidArgument, match="mask_size 64 is larger than the image"):
        AblationPath(BlobDetector(), AblationConfig()).attribute(blob_image())


def test_runs_under_inference_mode_and_no_grad():
    """Job runners may call methods under inference_mode or no_grad; the path still gets gradients."""
    model = BlobDetector().eval()
    with torch.inference_mode():
        x = blob_image()
        out = AblationPath(model, config(max_iterations=4)).attribute(x)
    with torch.no_grad():
        again = AblationPath(model, config(max_iterations=4)).attribute(blob_image())
    assert torch.allclose(out.path, again.path)
    assert out.score_history[-1] > out.score_history[0]
