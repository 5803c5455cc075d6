"""The spiral denoiser's serving form (handlers/denoise/spiral_runtime.py): the same map as the
torch module and the single ONNX graph, on every layout path, thread-safe, and what the registry
serves for spiral denoisers."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.tiny_models import perturbed_denoiser
from xaiserve.handlers.denoise import spiral_runtime as sr
from xaiserve.handlers.denoise.export import export_onnx, ort_denoise, ort_session
from xaiserve.handlers.denoise.layers import grid_operator_from
from xaiserve.handlers.denoise.networks import Denoiser, DenoiserConfig
from xaiserve.service.registry import OnnxModel, Registry, RegistryConfig

torch.set_num_threads(1)
STORE = Path(__file__).resolve().parent.parent / "model_store"


def _particles(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, size, size)).astype(np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("predict", ["clean", "noise"])
def test_runtime_equals_the_torch_module_on_both_layouts(predict: str) -> None:
    """Channels (4, 8, 16): with ONNX Runtime's NCHWc block of 16 (AVX-512) the first two levels
    run NCHW and the last blocked, the decoder mixing both; with a block of 8 only the first
    level is NCHW. Either way every resampling kernel and layout path is exercised."""
    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16), predict=predict))
    rt = sr.SpiralRuntime(m)
    x = _particles(5, 32)
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    got = rt.denoise(x)
    assert got.shape == want.shape and got.dtype == np.float32
    assert _rel(got, want) < 2e-5
    if rt.blk:
        convs = [c for cs in rt.enc for c in cs] + rt.dec + [rt.out]
        assert any(c.out_blocked for c in convs) and any(not c.out_blocked for c in convs)
        assert any(any(c.in_blocked.values()) for c in convs)


@pytest.mark.slow
def test_runtime_on_the_store_model_equals_its_onnx_graph_at_several_batch_sizes() -> None:
    reg = Registry(RegistryConfig(store=STORE, warmup=False, prefer_cuda=False))
    entry = reg.resolve("cryoem-spiral")
    rt = sr.SpiralRuntime(reg.torch_module(entry))
    sess = ort_session(reg.path(entry, "onnx"))
    for b in (1, 3, 32):
        x = _particles(b, 64, seed=b) * 5.0
        assert _rel(rt.denoise(x), ort_denoise(sess, x)) < 2e-5, b


def test_kernels_against_their_definitions() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 50)).astype(np.float32)
    index = rng.integers(0, 50, (4, 30))
    weight = rng.standard_normal((4, 30)).astype(np.float32)
    want = (x[:, index] * weight).sum(1)  # [6, 30]
    out = np.empty((6, 30), np.float32)
    sr._sparse_rows(x, index, weight, out)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    xb = rng.standard_normal((3, 50, 8)).astype(np.float32)
    outb = np.empty((3, 30, 8), np.float32)
    sr._sparse_blocked(xb, index, weight, outb)
    np.testing.assert_allclose(outb, np.einsum("dkml,km->dml", xb[:, index], weight), rtol=1e-5, atol=1e-5)


def test_ribbon_rows_are_what_gridsample_reads_from_the_stored_grid() -> None:
    m = Denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16))).eval()
    rt = sr.SpiralRuntime(m)
    grid = m.ops.rib0_grid
    n = m.ops.n[0]
    x = torch.randn(2, 3, 1, n)
    want = F.grid_sample(x, grid.expand(2, -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False)[
        :, :, [0, 2]
    ]
    ws = sr._Workspace()
    got = rt.ribbons[0].rows(np.ascontiguousarray(x.numpy()), ws, "t")
    # GridSample recomputes the sample position from the float32 grid, grid_operator_from in
    # float32 too but in another order: positions agree to ~1e-4 of a sample (layers.py)
    tol = 2e-4 * float(x.abs().max())
    np.testing.assert_allclose(got, want.numpy(), atol=tol)
    blk = 8
    xb = np.ascontiguousarray(x.numpy().reshape(2, 3, 1, n).transpose(0, 2, 3, 1))  # 3 channels in one padded block
    padded = np.zeros((2, 1, 1, n, blk), np.float32)
    padded[..., :3] = xb[:, None, :, :, :].reshape(2, 1, 1, n, 3)
    gotb = rt.ribbons[0].rows(padded, ws, "tb")  # [2, 1, 2, n, blk]
    np.testing.assert_allclose(gotb[..., :3].transpose(0, 4, 1, 2, 3).reshape(2, 3, 2, n), want.numpy(), atol=tol)
    assert not gotb[..., 3:].any()  # padded channels stay zero


def test_concurrent_calls_of_different_batch_sizes_agree_with_sequential_ones() -> None:
    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16)), seed=3)
    rt = sr.SpiralRuntime(m)
    inputs = [_particles(b, 32, seed=b) for b in (1, 2, 7, 16)]
    want = [rt.denoise(x) for x in inputs]
    got: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            got[t] = [rt.denoise(inputs[(t + i) % 4]) for i in range(8)]
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    for t, outs in got.items():
        for i, y in enumerate(outs):
            np.testing.assert_array_equal(y, want[(t + i) % 4])


def test_results_do_not_alias_the_workspace() -> None:
    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16)))
    rt = sr.SpiralRuntime(m)
    a, b = _particles(2, 32, seed=1), _particles(2, 32, seed=2)
    ya = rt.denoise(a)
    keep = ya.copy()
    rt.denoise(b)
    np.testing.assert_array_equal(ya, keep)


def test_wrong_shapes_and_cartesian_networks_are_refused() -> None:
    m = Denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16))).eval()
    rt = sr.SpiralRuntime(m)
    with pytest.raises(ValueError, match=r"\[B, 1, 32, 32\]"):
        rt.denoise(np.zeros((2, 1, 16, 16), np.float32))
    with pytest.raises(ValueError, match="spiral"):
        sr.SpiralRuntime(Denoiser(DenoiserConfig(arch="cartesian", size=32, channels=(4, 8, 16))).eval())


def test_the_registry_serves_spiral_denoisers_through_the_runtime_unless_told_not_to(caplog) -> None:
    reg = Registry(RegistryConfig(store=STORE, warmup=True, prefer_cuda=False, intra_op_threads=1))
    plain = Registry(
        RegistryConfig(store=STORE, warmup=True, prefer_cuda=False, intra_op_threads=1, spiral_runtime=False)
    )
    with caplog.at_level("INFO", logger="xaiserve.registry"):
        served = reg.onnx("cryoem-spiral")
    assert isinstance(served, sr.SpiralRuntime)
    assert [r.backend for r in caplog.records if r.getMessage() == "model loaded"] == ["spiral_runtime"]
    assert isinstance(plain.onnx("cryoem-spiral"), OnnxModel)
    assert isinstance(reg.onnx("cryoem-cartesian"), OnnxModel)
    x = _particles(4, 64, seed=9)
    got = served.run({"particles": x})["denoised"]
    want = plain.onnx("cryoem-spiral").run({"particles": x})["denoised"]
    assert _rel(got, want) < 2e-5


@pytest.mark.slow
def test_an_exported_graph_and_the_runtime_of_the_same_module_agree(tmp_path) -> None:
    """The portable artefact and the serving form stay two views of one network (kernel 5: five
    ribbon rows, four of them interpolated)."""
    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16), kernel=5), seed=5)
    path = export_onnx(m, tmp_path / "m.onnx")
    x = _particles(3, 32, seed=4)
    assert _rel(sr.SpiralRuntime(m).denoise(x), ort_denoise(ort_session(path), x)) < 2e-5


def test_the_nchwc_probe_reports_a_block_size() -> None:
    assert sr.nchwc_block() in (0, 4, 8, 16)


def test_grid_operator_is_the_runtime_ribbon() -> None:
    """The runtime reads the outer rows of `grid_operator_from` (the training operator) as is."""
    m = Denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16))).eval()
    rt = sr.SpiralRuntime(m)
    idx, w = grid_operator_from(m.ops.rib1_grid, m.ops.n[1])
    idx = idx.view(3, -1, 2)[[0, 2]].numpy()
    np.testing.assert_array_equal(rt.ribbons[1].i0, idx[..., 0])
    np.testing.assert_array_equal(rt.ribbons[1].w1, w.view(3, -1, 2)[[0, 2]].numpy()[..., 1])


@pytest.mark.slow
def test_an_onnx_only_spiral_entry_is_served_by_its_graph(tmp_path) -> None:
    """Weights are what the runtime is built from; an entry that ships only its ONNX graph (a
    legitimate store entry) is served by that graph, with the same results."""
    from xaiserve.service.modelstore import add_entry

    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16)), seed=2)
    export_onnx(m, tmp_path / "s" / "1" / "model.onnx")
    add_entry(
        tmp_path,
        {
            "name": "s",
            "version": "1",
            "kind": "denoiser",
            "files": {"onnx": "s/1/model.onnx"},
            "input": {"height": 32, "width": 32, "channels": 1, "mean": [0.0], "std": [1.0]},
            "arch": m.config.to_dict(),
        },
    )
    served = Registry(RegistryConfig(store=tmp_path, warmup=True, prefer_cuda=False, intra_op_threads=1)).onnx("s")
    assert isinstance(served, OnnxModel)
    x = _particles(2, 32, seed=6)
    assert _rel(served.run({"particles": x})["denoised"], sr.SpiralRuntime(m).denoise(x)) < 2e-5


def test_batches_above_the_chunk_size_and_shrinking_batches_give_the_same_results() -> None:
    """Large batches run in chunks of sr.CHUNK; a smaller batch after a larger one reads a prefix
    of the bigger buffers (and binds them anew): results must not depend on either."""
    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16)), seed=4)
    rt = sr.SpiralRuntime(m)
    x = _particles(sr.CHUNK + 5, 32, seed=11)
    with torch.no_grad():
        want = m(torch.from_numpy(x)).numpy()
    assert _rel(rt.denoise(x), want) < 2e-5
    for b in (7, 1, 3):
        assert _rel(rt.denoise(x[:b]), want[:b]) < 2e-5, b


@pytest.mark.slow
def test_a_batch_split_over_threads_gives_the_single_thread_results() -> None:
    m = perturbed_denoiser(DenoiserConfig(arch="spiral", size=32, channels=(4, 8, 16)), seed=7)
    one, two = sr.SpiralRuntime(m, threads=1), sr.SpiralRuntime(m, threads=2)
    assert two.threads == 2 and sr.SpiralRuntime(m, threads=0).threads >= 1
    for b in (1, 2, 9, 2 * sr.CHUNK + 3):
        x = _particles(b, 32, seed=20 + b)
        assert _rel(two.denoise(x), one.denoise(x)) < 1e-6, b
