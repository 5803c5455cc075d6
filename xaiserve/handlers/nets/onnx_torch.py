"""The torch form of an ONNX-only model: the graph converted with onnx2torch and checked against ONNX Runtime.

Gradient methods, GradCAM, ablation paths and masking-network training back-propagate through the
frozen model, which ONNX Runtime cannot do. `convert_onnx` turns the ONNX graph into a torch fx
GraphModule with the maintained converter `onnx2torch` (one torch module per ONNX node: Conv with
groups (depthwise), BatchNormalization, Relu, Clip -> ReLU6 / clamp, HardSwish, Sigmoid, MaxPool,
AveragePool, GlobalAveragePool, Gemm, MatMul, Add, Mul, Flatten, Reshape, Concat, ... (its list:
onnx2torch/node_converters)), wraps it as a `GraphForm` (named taps after any node, so GradCAM and the
feature pyramid work as on a torch.export graph) and compares it with ONNX Runtime on random inputs
before it is used: max |torch - ORT| <= PARITY_RTOL x (1 + max |ORT|), else FailedPrecondition.

`export_program` saves the converted module as a torch.export ExportedProgram (.pt2, dynamic batch):
`xaiserve models add` stores that file, so serving an added ONNX model needs no converter. Graphs
whose Reshape targets are computed at run time (Shape -> Gather -> Concat -> Reshape, as torch's
exporter writes `x.reshape(x.shape[0], -1)`) cannot be exported with a dynamic batch (onnx2torch's
Reshape tests the target shape's values); those keep the ONNX file as their stored form and are
converted again at load (the manifest's `torch_form`).

onnx2torch and torchvision: the package declares torchvision as a requirement, and torchvision
cannot be installed beside the project's CPU torch (PyPI's torchvision pins the CUDA build). It is
installed with `pip install --no-deps onnx2torch` (scripts/setup.sh, the Dockerfile): its other
requirements (torch, onnx, numpy) are core dependencies. Only two of its converters import
torchvision, at module level: NonMaxSuppression (torchvision.ops.nms, box_convert) and RoiAlign
(torchvision.ops.roi_align), detection ops that no image classifier or encoder graph contains. The
package imports all converters at once, so `import_onnx2torch` imports it with a placeholder
`torchvision` module whose functions raise, visible only during that import (removed from
sys.modules afterwards): a graph with NMS or RoiAlign fails the conversion with that reason, every
other op converts as upstream.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import threading
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xaiserve.errors import FailedPrecondition, quote
from xaiserve.handlers.nets.forms import GraphForm, RowWise, example_input, first_tensor, freeze

log = logging.getLogger("xaiserve.forms")

CONVERTER = "onnx2torch"
PARITY_RTOL = 1e-4  # max |torch - onnxruntime| relative to 1 + max |onnxruntime output| (float32, same ops)
_IMPORT_LOCK = threading.Lock()
_TORCHVISION_FUNCS = {"ops": ("nms", "box_convert", "roi_align", "roi_pool", "deform_conv2d")}


def converter_available() -> bool:
    """Whether onnx2torch is installed (cheap: no import)."""
    return importlib.util.find_spec(CONVERTER) is not None


def converter_version() -> str:
    import importlib.metadata as md

    try:
        return md.version(CONVERTER)
    except md.PackageNotFoundError:
        return ""


def _missing_torchvision(name: str):
    def f(*_a: Any, **_k: Any):
        raise FailedPrecondition(
            f"ONNX op needs torchvision.ops.{name}, and torchvision is not installed (detection ops such as "
            "NonMaxSuppression and RoiAlign are not converted)"
        )

    return f


def import_onnx2torch() -> types.ModuleType:
    """`import onnx2torch`, with a placeholder torchvision during the import when there is none (see the
    module docstring); FailedPrecondition saying how to install it when it is missing."""
    if CONVERTER in sys.modules:
        return sys.modules[CONVERTER]
    if not converter_available():
        raise FailedPrecondition(
            "the ONNX-to-torch converter is not installed: `pip install --no-deps onnx2torch` "
            "(torch, onnx and numpy are already here; --no-deps keeps pip from pulling torchvision and a CUDA torch)"
        )
    with _IMPORT_LOCK:
        placed: list[str] = []
        if importlib.util.find_spec("torchvision") is None:
            tv = types.ModuleType("torchvision")
            tv.__doc__ = "placeholder while onnx2torch imports (xaiserve.handlers.nets.onnx_torch)"
            ops = types.ModuleType("torchvision.ops")
            for fn in _TORCHVISION_FUNCS["ops"]:
                setattr(ops, fn, _missing_torchvision(fn))
            tv.ops = ops  # type: ignore[attr-defined]
            sys.modules["torchvision"], sys.modules["torchvision.ops"] = tv, ops
            placed = ["torchvision", "torchvision.ops"]
        try:
            mod = importlib.import_module(CONVERTER)
            # its Slice indexes with a list (deprecated by torch, still the same result: the parity check
            # against ONNX Runtime would tell otherwise); one warning per process says nothing to act on
            warnings.filterwarnings(
                "ignore", message="Using a non-tuple sequence for multidimensional indexing", module=r"onnx2torch\."
            )
            return mod
        finally:
            for name in placed:
                sys.modules.pop(name, None)


def _ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def parity(module: nn.Module, session, in_name: str, out_name: str, x: torch.Tensor) -> tuple[float, float]:
    """(max |module(x) - ORT(x)|, the allowed difference PARITY_RTOL x (1 + max |ORT(x)|))."""
    ref = session.run([out_name], {in_name: x.numpy()})[0].astype(np.float64)
    with torch.no_grad():
        got = first_tensor(module(x)).double().numpy()
    if got.shape != ref.shape:
        return float("inf"), 0.0
    return float(np.abs(got - ref).max()), PARITY_RTOL * (1.0 + float(np.abs(ref).max()))


def convert_onnx(path: Path, *, channels: int, height: int, width: int, io: dict[str, str] | None = None) -> nn.Module:
    """The frozen torch form of the ONNX graph at `path` (see the module docstring): a GraphForm of the
    onnx2torch module (RowWise when the graph has a fixed batch of 1), checked against ONNX Runtime on
    a batch of random inputs. io: the manifest's map of the kind's names (image, output) to the graph's."""
    path = Path(path)
    o2t = import_onnx2torch()
    sess = _ort_session(path)
    inputs, outputs = sess.get_inputs(), [o.name for o in sess.get_outputs()]
    io = dict(io or {})
    in_name = io.get("image") or (inputs[0].name if len(inputs) == 1 else "image")
    out_name = io.get("output") or (outputs[0] if len(outputs) == 1 else "output")
    if in_name not in [i.name for i in inputs] or out_name not in outputs:
        raise FailedPrecondition(
            f"{path.name}: cannot tell the image input / output among inputs "
            f"{', '.join(i.name for i in inputs)} and outputs {', '.join(outputs)}; map them in the entry's io"
        )
    if len(inputs) != 1:
        raise FailedPrecondition(f"{path.name} takes {len(inputs)} inputs; a converted encoder/classifier takes one")
    import onnx

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = o2t.convert(onnx.load(str(path)))
    except Exception as e:  # noqa: BLE001 - the converter raises NotImplementedError/KeyError/... per op
        raise FailedPrecondition(
            f"{CONVERTER} cannot convert {path.name} ({e.__class__.__name__}: "
            f"{quote(str(e).splitlines()[0] if str(e) else '', 200)}); add a torch form of the same network "
            "(`xaiserve models add NAME model.onnx --torch model.pt2 ...`)"
        ) from None
    gm.eval()  # onnx2torch builds its modules in training mode (batch norm would use batch statistics)
    form = GraphForm(gm, "onnx")
    form.output_index = outputs.index(out_name)
    freeze(form)
    batch = inputs[0].shape[0] if inputs[0].shape else None
    module: nn.Module = form
    if batch == 1:
        module = freeze(RowWise(form))
    x = example_input(channels, height, width, batch=2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # onnx2torch's Slice warns about indexing with a list
            return _checked(form, module, sess, in_name, out_name, x, batch, path)
    except FailedPrecondition:
        raise
    except Exception as e:  # noqa: BLE001 - a converted op that does not run (NMS without torchvision, ...)
        raise FailedPrecondition(
            f"{path.name} converted with {CONVERTER} does not run on a {channels}x{height}x{width} input "
            f"({e.__class__.__name__}: {quote(str(e).splitlines()[0] if str(e) else '', 200)})"
        ) from None


def _checked(
    form: GraphForm, module: nn.Module, sess, in_name: str, out_name: str, x: torch.Tensor, batch, path: Path
) -> nn.Module:
    """The parity check of convert_onnx (a fixed batch of 1: each row alone, and the rows together)."""
    form.shape_prop(x[:1])
    if batch == 1:
        d1, tol = parity(form, sess, in_name, out_name, x[:1])
        d2, _ = parity(form, sess, in_name, out_name, x[1:])
        with torch.no_grad():
            rows = first_tensor(module(x)).shape[0]
        diff = max(d1, d2) if rows == 2 else float("inf")
    else:
        diff, tol = parity(module, sess, in_name, out_name, x)
    if not diff <= tol:
        raise FailedPrecondition(
            f"{path.name} converted with {CONVERTER} differs from ONNX Runtime (max |difference| {diff:.3g}, "
            f"allowed {tol:.3g}); add a torch form of the same network (`--torch model.pt2`)"
        )
    module.parity_max_abs_diff = diff  # type: ignore[assignment]
    return module


def export_program(module: nn.Module, path: Path, *, channels: int, height: int, width: int) -> str | None:
    """Save the converted module as a torch.export ExportedProgram at `path` (dynamic batch; a fixed
    batch of 1 stays one), reloaded and compared with the module. Returns None when saved, else the
    reason it could not be (the file is then not written)."""
    path = Path(path)
    inner = module.inner if isinstance(module, RowWise) else module
    x = example_input(channels, height, width, batch=1 if isinstance(module, RowWise) else 2)
    dyn = None if isinstance(module, RowWise) else ({0: torch.export.Dim("batch")},)
    # a failed capture logs the whole graph as a warning of this logger: the reason returned says enough
    shapes_log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = shapes_log.level
    shapes_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = torch.export.export(inner, (x,), dynamic_shapes=dyn)
            torch.export.save(ep, str(path))
            back = torch.export.load(str(path)).module()
            ref = first_tensor(inner(x))
            diff = float((first_tensor(back(x)) - ref).abs().max())
        if not diff <= PARITY_RTOL * (1.0 + float(ref.abs().max())):
            raise ValueError(f"the saved program differs from the converted module by {diff:.3g}")
        return None
    except Exception as e:  # noqa: BLE001 - torch.export raises many types (data-dependent guards, ...)
        path.unlink(missing_ok=True)
        first = str(e).splitlines()[0] if str(e) else ""
        return f"{e.__class__.__name__}: {first[:160]}"
    finally:
        shapes_log.setLevel(level)


__all__ = [
    "CONVERTER",
    "PARITY_RTOL",
    "convert_onnx",
    "converter_available",
    "converter_version",
    "export_program",
    "import_onnx2torch",
]
