"""Serving form of a spiral denoiser: ONNX Runtime convolutions, resampling in compiled loops.

Why: in one ONNX graph the spiral network spends more time outside its convolutions than in
them, in GridSample (the outer ribbon rows) and gathers (the level changes): generic operators
that pay ~2 ns per interpolated value where a loop specialised to "two taps along a 1-D signal"
pays well under 1 ns, and the level changes need transposes to be gathered at all. ONNX Runtime
has no operator for a fixed sparse resampling, and a custom operator needs its C headers, which
its Python wheel does not ship. So the network runs as a pipeline:
  - every ribbon convolution (sec. 7.3.2, [THESIS]) is one small ONNX Runtime graph (its own
    session): Conv 1 x k over each input part (the middle ribbon row is the spiral itself) plus
    Conv (rows - 1) x k over the part's interpolated outer rows, batch norm folded, bias, ReLU:
    the regrouping of `layers.SpiralOps.ribbon_conv`, optimised by ONNX Runtime into its NCHWc
    convolutions as in the single graph;
  - the outer ribbon rows are interpolated by `_interp_rows` / `_interp_blocked` (numba) with the
    2-tap weights of `layers.grid_operator_from`, i.e. what GridSample computes on the stored grid;
  - every other resampling (cartesian <-> spiral, between levels) is `_sparse_rows` /
    `_sparse_blocked` (numba), the stored (index, weight) operators;
  - maps of at least one NCHWc block of channels stay in ONNX Runtime's blocked layout between
    the graphs (their reorder nodes are cut out of the optimised graphs), so no layout passes are
    added at the graph boundaries and every resampling tap moves a block of contiguous channels.
The same map as the exported ONNX graph and the torch module (parity tested, ~1e-6 of the output
scale), built from the same state dict; the single ONNX graph stays the portable artefact
(`model.onnx`), this is how the server runs it on CPU (service.registry, `spiral_runtime`).
Measured by bench/bench_denoise.py.

    rt = SpiralRuntime(denoiser, threads=1)      # a Denoiser of arch "spiral" (eval weights)
    out = rt.denoise(particles)                  # float32 [B, 1, H, W] -> [B, 1, H, W]
"""

from __future__ import annotations

import functools
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch

from xaiserve.handlers.denoise.layers import grid_operator_from

INPUT_NAME, OUTPUT_NAME = "particles", "denoised"
CHUNK = 32  # particles per pass through the pipeline (see SpiralRuntime.denoise)


@numba.njit(fastmath=True, boundscheck=False, nogil=True)
def _sparse_rows(x: np.ndarray, index: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """out[d, m] = sum_k weight[k, m] * x[d, index[k, m]]: x [D, N], index/weight taps-major
    [K, M], out [D, M]. Taps-major so the inner loop runs over contiguous output positions."""
    nd = x.shape[0]
    nk, nm = index.shape
    for d in range(nd):
        xd = x[d]
        o = out[d]
        for m in range(nm):
            o[m] = 0.0
        for k in range(nk):
            ik = index[k]
            wk = weight[k]
            for m in range(nm):
                o[m] += wk[m] * xd[ik[m]]


@numba.njit(fastmath=True, boundscheck=False, nogil=True)
def _sparse_blocked(x: np.ndarray, index: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """The same map on channel blocks: x [D, N, blk], index/weight taps-major [K, M],
    out [D, M, blk]; each tap moves `blk` contiguous channels."""
    nd, _, nl = x.shape
    nk, nm = index.shape
    for d in range(nd):
        xd = x[d]
        od = out[d]
        for m in range(nm):
            o = od[m]
            for lane in range(nl):
                o[lane] = 0.0
            for k in range(nk):
                w = weight[k, m]
                src = xd[index[k, m]]
                for lane in range(nl):
                    o[lane] += w * src[lane]


@numba.njit(fastmath=True, boundscheck=False, nogil=True)
def _interp_rows(
    x: np.ndarray, i0: np.ndarray, i1: np.ndarray, w0: np.ndarray, w1: np.ndarray, out: np.ndarray
) -> None:
    """out[d, r, j] = w0[r, j] x[d, i0[r, j]] + w1[r, j] x[d, i1[r, j]]: linear interpolation of
    each row of x [D, n] at the positions of R ribbon rows (out [D, R, n]; weights are zero where
    a row leaves the spiral, as GridSample's zero padding)."""
    nd = x.shape[0]
    nr, n = i0.shape
    for d in range(nd):
        xd = x[d]
        for r in range(nr):
            o = out[d, r]
            a, b, ia, ib = w0[r], w1[r], i0[r], i1[r]
            for j in range(n):
                o[j] = a[j] * xd[ia[j]] + b[j] * xd[ib[j]]


@numba.njit(fastmath=True, boundscheck=False, nogil=True)
def _interp_blocked(
    x: np.ndarray, i0: np.ndarray, i1: np.ndarray, w0: np.ndarray, w1: np.ndarray, out: np.ndarray
) -> None:
    """_interp_rows on channel blocks: x [D, n, blk] -> out [D, R, n, blk]."""
    nd, _, nl = x.shape
    nr, n = i0.shape
    for d in range(nd):
        xd = x[d]
        for r in range(nr):
            od = out[d, r]
            for j in range(n):
                a = w0[r, j]
                b = w1[r, j]
                s0 = xd[i0[r, j]]
                s1 = xd[i1[r, j]]
                o = od[j]
                for lane in range(nl):
                    o[lane] = a * s0[lane] + b * s1[lane]


class _Workspace(threading.local):
    """Per-thread output buffers, one per call site, reused while the batch size stays the same:
    fresh arrays of this size cost page faults on first touch (~1/3 of the resampling time at
    batch 32). One forward pass writes each call site once, and callers get fresh arrays back.
    Also the ONNX Runtime bindings of those buffers, per convolution."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        self.bindings: dict[str, tuple] = {}  # conv name -> (buffer addresses and shapes, IOBinding)

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """A [shape] float32 buffer: the leading rows of the call site's buffer if it is big enough
        (batch first, so a prefix is contiguous), else a new one."""
        buf = self.buffers.get(key)
        if buf is None or buf.shape[1:] != shape[1:] or buf.shape[0] < shape[0]:
            buf = np.empty(shape, np.float32)
            self.buffers[key] = buf
        return buf[: shape[0]]


def _taps_major(index: torch.Tensor, weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    return (
        np.ascontiguousarray(index.detach().cpu().numpy().T, dtype=np.int64),
        np.ascontiguousarray(weight.detach().cpu().numpy().T, dtype=np.float32),
    )


class SpiralRuntimeUnavailable(RuntimeError):
    """ONNX Runtime here lays out the convolutions' inputs or outputs differently from what the
    runtime's resampling kernels produce or read (see SpiralRuntime._check_layouts)."""


# -- feature layouts ------------------------------------------------------------------------------
# A feature map is either plain NCHW, numpy [B, C, H, n], or ONNX Runtime's NCHWc ("blocked"),
# numpy [B, C / blk, H, n, blk] (channels zero-padded to a multiple of blk): the layout its NCHWc
# convolutions compute in. Blocked maps go from one convolution to the next without the reorder
# passes ONNX Runtime would otherwise add at each graph boundary (a fifth of the time at batch 32),
# and every resampling tap moves blk contiguous channels.


def _blocked(x: np.ndarray) -> bool:
    return x.ndim == 5


def _ort_shape(x: np.ndarray) -> list[int]:
    """The shape ONNX Runtime sees: [B, C, H, n] (blocked: C = channel blocks x blk)."""
    return [x.shape[0], x.shape[1] * x.shape[4], x.shape[2], x.shape[3]] if _blocked(x) else list(x.shape)


@dataclass(frozen=True)
class _Ribbon:
    """The outer rows of one level's ribbon as 2-tap interpolations, each [rows - 1, n]."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray

    def rows(self, x: np.ndarray, ws: "_Workspace", key: str) -> np.ndarray:
        """[B, C, 1, n] -> the outer ribbon rows [B, C, rows - 1, n] (blocked in, blocked out)."""
        r = self.i0.shape[0]
        if _blocked(x):
            b, cb, _, n, blk = x.shape
            out = ws.get(key, (b, cb, r, n, blk))
            _interp_blocked(
                x.reshape(b * cb, n, blk), self.i0, self.i1, self.w0, self.w1, out.reshape(b * cb, r, n, blk)
            )
        else:
            b, c, _, n = x.shape
            out = ws.get(key, (b, c, r, n))
            _interp_rows(x.reshape(b * c, n), self.i0, self.i1, self.w0, self.w1, out.reshape(b * c, r, n))
        return out


def conv_model(name: str, n: int, split: tuple[int, ...], weight: np.ndarray, bias: np.ndarray | None, relu: bool):
    """ONNX graph of one ribbon convolution over parts of `split` channels: inputs mid{p}
    [B, C_p, 1, n] and outer{p} [B, C_p, rows - 1, n], output y [B, C_out, 1, n]. Every size
    but the batch is static: with a symbolic n, ONNX shape inference cannot tell that both convs
    give [B, C_out, 1, n], and ONNX Runtime then leaves the sum and the ReLU as separate passes
    instead of fusing them into its NCHWc convolutions (measured 7.6 vs ~5 ms at batch 32)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    cout, _, rows, k = weight.shape
    mid = rows // 2
    outer = [r for r in range(rows) if r != mid]
    pads = [0, k // 2, 0, k // 2]
    nodes, inits, inputs, terms = [], [], [], []
    lo = 0
    for p, c in enumerate(split):
        w = weight[:, lo : lo + c]
        lo += c
        for kind, w_part, shape_rows in (("mid", w[:, :, mid : mid + 1], 1), ("outer", w[:, :, outer], rows - 1)):
            inp = f"{kind}{p}"
            inputs.append(helper.make_tensor_value_info(inp, TensorProto.FLOAT, ["B", c, shape_rows, n]))
            inits.append(numpy_helper.from_array(np.ascontiguousarray(w_part, np.float32), f"w_{inp}"))
            conv_in = [inp, f"w_{inp}"]
            if not terms and bias is not None:
                inits.append(numpy_helper.from_array(bias.astype(np.float32), "bias"))
                conv_in.append("bias")
            nodes.append(helper.make_node("Conv", conv_in, [f"t_{inp}"], pads=pads))
            terms.append(f"t_{inp}")
    acc = terms[0]
    for i, t in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [acc, t], [f"s{i}"]))
        acc = f"s{i}"
    nodes.append(helper.make_node("Relu" if relu else "Identity", [acc], ["y"]))
    graph = helper.make_graph(
        nodes,
        name,
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", cout, 1, n])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9  # readable by ONNX Runtime builds older than the onnx package
    onnx.checker.check_model(model)
    return model


def _options(level: str):
    """One intra-op thread: the runtime parallelises over particles (SpiralRuntime.denoise).
    Thirteen small sessions with a pool each measured worse than one thread at 2 threads: the
    pools' threads spin after their work (ONNX Runtime's default) and take the cores from the
    next session's; without spinning, waking them costs more than they save at these sizes."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.log_severity_level = 3
    return so


def _ort_optimised(model):
    """The graph as ONNX Runtime optimises it for this CPU (NCHWc convolutions, reorders, fused
    sums and activations), read back as an ONNX model."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = _options("ORT_ENABLE_ALL")
        so.optimized_model_filepath = str(Path(tmp) / "optimised.onnx")
        ort.InferenceSession(model.SerializeToString(), sess_options=so, providers=["CPUExecutionProvider"])
        return onnx.load(so.optimized_model_filepath)


NCHWC = "com.microsoft.nchwc"  # ONNX Runtime's domain of its blocked-layout CPU operators


@functools.cache
def nchwc_block() -> int:
    """ONNX Runtime's NCHWc channel block on this CPU (16 with AVX-512, 8 with AVX2), 0 if it
    does not use NCHWc convolutions here: read off the padded filter of a probe convolution."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((1, 1, 1, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[0, 1, 0, 1])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, 8])],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    opt = _ort_optimised(model)
    if not any(nd.domain == NCHWC for nd in opt.graph.node):
        return 0
    conv = next(nd for nd in opt.graph.node if nd.domain == NCHWC and nd.op_type == "Conv")
    filt = next(t for t in opt.graph.initializer if t.name == conv.input[1])
    return int(filt.dims[0])


def _strip_reorders(model, blk: int, keep_output: bool):
    """Make the optimised graph take and give NCHWc tensors directly: each graph input that ONNX
    Runtime reorders (ReorderInput) becomes a blocked input, and the output's ReorderOutput is
    dropped unless `keep_output`. Returns (model, {input: blocked}, output blocked)."""
    g = model.graph
    nodes = list(g.node)
    inputs = {i.name: i for i in g.input}
    blocked = {name: False for name in inputs}
    drop = []
    for nd in nodes:
        if nd.domain == NCHWC and nd.op_type == "ReorderInput" and nd.input[0] in inputs:
            src, dst = nd.input[0], nd.output[0]
            for other in nodes:
                for i, name in enumerate(other.input):
                    if name == dst:
                        other.input[i] = src
            dims = inputs[src].type.tensor_type.shape.dim
            c = dims[1].dim_value
            dims[1].dim_value = -(-c // blk) * blk
            blocked[src] = True
            drop.append(nd)
    out_blocked = False
    out = g.output[0]
    if not keep_output:
        for nd in nodes:
            if nd.domain == NCHWC and nd.op_type == "ReorderOutput" and nd.output[0] == out.name:
                src = nd.input[0]
                for other in nodes:
                    for i, name in enumerate(other.output):
                        if name == src:
                            other.output[i] = out.name
                dims = out.type.tensor_type.shape.dim
                dims[1].dim_value = -(-dims[1].dim_value // blk) * blk
                out_blocked = True
                drop.append(nd)
    for nd in drop:
        g.node.remove(nd)
    del g.value_info[:]
    return model, blocked, out_blocked


class _RibbonConv:
    """One ribbon convolution (batch norm folded) on parts [B, C_p, 1, n] -> [B, C_out, 1, n],
    taking and giving each map in the layout its ONNX Runtime graph computes in."""

    def __init__(
        self, name: str, level: int, n: int, split: tuple[int, ...], unit: torch.nn.Module, relu: bool, blk: int
    ):
        """`unit`: a networks.ConvUnit (its batch norm folded in, as in the exported graph) or a
        bare layers.SpiralConv."""
        with torch.no_grad():
            w, b = unit.conv.folded(*unit.norm_affine()) if hasattr(unit, "norm_affine") else unit.folded()
        w = w.detach().numpy()  # [cout, cin, rows, k]
        b = None if b is None else b.detach().numpy()
        if sum(split) != w.shape[1]:
            raise ValueError(f"{name}: parts of {split} channels for a filter of {w.shape[1]} input channels")
        self.name, self.level, self.cout, self.split = name, level, int(w.shape[0]), split
        self.model = conv_model(name, n, split, w, b, relu)
        self.blk = blk
        self.in_blocked = {f"{kind}{p}": False for p in range(len(split)) for kind in ("mid", "outer")}
        self.out_blocked = False
        model, level_opt = self.model, "ORT_ENABLE_ALL"
        if blk:
            # outputs of fewer channels than a block stay NCHW: ONNX Runtime's NCHWc convolution
            # reads inputs of fewer channels than a block as NCHW (checked in SpiralRuntime)
            model, self.in_blocked, self.out_blocked = _strip_reorders(
                _ort_optimised(self.model), blk, keep_output=self.cout < blk
            )
            level_opt = "ORT_DISABLE_ALL"  # already optimised; its NCHWc nodes run as they are
        import onnxruntime as ort

        self.session = ort.InferenceSession(
            model.SerializeToString(), sess_options=_options(level_opt), providers=["CPUExecutionProvider"]
        )

    def __call__(self, parts: list[np.ndarray], ribbon: _Ribbon, ws: _Workspace) -> np.ndarray:
        arrays = []
        for p, x in enumerate(parts):
            arrays += [(f"mid{p}", x), (f"outer{p}", ribbon.rows(x, ws, f"{self.name}:outer{p}"))]
        b, n = parts[0].shape[0], parts[0].shape[3]
        if self.out_blocked:
            y = ws.get(f"{self.name}:y", (b, -(-self.cout // self.blk), 1, n, self.blk))
        else:
            y = ws.get(f"{self.name}:y", (b, self.cout, 1, n))
        arrays.append(("y", y))
        # every array here is a workspace buffer, the same from call to call at one batch size, so
        # the binding is kept (binding anew costs ~17 us per convolution, 10 % at batch 1)
        key = tuple((a.ctypes.data, a.shape) for _, a in arrays)
        cached = ws.bindings.get(self.name)
        if cached is None or cached[0] != key:
            binding = self.session.io_binding()
            for name, arr in arrays[:-1]:
                binding.bind_input(name, "cpu", 0, np.float32, _ort_shape(arr), arr.ctypes.data)
            binding.bind_output("y", "cpu", 0, np.float32, _ort_shape(y), y.ctypes.data)
            cached = (key, binding)
            ws.bindings[self.name] = cached
        self.session.run_with_iobinding(cached[1])
        return y


class SpiralRuntime:
    """A trained spiral `Denoiser` as a pipeline of compiled resampling and ONNX Runtime
    convolutions (see the module docstring). `denoise` and `run` are thread-safe."""

    def __init__(self, denoiser: torch.nn.Module, threads: int = 1):
        """`threads`: particles of a batch are split over this many threads (0: one per CPU core
        available); each runs the whole pipeline on its share, one thread per ONNX Runtime call."""
        cfg = denoiser.config
        if cfg.arch != "spiral":
            raise ValueError(f"SpiralRuntime runs spiral denoisers, got arch {cfg.arch!r}")
        self.threads = threads if threads > 0 else len(os.sched_getaffinity(0))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="spiral") if self.threads > 1 else None
        ops, core = denoiser.ops, denoiser.core
        self.config = cfg
        self.size = cfg.size
        self.n = list(ops.n)
        self.maps = {}
        for name in ["enc", "dec"] + [f"{d}{lev}" for lev in range(len(self.n) - 1) for d in ("down", "up")]:
            self.maps[name] = _taps_major(getattr(ops, f"{name}_index"), getattr(ops, f"{name}_weight"))
        mid = ops.rows // 2
        outer = [r for r in range(ops.rows) if r != mid]
        self.ribbons = []
        for lev, n in enumerate(self.n):
            idx, w = grid_operator_from(getattr(ops, f"rib{lev}_grid"), n)
            idx = idx.view(ops.rows, n, 2)[outer].numpy()
            w = w.view(ops.rows, n, 2)[outer].numpy()
            c = np.ascontiguousarray
            self.ribbons.append(
                _Ribbon(c(idx[..., 0]), c(idx[..., 1]), c(w[..., 0], np.float32), c(w[..., 1], np.float32))
            )
        chans = cfg.channels
        self.blk = blk = nchwc_block()
        self.enc = []
        for lev, units in enumerate(core.enc):
            cin = 1 if lev == 0 else chans[lev - 1]
            convs = []
            for j, u in enumerate(units):
                convs.append(_RibbonConv(f"enc{lev}_{j}", lev, self.n[lev], (cin,), u, True, blk))
                cin = chans[lev]
            self.enc.append(convs)
        self.dec = [
            _RibbonConv(f"dec{lev}", lev, self.n[lev], (chans[lev + 1], chans[lev]), u, True, blk)
            for u, lev in zip(core.dec, range(len(chans) - 2, -1, -1))
        ]
        self.out = _RibbonConv("out", 0, self.n[0], (chans[0],), core.out, False, blk)
        self._check_layouts()
        self.gain = np.float32(denoiser.gain.detach())
        self.disc = np.ascontiguousarray(denoiser.disc.detach().numpy().reshape(cfg.size, cfg.size), np.float32)
        self.eps = float(cfg.eps)
        self.predict = cfg.predict
        self.input_names, self.output_names = [INPUT_NAME], [OUTPUT_NAME]
        self._workspace = _Workspace()

    def _check_layouts(self) -> None:
        """Every map is produced in the layout its consumers read: maps of at least a block of
        channels blocked, smaller ones NCHW (resampling keeps the layout). Holds for ONNX
        Runtime's NCHWc rules (verified with 1.31); checked here so that a version which decides
        otherwise fails at load with a clear message (and the registry serves the single graph)
        instead of computing garbage."""
        blocked = lambda c: bool(self.blk) and c >= self.blk  # noqa: E731
        for conv in [c for cs in self.enc for c in cs] + self.dec + [self.out]:
            for p, c in enumerate(conv.split):
                for kind in ("mid", "outer"):
                    if conv.in_blocked[f"{kind}{p}"] != blocked(c):
                        raise SpiralRuntimeUnavailable(
                            f"ONNX Runtime reads {kind}{p} of {conv.name} ({c} channels, NCHWc block {self.blk}) "
                            f"{'blocked' if conv.in_blocked[f'{kind}{p}'] else 'as NCHW'}, against the layout rule; serve the single ONNX graph"
                        )
            if conv.out_blocked != blocked(conv.cout):
                raise SpiralRuntimeUnavailable(
                    f"output layout of {conv.name} does not follow the layout rule (block {self.blk})"
                )

    def _map(self, name: str, x: np.ndarray, ws: _Workspace) -> np.ndarray:
        """[B, C, 1, N] (or [B, C, N]) -> [B, C, 1, M] by the stored operator `name`, in x's layout."""
        index, weight = self.maps[name]
        m = index.shape[1]
        if _blocked(x):
            b, cb, _, n, blk = x.shape
            out = ws.get(f"map:{name}", (b, cb, 1, m, blk))
            _sparse_blocked(x.reshape(b * cb, n, blk), index, weight, out.reshape(b * cb, m, blk))
            return out
        b, c = x.shape[:2]
        out = ws.get(f"map:{name}", (b, c, 1, m))
        _sparse_rows(np.ascontiguousarray(x, np.float32).reshape(b * c, -1), index, weight, out.reshape(b * c, m))
        return out

    def denoise(self, particles: np.ndarray) -> np.ndarray:
        """Raw particles float32 [B, 1, H, W] -> denoised [B, 1, H, W] (networks.Denoiser.forward),
        in chunks of at most CHUNK particles (the per-thread workspace holds ~4 MB per particle of a
        chunk at 64 x 64, and per-particle time no longer falls beyond batches of ~16-32), spread
        over the runtime's threads."""
        x = np.asarray(particles, np.float32)
        s = self.size
        if x.ndim != 4 or x.shape[1:] != (1, s, s):
            raise ValueError(f"particles must be [B, 1, {s}, {s}], got {list(x.shape)}")
        nb = x.shape[0]
        size = min(CHUNK, -(-nb // self.threads))
        chunks = [x[i : i + size] for i in range(0, nb, size)]
        if len(chunks) == 1:
            return self._forward(x)
        outs = self._pool.map(self._forward, chunks) if self._pool is not None else map(self._forward, chunks)
        return np.concatenate(list(outs), 0)

    def _forward(self, x: np.ndarray) -> np.ndarray:
        nb, s = x.shape[0], self.size
        # networks.normalise in numpy, same order of operations: calling the torch function costs
        # ~0.25 ms per batch in op dispatch, a tenth of the whole pass at batch 1 (measured)
        disc = self.disc
        npx = disc.sum(dtype=np.float32)
        x = x.reshape(nb, s, s) * disc
        mu = x.sum((1, 2), keepdims=True) / npx
        var = (((x - mu) * disc) ** 2).sum((1, 2), keepdims=True) / npx
        floor = self.eps * (np.abs(x).sum((1, 2), keepdims=True) / npx + 1.0)
        sd = np.sqrt(var + floor * floor)
        xn = x / sd
        ws = self._workspace
        f = self._map("enc", xn.reshape(nb, 1, s * s), ws)
        skips = []
        for lev, convs in enumerate(self.enc):
            if lev > 0:
                f = self._map(f"down{lev - 1}", f, ws)
            for conv in convs:
                f = conv([f], self.ribbons[lev], ws)
            skips.append(f)
        for conv, lev in zip(self.dec, range(len(self.enc) - 2, -1, -1)):
            f = conv([self._map(f"up{lev}", f, ws), skips[lev]], self.ribbons[lev], ws)
        f = self.out([f], self.ribbons[0], ws)
        y = self._map("dec", f, ws).reshape(nb, s, s) * self.gain  # a new array: nothing of ws escapes
        if self.predict == "noise":
            y = xn - y
        return (y * disc * sd).reshape(nb, 1, s, s).astype(np.float32, copy=False)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The interface of service.registry.OnnxModel: {"particles": ...} -> {"denoised": ...}."""
        return {OUTPUT_NAME: self.denoise(feeds[INPUT_NAME])}
