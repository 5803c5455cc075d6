"""Guided backprop on capped rectifiers, and the torch form of an ONNX-only model (onnx2torch).

- guided backprop guides ReLU6 (nn.ReLU6, Clip(0, 6) in ONNX, aten.hardtanh in a torch.export graph)
  as it guides ReLU: on the MobileNet-style net of tests/byom_nets.py with ReLU6 activations it
  equals a reference built from backward hooks on every nn.ReLU6 (positive gradients through the
  linear range only), in the module, its .pt2 and its ONNX graph converted to torch; HardSwish and a
  clamp whose lower bound is not 0 keep their ordinary gradient (guided == plain saliency);
- the converter turns the common CNN ops into torch equal to ONNX Runtime within its tolerance, and
  refuses a graph that it converts wrongly or not at all with a message that says what to add.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from tests.byom_nets import make, make_ops_net
from xaiserve.errors import FailedPrecondition
from xaiserve.handlers.nets.forms import GraphForm, find_pyramid, load_exported_program
from xaiserve.handlers.nets.onnx_torch import PARITY_RTOL, convert_onnx, export_program
from xaiserve.handlers.saliency.methods import METHOD_CLASSES

torch.set_num_threads(1)
H, W = 64, 96


def _export(module: nn.Module, path: Path, shape: tuple[int, ...], names=("input", "out")) -> Path:
    x = torch.randn(2, *shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes={names[0]: {0: "b"}, names[1]: {0: "b"}},
            opset_version=17,
            dynamo=False,
        )
    return path


def _hooked_reference(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Guided gradient of the encoder's mean output by backward hooks: every nn.ReLU6 passes only
    positive gradients (its own backward already zeroes them outside 0 < x < 6)."""
    handles = [
        m.register_full_backward_hook(lambda _m, gin, _gout: (gin[0].clamp(min=0),))
        for m in module.modules()
        if isinstance(m, (nn.ReLU6, nn.ReLU))
    ]
    try:
        xx = x.detach().clone().requires_grad_(True)
        module(xx).mean(1).sum().backward()
        return xx.grad
    finally:
        for h in handles:
            h.remove()


def _raw(method: str, module: nn.Module, x: torch.Tensor, kind: str = "encoder") -> torch.Tensor:
    if kind == "classifier":
        with torch.no_grad():
            target = module(x).argmax(1)
        return METHOD_CLASSES[method](module, kind).attribute(x, target)
    return METHOD_CLASSES[method](module, kind).attribute(x)


@pytest.fixture(scope="module")
def relu6_net(tmp_path_factory):
    root = tmp_path_factory.mktemp("relu6")
    net = make("mobile", size=(H, W), act="relu6")
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, H, W)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(net, (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(ep, str(root / "m.pt2"))
    onnx_path = _export(net, root / "m.onnx", (3, H, W))
    return net, root / "m.pt2", onnx_path


def test_guided_backprop_guides_relu6_in_module_exported_graph_and_converted_onnx(relu6_net):
    net, pt2, onnx_path = relu6_net
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(3))
    ref = _hooked_reference(net, x)
    plain = _raw("saliency", net, x)
    assert (ref - plain).abs().max() > 1e-3 * plain.abs().max()  # guiding changes the map
    graph = load_exported_program(pt2)
    assert any("hardtanh" in str(n.target) for n in graph.graph_module.graph.nodes)
    converted = convert_onnx(onnx_path, channels=3, height=H, width=W)
    for form in (net, graph, converted):
        got = _raw("guided_backprop", form, x)
        torch.testing.assert_close(got, ref, atol=1e-5 * float(ref.abs().max()) + 1e-7, rtol=1e-4)


def test_hardswish_and_non_rectifying_clamps_keep_their_ordinary_gradient():
    net = make("mobile", size=(H, W), act="hardswish")
    for p in net.parameters():
        p.requires_grad_(False)
    x = torch.randn(1, 3, H, W)
    torch.testing.assert_close(_raw("guided_backprop", net, x), _raw("saliency", net, x))

    class Clamped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            # mixed signs after the clamp: negative gradients reach it, which guiding would zero
            self.register_buffer("sign", torch.tensor([1.0, -1.0, 1.0, -1.0]).view(1, 4, 1, 1))

        def forward(self, x):
            return (torch.clamp(self.conv(x), -0.5, 0.5) * self.sign).mean((2, 3))

    m = Clamped().eval()
    torch.testing.assert_close(_raw("guided_backprop", m, x), _raw("saliency", m, x))

    class Capped(Clamped):  # clamp(min=0, max=1): a capped rectifier, guided
        def forward(self, x):
            return (torch.clamp(self.conv(x), min=0.0, max=1.0) * self.sign).mean((2, 3))

    c = Capped().eval()
    assert not torch.allclose(_raw("guided_backprop", c, x), _raw("saliency", c, x))


def test_converter_matches_onnxruntime_on_the_common_cnn_ops(tmp_path):
    """Conv (plain, depthwise), BatchNormalization, Relu, Clip, HardSwish, Sigmoid, the pools, Gemm,
    MatMul, Add, Mul, Flatten, Reshape (from Shape), Concat: torch form == ONNX Runtime, gradients
    reach the input, and the feature pyramid and GradCAM layer are found on the converted graph."""
    import onnx

    path = _export(make_ops_net(), tmp_path / "ops.onnx", (3, 64, 64), names=("x", "y"))
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert ops >= {
        "Conv",
        "BatchNormalization",
        "Relu",
        "Clip",
        "HardSwish",
        "Sigmoid",
        "GlobalAveragePool",
        "AveragePool",
        "MaxPool",
        "Gemm",
        "MatMul",
        "Add",
        "Mul",
        "Flatten",
        "Reshape",
        "Concat",
    }
    module = convert_onnx(path, channels=3, height=64, width=64)
    assert isinstance(module, GraphForm) and module.source == "onnx"
    x = torch.randn(3, 3, 64, 64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {"x": x.numpy()})[0]
    with torch.no_grad():
        got = module(x).numpy()
    assert np.abs(got - ref).max() <= PARITY_RTOL * (1 + np.abs(ref).max())
    g = _raw("saliency", module, x, kind="classifier")
    assert g.shape == x.shape and float(g.abs().sum()) > 0
    taps = find_pyramid(module, x[:1])
    assert [t.stride for t in taps] == [2, 4, 8, 16, 32]
    cam = _raw("gradcam", module, x[:1], kind="classifier")
    assert cam.shape == (1, 1, 64, 64)
    # its Reshape target is computed from Shape: torch.export cannot capture it with a dynamic batch
    why = export_program(module, tmp_path / "ops.pt2", channels=3, height=64, width=64)
    assert why and "data-dependent" in why and not (tmp_path / "ops.pt2").exists()


def test_converted_graph_that_differs_or_does_not_convert_is_refused(tmp_path, monkeypatch):
    path = _export(make_ops_net(), tmp_path / "ops.onnx", (3, 64, 64))
    from xaiserve.handlers.nets import onnx_torch

    monkeypatch.setattr(onnx_torch, "PARITY_RTOL", 0.0)
    monkeypatch.setattr(onnx_torch, "parity", lambda *a: (0.5, 1e-4))
    with pytest.raises(FailedPrecondition, match=r"differs from ONNX Runtime \(max \|difference\| 0\.5.*--torch"):
        convert_onnx(path, channels=3, height=64, width=64)
    monkeypatch.undo()
    # an op onnx2torch has no converter for (GlobalMaxPool, onnx2torch 1.5.15)
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["h"])
    pool = helper.make_node("GlobalMaxPool", ["h"], ["p"])
    flat = helper.make_node("Flatten", ["p"], ["y"])
    graph = helper.make_graph(
        [node, pool, flat],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 3])],
    )
    odd = tmp_path / "odd.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(odd))
    with pytest.raises(FailedPrecondition, match=r"onnx2torch cannot convert odd\.onnx .*--torch model\.pt2"):
        convert_onnx(odd, channels=3, height=8, width=8)
