"""A user's own model as a frozen torch module: TorchScript and torch.export files, GradCAM and pyramid taps.

Pure torch (no grpc, protobuf or xaiserve.service). Three torch forms of a frozen encoder/classifier:

- an nn.Module (the project's handlers.nets networks, or any module built in-process);
- TorchScript (``torch.jit.load``). TorchScript runs compiled code: forward hooks cannot be
  registered on its submodules and torch-function modes do not see its ReLUs, so GradCAM and
  guided backprop could not run on it. It is therefore converted, once at load, to a torch.export
  graph with torch's own converter (``torch._export.converter.TS2EPConverter``, the route that
  ``torch.export.export`` itself recommends for a ScriptModule). When the conversion fails the raw
  TorchScript module serves the methods that need only autograd (saliency, SmoothGrad, IG,
  GradientShap), and GradCAM / guided backprop are refused with the reason (`ScriptForm.opaque`);
- a torch.export ExportedProgram (``.pt2``, ``torch.export.load``) -> ``ep.module()``, an fx
  GraphModule of aten ops.

Graph forms (`GraphForm`) get named taps: an ``nn.Identity`` call inserted after a node of the fx
graph. Hooks on a tap see that node's output, so captum's LayerGradCam runs on the last convolution
(`GraphForm.gradcam_layer`) and the masking-network decoders read a feature pyramid (`tapped`)
exactly as they do on a module tree. Exported graphs refuse ``.train()`` / ``.eval()``;
`GraphForm.train` therefore sets only its own flag (the graph was captured in eval mode, which
`load_exported_program` checks).

Feature pyramid ([NEM-U] sec. 3.3: "the frozen model acts as the U-Net encoder"): a probe forward
pass records every 4-D activation; for each spatial stride 2, 4, ..., 32 (input size / feature size,
the same along both axes) the LAST activation at that stride is kept: the deepest features at that
resolution, just before the network downsamples again. `taps=` names the layers (module names, or
fx node names for graph forms) instead.
"""

from __future__ import annotations

import logging
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from xaiserve.errors import FailedPrecondition, quote

log = logging.getLogger("xaiserve.forms")

# manifest `files` keys of the torch forms (the project's own networks use "state_dict" + "arch")
TORCH_FILE_KEYS = ("torchscript", "exported_program")
PYRAMID_STRIDES = (2, 4, 8, 16, 32)
_CONV_TARGETS = {torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default}
_TRAINING_OPS = {"aten._native_batch_norm_legit_functional.default", "aten._native_batch_norm_legit.default"}


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode and no gradients for the parameters (gradients still reach the input)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def first_tensor(out: Any) -> torch.Tensor:
    """A model's output tensor: the tensor itself, or the first element of a tuple/list output
    (models that also return auxiliary outputs)."""
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if isinstance(out, dict) and out:
        out = next(iter(out.values()))
    if not isinstance(out, torch.Tensor):
        raise FailedPrecondition(
            f"the model returned {type(out).__name__}, not a tensor (or a tuple whose first element is one)"
        )
    return out


class GraphForm(nn.Module):
    """An fx GraphModule (torch.export / converted TorchScript) as a frozen module with named taps."""

    opaque = False

    def __init__(self, graph_module: torch.fx.GraphModule, source: str):
        super().__init__()
        self.graph_module = graph_module
        self.source = source  # "exported_program" | "torchscript" | "onnx" (onnx2torch) | "module"
        self.output_index = 0  # which output of a multi-output graph is the model's output
        self._taps: dict[str, str] = {}  # fx node name -> tap submodule name

    def train(self, mode: bool = True) -> "GraphForm":
        # exported graphs raise on .train()/.eval(); their mode was fixed when they were captured
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.graph_module(x)
        if self.output_index and isinstance(out, (tuple, list)):
            out = out[self.output_index]
        return first_tensor(out)

    def shape_prop(self, x: torch.Tensor) -> None:
        """Record every node's output shape (meta "tensor_meta") for graphs built without it (onnx2torch's)."""
        from torch.fx.passes.shape_prop import ShapeProp

        with torch.no_grad():
            ShapeProp(self.graph_module).propagate(x)

    # -- graph inspection ------------------------------------------------------------------------
    def activations(self, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
        """(node name, shape) of every 4-D tensor the graph computes for x, in execution order."""
        seen: list[tuple[str, tuple[int, ...]]] = []

        class _Rec(torch.fx.Interpreter):
            def run_node(self, n):  # noqa: D401 - fx hook
                out = super().run_node(n)
                is_tap = n.op == "call_module" and str(n.target).startswith("xai_tap_")
                if (
                    n.op in ("call_function", "call_module", "call_method")
                    and not is_tap
                    and isinstance(out, torch.Tensor)
                    and out.ndim == 4
                    and out.is_floating_point()
                ):
                    seen.append((n.name, tuple(out.shape)))
                return out

        with torch.no_grad():
            _Rec(self.graph_module).run(x)
        return seen

    def conv_nodes(self) -> list[str]:
        """Convolutions: aten calls (torch.export graphs) or nn.Conv2d submodules (onnx2torch graphs)."""
        gm = self.graph_module
        out = []
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target in _CONV_TARGETS:
                out.append(n.name)
            elif n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), nn.Conv2d):
                out.append(n.name)
        return out

    def tap(self, node_name: str) -> nn.Module:
        """The tap module after fx node `node_name` (inserted on first use): hooks on it see that output."""
        if node_name in self._taps:
            return getattr(self.graph_module, self._taps[node_name])
        gm = self.graph_module
        nodes = {n.name: n for n in gm.graph.nodes}
        node = nodes.get(node_name)
        if node is None:
            raise FailedPrecondition(f"layer {quote(node_name, 80)} is not a node of the model's graph")
        mod_name = f"xai_tap_{len(self._taps)}"
        gm.add_submodule(mod_name, nn.Identity())
        with gm.graph.inserting_after(node):
            tap = gm.graph.call_module(mod_name, (node,))
        node.replace_all_uses_with(tap, delete_user_cb=lambda user: user is not tap)
        gm.recompile()
        self._taps[node_name] = mod_name
        return getattr(gm, mod_name)

    @property
    def gradcam_layer(self) -> nn.Module:
        """GradCAM's layer: a tap on the last conv block's activation, i.e. the graph's last
        convolution followed through the shape-preserving ops it feeds alone (batch norm, ReLU)."""
        convs = self.conv_nodes()
        if not convs:
            raise FailedPrecondition("gradcam needs a convolution; the model's graph has none")
        nodes = {n.name: n for n in self.graph_module.graph.nodes}
        node = nodes[convs[-1]]

        def shape(n):
            v = n.meta.get("val")
            if isinstance(v, torch.Tensor):
                return tuple(v.shape)
            tm = n.meta.get("tensor_meta")  # ShapeProp's record (onnx2torch graphs)
            return tuple(tm.shape) if tm is not None and hasattr(tm, "shape") else None

        def elementwise(n) -> bool:
            if n.op == "call_function":
                return True
            return n.op == "call_module" and not str(n.target).startswith("xai_tap_")

        while len(node.users) == 1:
            (user,) = node.users
            if not elementwise(user) or shape(user) is None or shape(user) != shape(node):
                break
            node = user
        return self.tap(node.name)


class ScriptForm(nn.Module):
    """A TorchScript module that could not be converted to a graph: autograd methods only."""

    opaque = True

    def __init__(self, script: torch.jit.ScriptModule, reason: str):
        super().__init__()
        self.script = script
        self.reason = reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.script(x))


class RowWise(nn.Module):
    """Runs a model whose graph has a fixed batch of 1 one row at a time (same outputs, concatenated)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.opaque = getattr(inner, "opaque", False)

    def train(self, mode: bool = True) -> "RowWise":
        self.training = mode
        self.inner.train(mode)
        return self

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.inner.gradcam_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.inner(x[i : i + 1]) for i in range(x.shape[0])], dim=0)


def example_input(channels: int, height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


def _check_eval_graph(ep: Any, path: Path) -> None:
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        t = str(n.target)
        if (
            t in _TRAINING_OPS
            or (t == "aten.batch_norm.default" and len(n.args) > 5 and n.args[5] is True)
            or (t == "aten.dropout.default" and len(n.args) > 2 and n.args[2] is True)
        ):
            raise FailedPrecondition(
                f"{path.name} was exported in training mode ({t} updates batch statistics or drops units); "
                "call model.eval() before torch.export.export and save it again"
            )


def load_exported_program(path: Path) -> GraphForm:
    """``torch.export.load`` -> GraphForm of ``ep.module()``; refuses a graph captured in training mode."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - torch.export.load raises many types on foreign bytes
        raise FailedPrecondition(
            f"{path.name} is not a torch.export ExportedProgram ({e.__class__.__name__}: {quote(str(e), 160)}); "
            "save one with torch.export.save(torch.export.export(model.eval(), (x,)), 'model.pt2')"
        ) from None
    _check_eval_graph(ep, path)
    return GraphForm(ep.module(), "exported_program")


def load_torchscript(path: Path, example: torch.Tensor) -> nn.Module:
    """``torch.jit.load`` -> GraphForm via TS2EPConverter (see the module docstring), else ScriptForm."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript is deprecated upstream, still served here
            script = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - torch.jit.load raises RuntimeError/ValueError/... on foreign bytes
        raise FailedPrecondition(
            f"{path.name} is not a TorchScript file ({e.__class__.__name__}: {quote(str(e), 160)}); "
            "save one with torch.jit.save(torch.jit.trace(model.eval(), x), 'model.ts')"
        ) from None
    script.eval()
    try:
        from torch._export.converter import TS2EPConverter

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            ep = TS2EPConverter(script, (example,)).convert()
        _check_eval_graph(ep, path)
        form = GraphForm(ep.module(), "torchscript")
        with torch.no_grad():
            ref = first_tensor(script(example))
            diff = float((ref - form(example)).abs().max())
        if not diff <= 1e-4 * (1.0 + float(ref.abs().max())):
            raise ValueError(f"converted graph differs from the TorchScript module by {diff:.3g}")
        return form
    except FailedPrecondition:
        raise
    except Exception as e:  # noqa: BLE001 - the converter is best effort; the raw module still serves
        reason = f"{e.__class__.__name__}: {quote(str(e).splitlines()[0] if str(e) else '', 160)}"
        log.warning(
            "TorchScript module kept as compiled code; gradcam and guided_backprop need a graph",
            extra={"file": path.name, "reason": reason},
        )
        return ScriptForm(script, reason)


def load_torch_form(path: Path, key: str, *, channels: int, height: int, width: int) -> nn.Module:
    """The frozen torch module of a manifest `files[key]` (key in TORCH_FILE_KEYS), checked on a
    batch of 2 (a graph traced or exported with a fixed batch of 1 is wrapped in RowWise)."""
    example = example_input(channels, height, width)
    if key == "exported_program":
        module: nn.Module = load_exported_program(path)
    elif key == "torchscript":
        module = load_torchscript(path, example)
    else:
        raise FailedPrecondition(f"unknown torch form {key!r}; use one of {', '.join(TORCH_FILE_KEYS)}")
    freeze(module)
    with torch.no_grad():
        try:
            out = module(example)
        except Exception as e:  # noqa: BLE001 - a fixed-batch graph fails here; batch 1 tells
            try:
                out = module(example[:1])
            except Exception as e1:  # noqa: BLE001
                raise FailedPrecondition(
                    f"{Path(path).name} does not run on a {channels}x{height}x{width} input "
                    f"({e1.__class__.__name__}: {quote(str(e1).splitlines()[0] if str(e1) else '', 160)}); "
                    "check the manifest's input size and channels"
                ) from None
            log.info(
                "torch form has a fixed batch of 1; running rows one by one",
                extra={"file": Path(path).name, "reason": str(e)[:120]},
            )
            module = freeze(RowWise(module))
            out = module(example)
    if out.ndim != 2 or out.shape[0] != example.shape[0]:
        raise FailedPrecondition(
            f"{Path(path).name} maps [B,{channels},{height},{width}] to {list(out.shape)}; an encoder or classifier "
            "must return [B,D] (an embedding or logits)"
        )
    return module


# -- GradCAM layer -------------------------------------------------------------------------------------
def last_conv_module(module: nn.Module, x: torch.Tensor) -> nn.Module | None:
    """The last module, in the order forward passes finish, whose output is a 4-D map larger than 1x1
    and that is (or contains) an nn.Conv2d: the last conv block before global pooling."""
    has_conv = {m for m in module.modules() if any(isinstance(s, nn.Conv2d) for s in m.modules())}
    last: list[nn.Module] = []

    def hook(mod, _inp, out):
        if mod in has_conv and isinstance(out, torch.Tensor) and out.ndim == 4 and out.shape[2] * out.shape[3] > 1:
            last.append(mod)

    handles = [m.register_forward_hook(hook) for m in module.modules() if m is not module]
    try:
        with torch.no_grad():
            module(x[:1])
    finally:
        for h in handles:
            h.remove()
    return last[-1] if last else None


# -- feature pyramid ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tap:
    """One pyramid level: the layer (module or fx node name), its stride and channels."""

    layer: str
    stride: int
    channels: int
    shape: tuple[int, int]


def _stride(inp: tuple[int, int], shape: tuple[int, int]) -> int | None:
    h, w = shape
    if h < 1 or w < 1 or inp[0] % h or inp[1] % w:
        return None
    sh, sw = inp[0] // h, inp[1] // w
    return sh if sh == sw else None


def _activations(module: nn.Module, x: torch.Tensor) -> list[tuple[str, tuple[int, ...]]]:
    if isinstance(module, GraphForm):
        return module.activations(x)
    if getattr(module, "opaque", False):
        raise FailedPrecondition(
            f"the model's TorchScript could not be converted to a graph ({getattr(module, 'reason', '')}); "
            "its layers cannot be tapped: give it as a torch.export ExportedProgram (.pt2) instead"
        )
    names = {m: n for n, m in module.named_modules() if n}
    seen: list[tuple[str, tuple[int, ...]]] = []

    def hook(mod, _inp, out):
        if isinstance(out, torch.Tensor) and out.ndim == 4 and out.is_floating_point():
            seen.append((names[mod], tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in names]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def find_pyramid(
    module: nn.Module, x: torch.Tensor, taps: Sequence[str] | None = None, strides: Sequence[int] = PYRAMID_STRIDES
) -> list[Tap]:
    """The feature pyramid of `module` at input x [1,C,H,W] (see the module docstring), shallow to deep.

    taps: layer names to use instead (each must give a 4-D map at a power-of-two stride, strides
    increasing); an unknown name raises FailedPrecondition listing the candidates."""
    inp = (int(x.shape[2]), int(x.shape[3]))
    acts = _activations(module, x[:1])
    if taps:
        by_name = {}
        for name, shape in acts:
            by_name[name] = shape
        out = []
        for name in taps:
            if name not in by_name:
                cands = ", ".join(f"{n} {list(s[1:])}" for n, s in acts[-40:])
                raise FailedPrecondition(
                    f"tap {quote(name, 80)} is not a 4-D activation of the model; the last ones are: {cands}"
                )
            shape = by_name[name]
            s = _stride(inp, shape[2:])
            if s is None or s & (s - 1):
                raise FailedPrecondition(
                    f"tap {quote(name, 80)} has shape {list(shape[1:])}: not a power-of-two stride of the "
                    f"{inp[0]}x{inp[1]} input"
                )
            out.append(Tap(name, s, int(shape[1]), (int(shape[2]), int(shape[3]))))
        out.sort(key=lambda t: t.stride)
        if len({t.stride for t in out}) != len(out):
            raise FailedPrecondition(f"taps {', '.join(taps)} repeat a stride; name one layer per stride")
        return out
    last: dict[int, tuple[str, tuple[int, ...]]] = {}
    for name, shape in acts:
        s = _stride(inp, shape[2:])
        if s in strides:
            last[s] = (name, shape)
    if not last:
        raise FailedPrecondition(
            f"the model has no feature map at a stride of {', '.join(map(str, strides))} of its "
            f"{inp[0]}x{inp[1]} input; name the layers with --taps"
        )
    return [Tap(n, s, int(sh[1]), (int(sh[2]), int(sh[3]))) for s, (n, sh) in sorted(last.items())]


class TappedModel(nn.Module):
    """A frozen model with the interface of handlers.nets' pyramid models, for the NEM decoders:

        features(x) -> (output, pyramid)   pyramid_channels, pyramid_strides, output_dim

    One forward pass gives the output and every tap ([NEM-U] sec. 3.1: the mask comes "in
    parallel" with the representation). Hooks collect the taps; a lock keeps concurrent passes apart."""

    def __init__(self, model: nn.Module, taps: Sequence[Tap], output_dim: int):
        super().__init__()
        self.model = model
        self.taps = tuple(taps)
        self.pyramid_channels = tuple(t.channels for t in self.taps)
        self.pyramid_strides = tuple(t.stride for t in self.taps)
        self.output_dim = int(output_dim)
        if isinstance(model, GraphForm):
            self._tap_modules = [model.tap(t.layer) for t in self.taps]
        else:
            mods = dict(model.named_modules())
            self._tap_modules = [mods[t.layer] for t in self.taps]
        self._lock = threading.Lock()

    def train(self, mode: bool = True) -> "TappedModel":
        self.training = mode
        self.model.eval()  # the frozen model always runs in eval mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.model(x))

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        got: dict[int, torch.Tensor] = {}

        def hook(i):
            def f(_m, _i, out):
                got[i] = out

            return f

        with self._lock:
            handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self._tap_modules)]
            try:
                out = first_tensor(self.model(x))
            finally:
                for h in handles:
                    h.remove()
        return out, [got[i] for i in range(len(self.taps))]


def tapped(module: nn.Module, x: torch.Tensor, taps: Sequence[str] | None = None) -> TappedModel:
    """`module` with its feature pyramid found (find_pyramid) and tapped."""
    with torch.no_grad():
        d = int(first_tensor(module(x[:1])).shape[1])
    return TappedModel(module, find_pyramid(module, x, taps), d)


# -- ONNX export of a torch form ------------------------------------------------------------------------
class _ExportWrapper(nn.Module):
    """Forward-only view for torch.onnx.export: its train() does not reach exported graphs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> "_ExportWrapper":
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return first_tensor(self.module(x))


def export_onnx(module: nn.Module, path: Path, example: torch.Tensor, *, opset: int = 17) -> Path:
    """The ONNX graph of a frozen encoder/classifier (input "image", output "output", dynamic batch),
    through the TorchScript-based exporter (it traces exported graphs and TorchScript alike)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic: dict | None = {"image": {0: "batch"}, "output": {0: "batch"}}
    if isinstance(module, RowWise):  # a fixed batch of 1 stays one (OnnxModel runs it row by row)
        module, example, dynamic = module.inner, example[:1], None
    target = module.script if isinstance(module, ScriptForm) else _ExportWrapper(module)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            target,
            (example,),
            str(path),
            input_names=["image"],
            output_names=["output"],
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))
    return path
