"""handlers.saliency: gradient baselines ([RELAX] eq. 14-16, captum) on hand-made models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from xaiserve.errors import FailedPrecondition, InvalidArgument
from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.handlers.saliency import METHODS, SaliencyConfig, attribute, methods_for
from xaiserve.handlers.saliency.methods import GuidedBackprop, IntegratedGradients, Saliency, SmoothGrad

H = W = 12
PIXEL = (4, 7)


class _Select(nn.Module):
    def __init__(self):
        super().__init__()
        m = torch.zeros(1, 1, H, W)
        m[..., PIXEL[0], PIXEL[1]] = 1.0
        self.register_buffer("m", m)

    def forward(self, a):
        return a * self.m


class OnePixelModel(nn.Module):
    """Linear in the input (for positive inputs) and influenced by one pixel only: a 1x1 conv, a ReLU,
    a fixed selection of the pixel PIXEL (inside the last conv block, so GradCAM sees it) and a linear
    head with positive weights."""

    def __init__(self, out: int):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU(), _Select())
        self.head = nn.Linear(2 * H * W, out)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.block[0].weight.copy_(torch.rand(2, 3, 1, 1, generator=g) + 0.1)
            self.block[0].bias.zero_()
            w = torch.zeros(out, 2, H, W)
            w[:, :, PIXEL[0], PIXEL[1]] = torch.rand(out, 2, generator=g) + 0.5
            self.head.weight.copy_(w.flatten(1))
            # different biases: the classes differ, so argmax and explicit targets are meaningful
            self.head.bias.copy_(torch.arange(out, dtype=torch.float32))
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        return self.head(self.block(x).flatten(1))


@pytest.mark.parametrize("kind,out", [("encoder", 4), ("classifier", 3)])
def test_every_method_finds_the_only_influential_pixel(kind, out):
    model = OnePixelModel(out).eval()
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(1)) + 0.1
    for method in methods_for(kind):
        a = attribute(method, model, x, kind=kind)
        assert a.shape == (2, H, W) and a.dtype == np.float32, method
        assert np.all(np.isfinite(a)) and a.min() >= 0.0 and a.max() <= 1.0, method
        for i in range(2):
            assert np.unravel_index(a[i].argmax(), (H, W)) == PIXEL, (method, i)
            assert a[i][PIXEL] == 1.0 and np.sort(a[i].ravel())[-2] < 1.0, method


def test_method_lists():
    assert set(methods_for("classifier")) == {
        "saliency",
        "guided_backprop",
        "smoothgrad",
        "integrated_gradients",
        "gradient_shap",
        "gradcam",
    }
    assert set(methods_for("encoder")) == set(METHODS)


class SmallNet(nn.Module):
    """A nonlinear encoder with functional ReLUs and negative weights (so guiding matters)."""

    def __init__(self, d: int = 5):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.l1 = nn.Linear(3 * 4 * 4, 16)
        self.l2 = nn.Linear(16, d)
        with torch.no_grad():
            for layer in (self.l1, self.l2):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
                layer.bias.copy_(torch.randn(layer.bias.shape, generator=g))

    def forward(self, x):
        return self.l2(F.relu(self.l1(x.flatten(1))))


def test_eq14_single_backward_equals_mean_of_per_dimension_gradients():
    net = SmallNet().eval()
    x = torch.randn(3, 3, 4, 4)
    fast = Saliency(net, "encoder").attribute(x.clone().requires_grad_(True)).detach()
    jac = torch.stack([torch.autograd.functional.jacobian(net, x[i : i + 1])[0, :, 0] for i in range(3)])  # [B,D,C,H,W]
    torch.testing.assert_close(fast, jac.mean(dim=1), rtol=1e-5, atol=1e-6)


def test_eq15_guided_backprop_zeroes_negative_gradients_at_functional_relus():
    net = SmallNet().eval()
    x = torch.randn(2, 3, 4, 4)
    guided = GuidedBackprop(net, "encoder").attribute(x)
    h = net.l1(x.flatten(1))
    w2 = net.l2.weight.mean(0, keepdim=True)  # d mean_d f_d / d relu(h)
    expected = ((w2.clamp(min=0) * (h > 0)) @ net.l1.weight).view_as(x)
    torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-6)
    plain = ((w2 * (h > 0)) @ net.l1.weight).view_as(x)
    assert (guided - plain).abs().max() > 1e-3  # the guiding changed something


class _HandGuided(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t):
        y = t.clamp(min=0)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g.clamp(min=0) * (y > 0)


def test_guided_backprop_covers_the_residual_blocks_of_handlers_nets(monkeypatch):
    """handlers.nets blocks call F.relu (captum's GuidedBackprop would only guide nn.ReLU modules)."""
    enc = FrozenSpec(encoder=EncoderArch(stem=4, widths=(8,), blocks=(1,))).build().eval()
    x = torch.randn(1, 3, 8, 8)
    guided = GuidedBackprop(enc, "encoder").attribute(x)
    # the same backward with every ReLU guided by hand (nn.ReLU calls F.relu too)
    monkeypatch.setattr(F, "relu", lambda t, inplace=False: _HandGuided.apply(t))
    xr = x.clone().requires_grad_(True)
    enc(xr).mean(1).sum().backward()
    monkeypatch.undo()
    torch.testing.assert_close(guided, xr.grad, rtol=1e-5, atol=1e-6)
    assert (guided - Saliency(enc, "encoder").attribute(x.clone().requires_grad_(True))).abs().max() > 1e-4


def test_smoothgrad_without_noise_is_eq14_and_is_reproducible():
    net = SmallNet().eval()
    x = torch.randn(2, 3, 4, 4)
    zero = SmoothGrad(net, "encoder", SaliencyConfig(smoothgrad_noise=0.0, smoothgrad_samples=3)).attribute(x)
    torch.testing.assert_close(zero, Saliency(net, "encoder").attribute(x.clone().requires_grad_(True)).detach())
    a1 = attribute("smoothgrad", net, x, kind="encoder")
    a2 = attribute("smoothgrad", net, x, kind="encoder")
    np.testing.assert_array_equal(a1, a2)


def test_label_free_and_targets_are_aligned_within_a_batch():
    """captum expands the batch n_steps (IG) times: f(x0) and the targets must follow their own image."""
    enc = SmallNet().eval()
    x = torch.randn(3, 3, 4, 4)
    for method in ("integrated_gradients", "label_free_saliency"):
        batch = attribute(method, enc, x, kind="encoder")
        single = np.concatenate([attribute(method, enc, x[i : i + 1], kind="encoder") for i in range(3)])
        np.testing.assert_allclose(batch, single, atol=1e-5)
    clf = OnePixelModel(3).eval()
    xc = torch.rand(2, 3, H, W) + 0.1
    raw = IntegratedGradients(clf, "classifier").attribute(xc, torch.tensor([0, 2]))
    r0 = IntegratedGradients(clf, "classifier").attribute(xc[:1], torch.tensor([0]))
    r2 = IntegratedGradients(clf, "classifier").attribute(xc[1:], torch.tensor([2]))
    torch.testing.assert_close(raw, torch.cat([r0, r2]), rtol=1e-5, atol=1e-6)


def test_classifier_target_defaults_to_the_predicted_class():
    net = SmallNet(d=4).eval()
    x = torch.randn(2, 3, 4, 4)
    pred = net(x).argmax(1)
    np.testing.assert_array_equal(
        attribute("saliency", net, x, kind="classifier"),
        attribute("saliency", net, x, kind="classifier", target=pred.numpy()),
    )
    other = (pred + 1) % 4
    assert not np.allclose(
        attribute("saliency", net, x, kind="classifier", target=other), attribute("saliency", net, x, kind="classifier")
    )


def test_gradient_shap_is_reproducible_and_leaves_the_global_rng_alone():
    net = SmallNet().eval()
    x = torch.randn(2, 3, 4, 4)
    torch.manual_seed(123)
    np.random.seed(7)
    expected_next = torch.rand(3), np.random.random(3)
    torch.manual_seed(123)
    np.random.seed(7)
    a1 = attribute("gradient_shap", net, x, kind="encoder")
    np.testing.assert_array_equal(torch.rand(3).numpy(), expected_next[0].numpy())
    np.testing.assert_array_equal(np.random.random(3), expected_next[1])
    np.testing.assert_array_equal(a1, attribute("gradient_shap", net, x, kind="encoder"))


def test_works_inside_inference_mode_and_on_a_single_image():
    net = SmallNet().eval()
    with torch.inference_mode():
        x = torch.randn(3, 4, 4)
        a = attribute("saliency", net, x, kind="encoder")
    assert a.shape == (1, 4, 4) and a.max() == 1.0


def test_bad_input():
    net = SmallNet().eval()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(InvalidArgument, match="unknown saliency method 'occlusion'.*guided_backprop.*gradcam"):
        attribute("occlusion", net, x, kind="encoder")
    with pytest.raises(InvalidArgument, match="label_free_saliency.*available: saliency"):
        attribute("label_free_saliency", net, x, kind="classifier")
    with pytest.raises(InvalidArgument, match="kind 'nem_u'"):
        attribute("saliency", net, x, kind="nem_u")
    with pytest.raises(InvalidArgument, match="only for classifiers"):
        attribute("saliency", net, x, kind="encoder", target=1)
    with pytest.raises(InvalidArgument, match="outside the classifier's classes 0..4"):
        attribute("saliency", net, x, kind="classifier", target=5)
    with pytest.raises(InvalidArgument, match="2 targets for a batch of 1"):
        attribute("saliency", net, x, kind="classifier", target=[0, 1])
    with pytest.raises(InvalidArgument, match=r"\[C,H,W\]"):
        attribute("saliency", net, torch.randn(4, 4), kind="encoder")
    with pytest.raises(InvalidArgument, match="NaN"):
        attribute("saliency", net, torch.full((3, 4, 4), float("nan")), kind="encoder")
    with pytest.raises(FailedPrecondition, match="4-D"):
        attribute("gradcam", net, x, kind="encoder")
    with pytest.raises(InvalidArgument, match="smoothgrad_samples"):
        SaliencyConfig(smoothgrad_samples=0)
