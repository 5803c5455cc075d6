"""The SIFT decomposition of [THESIS] sec. 4.1-4.2 (handlers/sift): keypoints, feature cells and the
linear decoder. Reconstruction with all gains 1 (eq. 4.12-4.14, Lemma 10) to a stated tolerance,
linearity, sparse = dense, gradients, the cell geometry, the sparsity guard, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xaiserve.errors import InvalidArgument
from xaiserve.handlers.sift.ablation import keypoints_of
from xaiserve.handlers.sift.decomposition import (
    DecompositionConfig,
    _nearest_keypoint,
    _smooth_cells,
    decompose,
    scale_layers,
)
from xaiserve.handlers.sift.heatmaps import bandpass_amplitude, extract
from xaiserve.handlers.sift.keypoints import KeypointConfig, Keypoints, detect

torch.set_num_threads(1)

MEAN, STD = (0.6, 0.5, 0.4), (0.2, 0.2, 0.2)
# all gains 1 give back x (Lemma 10) up to float32 storage of the decoder: |D(1) - x| <= TOL for x
# of magnitude ~3 (normalised units); measured ~5e-7
TOL = 1e-5


def _image(size: int = 48, seed: int = 0) -> np.ndarray:
    """HWC [0, 1]: a smooth background, a dozen blobs of different sizes and colours, mild texture."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    img = np.stack([0.6 + 0.1 * xx, 0.5 + 0.1 * yy, 0.4 + 0.05 * xx * yy], axis=-1)
    for _ in range(12):
        cy, cx = rng.uniform(0.1, 0.9, 2)
        r = rng.uniform(0.03, 0.15)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
        img = img * (1 - blob) + rng.uniform(0, 1, 3) * blob
    img = img + 0.02 * rng.standard_normal(img.shape)
    return np.clip(img, 0, 1)


def _normalised(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((img - np.asarray(MEAN)) / np.asarray(STD)).transpose(2, 0, 1).copy()).float()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return _normalised(_image())


@pytest.fixture(scope="module")
def kp(x) -> Keypoints:
    return keypoints_of(x, KeypointConfig(), MEAN, STD)


@pytest.fixture(scope="module")
def dec(x, kp):
    return decompose(x, kp)


def test_keypoints_are_scale_space_points_inside_the_image(kp):
    assert 3 <= len(kp) <= 200
    assert kp.positions.shape == (len(kp), 2) and kp.sigmas.shape == (len(kp),)
    assert (kp.positions >= -0.5).all() and (kp.positions <= 47.5).all() and (kp.sigmas > 0).all()
    # duplicates (one per orientation in scikit-image) are merged: every (r, sigma) once
    assert len(np.unique(np.c_[kp.positions, kp.sigmas], axis=0)) == len(kp)
    # the cubic refinement gives sub-pixel positions (Remark 19): not all on pixel centres
    assert np.abs(kp.positions - np.round(kp.positions)).max() > 0.01


@pytest.mark.parametrize(
    "cfg",
    [
        DecompositionConfig(),
        DecompositionConfig(eta=1.0),
        DecompositionConfig(smooth=False),  # decoder version 1 (sec. 4.1.3B)
        DecompositionConfig(
            sparsity=0.2, layers_per_octave=2
        ),  # aggressive cutoff: the redistribution restores the mass
        DecompositionConfig(resolution_sigmas=()),  # every layer at full resolution
    ],
    ids=["default", "eta1", "hard", "sparse", "fullres"],
)
@pytest.mark.slow
def test_all_gains_one_reconstruct_the_image(x, kp, cfg):
    dec = decompose(x, kp, cfg)
    err = float((dec.decode(torch.ones(len(kp)))[0] - x).abs().max())
    assert err <= TOL, err
    assert dec.reconstruction_error <= TOL and dec.dropped_voxels == 0


def test_the_cells_are_a_partition_of_unity(dec):
    # eq. 4.46-4.47 with C = 1 per layer: all gains 1 give 1 everywhere (Lemma 10 on the scalar field)
    vor = dec.voronoi(torch.ones(dec.num_keypoints))
    assert torch.allclose(vor, torch.ones_like(vor), atol=1e-5)
    # each gain contributes a non-negative amount, so gains in [0, 1] give a map in [0, 1]
    v = dec.voronoi(torch.rand(dec.num_keypoints, generator=torch.Generator().manual_seed(0)))
    assert float(v.min()) >= -1e-6 and float(v.max()) <= 1 + 1e-6


def test_the_decoder_is_linear(dec):
    g = torch.Generator().manual_seed(1)
    K = dec.num_keypoints
    u, v = torch.randn(K, generator=g), torch.randn(K, generator=g)
    lhs = dec.decode(2.0 * u - 0.5 * v)
    rhs = 2.0 * dec.decode(u) - 0.5 * dec.decode(v)
    assert torch.allclose(lhs, rhs, atol=1e-5)
    assert float(dec.decode(torch.zeros(K)).abs().max()) == 0.0  # the implicit baseline (sec. 4.3.1)
    # batched decoding is the per-row decoding
    both = dec.decode(torch.stack([u, v]))
    assert torch.allclose(both[1], dec.decode(v)[0], atol=1e-6)


def test_sparse_and_dense_forms_agree(dec):
    dense = dec.dense()
    theta = torch.rand(5, dec.num_keypoints, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(dense.decode(theta), dec.decode(theta), atol=1e-5)
    assert torch.allclose(dense.voronoi(theta), dec.voronoi(theta), atol=1e-6)
    # sparse even with a dozen keypoints (a pixel meets several cells over the scale layers); the
    # fill falls with K: ~2 % at 224 x 224 with ~600 keypoints (bench/bench_sift.py)
    assert dec.nnz < 0.75 * sum(lv.delta.numel() for lv in dense.levels)


def test_gradients_flow_and_match_the_dense_jacobian(dec):
    K = dec.num_keypoints
    w = torch.randn(1, *dec.image_shape, generator=torch.Generator().manual_seed(3))
    grads = []
    for d in (dec, dec.dense()):
        theta = torch.full((2, K), 0.5, requires_grad=True)
        (d.decode(theta) * w).sum().backward()
        grads.append(theta.grad)
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-4)
    # linear: the gradient is <w, D(e_j)>, the same for every row of the batch
    basis = dec.decode(torch.eye(K))
    assert torch.allclose(grads[0][0], (basis * w).flatten(1).sum(1), atol=1e-4)


def test_metric_weights_are_the_norms_of_the_single_features(dec):
    K = dec.num_keypoints
    w = dec.metric_weights(batch=4)
    assert torch.allclose(w, dec.decode(torch.eye(K)).flatten(1).norm(dim=1), rtol=1e-5)
    assert (w > 0).all()


def test_cells_are_nearest_keypoints_in_the_eta_metric():
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(0)
    kp = Keypoints(rng.uniform(0, 20, (12, 2)), rng.uniform(0.5, 8, 12))
    ys, xs = np.arange(20.0), np.arange(20.0)
    for eta in (1.0, 4.0):
        got = _nearest_keypoint(ys, xs, 3.0, cKDTree(np.c_[kp.positions, eta * kp.sigmas]), eta)
        d = (
            (ys[:, None, None] - kp.positions[:, 0]) ** 2
            + (xs[None, :, None] - kp.positions[:, 1]) ** 2
            + eta**2 * (3.0 - kp.sigmas) ** 2
        )
        assert (got == d.argmin(axis=-1)).all()  # eq. 4.18-4.19


@pytest.mark.parametrize(
    "shape, blur, s",
    [((20, 17), 1.3, 0.01), ((9, 11), 6.0, 0.01), ((12, 12), 2.0, 0.3), ((16, 8), 0.7, 0.0)],
    ids=["default", "kernel-wider-than-grid", "cutoff", "no-cutoff"],
)
def test_bulk_cells_are_the_per_cell_definition(shape, blur, s):
    # the sparse-product construction of all cells at once equals eq. 4.27 + 4.37-4.39 cell by cell:
    # each characteristic function blurred on the whole grid (scipy's reflecting boundary, which
    # folds kernels wider than the grid), cut off at s, and the mass redistributed with the guard
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    K = 7
    labels = rng.integers(0, K - 1, shape)  # keypoint K - 1 owns no voxel
    labels[: shape[0] // 2, : shape[1] // 2] = 0  # one big cell
    got, present, dropped = _smooth_cells(labels, blur, True, s, 1e-3, K)
    cells = np.stack([gaussian_filter((labels == k).astype(float), blur, mode="reflect") for k in range(K)], -1)
    if s > 0:
        cells = np.where(cells > s, (cells - s) / (1 - s), 0.0)
    m = cells.sum(-1, keepdims=True)
    want = cells * (1 + (1 - m) / np.maximum(m, 1e-3))
    assert np.abs(got.toarray().reshape(*shape, K) - want).max() < 1e-12
    assert present == int((want.reshape(-1, K) > 0).any(0).sum()) and dropped == int((m < 1e-3).sum())
    # a partition of unity again where m >= guard (Lemma 10)
    kept = (m >= 1e-3).ravel()
    assert np.allclose(np.asarray(got.sum(axis=1)).ravel()[kept], 1.0)
    hard, _, _ = _smooth_cells(labels, blur, False, s, 1e-3, K)
    assert (hard.toarray() == np.eye(K)[labels.ravel()]).all()  # version 1: the hard cells (eq. 4.20)


def test_layers_tile_the_sigma_axis_and_reduce_resolution():
    layers = scale_layers(64, 64, DecompositionConfig())
    assert layers[0].lower == 0.0 and np.isinf(layers[-1].upper)
    assert all(a.upper == b.lower for a, b in zip(layers[:-1], layers[1:]))
    # Table 4.1: 1/2 resolution from sigma 4.5, 1/4 from 9 (2.25 pixels of the reduced grid)
    assert {lay.factor for lay in layers if lay.lower < 4.5} == {1}
    assert all(lay.factor == 4 and lay.shape == (16, 16) for lay in layers if lay.lower >= 9)


def test_smooth_cells_soften_the_edges_of_an_ablated_feature(x, kp):
    # sec. 4.1.3C: switching a feature off leaves no hard Voronoi edge (fig. 4.5)
    jumps = []
    for smooth in (False, True):
        d = decompose(x, kp, DecompositionConfig(smooth=smooth, eta=1.0))
        theta = torch.ones(len(kp))
        theta[int(np.argmax(kp.sigmas < 3))] = 0.0
        diff = (d.decode(theta)[0] - x).abs().sum(0)
        jumps.append(float(torch.maximum((diff[1:] - diff[:-1]).abs().max(), (diff[:, 1:] - diff[:, :-1]).abs().max())))
    assert jumps[1] < jumps[0]


def test_the_guard_keeps_an_extreme_cutoff_finite(x, kp):
    # s = 0.9 truncates every voxel shared between cells: m < guard there (eq. 4.39 with max(m, 1e-3))
    d = decompose(x, kp, DecompositionConfig(sparsity=0.9))
    out = d.decode(torch.ones(len(kp)))
    assert torch.isfinite(out).all() and d.dropped_voxels > 0
    assert d.reconstruction_error > TOL  # those voxels are left out, as the thesis says
    assert d.reconstruction_error < float(x.abs().max())


def test_heatmap_extractions(dec):
    K = dec.num_keypoints
    v = torch.zeros(K)
    v[0] = 1.0
    vor, band = extract(dec, v, mean=MEAN, std=STD)
    assert vor.shape == band.shape == dec.image_shape[1:]
    assert 0 <= float(vor.min()) and float(vor.max()) <= 1 and float(band.max()) == pytest.approx(1.0)
    # the Voronoi map of one keypoint peaks near it
    r, c = np.unravel_index(int(vor.argmax()), vor.shape)
    assert float(vor[int(round(dec.keypoints.positions[0][0])), int(round(dec.keypoints.positions[0][1]))]) > 0
    # eq. 4.48 on a constant image is 0; on an edge it is positive
    flat = torch.ones(1, 3, 16, 16)
    assert float(bandpass_amplitude(flat).abs().max()) < 1e-6
    step = flat.clone()
    step[..., 8:] = 0.0
    assert float(bandpass_amplitude(step).max()) > 0.1
    del r, c


def test_a_flat_image_has_no_keypoints():
    with pytest.raises(InvalidArgument, match="no SIFT keypoint"):
        detect(np.full((48, 48, 3), 0.5))


def test_more_keypoints_than_the_limit_are_refused():
    with pytest.raises(InvalidArgument, match="more than this server's limit of 2"):
        detect(_image(), KeypointConfig(max_keypoints=2))


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan")])
def test_eta_must_be_positive(x, kp, eta):
    with pytest.raises(InvalidArgument, match="eta"):
        decompose(x, kp, DecompositionConfig(eta=eta))


def test_bad_shapes():
    with pytest.raises(InvalidArgument):
        detect(np.zeros((4, 4)))
    with pytest.raises(InvalidArgument):
        decompose(torch.zeros(48, 48), Keypoints(np.zeros((1, 2)), np.ones(1)))
