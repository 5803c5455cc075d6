"""Explain's fidelity option and `xaiserve evaluate explanations` share one definition
(handlers/fidelity.py; METHODS.md, decision 2026-12): the target's softmax probability on x * m for
a classifier, cos(Phi(x), Phi(x * m)) for an encoder, m the min-max normalised mask. Checked on the
default zoo over a real gRPC channel against training.metrics.fidelity with the torch modules.

NEMt answers "where is class k" also when k is absent: the response carries the target's
probability on x * m (the served mask) and target_absent, checked here against the classifier.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import DEFAULT_STORE
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.images import to_model_input
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.service.tensors import from_tensor, to_tensor
from xaiserve.training import metrics as M

pytestmark = pytest.mark.slow  # the default zoo's server (~10 s to start)

N = 6


@pytest.fixture(scope="module")
def stub(zoo):
    return zoo.stub()


@pytest.fixture(scope="module")
def registry():
    return Registry(RegistryConfig(store=DEFAULT_STORE, warmup=False))


def _split(name: str):
    from xaiserve.training.datasets import get_dataset

    return get_dataset(name).split("test")  # uint8 images [n, 3, H, W], as a client sends them


def _explain(stub, model: str, chw_u8: np.ndarray, **opts) -> pb.ExplainResponse:
    image = pb.Image(tensor=to_tensor(np.ascontiguousarray(chw_u8.transpose(1, 2, 0))))
    return stub.Explain(
        pb.ExplainRequest(
            model=model, image=image, options=pb.ExplainOptions(fidelity=True, mask_resolution=pb.MASK_AT_MODEL, **opts)
        ),
        timeout=60,
    )


def _x(registry, entry_name: str, images: np.ndarray) -> torch.Tensor:
    spec = registry.resolve(entry_name).input
    return torch.stack(
        [torch.from_numpy(to_model_input(im.transpose(1, 2, 0).astype(np.float32) / 255.0, spec)) for im in images]
    )


def test_classifier_fidelity_is_the_evaluations_target_probability(stub, registry):
    ch = _split("lesions")
    module = registry.torch_module(registry.resolve("lesions-classifier"))
    x = _x(registry, "lesions-classifier", ch.images[:N])
    for model, method in (("lesions-nemt", ""), ("lesions-classifier", "gradcam"), ("lesions-classifier", "saliency")):
        served, masks, targets = [], [], []
        for i in range(N):
            t = int(ch.labels[i])
            r = _explain(stub, model, ch.images[i], method=method, target_label=t)
            assert r.HasField("fidelity") and r.target_label == t
            served.append(r.fidelity)
            masks.append(from_tensor(r.mask))
            targets.append(t)
        ours = M.fidelity(module, x, np.stack(masks), kind="classifier", targets=np.array(targets))
        np.testing.assert_allclose(served, ours, atol=2e-4, err_msg=f"{model} {method}")
        assert all(0.0 <= f <= 1.0 for f in served)  # a probability, not a cosine of logits


def test_classifier_fidelity_without_a_target_explains_the_argmax(stub, registry):
    ch = _split("lesions")
    module = registry.torch_module(registry.resolve("lesions-classifier"))
    x = _x(registry, "lesions-classifier", ch.images[:2])
    r = [_explain(stub, "lesions-classifier", ch.images[i], method="saliency") for i in range(2)]
    with torch.no_grad():
        argmax = module(x).argmax(dim=1).numpy()
    assert [a.target_label for a in r] == list(argmax)
    ours = M.fidelity(module, x, np.stack([from_tensor(a.mask) for a in r]), kind="classifier", targets=argmax)
    np.testing.assert_allclose([a.fidelity for a in r], ours, atol=2e-4)


def test_encoder_fidelity_is_the_evaluations_cosine(stub, registry):
    ch = _split("scenes")
    module = registry.torch_module(registry.resolve("scenes-simclr"))
    x = _x(registry, "scenes-simclr", ch.images[:N])
    for model, method in (("scenes-nemu", ""), ("scenes-simclr", "saliency")):
        r = [_explain(stub, model, ch.images[i], method=method) for i in range(N)]
        ours = M.fidelity(module, x, np.stack([from_tensor(a.mask) for a in r]), kind="encoder")
        np.testing.assert_allclose([a.fidelity for a in r], ours, atol=2e-4, err_msg=f"{model} {method}")


def test_nemt_says_when_the_target_is_absent(stub, registry):
    """For every label k: target_probability = softmax(Phi(x * m))_k with the served mask, and
    target_absent = max(m) < 0.5 or that probability <= 0.5. Labels other than the prediction on
    single-lesion images are where an absent class shows up."""
    ch = _split("lesions")
    entry = registry.resolve("lesions-classifier")
    module = registry.torch_module(entry)
    x = _x(registry, "lesions-classifier", ch.images[:N])
    k = len(entry.labels)
    flags = {"absent": 0, "present": 0}
    for model in ("lesions-nemt", "lesions-nemt-cond"):
        for i in range(3):
            for t in range(k):
                r = _explain(stub, model, ch.images[i], target_label=t)
                assert r.HasField("target_probability")
                m = from_tensor(r.mask)
                with torch.no_grad():
                    p = torch.softmax(module(x[i : i + 1] * torch.from_numpy(m.copy())[None, None]).double(), dim=1)[
                        0, t
                    ]
                assert r.target_probability == pytest.approx(float(p), abs=2e-4)
                assert r.target_absent == (float(m.max()) < 0.5 or not r.target_probability > 0.5)
                flags["absent" if r.target_absent else "present"] += 1
    assert flags["absent"] > 0 and flags["present"] > 0, flags
    # not a NEMt model: no such fields
    r = _explain(stub, "scenes-nemu", _split("scenes").images[0])
    assert not r.HasField("target_probability") and not r.target_absent
