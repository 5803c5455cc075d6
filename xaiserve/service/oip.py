"""The Open Inference Protocol v2 (`inference.GRPCInferenceService`) over xaiserve's models.

An adapter, not a second server: every ModelInfer is translated into the service objects that
explain.v1 uses (the registry resolves the model, the methods table says what applies, the fast
path runs Explain / Denoise / the model's micro-batcher), under the same request metrics (rpc label
"ModelInfer", ...), the same interceptors (tokens) and the same admission (registered by
service.rpc.add_service with the server's admission gate). docs/OIP.md is the user's page.

Tensors of each model kind (B = rows of the request; -1 in metadata marks any size):

    nem_u, nemt, encoder, classifier
      input  image    FP32  [B, C, H, W]  the model's input layout: at its size, normalised
                                          (x - mean) / std, exactly what its ONNX graph takes
                      BYTES [B]           encoded images (PNG, JPEG, ...), each decoded and
                                          preprocessed as Explain does; all of one size
      input  target   INT64 [B]           optional, NEMt and classifier explanations: the label per
                                          row (-1 = the predicted one); or parameter target_label
      output mask     FP32  [B, 1, h, w]  the explanation at the input's resolution (h x w: the
                                          images', or the model's for raw tensors); masking
                                          networks always, encoders / classifiers with `method`
             output   FP32  [B, D]        representation (encoder, NEM-U) or logits (classifier, NEMt)
             label    INT64 [B]           the label explained (NEMt; classifiers with `method`)
             fidelity FP32  [B]           with parameter fidelity = true
    denoiser
      input  particles FP32 [B, 1, H, W]  raw units, or BYTES [1]: one MRC stack
      output denoised  FP32 [B, 1, H, W]

Request parameters: `method` (string, a method of the methods table that Explain serves),
`target_label` (int64), `fidelity` (bool), `timeout` (int64 microseconds, Triton's). Anything
else is INVALID_ARGUMENT naming the known ones.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, ContextManager

import numpy as np

from xaiserve.methods import KINDS, MASK_KINDS, METHODS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.inference import grpc_predict_v2_pb2 as oip
from xaiserve.service.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted, XaiError, quote
from xaiserve.service.fastpath import FastPath
from xaiserve.service.images import ImageHeader, probe_image, to_input_geometry
from xaiserve.service.registry import ModelEntry, Registry
from xaiserve.service.rpc import Observed, observed_unary
from xaiserve.service.tensors import from_tensor, tensor_message_bytes

log = logging.getLogger("xaiserve.oip")
SERVICE = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]
SERVICE_NAME = SERVICE.full_name
# Triton's names for the extensions this service has
EXTENSIONS = ("model_configuration", "model_repository")
REPOSITORY = "model_store"
PARAMETERS = {
    "method": "string: an explanation method (see ModelConfig parameters 'methods')",
    "target_label": "int64: the label to explain (classifiers, NEMt)",
    "fidelity": "bool: also answer output 'fidelity' [NEM-U] sec. 3.1",
    "timeout": "int64: microseconds the server may spend (the call's deadline also applies)",
}
# Parameters that clients put on single tensors; accepted and not needed (the HTTP client's
# binary-data bookkeeping).
TENSOR_PARAMETERS = ("binary_data_size", "binary_data")

# datatype -> (numpy dtype, InferTensorContents field)
DATATYPES: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype("?"), "bool_contents"),
    "UINT8": (np.dtype("u1"), "uint_contents"),
    "UINT16": (np.dtype("<u2"), "uint_contents"),
    "UINT32": (np.dtype("<u4"), "uint_contents"),
    "UINT64": (np.dtype("<u8"), "uint64_contents"),
    "INT8": (np.dtype("i1"), "int_contents"),
    "INT16": (np.dtype("<i2"), "int_contents"),
    "INT32": (np.dtype("<i4"), "int_contents"),
    "INT64": (np.dtype("<i8"), "int64_contents"),
    "FP16": (np.dtype("<f2"), ""),
    "FP32": (np.dtype("<f4"), "fp32_contents"),
    "FP64": (np.dtype("<f8"), "fp64_contents"),
}
CONFIG_TYPES = {"FP32": oip.TYPE_FP32, "INT64": oip.TYPE_INT64, "BYTES": oip.TYPE_STRING}
MAX_RANK = 8


# ----------------------------------------------------------------------------------- tensor I/O
@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]
    optional: bool = False


def model_io(entry: ModelEntry, frozen: ModelEntry | None) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The inputs and outputs a model has over this protocol (see the module docstring)."""
    s = entry.input
    if entry.kind == "denoiser":
        return (
            [TensorSpec("particles", "FP32", (-1, 1, s.height, s.width))],
            [TensorSpec("denoised", "FP32", (-1, 1, s.height, s.width))],
        )
    f = frozen or entry
    dim = f.output_dim or len(f.labels) or -1
    inputs = [TensorSpec("image", "FP32", (-1, s.channels, s.height, s.width))]
    if f.kind == "classifier":
        inputs.append(TensorSpec("target", "INT64", (-1,), optional=True))
    outputs = [TensorSpec("mask", "FP32", (-1, 1, -1, -1)), TensorSpec("output", "FP32", (-1, dim))]
    if f.kind == "classifier":
        outputs.append(TensorSpec("label", "INT64", (-1,)))
    outputs.append(TensorSpec("fidelity", "FP32", (-1,)))
    return inputs, outputs


def _bytes_elements(data: bytes, n: int, what: str) -> list[bytes]:
    """The elements of a raw BYTES tensor: each a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    for i in range(n):
        if pos + 4 > len(data):
            raise InvalidArgument(
                f"{what}: raw BYTES data ends before element {i} of {n}; each element is a "
                "4-byte little-endian length followed by that many bytes"
            )
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise InvalidArgument(f"{what}: element {i} says {size} bytes but only {len(data) - pos} remain")
        out.append(data[pos : pos + size])
        pos += size
    if pos != len(data):
        raise InvalidArgument(f"{what}: {len(data) - pos} bytes left after the {n} elements its shape declares")
    return out


@dataclass
class Input:
    """One request tensor, checked and read: `array` (numeric) or `items` (BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    items: list[bytes] | None = None


def read_inputs(request: oip.ModelInferRequest, max_elements: int) -> dict[str, Input]:
    """Every input of the request, checked against the protocol (datatype, shape, data size)."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
            "send the data of every input there, in the order of `inputs`, or of none"
        )
    out: dict[str, Input] = {}
    for i, t in enumerate(request.inputs):
        what = f"input {quote(t.name, 64)!s}"
        if t.name in out:
            raise InvalidArgument(f"{what} appears twice; send each input once")
        for k in t.parameters:
            if k not in TENSOR_PARAMETERS:
                raise InvalidArgument(
                    f"{what}: parameter {quote(k, 64)} is unknown; inputs take none "
                    "(request parameters: " + ", ".join(PARAMETERS) + ")"
                )
        if t.datatype not in DATATYPES and t.datatype != "BYTES":
            raise InvalidArgument(
                f"{what}: datatype {quote(t.datatype, 32)} is not one of the protocol's: "
                + ", ".join([*DATATYPES, "BYTES"])
            )
        if len(t.shape) > MAX_RANK or any(d < 0 for d in t.shape):
            raise InvalidArgument(
                f"{what}: shape {list(t.shape)[: MAX_RANK + 1]} must have at most {MAX_RANK} dimensions, none negative"
            )
        shape = tuple(int(d) for d in t.shape)
        n = math.prod(shape)
        if n > max_elements:
            raise ResourceExhausted(f"{what}: {n} elements is more than the limit of {max_elements}")
        inp = Input(t.name, t.datatype, shape)
        if t.datatype == "BYTES":
            if raw:
                inp.items = _bytes_elements(raw[i], n, what)
            else:
                inp.items = list(t.contents.bytes_contents)
                if len(inp.items) != n:
                    raise InvalidArgument(
                        f"{what}: contents.bytes_contents has {len(inp.items)} elements; shape {list(shape)} needs {n}"
                    )
        else:
            dt, field = DATATYPES[t.datatype]
            if raw:
                if len(raw[i]) != n * dt.itemsize:
                    raise InvalidArgument(
                        f"{what}: {len(raw[i])} bytes of raw data, but {t.datatype} x shape "
                        f"{list(shape)} needs {n * dt.itemsize}"
                    )
                inp.array = np.frombuffer(raw[i], dtype=dt).reshape(shape)
            else:
                values = getattr(t.contents, field) if field else ()
                if len(values) != n:
                    raise InvalidArgument(
                        f"{what}: {len(values)} values in contents"
                        + (f".{field}" if field else "")
                        + f", but shape {list(shape)} needs {n}"
                        + ("" if field else f"; {t.datatype} travels in raw_input_contents only")
                    )
                inp.array = np.asarray(values, dtype=dt).reshape(shape)
        out[t.name] = inp
    return out


def add_output(resp: oip.ModelInferResponse, name: str, array: np.ndarray) -> None:
    """Append an output tensor (raw little-endian contents, as tritonclient reads them)."""
    a = np.ascontiguousarray(array)
    dtype = {np.dtype("float32"): "FP32", np.dtype("int64"): "INT64"}[a.dtype]
    resp.outputs.add(name=name, datatype=dtype, shape=list(a.shape))
    resp.raw_output_contents.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())


# ------------------------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Options:
    method: str = ""
    target_label: int | None = None
    fidelity: bool = False
    timeout_s: float | None = None


def _param(p: oip.InferParameter, name: str, kind: str) -> Any:
    which = p.WhichOneof("parameter_choice")
    ok = {"string": ("string_param",), "int": ("int64_param", "uint64_param"), "bool": ("bool_param",)}[kind]
    if which not in ok:
        raise InvalidArgument(
            f"parameter {name} must be a {kind} (InferParameter.{' or '.join(ok)}), not {which or 'empty'}"
        )
    return getattr(p, which)


def read_options(params: Any) -> Options:
    unknown = [k for k in params if k not in PARAMETERS]
    if unknown:
        raise InvalidArgument(
            f"parameter {quote(unknown[0], 64)} is unknown; known: "
            + "; ".join(f"{k} ({v})" for k, v in PARAMETERS.items())
        )
    method = _param(params["method"], "method", "string").strip() if "method" in params else ""
    target = int(_param(params["target_label"], "target_label", "int")) if "target_label" in params else None
    fid = bool(_param(params["fidelity"], "fidelity", "bool")) if "fidelity" in params else False
    timeout = None
    if "timeout" in params:
        us = int(_param(params["timeout"], "timeout", "int"))
        if us <= 0:
            raise InvalidArgument(f"parameter timeout is {us} microseconds; give a positive number")
        timeout = us / 1e6
    return Options(method, target, fid, timeout)


# -------------------------------------------------------------------------------------- servicer
Admit = Callable[[Any], ContextManager[Any]]


def _serving() -> bool:
    from xaiserve.service import metrics

    return list(metrics.SERVING.collect())[0].samples[0].value == 1


def _deadline(context: Any, opts: Options) -> float | None:
    left = context.time_remaining()
    if opts.timeout_s is None:
        return left
    return opts.timeout_s if left is None else min(left, opts.timeout_s)


class InferenceServicer:
    """inference.GRPCInferenceService over the registry and the fast path (see the module docstring).

    `admit(context)` is the server's admission gate: service.rpc.add_service enters it around each
    unary ModelInfer; ModelStreamInfer enters it around each request of the stream."""

    service_name = SERVICE_NAME
    file = oip.DESCRIPTOR  # the .proto behind it (server reflection)

    def __init__(
        self,
        registry: Registry,
        fast: FastPath,
        *,
        version: str,
        admit: Admit | None = None,
        ready: Callable[[], bool] = _serving,
    ):
        self.registry, self.fast, self.version = registry, fast, version
        self.admit = admit
        self.ready = ready  # the server sets its own readiness flag once it serves

    # -- health and metadata ----------------------------------------------------------------
    async def ServerLive(self, request, context):
        return await observed_unary("ServerLive", context, self._live)

    async def _live(self, obs: Observed):
        return oip.ServerLiveResponse(live=True)

    async def ServerReady(self, request, context):
        async def go(obs: Observed):
            return oip.ServerReadyResponse(ready=self.ready())

        return await observed_unary("ServerReady", context, go)

    def _resolve(self, obs: Observed, name: str, version: str) -> ModelEntry:
        if not name.strip():
            raise InvalidArgument(
                "the model name is empty; name one of: " + ", ".join(sorted({e.name for e in self.registry.entries()}))
            )
        if ":" in name:
            raise InvalidArgument(f"model name {quote(name, 64)} contains ':'; put the version in the version field")
        entry = self.registry.resolve(f"{name}:{version}" if version else name)
        obs.model = entry.id
        return entry

    async def ModelReady(self, request, context):
        async def go(obs: Observed):
            try:
                entry = self._resolve(obs, request.name, request.version)
            except FailedPrecondition:  # in the manifest, not served (the reason: RepositoryIndex)
                return oip.ModelReadyResponse(ready=False)
            return oip.ModelReadyResponse(ready=self.ready() and "onnx" in self.registry.forms(entry))

        return await observed_unary("ModelReady", context, go)

    async def ServerMetadata(self, request, context):
        async def go(obs: Observed):
            return oip.ServerMetadataResponse(name="xaiserve", version=self.version, extensions=list(EXTENSIONS))

        return await observed_unary("ServerMetadata", context, go)

    def _frozen(self, entry: ModelEntry) -> ModelEntry | None:
        try:
            return self.registry.frozen_for(entry)
        except XaiError:
            return None

    async def ModelMetadata(self, request, context):
        async def go(obs: Observed):
            entry = self._resolve(obs, request.name, request.version)
            inputs, outputs = model_io(entry, self._frozen(entry))
            versions = [e.version for e in self.registry.entries() if e.name == entry.name]
            return oip.ModelMetadataResponse(
                name=entry.name,
                versions=versions,
                platform=f"xaiserve_{entry.kind}",
                inputs=[
                    oip.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                    for t in inputs
                ],
                outputs=[
                    oip.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
                    for t in outputs
                ],
            )

        return await observed_unary("ModelMetadata", context, go)

    async def ModelConfig(self, request, context):
        async def go(obs: Observed):
            entry = self._resolve(obs, request.name, request.version)
            frozen = self._frozen(entry)
            inputs, outputs = model_io(entry, frozen)
            cfg = self.fast.config
            c = oip.ModelConfig(
                name=entry.name,
                platform=f"xaiserve_{entry.kind}",
                backend="xaiserve",
                max_batch_size=self._max_rows(entry),
            )
            for t in inputs:
                c.input.add(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.shape[1:], optional=t.optional)
            for t in outputs:
                c.output.add(name=t.name, data_type=CONFIG_TYPES[t.datatype], dims=t.shape[1:])
            c.dynamic_batching.preferred_batch_size.append(cfg.max_batch)
            c.dynamic_batching.max_queue_delay_microseconds = int(cfg.max_delay_ms * 1000)
            s = entry.input
            params = {
                "kind": entry.kind,
                "explains": entry.explains,
                "labels": ",".join(entry.labels),
                "methods": ",".join(
                    m for m in self.registry.methods(entry) if METHODS[m].rpc in ("Explain", "Denoise")
                ),
                "mean": ",".join(f"{v:g}" for v in s.mean),
                "std": ",".join(f"{v:g}" for v in s.std),
                "bytes_input": ""
                if entry.kind == "denoiser"
                else "image may also be BYTES [B]: encoded PNG/JPEG images",
                "kind_doc": KINDS[entry.kind].doc,
            }
            for k, v in params.items():
                if v:
                    c.parameters[k].string_value = v
            return oip.ModelConfigResponse(config=c)

        return await observed_unary("ModelConfig", context, go)

    async def RepositoryIndex(self, request, context):
        async def go(obs: Observed):
            if request.repository_name not in ("", REPOSITORY):
                raise NotFound(
                    f"repository {quote(request.repository_name, 64)} is unknown; this server has one, "
                    f"{REPOSITORY!r} (or leave the name empty)"
                )
            out = oip.RepositoryIndexResponse()
            ready = self.ready()
            for e in self.registry.entries():
                ok = ready and "onnx" in self.registry.forms(e)
                if ok or not request.ready:
                    out.models.add(
                        name=e.name,
                        version=e.version,
                        state="READY" if ok else "UNAVAILABLE",
                        reason="" if ok else ("draining" if not ready else "no ONNX graph in the store"),
                    )
            if not request.ready:
                for b in self.registry.unavailable():
                    out.models.add(name=b.name, version=b.version, state="UNAVAILABLE", reason=b.reason)
            return out

        return await observed_unary("RepositoryIndex", context, go)

    # -- inference ----------------------------------------------------------------------------
    async def ModelInfer(self, request, context):
        async def go(obs: Observed):
            return await self.fast.serialize(await self.infer(obs, request, context))

        return await observed_unary("ModelInfer", context, go)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any], context):
        """Each request answered in order; a failed one answers its error and the stream goes on."""
        from xaiserve.service.errors import status_of

        try:
            async for request in request_iterator:
                obs = Observed("ModelStreamInfer")
                try:
                    with self.admit(context) if self.admit else _Nothing():
                        resp = await self.infer(obs, request, context)
                    answer = oip.ModelStreamInferResponse(infer_response=resp)
                except XaiError as e:
                    obs.code = e.code
                    answer = oip.ModelStreamInferResponse(error_message=f"{status_of(e).name}: {e}")
                except asyncio.TimeoutError:
                    obs.code = "DEADLINE_EXCEEDED"
                    answer = oip.ModelStreamInferResponse(error_message="DEADLINE_EXCEEDED: the request's time ran out")
                except Exception as e:  # noqa: BLE001 - one request's failure is its answer, not the stream's end
                    ref = f"{id(e):x}"[-12:]
                    log.error(
                        "internal error", exc_info=e, extra={"rpc": obs.rpc, "model": obs.model, "error_ref": ref}
                    )
                    obs.code = "INTERNAL"
                    answer = oip.ModelStreamInferResponse(
                        error_message=f"INTERNAL: internal error (reference {ref} in the server log)"
                    )
                finally:
                    obs.done()
                yield answer
        except XaiError as e:  # a message of the stream that is not a ModelInferRequest
            await context.abort(status_of(e), str(e))

    def _max_rows(self, entry: ModelEntry) -> int:
        return self.fast.config.max_denoise_batch if entry.kind == "denoiser" else self.fast.config.max_batch

    async def infer(self, obs: Observed, request: oip.ModelInferRequest, context: Any) -> oip.ModelInferResponse:
        t0 = time.perf_counter()
        entry = self._resolve(obs, request.model_name, request.model_version)
        opts = read_options(request.parameters)
        frozen = self._frozen(entry)
        inputs, outputs = model_io(entry, frozen)
        known_in = {t.name: t for t in inputs}
        known_out = [t.name for t in outputs]
        limit = self.fast.max_message_bytes // 4
        got = read_inputs(request, limit)
        for t in inputs:
            if not t.optional and t.name not in got:
                raise InvalidArgument(
                    f"model {entry.id} needs input {t.name!r} ({t.datatype} {list(t.shape)}"
                    + (", or BYTES [B]: encoded images" if t.name == "image" else ", or BYTES [1]: an MRC stack")
                    + f"); the request has: {', '.join(quote(n, 64) for n in got) or 'no inputs'}"
                )
        for name in got:
            if name not in known_in:
                raise InvalidArgument(
                    f"model {entry.id} has no input {quote(name, 64)}; its inputs: "
                    + ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in inputs)
                )
        wanted = [o.name for o in request.outputs]
        for o in request.outputs:
            if o.name not in known_out:
                raise InvalidArgument(
                    f"model {entry.id} has no output {quote(o.name, 64)}; its outputs: " + ", ".join(known_out)
                )
            for k in o.parameters:
                if k not in TENSOR_PARAMETERS:
                    raise InvalidArgument(
                        f"requested output {o.name!r}: parameter {quote(k, 64)} is not supported"
                        + (
                            "; request output 'output' and take the top classes from the logits"
                            if k == "classification"
                            else "; outputs take none"
                        )
                    )
        resp = oip.ModelInferResponse(model_name=entry.name, model_version=entry.version, id=request.id)
        timeout = _deadline(context, opts)
        if entry.kind == "denoiser":
            if opts.method or opts.target_label is not None or opts.fidelity:
                raise InvalidArgument(
                    f"model {entry.id} is a denoiser; it takes no parameters method, target_label or fidelity"
                )
            await self._denoise(entry, got["particles"], resp, timeout)
        else:
            await self._image(entry, frozen, got, opts, wanted, resp, timeout)
        resp.parameters["total_ms"].double_param = (time.perf_counter() - t0) * 1e3
        return resp

    # -- denoisers ----------------------------------------------------------------------------
    async def _denoise(
        self, entry: ModelEntry, inp: Input, resp: oip.ModelInferResponse, timeout: float | None
    ) -> None:
        s = entry.input
        if inp.datatype == "BYTES":
            if len(inp.items or ()) != 1:
                raise InvalidArgument(f"input particles as BYTES is one MRC stack: shape [1], not {list(inp.shape)}")
            req = pb.DenoiseRequest(model=entry.id, mrc=inp.items[0])  # type: ignore[index]
        else:
            if inp.datatype != "FP32" or len(inp.shape) != 4 or inp.shape[1] != 1:
                raise InvalidArgument(
                    f"input particles is {inp.datatype} {list(inp.shape)}; model {entry.id} takes "
                    f"FP32 [B, 1, {s.height}, {s.width}] (raw units) or BYTES [1] (an MRC stack)"
                )
            arr = inp.array
            assert arr is not None  # read_inputs fills `array` for every numeric datatype
            req = pb.DenoiseRequest(
                model=entry.id,
                tensor=pb.Tensor(dtype="float32", shape=[arr.shape[0], *arr.shape[2:]], data=arr.tobytes()),
            )
        out = await self.fast.denoise(req, timeout=timeout, entry=entry)
        den = from_tensor(out.denoised, what="denoised")
        add_output(resp, "denoised", den.reshape(den.shape[0], 1, *den.shape[1:]))
        _timing(resp, out.timing)

    # -- image models ---------------------------------------------------------------------------
    async def _image(
        self,
        entry: ModelEntry,
        frozen: ModelEntry | None,
        got: dict[str, Input],
        opts: Options,
        wanted: list[str],
        resp: oip.ModelInferResponse,
        timeout: float | None,
    ) -> None:
        img = got["image"]
        s = entry.input
        f = frozen or entry
        rows = img.shape[0] if img.shape else 0
        if img.datatype == "BYTES":
            if len(img.shape) != 1:
                raise InvalidArgument(
                    f"input image as BYTES is one encoded image per row: shape [B], not {list(img.shape)}"
                )
        elif img.datatype != "FP32" or len(img.shape) != 4 or img.shape[1:] != (s.channels, s.height, s.width):
            raise InvalidArgument(
                f"input image is {img.datatype} {list(img.shape)}; model {entry.id} takes FP32 [B, {s.channels}, "
                f"{s.height}, {s.width}] normalised as (x - mean) / std with mean {list(s.mean)} and std {list(s.std)}, "
                "or BYTES [B] encoded images (PNG, JPEG)"
            )
        if rows < 1:
            raise InvalidArgument("input image has no rows; send at least one")
        if rows > self._max_rows(entry):
            raise InvalidArgument(
                f"input image has {rows} rows; this server takes at most {self._max_rows(entry)} per "
                "request (max_batch): split the batch over several requests, sent at once"
            )
        targets = self._targets(entry, f, got.get("target"), opts, rows)
        explain = bool(opts.method) or entry.kind in MASK_KINDS
        if not explain:
            needs = [n for n in wanted if n in ("mask", "label", "fidelity")] + (["fidelity"] if opts.fidelity else [])
            if needs:
                offered = [m for m in self.registry.methods(entry) if METHODS[m].rpc == "Explain"]
                raise InvalidArgument(
                    f"output {needs[0]!r} of {entry.kind} {entry.id} is an explanation: set parameter "
                    f"method to one of {', '.join(offered) or '(none for this model)'}"
                )
        # the images' size, from their headers (no decoding yet): one batch is one size
        headers: list[ImageHeader] = []
        if img.datatype == "BYTES":
            images = [pb.Image(encoded=b) for b in img.items or ()]
            sizes = set()
            for i, im in enumerate(images):
                try:
                    hdr = probe_image(im)
                except XaiError as e:
                    raise type(e)(f"input image, element {i} of {rows} (BYTES): {e}") from None
                headers.append(hdr)
                sizes.add((hdr.height, hdr.width))
            if len(sizes) > 1:
                raise InvalidArgument(
                    f"the {rows} images are of {len(sizes)} sizes ({', '.join(f'{h} x {w}' for h, w in sorted(sizes)[:4])}); "
                    "the masks of one request form one tensor: send images of one size together"
                )
            ((h, w),) = sizes
        else:
            images, (h, w) = [], (s.height, s.width)
        want = set(wanted) if wanted else None
        with_fid = opts.fidelity or (want is not None and "fidelity" in want)
        out_dim = max(f.output_dim, len(f.labels), 1)
        bound = rows * (tensor_message_bytes((1, h, w)) + tensor_message_bytes((out_dim,)) + 64) + 1024
        self.fast.check_response_size(
            bound, f"{rows} masks of {h} x {w}", "send fewer rows per request or smaller images"
        )
        prepared = None
        if img.datatype != "BYTES":
            prepared = await self.fast.cpu.run(_prepare_raw, img.array, s)

        if not explain:  # the model's forward pass alone, through its micro-batcher
            if prepared is None:
                prepared = await _all(self.fast.cpu.run(_decode, im, s) for im in images)
            results = await _all(self.fast.batcher(entry).submit({"image": x}, timeout=timeout) for _, x in prepared)
            add_output(resp, "output", np.concatenate([r["output"] for r, _ in results]).astype(np.float32))
            resp.parameters["batch_size"].int64_param = max(bt.batch_rows for _, bt in results)
            return

        options = pb.ExplainOptions(
            method=opts.method, return_output=want is None or "output" in want, fidelity=with_fid
        )
        requests = [
            pb.ExplainRequest(
                model=entry.id,
                options=_with_target(options, None if targets is None else targets[i]),
                **({"image": images[i]} if images else {}),
            )
            for i in range(rows)
        ]
        # explain.v1's checks, per row, on the loop (the headers read above, not probed again)
        plans = [
            self.fast.plan_explain(
                r, entry, None if prepared is None else prepared[i], header=headers[i] if headers else None
            )
            for i, r in enumerate(requests)
        ]
        if all(p.one for p in plans):
            # the common case (a NEM-U mask, no fidelity): explain.v1's one CPU-pool task per row,
            # and the output tensors built by the thread that ran the model (no second task)
            rows_out = _Rows(resp, rows, entry, want)
            futures: list[asyncio.Future] = []
            try:
                for i, r in enumerate(requests):
                    futures.append(
                        self.fast._explain_one(
                            r,
                            entry,
                            r.options,
                            None if prepared is None else prepared[i],
                            timeout,
                            build=functools.partial(rows_out.row, i),
                        )
                    )
            except BaseException:  # a row refused (the decode pool full): the rows queued are dropped
                for queued in futures:
                    queued.cancel()
                raise
            # one row (the usual request): its future itself, no task and gather around it
            await (futures[0] if rows == 1 else _all(futures))
            return
        answers = await _all(
            self.fast.explain(
                r, timeout=timeout, entry=entry, prepared=None if prepared is None else prepared[i], plan=plans[i]
            )
            for i, r in enumerate(requests)
        )
        await self.fast.cpu.run(_explain_outputs, resp, answers, want, with_fid)
        resp.parameters["method"].string_param = answers[0].method
        resp.parameters["batch_size"].int64_param = max(a.timing.batch_size for a in answers)

    @staticmethod
    def _targets(entry: ModelEntry, f: ModelEntry, t: Input | None, opts: Options, rows: int) -> list[int] | None:
        if t is None and opts.target_label is None:
            return None
        if f.kind != "classifier":
            raise InvalidArgument(
                f"target labels apply to classifiers and NEMt models; {entry.id} explains an {f.kind}"
            )
        if t is not None and opts.target_label is not None:
            raise InvalidArgument("give the target either as input 'target' or as parameter target_label, not both")
        if t is None:
            return [int(opts.target_label)] * rows  # type: ignore[arg-type]
        if t.datatype != "INT64" or t.shape != (rows,):
            raise InvalidArgument(
                f"input target is {t.datatype} {list(t.shape)}; it is INT64 [{rows}]: one label per "
                "row of image (-1 = the predicted label)"
            )
        return [int(v) for v in t.array]  # type: ignore[union-attr]


async def _all(aws: Any) -> list[Any]:
    """Await every awaitable (rows of one request run concurrently, so the micro-batcher batches them);
    when one fails the others are cancelled and its error is the request's."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        raise


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _with_target(options: pb.ExplainOptions, target: int | None) -> pb.ExplainOptions:
    if target is None or target < 0:
        return options  # NEMt: unset = the predicted label
    o = pb.ExplainOptions()
    o.CopyFrom(options)
    o.target_label = target
    return o


def _prepare_raw(x: np.ndarray, spec: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """Rows of a raw FP32 [B, C, H, W] input in the model's layout -> (image HWC in [0, 1], x [1, C, H, W])
    per row; the image (the input denormalised) is what the mask is mapped and rendered onto."""
    if not np.isfinite(x).all():
        raise InvalidArgument("input image contains NaN or Inf values")
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    out = []
    for row in x.astype(np.float32, copy=False):
        image = np.clip(row * std + mean, 0.0, 1.0).transpose(1, 2, 0)
        out.append((np.ascontiguousarray(image), np.ascontiguousarray(row[None])))
    return out


def _decode(image: pb.Image, spec: Any) -> tuple[np.ndarray, np.ndarray]:
    arr, x, _ = FastPath._prepare(image, spec)  # the same decoding and preprocessing as Explain
    return arr, x


class _Rows:
    """The outputs of one request's rows of the fast path (FastPath._explain_one with `build`):
    each row's mask and output are made on the thread that ran its model call (or rendered its
    large mask), and the thread that finishes the last row writes the response's tensors. The same
    arrays and bytes as _explain_outputs over explain.v1's answers: the float32 mask over the input
    (mask_wire.fill_mask's MASK_AT_INPUT: to_input_geometry), the output as float32."""

    def __init__(self, resp: oip.ModelInferResponse, rows: int, entry: ModelEntry, want: set[str] | None):
        self.resp, self.left, self.spec, self.kind = resp, rows, entry.input, entry.kind
        self.want_mask = want is None or "mask" in want
        self.want_output = want is None or "output" in want
        self.masks: list[np.ndarray | None] = [None] * rows
        self.outs: list[np.ndarray | None] = [None] * rows
        self.batch = 0
        self.lock = threading.Lock()

    def row(self, i: int, image: np.ndarray, res: dict[str, np.ndarray], bt: Any) -> oip.ModelInferResponse | None:
        """Row i is done (any thread): the response when it is the last row, else None."""
        mask = None
        if self.want_mask:
            h, w = image.shape[:2]
            mask = to_input_geometry(res["mask"][0, 0], self.spec, h, w).astype(np.float32)
        out = res["output"][0].astype(np.float32) if self.want_output else None
        with self.lock:
            self.masks[i], self.outs[i] = mask, out
            self.batch = max(self.batch, bt.batch_rows)
            self.left -= 1
            if self.left:
                return None
        resp = self.resp
        if self.want_mask:
            add_output(resp, "mask", np.stack(self.masks)[:, None])  # type: ignore[arg-type]
        if self.want_output:
            add_output(resp, "output", np.stack(self.outs))  # type: ignore[arg-type]
        resp.parameters["method"].string_param = self.kind
        resp.parameters["batch_size"].int64_param = self.batch
        return resp


def _explain_outputs(
    resp: oip.ModelInferResponse, answers: list[pb.ExplainResponse], want: set[str] | None, with_fid: bool
) -> None:
    masks = np.stack([from_tensor(a.mask, what="mask").astype(np.float32) for a in answers])[:, None]
    if want is None or "mask" in want:
        add_output(resp, "mask", masks)
    if (want is None or "output" in want) and answers[0].output.shape:
        add_output(resp, "output", np.stack([from_tensor(a.output, what="output") for a in answers]).astype(np.float32))
    labelled = any(a.target_label >= 0 for a in answers)
    if labelled and (want is None or "label" in want):
        add_output(resp, "label", np.array([a.target_label for a in answers], dtype=np.int64))
    if with_fid:
        add_output(resp, "fidelity", np.array([a.fidelity for a in answers], dtype=np.float32))


def _timing(resp: oip.ModelInferResponse, timing: pb.Timing) -> None:
    resp.parameters["queue_ms"].double_param = timing.queue_ms
    resp.parameters["inference_ms"].double_param = timing.inference_ms
    resp.parameters["batch_size"].int64_param = timing.batch_size


def add_inference_service(
    server: Any, registry: Registry, fast: FastPath, *, version: str, admit: Admit | None = None
) -> InferenceServicer:
    """Register inference.GRPCInferenceService on `server` (grpc.aio) with the server's admission
    gate on ModelInfer, through service.rpc.add_service like explain.v1."""
    from xaiserve.service.rpc import add_service

    servicer = InferenceServicer(registry, fast, version=version, admit=admit)
    add_service(server, servicer, SERVICE, pool=fast.cpu, admit={"ModelInfer": admit} if admit else None)
    return servicer
