"""The Open Inference Protocol v2 over HTTP/REST (KServe v2 / Triton's HTTP API) on the HTTP port.

    route (NAME, V URL-quoted)                 gRPC method      answer
    GET  /v2                                   ServerMetadata   {"name", "version", "extensions"}
    GET  /v2/health/live                       ServerLive       200 {"live": true}
    GET  /v2/health/ready                      ServerReady      200 {"ready": true}; 400 {"ready": false} (draining)
    GET  /v2/models/NAME[/versions/V]          ModelMetadata    {"name", "versions", "platform", "inputs", "outputs"}
    GET  /v2/models/NAME[/versions/V]/ready    ModelReady       200 / 400 {"ready": ...}; unknown model 404
    GET  /v2/models/NAME[/versions/V]/config   ModelConfig      Triton's model configuration (its JSON mapping)
    POST /v2/models/NAME[/versions/V]/infer    ModelInfer       the inference response
    POST /v2/repository/index                  RepositoryIndex  [{"name", "version", "state", "reason"}]

The spec's health rule: 200 means true, a 4xx false. An error answers {"error": message, "code":
status name} with the HTTP status of its code (service.errors.http_status_of: NOT_FOUND 404,
INVALID_ARGUMENT 400, RESOURCE_EXHAUSTED 429, UNAVAILABLE 503, ...); tritonclient.http reads
"error".

One code path: each route builds the gRPC request message and calls the OIP servicer's own method
(service.oip.InferenceServicer: ModelMetadata, ModelReady, ..., and `infer` for ModelInfer) with
web.api.HttpCall standing for the gRPC context, so the model resolution, the tensor checks, the
mapping onto the fast path, the messages, the request metrics (rpc labels "ModelInfer", ...),
admission and token policies (named as the gRPC methods, `inference.GRPCInferenceService/...`)
are the gRPC port's. What this module adds is the JSON form of the messages:

- An inference request is JSON {"id", "parameters", "inputs", "outputs"}; each input
  {"name", "shape", "datatype", "parameters", "data"} with `data` row-major, flat or nested. BYTES
  elements in JSON are base64 strings (JSON cannot hold raw bytes; MLServer's and KServe's
  convention). Every input becomes the request's raw_input_contents, so the servicer checks it as
  it checks a gRPC request.
- Triton's binary tensor data extension (what tritonclient.http sends by default): header
  `Inference-Header-Content-Length: N`, the first N bytes of the body are the JSON, then the data of
  each input with parameter `binary_data_size`, in order (BYTES: 4-byte little-endian length, then
  the bytes, per element). Outputs come binary when the request output has parameter
  `binary_data: true`, or for outputs not listed when request parameter `binary_data_output` is
  true; then the answer has the same header and is `application/octet-stream`.
- Request parameters are JSON strings, numbers and booleans (InferParameter's string / int64 /
  double / bool); `Content-Encoding: gzip` or `deflate` bodies are accepted (tritonclient's
  request_compression_algorithm), inflated up to the body limit.

Limits: a body of at most max_message_mb (the gRPC message limit; large tensors belong in the
binary extension), at most `max_calls` calls at once (RESOURCE_EXHAUSTED beyond), and the call's
deadline is the request parameter `timeout` (microseconds, Triton's) or MAX_TIMEOUT_S. Connections
are kept alive (HTTP/1.1) between calls that read their whole body. Threads as service.web.api:
the HTTP thread reads the body and writes the answer; parsing and encoding run in the fast path's
bounded CPU pool, the servicer on the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import json
import logging
import math
import re
import struct
import threading
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from xaiserve.proto.inference import grpc_predict_v2_pb2 as oip
from xaiserve.service.errors import InvalidArgument, ResourceExhausted, Unavailable, XaiError, http_status_of, quote
from xaiserve.service.oip import DATATYPES, SERVICE_NAME
from xaiserve.service.rpc import Observed, failure, observed_unary
from xaiserve.service.web.api import (
    Aborted,
    HttpCall,
    authorize_http,
    read_body,
    refuse_cross_origin,
    run_on_loop,
)

log = logging.getLogger("xaiserve.oip.http")

MAX_TIMEOUT_S = 600.0
HEADER_LENGTH = "Inference-Header-Content-Length"
_NAME = r"(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    rpc: str  # the gRPC method: its metrics label and the token permission
    handler: str


ROUTES: tuple[Route, ...] = tuple(
    Route(m, re.compile(p), rpc, h)
    for m, p, rpc, h in (
        ("GET", r"/v2/?", "ServerMetadata", "_server_metadata"),
        ("GET", r"/v2/health/live", "ServerLive", "_live"),
        ("GET", r"/v2/health/ready", "ServerReady", "_ready"),
        ("POST", r"/v2/repository/index", "RepositoryIndex", "_repository_index"),
        ("GET", rf"/v2/models/{_NAME}", "ModelMetadata", "_model_metadata"),
        ("GET", rf"/v2/models/{_NAME}/ready", "ModelReady", "_model_ready"),
        ("GET", rf"/v2/models/{_NAME}/config", "ModelConfig", "_model_config"),
        ("POST", rf"/v2/models/{_NAME}/infer", "ModelInfer", "_infer"),
    )
)
ROUTE_LIST = (
    "GET /v2, /v2/health/live, /v2/health/ready, /v2/models/NAME[/versions/V][/ready|/config]; "
    "POST /v2/models/NAME[/versions/V]/infer, /v2/repository/index"
)


# ------------------------------------------------------------------------------------------ JSON
def _json_object(raw: bytes | memoryview, what: str) -> dict:
    try:
        doc = json.loads(bytes(raw))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidArgument(
            f"{what} is not JSON{where}; send the JSON object of the Open Inference Protocol "
            f"(with binary tensors: its first {HEADER_LENGTH} bytes)"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"{what} is a JSON {type(doc).__name__}, not an object")
    return doc


def _check_keys(doc: dict, known: tuple[str, ...], what: str) -> None:
    for k in doc:
        if k not in known:
            raise InvalidArgument(
                f"{what} has field {quote(str(k), 64)}, which the protocol does not define; known: {', '.join(known)}"
            )


def _set_param(p: oip.InferParameter, value: Any, what: str) -> None:
    """A JSON parameter value into InferParameter (bool, int64, double or string)."""
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        if not -(1 << 63) <= value < (1 << 63):
            raise InvalidArgument(f"{what} = {quote(str(value), 32)} does not fit in an int64")
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    elif isinstance(value, str):
        p.string_param = value
    else:
        raise InvalidArgument(f"{what} is a JSON {type(value).__name__}; parameters are strings, numbers or booleans")


def _param_value(p: oip.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _params(doc: dict, what: str) -> dict:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidArgument(f"{what}.parameters is a JSON {type(params).__name__}; it is an object")
    return params


def _flatten(data: Any, out: list) -> None:
    if isinstance(data, list):
        for d in data:
            _flatten(d, out)
    else:
        out.append(data)


def _json_bytes(data: Any, n: int, what: str) -> bytes:
    """BYTES elements given in JSON (base64 strings) as the raw BYTES layout (length-prefixed)."""
    items: list = []
    _flatten(data, items)
    if len(items) != n:
        raise InvalidArgument(f"{what}: data has {len(items)} elements, but its shape needs {n}")
    out = []
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InvalidArgument(
                f"{what}: element {i} of data is a JSON {type(s).__name__}; BYTES elements are base64 strings"
            )
        try:
            b = base64.b64decode(s, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidArgument(
                f"{what}: element {i} of data ({quote(s, 40)}) is not base64; BYTES travel in JSON as base64 "
                "strings, or raw in the binary data extension (tritonclient: binary_data=True, its default)"
            ) from None
        out.append(struct.pack("<I", len(b)) + b)
    return b"".join(out)


_KINDS = {"BOOL": "b", "FP16": "iuf", "FP32": "iuf", "FP64": "iuf"}


def _json_numbers(data: Any, datatype: str, n: int, what: str) -> bytes:
    """Numbers given in JSON (flat or nested, row-major) as little-endian bytes of `datatype`."""
    dt = DATATYPES[datatype][0]
    try:
        a = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidArgument(f"{what}: data is a ragged list; give it flat or nested to the tensor's shape") from None
    if a.size != n:
        raise InvalidArgument(f"{what}: data has {a.size} values, but its shape needs {n}")
    if n == 0:
        return b""
    kinds = _KINDS.get(datatype, "iu")
    if a.dtype.kind not in kinds:
        want = {"b": "true / false", "iu": "integers", "iuf": "numbers"}[kinds]
        raise InvalidArgument(f"{what}: data must be {want} for {datatype}; it holds {a.dtype.kind!r}-kind values")
    if kinds == "iu":
        info = np.iinfo(dt)
        if a.min() < info.min or a.max() > info.max:
            raise InvalidArgument(f"{what}: a value of data is outside {datatype}'s range {info.min}..{info.max}")
    return a.astype(dt).tobytes()


@dataclass
class Wanted:
    """Which outputs answer binary (the binary data extension)."""

    default: bool = False
    named: dict[str, bool] | None = None

    def binary(self, name: str) -> bool:
        return (self.named or {}).get(name, self.default)


def _inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    enc = encoding.strip().lower()
    if enc in ("", "identity"):
        return raw
    if enc not in ("gzip", "deflate"):
        raise InvalidArgument(f"Content-Encoding {quote(encoding, 32)} is not accepted; send gzip, deflate or none")
    d = zlib.decompressobj(wbits=31 if enc == "gzip" else 15)
    try:
        out = d.decompress(raw, limit + 1)
    except zlib.error as e:
        raise InvalidArgument(f"the {enc} body does not inflate: {quote(str(e), 80)}") from None
    if len(out) > limit or d.unconsumed_tail:
        raise ResourceExhausted(f"the {enc} body inflates to more than the {limit} bytes this server takes")
    return out


def parse_infer(
    raw: bytes, header_length: str | None, encoding: str, name: str, version: str, limit: int
) -> tuple[oip.ModelInferRequest, Wanted]:
    """The body of POST .../infer as the gRPC ModelInferRequest (every input raw) and the outputs'
    binary choice. Checks the JSON form only; the servicer checks the tensors."""
    raw = _inflate(raw, encoding, limit)
    if header_length is None:
        header, rest = memoryview(raw), memoryview(b"")
    else:
        try:
            hl = int(header_length)
        except ValueError:
            raise InvalidArgument(f"{HEADER_LENGTH} {quote(header_length, 32)} is not a number") from None
        if not 0 < hl <= len(raw):
            raise InvalidArgument(f"{HEADER_LENGTH} is {hl}, but the body has {len(raw)} bytes")
        header, rest = memoryview(raw)[:hl], memoryview(raw)[hl:]
    doc = _json_object(header, "the inference request")
    _check_keys(doc, ("id", "parameters", "inputs", "outputs"), "the inference request")
    req = oip.ModelInferRequest(model_name=name, model_version=version)
    rid = doc.get("id", "")
    if not isinstance(rid, str):
        raise InvalidArgument(f"the request's id is a JSON {type(rid).__name__}; it is a string")
    req.id = rid
    wanted = Wanted()
    for k, v in _params(doc, "the inference request").items():
        if k == "binary_data_output":
            if not isinstance(v, bool):
                raise InvalidArgument("parameter binary_data_output must be true or false")
            wanted.default = v
            continue
        _set_param(req.parameters[k], v, f"parameter {quote(k, 64)}")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidArgument("the inference request has no list `inputs`; give one object per input tensor")
    pos = 0
    for i, t in enumerate(inputs):
        what = f"inputs[{i}]"
        if not isinstance(t, dict):
            raise InvalidArgument(f"{what} is a JSON {type(t).__name__}; each input is an object")
        _check_keys(t, ("name", "shape", "datatype", "parameters", "data"), what)
        tname, shape, datatype = t.get("name"), t.get("shape"), t.get("datatype")
        if not isinstance(tname, str) or not isinstance(datatype, str):
            raise InvalidArgument(f"{what}: give its name and datatype as strings")
        what = f"input {quote(tname, 64)}"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise InvalidArgument(f"{what}: shape must be a list of integers")
        tensor = req.inputs.add(name=tname, datatype=datatype)
        try:
            tensor.shape.extend(shape)
        except ValueError:
            raise InvalidArgument(f"{what}: a dimension of shape does not fit in an int64") from None
        size = None
        for k, v in _params(t, what).items():
            if k == "binary_data_size":
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise InvalidArgument(f"{what}: binary_data_size must be a non-negative integer")
                size = v
            else:
                _set_param(tensor.parameters[k], v, f"{what}: parameter {quote(k, 64)}")
        if size is not None:
            if "data" in t:
                raise InvalidArgument(f"{what} has both data and binary_data_size; give its data one way")
            if pos + size > len(rest):
                raise InvalidArgument(
                    f"{what}: binary_data_size {size} runs past the body's binary part "
                    f"({len(rest) - pos} bytes left after the inputs before it)"
                )
            req.raw_input_contents.append(bytes(rest[pos : pos + size]))
            pos += size
            continue
        if "data" not in t:
            raise InvalidArgument(
                f"{what} has no data: give `data` (JSON) or parameter binary_data_size (binary data extension)"
            )
        if datatype not in DATATYPES and datatype != "BYTES" or any(d < 0 for d in shape):
            req.raw_input_contents.append(b"")  # the servicer names the datatype or shape that is wrong
            continue
        n = math.prod(shape)
        if n > limit:
            raise ResourceExhausted(f"{what}: {n} elements is more than the limit of {limit}")
        conv = _json_bytes if datatype == "BYTES" else (lambda d, n, w: _json_numbers(d, datatype, n, w))
        req.raw_input_contents.append(conv(t["data"], n, what))
    if pos != len(rest):
        raise InvalidArgument(
            f"the body has {len(rest) - pos} bytes after the JSON and the inputs' binary_data_size; "
            f"check {HEADER_LENGTH} and each input's binary_data_size"
        )
    outputs = doc.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidArgument("the request's outputs is not a list; give one object per output wanted")
    if outputs:
        named: dict[str, bool] = {}
        wanted.named = named
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidArgument(f"outputs[{i}] must be an object with a string name")
        _check_keys(o, ("name", "parameters"), f"outputs[{i}]")
        out = req.outputs.add(name=o["name"])
        for k, v in _params(o, f"output {quote(o['name'], 64)}").items():
            if k == "binary_data":
                if not isinstance(v, bool):
                    raise InvalidArgument(f"output {quote(o['name'], 64)}: binary_data must be true or false")
                named[o["name"]] = v
            else:
                _set_param(out.parameters[k], v, f"output {quote(o['name'], 64)}: parameter {quote(k, 64)}")
    return req, wanted


def encode_infer(resp: oip.ModelInferResponse, wanted: Wanted) -> tuple[bytes, dict[str, str], str]:
    """The inference response as JSON (+ binary outputs): (body, headers, content type)."""
    doc: dict[str, Any] = {"model_name": resp.model_name, "model_version": resp.model_version}
    if resp.id:
        doc["id"] = resp.id
    if resp.parameters:
        doc["parameters"] = {k: _param_value(v) for k, v in resp.parameters.items()}
    outs, chunks = [], []
    for o, data in zip(resp.outputs, resp.raw_output_contents, strict=True):
        t: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        if wanted.binary(o.name):
            t["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            t["data"] = np.frombuffer(data, dtype=DATATYPES[o.datatype][0]).tolist()
        outs.append(t)
    doc["outputs"] = outs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if chunks:
        return header + b"".join(chunks), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"
    return header, {}, "application/json"


def _int64s(desc: Descriptor, d: dict) -> dict:
    """The protobuf JSON mapping prints 64-bit integers as strings; Triton's JSON has numbers."""
    for f in desc.fields:
        if f.json_name not in d and f.name not in d:
            continue
        key = f.name if f.name in d else f.json_name
        v = d[key]
        if f.cpp_type in (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64):
            d[key] = [int(x) for x in v] if isinstance(v, list) else int(v)
        elif f.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
            mt = f.message_type
            if mt.GetOptions().map_entry:
                vt = mt.fields_by_name["value"].message_type
                if vt is not None:
                    for x in v.values():
                        _int64s(vt, x)
            elif isinstance(v, list):
                for x in v:
                    _int64s(mt, x)
            else:
                _int64s(mt, v)
    return d


def _tensor_metadata(ts: Any) -> list[dict]:
    return [{"name": t.name, "datatype": t.datatype, "shape": [int(d) for d in t.shape]} for t in ts]


# ------------------------------------------------------------------------------------------ routes
class OipRest:
    """The /v2 routes on the OIP servicer of the gRPC port (see the module docstring)."""

    def __init__(
        self,
        inference: Any,
        principals: Any,
        config: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        serving: threading.Event | None = None,
        max_calls: int = 64,
    ):
        self.servicer, self.principals, self.loop, self.serving = inference, principals, loop, serving
        self.fast = inference.fast
        self.auth = getattr(principals, "auth", None)
        self.cert_only = bool(config.tls_client_ca) and self.auth is None
        self.max_body = config.max_message_mb * 1024 * 1024
        self.max_calls = max_calls
        self._calls = threading.BoundedSemaphore(max_calls)

    # -- HTTP plumbing -------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        path = url.path
        matches = [(r, m) for r in ROUTES if (m := r.pattern.fullmatch(path))]
        if not matches:
            h.close_connection = True  # a body, if any, stays unread
            return self._error(h, "NOT_FOUND", f"no route {quote(path, 120)}; the routes are {ROUTE_LIST}")
        found = next(((r, m) for r, m in matches if r.method == h.command), None)
        if found is None:
            h.close_connection = True
            allow = ", ".join(sorted({r.method for r, _ in matches}))
            return self._error(
                h, "METHOD_NOT_ALLOWED", f"{h.command} is not allowed on {quote(path, 120)}; use {allow}", status=405
            )
        route, m = found
        try:  # before the body is read: a caller without a token cannot make the server read 64 MB
            self._same_origin(h)
            authorization = self._authorize(h, route.rpc)
        except Aborted as e:
            h.close_connection = True
            return self._error(h, e.code, e.message)
        try:
            raw = self._read_body(h)
        except XaiError as e:
            h.close_connection = True
            return self._refused(h, route.rpc, e)
        except OSError:
            h.close_connection = True
            return  # the client went away (or stalled past the port's timeout)
        if route.rpc not in ("ServerLive", "ServerReady") and self.serving is not None and not self.serving.is_set():
            return self._refused(h, route.rpc, Unavailable("the server is draining; retry on another replica"))
        args = {k: unquote(v) if v else "" for k, v in m.groupdict().items()}
        if not self._calls.acquire(blocking=False):
            return self._refused(
                h,
                route.rpc,
                ResourceExhausted(f"the /v2 API has {self.max_calls} calls in progress; retry with backoff"),
            )
        try:
            work = getattr(self, route.handler)(h, raw, **args)
            ctx = HttpCall(authorization, MAX_TIMEOUT_S)
            try:
                fut = self._on_loop(work(ctx))
                status, body, headers, ctype = fut.result(
                    timeout=MAX_TIMEOUT_S + 10.0
                )  # the servicer keeps the deadline
            except concurrent.futures.TimeoutError:
                fut.cancel()
                return self._error(h, "DEADLINE_EXCEEDED", "the call's deadline passed before the work finished")
            except Aborted as e:
                return self._error(h, e.code, e.message)
            except Exception as e:  # noqa: BLE001 - never a traceback to the client
                return self._internal(h, route.rpc, e)
            self._send(h, status, body, ctype, headers)
        finally:
            self._calls.release()

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        return read_body(h, self.max_body, "(max_message_mb); send fewer rows per request")

    @staticmethod
    def _same_origin(h: BaseHTTPRequestHandler) -> None:
        refuse_cross_origin(h, "another web site's page may not call /v2")

    def _authorize(self, h: BaseHTTPRequestHandler, rpc: str) -> str | None:
        """As the gRPC interceptor: the token's allow-list must name inference.GRPCInferenceService/<rpc>."""
        return authorize_http(h, self.auth, self.cert_only, f"/{SERVICE_NAME}/{rpc}", "/v2")

    def _on_loop(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        return run_on_loop(self.loop, coro)

    @staticmethod
    def _send(
        h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None
    ) -> None:
        try:
            h.send_response(status)
            h.send_header("Content-Type", f"{ctype}; charset=utf-8" if ctype == "application/json" else ctype)
            h.send_header("Content-Length", str(len(body)))
            h.send_header("Cache-Control", "no-store")
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(body)
        except OSError:
            h.close_connection = True  # the client is gone

    def _error(self, h: BaseHTTPRequestHandler, code: str, message: str, *, status: int | None = None) -> None:
        status = status or http_status_of(code)
        headers = {"WWW-Authenticate": 'Bearer realm="xaiserve"'} if status == 401 else None
        body = json.dumps({"error": message, "code": code}).encode()
        self._send(h, status, body, "application/json", headers)

    def _refused(self, h: BaseHTTPRequestHandler, rpc: str, e: XaiError) -> None:
        """A call refused before the servicer ran, counted in the request metrics as the gRPC port counts it."""
        obs = Observed(rpc)
        try:
            code, message = failure(obs, e)
        finally:
            obs.done()
        self._error(h, code, message)

    def _internal(self, h: BaseHTTPRequestHandler, rpc: str, e: BaseException) -> None:
        obs = Observed(rpc)
        try:
            code, message = failure(obs, e)  # logged with a reference the message gives
        finally:
            obs.done()
        self._error(h, code, message)

    @staticmethod
    async def _before_servicer(rpc: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        """An XaiError raised before the servicer ran (refused, malformed) ends the call as
        service.rpc ends such a gRPC call: counted, with its status."""
        try:
            return await fn()
        except XaiError as e:
            obs = Observed(rpc)
            try:
                code, message = failure(obs, e)
            finally:
                obs.done()
            raise Aborted(code, message) from None

    @staticmethod
    def _json(doc: Any, status: int = 200) -> tuple[int, bytes, dict, str]:
        return status, json.dumps(doc, separators=(",", ":")).encode(), {}, "application/json"

    # -- health and metadata ----------------------------------------------------------------
    def _live(self, h, raw):
        async def work(ctx: HttpCall):
            r = await self.servicer.ServerLive(oip.ServerLiveRequest(), ctx)
            return self._json({"live": r.live}, 200 if r.live else 400)

        return work

    def _ready(self, h, raw):
        async def work(ctx: HttpCall):
            r = await self.servicer.ServerReady(oip.ServerReadyRequest(), ctx)
            return self._json({"ready": r.ready}, 200 if r.ready else 400)

        return work

    def _server_metadata(self, h, raw):
        async def work(ctx: HttpCall):
            r = await self.servicer.ServerMetadata(oip.ServerMetadataRequest(), ctx)
            return self._json({"name": r.name, "version": r.version, "extensions": list(r.extensions)})

        return work

    def _model_ready(self, h, raw, name: str, version: str):
        async def work(ctx: HttpCall):
            r = await self.servicer.ModelReady(oip.ModelReadyRequest(name=name, version=version), ctx)
            return self._json({"name": name, "ready": r.ready}, 200 if r.ready else 400)

        return work

    def _model_metadata(self, h, raw, name: str, version: str):
        async def work(ctx: HttpCall):
            r = await self.servicer.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version), ctx)
            return self._json(
                {
                    "name": r.name,
                    "versions": list(r.versions),
                    "platform": r.platform,
                    "inputs": _tensor_metadata(r.inputs),
                    "outputs": _tensor_metadata(r.outputs),
                }
            )

        return work

    def _model_config(self, h, raw, name: str, version: str):
        async def work(ctx: HttpCall):
            r = await self.servicer.ModelConfig(oip.ModelConfigRequest(name=name, version=version), ctx)
            doc = json_format.MessageToDict(r.config, preserving_proto_field_name=True)
            return self._json(_int64s(oip.ModelConfig.DESCRIPTOR, doc))

        return work

    def _repository_index(self, h, raw):
        async def work(ctx: HttpCall):
            async def parse() -> bool:
                if not raw.strip():
                    return False
                doc = _json_object(raw, "the repository index request")
                _check_keys(doc, ("repository_name", "ready"), "the repository index request")
                if not isinstance(doc.get("ready", False), bool):
                    raise InvalidArgument("ready must be true or false")
                return doc.get("ready", False)

            ready = await self._before_servicer("RepositoryIndex", parse)
            r = await self.servicer.RepositoryIndex(oip.RepositoryIndexRequest(ready=ready), ctx)
            return self._json(
                [
                    {
                        "name": m.name,
                        "version": m.version,
                        "state": m.state,
                        **({"reason": m.reason} if m.reason else {}),
                    }
                    for m in r.models
                ]
            )

        return work

    # -- inference ----------------------------------------------------------------------------
    def _infer(self, h, raw, name: str, version: str):
        header_length = h.headers.get(HEADER_LENGTH)
        encoding = h.headers.get("Content-Encoding") or ""
        admit = self.servicer.admit

        async def work(ctx: HttpCall):
            async def call():
                with admit(ctx) if admit is not None else contextlib.nullcontext():  # the gRPC port's gate
                    req, wanted = await self.fast.cpu.run(
                        parse_infer, raw, header_length, encoding, name, version, self.max_body
                    )

                    async def go(obs: Observed):
                        return await self.servicer.infer(obs, req, ctx)  # the gRPC ModelInfer's own body

                    return await observed_unary("ModelInfer", ctx, go), wanted  # type: ignore[arg-type]

            resp, wanted = await self._before_servicer("ModelInfer", call)
            body, headers, ctype = await self.fast.cpu.run(encode_infer, resp, wanted)
            return 200, body, headers, ctype

        return work


def mounts(
    inference: Any, principals: Any, config: Any, loop: asyncio.AbstractEventLoop, serving: threading.Event | None
) -> dict[str, Callable[[BaseHTTPRequestHandler], None]]:
    """The /v2 routes for service.httpd.OpsServer(mounts=..., keep_alive=...)."""
    api = OipRest(inference, principals, config, loop, serving=serving)
    return {"/v2": api.handle, "/v2/*": api.handle}
