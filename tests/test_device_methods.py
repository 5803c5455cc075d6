"""Every torch-based method keeps its tensors on the module's device, and survives running out of memory.

No GPU here: the methods run with device "cpu" through the code a GPU worker runs, under the two
instruments of tests/devicecheck.py (a default device of "meta", so that a tensor made without a
device is off the module's device, and a recorder of tensors off it, factory calls without a device
and host copies in xaiserve's code). Out-of-memory errors are simulated by a module that raises
torch.OutOfMemoryError (the type torch raises on CUDA) above a batch size: the real allocator
cannot be made to fail here, the halving code path is the one a GPU worker takes.
"""

from __future__ import annotations

import captum.attr  # noqa: F401  (imported before the checks: module-level constants are not the methods')
import pytest
import torch
from torch import nn

from tests.devicecheck import DeviceRecorder, wrong_default_device
from xaiserve.devices import ChunkSize, is_out_of_memory, run_chunked
from xaiserve.handlers import saliency
from xaiserve.handlers.ablation import scores as S
from xaiserve.handlers.ablation.optimiser import AblationConfig, AblationPath
from xaiserve.handlers.nets import EncoderArch, FrozenSpec
from xaiserve.handlers.relax import Relax, RelaxConfig
from xaiserve.handlers.relax.embed import torch_embed

torch.set_num_threads(1)
ARCH = EncoderArch(stem=8, widths=(8, 16), blocks=(1, 1))
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def frozen(num_classes: int = 0) -> nn.Module:
    torch.manual_seed(0)
    m = FrozenSpec(ARCH, num_classes=num_classes).build().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


@pytest.fixture(scope="module")
def encoder() -> nn.Module:
    return frozen()


@pytest.fixture(scope="module")
def classifier() -> nn.Module:
    return frozen(3)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(3, 24, 24, generator=torch.Generator().manual_seed(1))


class OomAbove(nn.Module):
    """The wrapped module, except that a batch above `limit` raises CUDA's out-of-memory error."""

    def __init__(self, module: nn.Module, limit: int):
        super().__init__()
        self.module, self.limit, self.batches = module, limit, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {x.shape[0]} images (simulated)")
        return self.module(x)


# --- every tensor on the module's device ------------------------------------------------------------
RELAX_CASES = [
    dict(estimator="plain", masking="zero"),
    dict(estimator="plain", masking="noise", two_pass=True),
    dict(estimator="control_variate", masking="texture", adaptive=True, target_error=1e-6, min_masks=16),
    dict(estimator="plain", masking="brightness"),
    dict(estimator="plain", masking="shape"),
]


@pytest.mark.parametrize("case", RELAX_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_relax_creates_every_tensor_on_the_image_device(encoder, image, case):
    cfg = RelaxConfig(num_masks=48, batch_size=16, cells=4, cv_min_fit=16, cv_grid=4, **case)
    relax = Relax(torch_embed(encoder), cfg, mean=MEAN, std=STD, forward_batch=8)
    seen = []
    with wrong_default_device(), DeviceRecorder() as rec:
        out = relax.attribute(image, progress=lambda p: seen.append(p.importance))
    assert not rec.findings, rec.report()
    assert out.importance.device.type == "cpu" and torch.isfinite(out.importance).all()
    assert out.forward_batch == 8 and len(seen) == 3
    # the instruments are live: the same run without its device handling is caught
    with wrong_default_device(), DeviceRecorder() as rec:
        torch.zeros(3) + 1
    assert any(f.what == "tensor on meta" for f in rec.findings)


def test_the_recorder_catches_a_host_copy_and_a_factory_without_device_in_xaiserve_code(encoder, image):
    from xaiserve.handlers.relax import masks

    with DeviceRecorder() as rec:
        masks.generate_masks(2, masks.mask_geometry(8, 8, 2), generator=None)  # device given: nothing to find
    assert not rec.findings, rec.report()
    with DeviceRecorder() as rec:
        masks.interpolation_matrix(3, 8)  # torch.eye(..., device=None): would be on the CPU next to a GPU batch
        torch_embed(encoder)(image[None]).cpu()  # the test's own host copy: not xaiserve's code
    assert [f.what for f in rec.findings] == ["factory without device"], rec.report()


@pytest.mark.parametrize("score", ["retaining", "contrastive", "straddling"])
def test_ablation_path_creates_every_tensor_on_the_image_device(classifier, image, score):
    cfg = AblationConfig(
        num_slices=4,
        mask_size=8,
        max_iterations=3,
        min_iterations=1,
        score=score,
        reduction="contrastive" if score == "straddling" else "transition",
        require_baseline_change=False,
    )
    heat = []
    with wrong_default_device(), DeviceRecorder() as rec:
        out = AblationPath(classifier, cfg, slice_batch=3).attribute(image, progress=lambda p: heat.append(p.heatmap))
    assert not rec.findings, rec.report()
    assert out.iterations == 3 and len(heat) == 3 and out.path.device.type == "cpu"


@pytest.mark.parametrize("kind", ["encoder", "classifier"])
def test_gradient_methods_create_no_tensor_off_the_module_device(encoder, classifier, image, kind):
    module = encoder if kind == "encoder" else classifier
    allowed = {("reduce.py", "to_map")}  # the documented boundary: maps come back as numpy
    for method in saliency.methods_for(kind):
        with DeviceRecorder(allowed=allowed) as rec:
            maps = saliency.attribute(method, module, image, kind=kind)
        assert not rec.findings, f"{method}:\n{rec.report()}"
        assert maps.shape == (1, 24, 24)


# --- out of memory: halve, go on, same result -----------------------------------------------------
def test_run_chunked_halves_on_out_of_memory_and_keeps_the_order():
    calls, events = [], []

    def fn(a: int, b: int) -> list[int]:
        calls.append(b - a)
        if b - a > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return list(range(a, b))

    chunk = ChunkSize(16, on_oom=lambda old, new: events.append((old, new)))
    out = run_chunked(fn, 10, chunk)
    assert [i for part in out for i in part] == list(range(10))
    assert events == [(16, 8), (8, 4), (4, 2)] and chunk.size == 2 and chunk.halvings == 3
    assert calls[:4] == [10, 8, 4, 2]
    with pytest.raises(torch.OutOfMemoryError):  # at a single item there is nothing left to halve
        run_chunked(lambda a, b: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")), 3, ChunkSize(1))
    with pytest.raises(ValueError):  # anything else is not an allocation failure: raised at once
        run_chunked(lambda a, b: (_ for _ in ()).throw(ValueError("bad")), 3, ChunkSize(4))
    assert is_out_of_memory(
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
    )
    assert not is_out_of_memory(RuntimeError("shape mismatch"))


def test_relax_after_out_of_memory_gives_the_same_maps(encoder, image):
    cfg = RelaxConfig(num_masks=64, batch_size=32, cells=4, seed=3)
    ref = Relax(torch_embed(encoder), cfg).attribute(image)
    events = []
    flaky = OomAbove(encoder, 9)
    out = Relax(torch_embed(flaky), cfg, on_oom=lambda o, n: events.append((o, n))).attribute(image)
    assert events == [(32, 16), (16, 8)] and out.forward_batch == 8
    assert max(flaky.batches[-4:]) <= 8 and out.num_masks == 64
    torch.testing.assert_close(out.importance, ref.importance, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.uncertainty, ref.uncertainty, rtol=0, atol=1e-6)


@pytest.mark.parametrize("score", ["retaining", "dissipating", "contrastive", "straddling"])
def test_chunked_gradient_equals_the_batched_one(classifier, image, score):
    from xaiserve.handlers.ablation.path import affine_path

    paths = torch.stack([affine_path(5, 8, 8) for _ in range(S.num_paths(score))])
    paths = (paths + 0.05 * torch.randn(paths.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    base = torch.zeros_like(image)
    whole = S.evaluate_with_grad(score, classifier, image, base, paths, 1, 0.7, 0.2)
    parts = S.evaluate_with_grad(score, classifier, image, base, paths, 1, 0.7, 0.2, ChunkSize(3))
    for a, b in zip(whole, parts):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    value, probs = S.evaluate_chunked(score, classifier, image, base, paths, 1, 0.7, 0.2, ChunkSize(2))
    torch.testing.assert_close(value, whole[0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(probs, whole[1], rtol=1e-5, atol=1e-7)


def test_ablation_path_after_out_of_memory_gives_the_same_path(classifier, image):
    cfg = AblationConfig(num_slices=6, mask_size=8, max_iterations=4, min_iterations=1, require_baseline_change=False)
    baseline = torch.zeros_like(image)  # given: no blur search (its batches of 8 are not what is tested)
    ref = AblationPath(classifier, cfg).attribute(image, baseline=baseline)
    events = []
    flaky = OomAbove(classifier, 4)
    opt = AblationPath(flaky, cfg, on_oom=lambda o, n: events.append((o, n)))
    out = opt.attribute(image, baseline=baseline)
    assert events == [(6, 3)] and opt.chunk.size == 3
    torch.testing.assert_close(out.path, ref.path, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.heatmap, ref.heatmap, rtol=1e-4, atol=1e-5)
    assert out.score == pytest.approx(ref.score, rel=1e-5)
