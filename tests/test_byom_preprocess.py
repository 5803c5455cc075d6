"""Preprocessing modes (stretch | letterbox | center-crop) and their inverse for maps
(service.images.to_model_input / to_input_geometry), and torch forms of a user model
(handlers.nets.forms): loading, GradCAM layer, feature pyramid, fixed batch, training-mode export."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from tests.byom_nets import make, save_forms
from xaiserve.errors import FailedPrecondition
from xaiserve.handlers import saliency
from xaiserve.handlers.nets.forms import GraphForm, RowWise, find_pyramid, load_torch_form, tapped
from xaiserve.service.images import InputSpec, fit, to_input_geometry, to_model_input

torch.set_num_threads(1)


def spec(mode: str, h: int = 32, w: int = 48) -> InputSpec:
    return InputSpec(h, w, 1, (0.5,), (0.25,), mode)


def ramp(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((yy / h + xx / w) / 2)[:, :, None]


def as_map(x: np.ndarray, s: InputSpec) -> np.ndarray:
    """The model input's one channel back in [0, 1] (what a map of the model's input looks like)."""
    return x[0] * s.std[0] + s.mean[0]


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "center-crop"])
def test_same_aspect_is_a_plain_resize_in_every_mode(mode):
    img = ramp(64, 96)  # 2:3, like the model's 32 x 48
    s = spec(mode)
    assert fit(64, 96, s).offset == (0, 0)
    np.testing.assert_allclose(to_model_input(img, s), to_model_input(img, spec("stretch")))


def test_letterbox_pads_with_the_mean_and_the_inverse_cuts_the_padding():
    s = spec("letterbox")
    img = ramp(60, 40)  # tall image into a wide model: content 32 x 21 (rounded), centred
    f = fit(60, 40, s)
    assert f.content[0] == 32 and f.content[1] == round(40 * 32 / 60) and f.offset[0] == 0 and f.offset[1] > 0
    x = to_model_input(img, s)
    left = f.offset[1]
    assert np.allclose(x[:, :, :left], 0.0) and np.allclose(x[:, :, left + f.content[1] :], 0.0)  # mean = 0 normalised
    back = to_input_geometry(as_map(x, s), s, 60, 40)
    assert back.shape == (60, 40)
    assert np.abs(back - img[:, :, 0]).mean() < 0.02  # the image comes back, no padding band in it


def test_center_crop_covers_the_input_and_the_unseen_border_is_zero():
    s = spec("center-crop")
    img = ramp(40, 40) * 0.5 + 0.5  # values in [0.5, 1]: a zero in the map is the border
    f = fit(40, 40, s)
    assert f.content == (48, 48) and f.offset == (-8, 0)  # 48 x 48 scaled, 8 rows cut top and bottom
    x = to_model_input(img, s)
    assert np.allclose(as_map(x, s), to_model_input(img, spec("stretch", 48, 48))[0, 8:40] * 0.25 + 0.5, atol=1e-5)
    back = to_input_geometry(as_map(x, s), s, 40, 40)
    rows = 8 * 40 // 48  # the cut rows, in image pixels
    assert np.allclose(back[: rows - 1], 0.0) and np.allclose(back[-(rows - 1) :], 0.0)
    assert np.abs(back[rows + 1 : -rows - 1] - img[rows + 1 : -rows - 1, :, 0]).mean() < 0.02


def test_stacked_and_coarse_maps_map_back_too():
    s = spec("letterbox")
    maps = np.random.default_rng(0).random((3, 16, 24)).astype(np.float32)  # a coarser grid, same aspect
    assert to_input_geometry(maps, s, 50, 90).shape == (3, 50, 90)


# -- torch forms -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("forms")
    return {a: save_forms(make(a, size=(64, 64)), root / a, size=(64, 64)) for a in ("vgg", "mobile")} | {"root": root}


@pytest.mark.slow
@pytest.mark.parametrize("arch,kind", [("vgg", "classifier"), ("mobile", "encoder")])
@pytest.mark.parametrize("key", ["torchscript", "exported_program"])
def test_torch_forms_equal_the_module_and_run_every_gradient_method(files, arch, kind, key):
    ref = make(arch, size=(64, 64))
    mod = load_torch_form(files[arch][key], key, channels=3, height=64, width=64)
    assert isinstance(mod, GraphForm)  # TorchScript converted to a graph: hooks and guided ReLUs work
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), ref(x), atol=1e-5, rtol=1e-4)
    for method in saliency.methods_for(kind):
        got = saliency.attribute(method, mod, x[:1], kind=kind)
        assert got.shape == (1, 64, 64) and np.isfinite(got).all(), method
        if method != "gradcam":  # same network, same maps (GradCAM's layer is chosen per form)
            np.testing.assert_allclose(
                got, saliency.attribute(method, ref, x[:1], kind=kind), atol=1e-4, err_msg=method
            )


@pytest.mark.slow
def test_gradcam_layer_is_the_last_conv_block_not_the_global_pool(files):
    mod = load_torch_form(files["vgg"]["exported_program"], "exported_program", channels=3, height=64, width=64)
    seen = []
    h = mod.gradcam_layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    mod(torch.randn(1, 3, 64, 64))
    h.remove()
    assert seen == [(1, 8, 16, 16)]  # the last conv's ReLU (before the last max-pool), not [1, 8, 1, 1]
    ref = make("vgg", size=(64, 64))
    # the module-tree rule (nn.Module): the `features` block, 8 x 8 after its pool, not AdaptiveAvgPool2d
    from xaiserve.handlers.saliency.methods import gradcam_layer

    assert gradcam_layer(ref, torch.randn(1, 3, 64, 64)) is ref.features


@pytest.mark.slow
def test_feature_pyramid_found_by_probe_and_overridden_by_taps(files):
    mod = load_torch_form(files["mobile"]["exported_program"], "exported_program", channels=3, height=64, width=64)
    taps = find_pyramid(mod, torch.randn(1, 3, 64, 64))
    assert [t.stride for t in taps] == [2, 4, 8, 16, 32]
    assert [t.channels for t in taps] == [8, 12, 16, 24, 32]
    tm = tapped(mod, torch.randn(1, 3, 64, 64), taps=[taps[1].layer, taps[3].layer])
    out, pyr = tm.features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 16) and [tuple(p.shape) for p in pyr] == [(2, 12, 16, 16), (2, 24, 4, 4)]
    assert tm.pyramid_strides == (4, 16)
    with pytest.raises(FailedPrecondition, match="not a 4-D activation"):
        find_pyramid(mod, torch.randn(1, 3, 64, 64), taps=["nope"])
    # a plain nn.Module: hooks on its module tree
    ref = make("mobile", size=(64, 64))
    assert [t.stride for t in find_pyramid(ref, torch.randn(1, 3, 64, 64))] == [2, 4, 8, 16, 32]


@pytest.mark.slow
def test_fixed_batch_graph_runs_row_by_row(files):
    root = files["root"]
    paths = save_forms(make("vgg", size=(64, 64)), root / "static", size=(64, 64), static_batch=True)
    ep_static = torch.export.export(make("vgg", size=(64, 64)), (torch.randn(1, 3, 64, 64),))
    torch.export.save(ep_static, str(paths["exported_program"]))
    mod = load_torch_form(paths["exported_program"], "exported_program", channels=3, height=64, width=64)
    assert isinstance(mod, RowWise)
    assert saliency.attribute("smoothgrad", mod, torch.randn(1, 3, 64, 64), kind="classifier").shape == (1, 64, 64)


@pytest.mark.slow
def test_training_mode_export_and_foreign_files_are_refused(files, tmp_path):
    m = make("mobile", size=(64, 64)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(torch.export.export(m, (torch.randn(2, 3, 64, 64),)), str(tmp_path / "train.pt2"))
    with pytest.raises(FailedPrecondition, match="training mode.*model.eval"):
        load_torch_form(tmp_path / "train.pt2", "exported_program", channels=3, height=64, width=64)
    (tmp_path / "junk.pt2").write_bytes(b"not a model")
    with pytest.raises(FailedPrecondition, match="not a torch.export ExportedProgram"):
        load_torch_form(tmp_path / "junk.pt2", "exported_program", channels=3, height=64, width=64)
    with pytest.raises(FailedPrecondition, match="not a TorchScript file"):
        load_torch_form(tmp_path / "junk.pt2", "torchscript", channels=3, height=64, width=64)
    with pytest.raises(FailedPrecondition, match="does not run on a 3x40x40 input"):
        load_torch_form(_flatten_net(tmp_path), "exported_program", channels=3, height=40, width=40)


def _flatten_net(tmp_path):
    """A net with a Linear over its flattened 64 x 64 map: any other input size fails."""
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.Flatten(), nn.Linear(2 * 64 * 64, 4)).eval()
    path = tmp_path / "flat.pt2"
    torch.export.save(
        torch.export.export(net, (torch.randn(2, 3, 64, 64),), dynamic_shapes=({0: torch.export.Dim("b")},)), str(path)
    )
    return path


@pytest.mark.slow
def test_torchscript_kept_as_compiled_code_serves_autograd_methods_and_refuses_layer_methods(files):
    """When torch's converter cannot turn a TorchScript module into a graph, the module itself serves
    the methods that need only autograd; GradCAM and guided backprop (which need its layers and
    ReLUs) are refused, naming the file to add instead."""
    from xaiserve.handlers.nets.forms import ScriptForm

    script = torch.jit.load(str(files["mobile"]["torchscript"]))
    mod = ScriptForm(script, "converter failed (test)")
    x = torch.randn(1, 3, 64, 64)
    ref = make("mobile", size=(64, 64))
    np.testing.assert_allclose(
        saliency.attribute("saliency", mod, x, kind="encoder"),
        saliency.attribute("saliency", ref, x, kind="encoder"),
        atol=1e-5,
    )
    for method in ("gradcam", "guided_backprop"):
        with pytest.raises(FailedPrecondition, match=r"TorchScript could not be converted.*converter failed.*\.pt2"):
            saliency.attribute(method, mod, x, kind="encoder")
    with pytest.raises(FailedPrecondition, match="cannot be tapped"):
        find_pyramid(mod, x)
