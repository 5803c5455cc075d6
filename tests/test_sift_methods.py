"""The SIFT saliency method objects ([THESIS] sec. 4.3; handlers/sift) on the default lesions
classifier (model_store/, torch form) and lesion images: the ablation path over keypoint gains keeps
the path axioms (boundaries, monotone, constant speed, also in the metric of eq. 4.45) and starts
at the image's own classification; sift_rise's per-keypoint estimator equals the direct mean over
its masks; cancellation and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import DEFAULT_STORE
from xaiserve.errors import Cancelled, InvalidArgument
from xaiserve.handlers.ablation.path import interior_times
from xaiserve.handlers.sift import SiftAblation, SiftAblationConfig, SiftRise, SiftRiseConfig, decompose
from xaiserve.handlers.sift.ablation import keypoints_of
from xaiserve.handlers.sift.keypoints import KeypointConfig

torch.set_num_threads(1)

FAST = dict(num_slices=6, max_iterations=6)


@pytest.fixture(scope="module")
def model():
    from xaiserve.service.registry import Registry, RegistryConfig

    reg = Registry(RegistryConfig(store=DEFAULT_STORE, warmup=False))
    entry = reg.resolve("lesions-classifier")
    return reg.torch_module(entry), entry.input


@pytest.fixture(scope="module")
def lesion(model):
    from xaiserve.training.datasets.lesions import Lesions, LesionsConfig

    split = Lesions(LesionsConfig(sizes={"train": 1, "val": 1, "test": 4})).split("test")
    _, spec = model
    img = torch.from_numpy(split.images[1]).float() / 255.0
    x = (img - torch.tensor(spec.mean).view(3, 1, 1)) / torch.tensor(spec.std).view(3, 1, 1)
    return x, int(split.labels[1])


@pytest.fixture(scope="module")
def decoder(model, lesion):
    _, spec = model
    x, _ = lesion
    return decompose(x, keypoints_of(x, KeypointConfig(), spec.mean, spec.std))


def _check_path(gains: torch.Tensor, weights: torch.Tensor | None = None) -> None:
    T = gains.shape[0] - 2
    assert torch.allclose(gains[0], torch.ones_like(gains[0])) and torch.allclose(
        gains[-1], torch.zeros_like(gains[-1])
    )
    assert (gains[1:] <= gains[:-1] + 1e-6).all()  # phi monotone in t: gains only decrease
    assert float(gains.min()) >= 0 and float(gains.max()) <= 1
    phi = 1.0 - gains[1:-1]
    mass = phi.mean(dim=1) if weights is None else (phi * weights).sum(dim=1) / weights.sum()
    assert torch.allclose(mass, interior_times(T), atol=2e-3)  # constant speed (Lemma 7)


@pytest.mark.slow
def test_ablation_path_over_keypoint_gains(model, lesion, decoder):
    module, spec = model
    x, label = lesion
    seen = []
    out = SiftAblation(module, SiftAblationConfig(**FAST), mean=spec.mean, std=spec.std).attribute(
        x, target=label, progress=seen.append, decoder=decoder
    )
    K = decoder.num_keypoints
    assert out.gains.shape == (8, K) and out.times.shape == (8,) and out.probabilities.shape == (8, 4)
    _check_path(out.gains)
    # t = 0 is D(1) = x: the classifier's own probability of the label
    with torch.no_grad():
        p_x = torch.softmax(module(x[None]), dim=1)[0, label]
    assert float(out.probabilities[0, label]) == pytest.approx(float(p_x), abs=1e-4)
    assert out.heatmap_voronoi.shape == out.heatmap_bandpass.shape == (64, 64)
    for h in (out.heatmap_voronoi, out.heatmap_bandpass):
        assert 0 <= float(h.min()) and float(h.max()) <= 1 and float(h.max()) > 0
    assert out.keypoint_scores.shape == (K,)
    assert len(seen) == out.iterations == len(out.score_history) and seen[-1].heatmap.shape == (64, 64)
    # the contrastive score (default) improves from the affine start
    assert max(out.score_history) >= out.score_history[0]
    assert out.path_images().shape == (8, 3, 64, 64)


@pytest.mark.slow
def test_metric_weights_change_the_time_normalisation(model, lesion, decoder):
    module, spec = model
    x, label = lesion
    out = SiftAblation(module, SiftAblationConfig(metric_weights=True, **FAST), mean=spec.mean, std=spec.std).attribute(
        x, target=label, decoder=decoder
    )
    w = out.metric_weights
    assert w is not None and float(w.mean()) == pytest.approx(1.0) and float(w.std()) > 0
    _check_path(out.gains, w)


def test_straddling_returns_both_paths(model, lesion, decoder):
    module, spec = model
    x, label = lesion
    out = SiftAblation(
        module, SiftAblationConfig(score="straddling", reduction="contrastive", **FAST), mean=spec.mean, std=spec.std
    ).attribute(x, target=label, decoder=decoder)
    assert out.gains_down is not None and out.probabilities_down is not None
    _check_path(out.gains)
    _check_path(out.gains_down)
    assert float(out.heatmap_voronoi.min()) >= 0  # signed reduction mapped with 1/2 = neutral


def test_stopping_ends_the_path(model, lesion, decoder):
    module, spec = model
    x, _ = lesion
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    out = SiftAblation(
        module, SiftAblationConfig(num_slices=4, max_iterations=50, stop_saturation=1.0), mean=spec.mean, std=spec.std
    ).attribute(x, should_stop=stop, decoder=decoder)
    assert out.stop_reason == "stopped" and out.iterations == 2


def test_rise_estimator_is_the_mean_over_the_masks_keeping_each_keypoint(model, lesion, decoder):
    module, spec = model
    x, label = lesion
    cfg = SiftRiseConfig(num_masks=48, batch_size=16, seed=7)
    out = SiftRise(module, cfg, mean=spec.mean, std=spec.std).attribute(x, target=label, decoder=decoder)
    K = decoder.num_keypoints
    # redraw the same masks (the same generator, batch by batch) and average directly
    g = torch.Generator().manual_seed(7)
    masks = torch.cat([(torch.rand((16, K), generator=g) < 0.5).float() for _ in range(3)])
    with torch.no_grad():
        s = torch.softmax(module(decoder.decode(masks)).double(), dim=1)[:, label]
    on = masks.double()
    direct = (on * s[:, None]).sum(0) / on.sum(0)
    assert torch.allclose(out.importance.double(), direct, atol=1e-5)
    var = (on * (s[:, None] - direct) ** 2).sum(0) / (on.sum(0) - 1)
    assert torch.allclose(out.uncertainty.double(), var, atol=1e-5)
    assert out.num_masks == 48 and out.mean_score == pytest.approx(float(s.mean()), abs=1e-6)
    assert (out.std_error > 0).all() and out.heatmap_voronoi.shape == (64, 64)
    # the same seed gives the same result
    again = SiftRise(module, cfg, mean=spec.mean, std=spec.std).attribute(x, target=label, decoder=decoder)
    assert torch.equal(again.importance, out.importance)


def test_rise_explains_an_encoder_by_cosine_similarity(model, lesion, decoder):
    module, spec = model
    x, _ = lesion
    # the classifier's logit vector as a representation: label-free, scores are cosines in [-1, 1]
    out = SiftRise(
        module, SiftRiseConfig(num_masks=32, batch_size=32), kind="encoder", mean=spec.mean, std=spec.std
    ).attribute(x, decoder=decoder)
    assert out.target == -1 and out.reference_score == pytest.approx(1.0, abs=1e-4)
    assert float(out.importance.max()) <= 1.0 + 1e-6
    with pytest.raises(InvalidArgument, match="target_label"):
        SiftRise(module, SiftRiseConfig(num_masks=8), kind="encoder").attribute(x, target=1, decoder=decoder)


def test_rise_stopped_before_the_first_batch_is_cancelled(model, lesion, decoder):
    module, spec = model
    x, _ = lesion
    with pytest.raises(Cancelled):
        SiftRise(module, SiftRiseConfig(num_masks=8)).attribute(x, should_stop=lambda: True, decoder=decoder)


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"score": "best"}, "score"),
        ({"num_slices": 1}, "num_slices"),
        ({"saturation": -1.0}, "saturation"),
        ({"reduction": "contrastive"}, "straddling"),
        ({"sigma_lp": 0.0}, "sigma_lp"),
    ],
)
def test_bad_ablation_parameters(kw, word):
    with pytest.raises(InvalidArgument, match=word):
        SiftAblationConfig(**kw).check()


@pytest.mark.parametrize(
    "kw, word", [({"num_masks": 0}, "num_masks"), ({"p_keep": 1.0}, "p_keep"), ({"batch_size": 0}, "batch_size")]
)
def test_bad_rise_parameters(kw, word):
    with pytest.raises(InvalidArgument, match=word):
        SiftRiseConfig(**kw).check()


def test_target_out_of_range(model, lesion, decoder):
    module, spec = model
    x, _ = lesion
    with pytest.raises(InvalidArgument, match="out of range"):
        SiftAblation(module, SiftAblationConfig(**FAST)).attribute(x, target=9, decoder=decoder)
    assert np.isfinite(decoder.reconstruction_error)
