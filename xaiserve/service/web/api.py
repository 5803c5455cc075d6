"""The web viewer's JSON API: the gRPC servicer's calls over HTTP, for the page (and for curl).

Bodies and answers are the protobuf JSON mapping of the explain.v1 messages (field names as in the
.proto, bytes as base64, 64-bit integers as strings, enums by name, every field printed):

    route                                 gRPC method (allow-list)   body -> answer
    GET  /api/models[?kind=K]             ListModels                 ListModelsResponse
    GET  /api/methods                     ListModels                 the methods table, model kinds, job parameters
    POST /api/preview                     Explain                    ExplainRequest (model, image) -> the image as
                                                                     the server decodes it for the model, as PNG
    POST /api/explain                     Explain                    ExplainRequest -> ExplainResponse
    POST /api/denoise[?particles=1]       Denoise                    DenoiseRequest -> DenoiseResponse (+ "particles":
                                                                     the particles the model saw)
    POST /api/jobs                        SubmitJob                  JobRequest -> Job
    GET  /api/jobs/ID[?include_result=1]  GetJob                     Job
    POST /api/jobs/ID/cancel              CancelJob                  Job
    GET  /api/jobs/ID/events              WatchJob                   text/event-stream, one JobEvent per event

One code path: a route builds the protobuf request and calls the gRPC servicer's own method
(ExplainerServicer.Explain, SubmitJob, WatchJob, ...) with `HttpCall`, which stands for the gRPC
context, so validation, messages, metrics (the same rpc labels; "Preview" and "ListMethods" for the
two routes only the page has), job ownership and admission are those of the gRPC port. Unary calls
take `?timeout=SECONDS` (default 60) as their deadline. An error answers {"code", "message",
"status"} with the HTTP status of its code (service.errors.http_status_of). Server-sent events are
`id: <sequence>`, `event: <JobEventType>` (EVENT_PROGRESS, ...), `data: <JobEvent JSON>`; an error
after the stream started is `event: error` with the error document; a comment every 15 s keeps
proxies from closing an idle stream. The page reads the stream with fetch(), which can send the
Authorization header (EventSource cannot).

Auth: with tokens on, every /api call needs `Authorization: Bearer <token>`, checked as the gRPC
interceptor checks it (service.security: constant time, the token's allow-list of gRPC methods in
the column above, the same rejection counter and fixed messages) before the body is read. A server
that authenticates gRPC callers by client certificate alone (mutual TLS, no tokens) refuses /api:
the plain-HTTP port cannot check certificates. The page and its static files are public (they hold
no data). Against cross-site request forgery a POST body must be `application/json` (which another
site's page can only send after a CORS preflight, never granted here) and a call whose `Origin` is
not this host is refused (PERMISSION_DENIED).

Threads: service.httpd answers each connection in a thread of its own, which reads the body and
writes the answer (I/O only); the servicer runs on the event loop, request parsing and JSON
encoding in the fast path's bounded CPU pool. At most `max_calls` calls and `max_watchers` event
streams are open at once; beyond, RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import fields as dc_fields
from http.server import BaseHTTPRequestHandler
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from xaiserve.methods import KINDS, METHODS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import InvalidArgument, ResourceExhausted, Unavailable, XaiError, http_status_of, quote
from xaiserve.service.rpc import Observed, failure, observed_unary
from xaiserve.service.security import AUTH_REJECTED, PERMISSION_DENIED_MESSAGE

log = logging.getLogger("xaiserve.web")

SERVICE = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
UNAUTHENTICATED_MESSAGE = "authentication required: send a valid bearer token in the Authorization header"
CERT_ONLY_MESSAGE = (
    "this server authenticates callers by client certificate (mutual TLS), which its HTTP port "
    "cannot check; configure tokens_file to use the web API"
)
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 600.0
KEEPALIVE_S = 15.0
FIRST_EVENT_TIMEOUT_S = 30.0
SLOW_READER_BACKLOG = 16  # progress events waiting for a slow reader beyond which new ones are skipped


class Aborted(Exception):
    """A call ended with a status: what HttpCall.abort raises where grpc would end the call."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


def refuse_cross_origin(h: BaseHTTPRequestHandler, surface: str) -> None:
    """A call whose Origin is not this host is refused (cross-site request forgery): another web
    site's page may not call the HTTP APIs from a visitor's browser."""
    origin = h.headers.get("Origin")
    if origin is not None:
        host = (h.headers.get("Host") or "").strip().lower()
        if origin == "null" or urlsplit(origin).netloc.lower() != host:
            raise Aborted("PERMISSION_DENIED", f"cross-origin call from {quote(origin, 80)} refused: {surface}")


def authorize_http(h: BaseHTTPRequestHandler, auth: Any, cert_only: bool, method: str, surface: str) -> str | None:
    """The Authorization header to hand on when the caller may call the gRPC `method`
    (/package.Service/Rpc); raises Aborted (UNAUTHENTICATED / PERMISSION_DENIED) as the gRPC
    interceptor would. `surface` names the HTTP API in the log line."""
    values = h.headers.get_all("Authorization") or []
    if cert_only:
        raise Aborted("UNAUTHENTICATED", CERT_ONLY_MESSAGE)
    if auth is None:
        return values[0] if len(values) == 1 else None
    policy, reason = auth.authenticate([("authorization", v) for v in values])
    if policy is None:
        AUTH_REJECTED.labels(reason).inc()
        log.warning("rejected %s call: method=%s reason=%s_token status=UNAUTHENTICATED", surface, method, reason)
        raise Aborted("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE)
    if not policy.allows(method):
        AUTH_REJECTED.labels("forbidden").inc()
        log.warning("rejected %s call: method=%s token_name=%s status=PERMISSION_DENIED", surface, method, policy.name)
        raise Aborted("PERMISSION_DENIED", PERMISSION_DENIED_MESSAGE)
    return values[0]


def read_body(h: BaseHTTPRequestHandler, max_body: int, too_large_hint: str, missing: str | None = None) -> bytes:
    """The request body by its Content-Length, refused before reading when it is over `max_body`
    (`too_large_hint` says what to send instead). Without a length: InvalidArgument(`missing`), or
    when `missing` is None an empty body (a POST without a length then closes the connection: under
    HTTP/1.1 its body runs to the end)."""
    if h.headers.get("Transfer-Encoding"):
        raise InvalidArgument("chunked request bodies are not accepted; send Content-Length")
    length = h.headers.get("Content-Length")
    if length is None:
        if missing is not None:
            raise InvalidArgument(missing)
        if h.command == "POST":
            h.close_connection = True
        return b""
    try:
        n = int(length)
    except ValueError:
        raise InvalidArgument(f"Content-Length {quote(length, 32)} is not a number") from None
    if n < 0:
        raise InvalidArgument(f"Content-Length {n} is negative")
    if n > max_body:
        raise ResourceExhausted(
            f"the request body has {n} bytes, more than the {max_body} this server takes {too_large_hint}"
        )
    data = h.rfile.read(n)
    if len(data) != n:
        raise InvalidArgument(f"the request body ended after {len(data)} of its {n} bytes")
    return data


def run_on_loop(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any]) -> concurrent.futures.Future:
    """Hand a coroutine from an HTTP thread to the server's event loop."""
    try:
        return asyncio.run_coroutine_threadsafe(coro, loop)  # type: ignore[arg-type]
    except RuntimeError:  # the loop is closed: the server has stopped
        coro.close()  # type: ignore[attr-defined]
        raise Aborted("UNAVAILABLE", "the server is shutting down; retry on another replica") from None


class HttpCall:
    """What the servicer reads of a grpc.aio.ServicerContext, for one HTTP call: the caller's
    Authorization header as metadata (so service.security.Principals names the same principal),
    the deadline, and abort()."""

    def __init__(self, authorization: str | None, timeout_s: float | None):
        self._metadata = (("authorization", authorization),) if authorization else ()
        self._deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict:
        return {}  # no client certificate on the HTTP port

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: Any, details: str) -> None:
        raise Aborted(getattr(code, "name", str(code)), details)


@dataclass(frozen=True)
class Route:
    method: str
    pattern: re.Pattern
    rpc: str  # the rpc label of its metrics
    permission: str  # the gRPC method a token's allow-list must name
    handler: str


ROUTES: tuple[Route, ...] = tuple(
    Route(m, re.compile(p), rpc, perm, h)
    for m, p, rpc, perm, h in (
        ("GET", r"/api/models", "ListModels", "ListModels", "_models"),
        ("GET", r"/api/methods", "ListMethods", "ListModels", "_methods"),
        ("POST", r"/api/preview", "Preview", "Explain", "_preview"),
        ("POST", r"/api/explain", "Explain", "Explain", "_explain"),
        ("POST", r"/api/denoise", "Denoise", "Denoise", "_denoise"),
        ("POST", r"/api/jobs", "SubmitJob", "SubmitJob", "_submit_job"),
        ("GET", r"/api/jobs/(?P<id>[^/]+)", "GetJob", "GetJob", "_get_job"),
        ("POST", r"/api/jobs/(?P<id>[^/]+)/cancel", "CancelJob", "CancelJob", "_cancel_job"),
        ("GET", r"/api/jobs/(?P<id>[^/]+)/events", "WatchJob", "WatchJob", "_watch_job"),
    )
)


# ----------------------------------------------------------------------------------------- JSON
def to_dict(message: Message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def to_json(message: Message) -> bytes:
    return json.dumps(to_dict(message), separators=(",", ":")).encode()


def parse_json(raw: bytes, cls: type[Message]) -> Message:
    """The request message from its JSON mapping; InvalidArgument that says what is wrong (never
    quoting more than 200 characters of the body)."""
    name = cls.DESCRIPTOR.full_name
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise InvalidArgument(
            f"the request body is not JSON{where}; send {name} in the protobuf JSON mapping "
            "(Content-Type: application/json)"
        ) from None
    if not isinstance(doc, dict):
        raise InvalidArgument(
            f"the request body is a JSON {type(doc).__name__}, not an object; send {name} in the protobuf JSON mapping"
        )
    try:
        return json_format.ParseDict(doc, cls(), max_recursion_depth=32)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        raise InvalidArgument(f"the request body is not a valid {name}: {quote(str(e))}") from None


# ------------------------------------------------------------------------------ methods document
def _proto_comments(message: str) -> dict[str, str]:
    """Field comments of `message` in explainer.proto (the text the page shows as each field's help)."""
    text = (resources.files("xaiserve.proto.explain.v1") / "explainer.proto").read_text()
    m = re.search(rf"^message {message} \{{\n(.*?)^\}}", text, re.S | re.M)
    out: dict[str, str] = {}
    if m is None:
        return out
    pending: list[str] = []
    for line in m.group(1).splitlines():
        s = line.strip()
        if s.startswith("//"):
            pending.append(s[2:].strip())
            continue
        f = re.match(r"(?:optional\s+|repeated\s+)?[\w.]+\s+(\w+)\s*=\s*\d+\s*;\s*(?://\s*(.*))?$", s)
        if f:
            out[f.group(1)] = " ".join(pending + ([f.group(2).strip()] if f.group(2) else []))
        pending = []
    return out


_TYPES = {
    FieldDescriptor.CPPTYPE_INT32: "int",
    FieldDescriptor.CPPTYPE_INT64: "int",
    FieldDescriptor.CPPTYPE_FLOAT: "float",
    FieldDescriptor.CPPTYPE_DOUBLE: "float",
    FieldDescriptor.CPPTYPE_BOOL: "bool",
    FieldDescriptor.CPPTYPE_STRING: "string",
    FieldDescriptor.CPPTYPE_MESSAGE: "message",
}


def _param_fields(cls: type[Message], defaults: dict[str, Any], choices: dict[str, tuple[str, ...]]) -> list[dict]:
    help_text = _proto_comments(cls.DESCRIPTOR.name)
    out = []
    for f in cls.DESCRIPTOR.fields:
        kind = _TYPES.get(f.cpp_type, "string")
        if kind == "message":
            kind = f.message_type.name.lower()  # "image": not a form field of the page
        out.append(
            {
                "name": f.name,
                "type": kind,
                "optional": f.has_presence,
                "default": defaults.get(f.name),
                "choices": list(choices.get(f.name, ())),
                "help": help_text.get(f.name, ""),
            }
        )
    return out


def _known_defaults(name: str, method: Any) -> tuple[dict[str, Any], dict[str, tuple[str, ...]]]:
    """(defaults, choices) the job adapters fill in for an unset field of RELAX and ablation paths."""
    if name == "relax":
        from xaiserve.handlers.relax.masking import MASKINGS
        from xaiserve.handlers.relax.relax import ESTIMATORS, RelaxConfig
        from xaiserve.handlers.relax.uncertainty import THRESHOLD_RULES

        defaults = RelaxConfig(batch_size=getattr(method, "batch_size", RelaxConfig.batch_size)).to_dict()
        return defaults, {"masking": MASKINGS, "threshold": THRESHOLD_RULES, "estimator": ESTIMATORS}
    if name == "ablation_path":
        from xaiserve.handlers.ablation.optimiser import AblationConfig
        from xaiserve.handlers.ablation.reductions import REDUCTIONS
        from xaiserve.handlers.ablation.scores import SCORES
        from xaiserve.service.jobs.ablation import DEFAULT_MASK_SIZE

        defaults = {f.name: getattr(AblationConfig(), f.name) for f in dc_fields(AblationConfig)}
        defaults["mask_size"] = DEFAULT_MASK_SIZE  # at most the model's side (service/jobs/ablation.py)
        return defaults, {"score": SCORES, "reduction": REDUCTIONS}
    return {}, {}


def job_parameters(jobs: Any) -> dict[str, dict]:
    """Each served job method's parameters: its JobRequest.params field, the fields of its parameters
    message with their .proto comments, and for RELAX and ablation paths the defaults their adapters
    fill in (their configuration classes), so that the page shows what an unset field means."""
    served = getattr(jobs, "methods", {}) or {}
    oneof = {f.message_type.name: f.name for f in pb.JobRequest.DESCRIPTOR.oneofs_by_name["params"].fields}
    out: dict[str, dict] = {}
    for name in sorted(served):
        spec = METHODS.get(name)
        msg = spec.params if spec is not None else ""
        if not msg or msg not in oneof:
            out[name] = {"params": "", "fields": []}
            continue
        defaults, choices = _known_defaults(name, served[name])
        out[name] = {"params": oneof[msg], "fields": _param_fields(getattr(pb, msg), defaults, choices)}
    return out


def methods_document(servicer: Any) -> dict:
    cfg = servicer.config
    return {
        "methods": {
            n: {
                "rpc": m.rpc,
                "kinds": sorted(m.kinds),
                "forms": sorted(m.forms),
                "own": m.own,
                "params": m.params,
                "doc": m.doc,
                "targeted": m.targeted,
            }
            for n, m in METHODS.items()
        },
        "kinds": {
            n: {
                "inputs": list(k.inputs),
                "outputs": list(k.outputs),
                "masking": k.masking,
                "explains": list(k.explains),
                "doc": k.doc,
            }
            for n, k in KINDS.items()
        },
        "jobs": job_parameters(servicer.jobs),
        "limits": {"max_message_mb": cfg.max_message_mb, "max_denoise_batch": cfg.max_denoise_batch},
        "auth": getattr(servicer.principals, "auth", None) is not None,
    }


# ------------------------------------------------------------------------------------------ API
class WebApi:
    """The /api routes on the objects of `servicer` (service.server.ExplainerServicer)."""

    def __init__(
        self,
        servicer: Any,
        loop: asyncio.AbstractEventLoop,
        *,
        serving: threading.Event | None = None,
        max_calls: int = 64,
        max_watchers: int = 64,
    ):
        self.servicer, self.loop, self.serving = servicer, loop, serving
        self.fast, self.registry = servicer.fast, servicer.registry
        self.principals = servicer.principals
        self.auth = getattr(self.principals, "auth", None)
        cfg = servicer.config
        self.cert_only = bool(cfg.tls_client_ca) and self.auth is None
        # a request message of max_message_mb as JSON: base64 adds a third, plus the JSON around it
        self.max_body = cfg.max_message_mb * 1024 * 1024 * 4 // 3 + (1 << 16)
        self.max_calls, self.max_watchers = max_calls, max_watchers
        self._calls = threading.BoundedSemaphore(max_calls)
        self._watchers = threading.BoundedSemaphore(max_watchers)
        self._methods_doc = json.dumps(methods_document(servicer), separators=(",", ":")).encode()
        if self.auth is not None and cfg.metrics_host not in ("127.0.0.1", "localhost", "::1"):
            log.warning(
                "the web API on %s takes bearer tokens over plain HTTP; put a TLS-terminating proxy in front "
                "of the HTTP port or bind it to loopback",
                cfg.metrics_host,
            )

    # -- HTTP plumbing -------------------------------------------------------------------------
    def handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlsplit(h.path)
        path = url.path
        matches = [(r, m) for r in ROUTES if (m := r.pattern.fullmatch(path))]
        if not matches:
            routes = ", ".join(sorted({r.pattern.pattern.replace("(?P<id>[^/]+)", "ID") for r in ROUTES}))
            return self._error(h, "NOT_FOUND", f"no API route {quote(path)}; the routes are {routes}")
        route = next(((r, m) for r, m in matches if r.method == h.command), None)
        if route is None:
            allow = ", ".join(sorted({r.method for r, _ in matches}))
            return self._error(
                h,
                "METHOD_NOT_ALLOWED",
                f"{h.command} is not allowed on {quote(path)}; use {allow}",
                status=405,
                headers={"Allow": allow},
            )
        r, m = route
        try:
            self._same_origin(h)
            authorization = self._authorize(h, r.permission)
        except Aborted as e:
            return self._error(h, e.code, e.message)
        if self.serving is not None and not self.serving.is_set():  # as the gRPC port refuses calls while draining
            return self._refused(h, r.rpc, Unavailable("the server is draining; retry on another replica"))
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        args = {k: unquote(v) for k, v in m.groupdict().items()}
        try:
            getattr(self, r.handler)(h, r, query, authorization, **args)
        except Exception as e:  # noqa: BLE001 - a bug here answers INTERNAL, never a traceback or a dropped connection
            self._internal(h, r.rpc, e)

    def _internal(self, h: BaseHTTPRequestHandler, rpc: str, e: BaseException) -> None:
        obs = Observed(rpc)
        try:
            code, message = failure(obs, e)  # logs it with a reference the message gives
        finally:
            obs.done()
        self._error(h, code, message)

    @staticmethod
    def _same_origin(h: BaseHTTPRequestHandler) -> None:
        """Refuse what another web site's page could make a visitor's browser send (cross-site
        request forgery): a POST must be JSON, which a cross-origin page can only send after a CORS
        preflight this server never grants, and a call whose Origin is not this host is refused."""
        refuse_cross_origin(h, "the web API answers its own page only")
        if h.command == "POST":
            ctype = (h.headers.get("Content-Type") or "").split(";", 1)[0].strip().lower()
            if ctype != "application/json":
                raise Aborted(
                    "INVALID_ARGUMENT",
                    f"Content-Type {quote(ctype or '(none)')} is not JSON; send the body "
                    "with Content-Type: application/json",
                )

    def _authorize(self, h: BaseHTTPRequestHandler, permission: str) -> str | None:
        """The Authorization header to hand on when the caller may call `permission`."""
        return authorize_http(h, self.auth, self.cert_only, f"/{SERVICE}/{permission}", "web")

    def _send(
        self,
        h: BaseHTTPRequestHandler,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        h.send_response(status)
        h.send_header("Content-Type", f"{ctype}; charset=utf-8" if ctype == "application/json" else ctype)
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Cache-Control", "no-store")
        h.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body)

    def _error(
        self,
        h: BaseHTTPRequestHandler,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        status = status or http_status_of(code)
        headers = dict(headers or {})
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="xaiserve"'
        body = json.dumps({"code": code, "message": message, "status": status}).encode()
        try:
            self._send(h, status, body, headers=headers)
        except OSError:
            pass  # the client is gone

    def _read_body(self, h: BaseHTTPRequestHandler) -> bytes:
        return read_body(
            h,
            self.max_body,
            f"(max_message_mb = {self.servicer.config.max_message_mb}, as JSON); send a smaller image or fewer particles",
            missing="the request has no Content-Length; send the JSON body with its length",
        )

    def _timeout(self, query: dict[str, str]) -> float:
        raw = query.get("timeout")
        if raw is None or raw == "":
            return DEFAULT_TIMEOUT_S
        try:
            t = float(raw)
        except ValueError:
            raise InvalidArgument(f"timeout {quote(raw)} is not a number of seconds") from None
        if not 0 < t <= MAX_TIMEOUT_S:
            raise InvalidArgument(f"timeout {t:g} s is out of range; use 0 < timeout <= {MAX_TIMEOUT_S:g} seconds")
        return t

    @staticmethod
    def _flag(query: dict[str, str], name: str) -> bool:
        v = query.get(name, "").strip().lower()
        if v in ("", "0", "false", "no", "off"):
            return False
        if v in ("1", "true", "yes", "on"):
            return True
        raise InvalidArgument(f"query parameter {name} = {quote(v)}: use 1 or 0 (true / false)")

    def _on_loop(self, coro: Awaitable[Any]) -> concurrent.futures.Future:
        return run_on_loop(self.loop, coro)

    # -- unary calls ---------------------------------------------------------------------------
    def _unary(
        self,
        h: BaseHTTPRequestHandler,
        route: Route,
        query: dict[str, str],
        authorization: str | None,
        work: Callable[[HttpCall, bytes], Awaitable[bytes]],
        *,
        body: bool,
    ) -> None:
        """Read the body, run `work` on the event loop with the call's context, answer its JSON."""
        if not self._calls.acquire(blocking=False):
            return self._refused(
                h,
                route.rpc,
                ResourceExhausted(f"the web API has {self.max_calls} calls in progress; retry with backoff"),
            )
        try:
            try:
                timeout = self._timeout(query)
                raw = self._read_body(h) if body else b""
            except XaiError as e:
                return self._refused(h, route.rpc, e)
            ctx = HttpCall(authorization, timeout)
            try:
                fut = self._on_loop(work(ctx, raw))
                # the servicer keeps the deadline itself; this wait only guards against a stuck loop
                answer = fut.result(timeout=timeout + 10.0)
            except concurrent.futures.TimeoutError:
                fut.cancel()
                return self._error(h, "DEADLINE_EXCEEDED", "the call's deadline passed before the work finished")
            except Aborted as e:
                return self._error(h, e.code, e.message)
            except Exception as e:  # noqa: BLE001 - never a traceback to the client
                return self._internal(h, route.rpc, e)
            try:
                self._send(h, 200, answer)
            except OSError:
                pass  # the client went away before the answer
        finally:
            self._calls.release()

    def _refused(self, h: BaseHTTPRequestHandler, rpc: str, e: XaiError) -> None:
        """A call refused before the servicer ran, counted in the request metrics as the gRPC port counts it."""
        obs = Observed(rpc)
        try:
            code, message = failure(obs, e)
        finally:
            obs.done()
        self._error(h, code, message)

    async def _before_servicer(self, rpc: str, ctx: HttpCall, fn: Callable[[], Awaitable[Any]]) -> Any:
        """Run `fn` (admission, parsing, then the servicer); an XaiError raised before the servicer
        ran (refused, malformed) ends the call as service.rpc ends such a gRPC call."""
        try:
            return await fn()
        except XaiError as e:
            obs = Observed(rpc)
            try:
                code, message = failure(obs, e)
            finally:
                obs.done()
            raise Aborted(code, message) from None

    def _admission(self, ctx: HttpCall) -> Any:
        """The fast path's admission slot, as the gRPC port takes it for Explain and Denoise (service/server.py)."""
        adm = self.fast.admission
        return adm.slot(self.principals.of(ctx) if self.principals is not None and adm.per_principal else "")

    async def _parse(self, raw: bytes, cls: type[Message]) -> Message:
        return await self.fast.cpu.run(parse_json, raw, cls)

    async def _encode(self, answer: Message | bytes, cls: type[Message]) -> bytes:
        def encode() -> bytes:
            msg = cls.FromString(answer) if isinstance(answer, (bytes, bytearray)) else answer
            return to_json(msg)

        return await self.fast.cpu.run(encode)

    # -- routes --------------------------------------------------------------------------------
    def _models(self, h, route, query, authorization) -> None:
        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            req = pb.ListModelsRequest(kind=query.get("kind", ""))
            return await self._encode(await self.servicer.ListModels(req, ctx), pb.ListModelsResponse)

        self._unary(h, route, query, authorization, work, body=False)

    def _methods(self, h, route, query, authorization) -> None:
        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            async def go(obs: Observed) -> bytes:
                return self._methods_doc

            return await observed_unary("ListMethods", ctx, go)  # type: ignore[arg-type]

        self._unary(h, route, query, authorization, work, body=False)

    def _preview(self, h, route, query, authorization) -> None:
        from xaiserve.service.images import decode_image, encode_png

        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            async def go(obs: Observed) -> bytes:
                with self._admission(ctx):
                    req = await self._parse(raw, pb.ExplainRequest)
                    entry = self.registry.resolve(req.model)
                    obs.model = entry.id
                    if not req.HasField("image"):
                        raise InvalidArgument("image is missing: set image.encoded (base64 of the file's bytes)")

                    def render() -> bytes:
                        arr = decode_image(req.image, entry.input)  # DICOM windowed as the model takes it
                        h_, w_, c = arr.shape
                        return json.dumps(
                            {
                                "model": entry.id,
                                "height": h_,
                                "width": w_,
                                "channels": c,
                                "png": base64.b64encode(encode_png(arr)).decode(),
                            }
                        ).encode()

                    return await self.fast.cpu.run(render)

            return await observed_unary("Preview", ctx, go)  # type: ignore[arg-type]

        self._unary(h, route, query, authorization, work, body=True)

    def _explain(self, h, route, query, authorization) -> None:
        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            async def call() -> Any:
                with self._admission(ctx):
                    req = await self._parse(raw, pb.ExplainRequest)
                    return await self.servicer.Explain(req, ctx)

            return await self._encode(await self._before_servicer("Explain", ctx, call), pb.ExplainResponse)

        self._unary(h, route, query, authorization, work, body=True)

    def _denoise(self, h, route, query, authorization) -> None:
        try:
            with_particles = self._flag(query, "particles")
        except XaiError as e:
            return self._refused(h, route.rpc, e)

        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            async def call() -> tuple[Any, Message]:
                with self._admission(ctx):
                    req = await self._parse(raw, pb.DenoiseRequest)
                    return await self.servicer.Denoise(req, ctx), req

            answer, req = await self._before_servicer("Denoise", ctx, call)
            if not with_particles:
                return await self._encode(answer, pb.DenoiseResponse)

            def encode() -> bytes:
                from xaiserve.service.denoise import particles_from_request
                from xaiserve.service.tensors import to_tensor

                resp = pb.DenoiseResponse.FromString(answer) if isinstance(answer, (bytes, bytearray)) else answer
                entry = self.registry.resolve(resp.model)
                seen = particles_from_request(req, entry, self.servicer.config.max_denoise_batch)[:, 0]
                doc = to_dict(resp)
                doc["particles"] = to_dict(to_tensor(seen))
                return json.dumps(doc, separators=(",", ":")).encode()

            return await self.fast.cpu.run(encode)

        self._unary(h, route, query, authorization, work, body=True)

    def _submit_job(self, h, route, query, authorization) -> None:
        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            async def call() -> Any:
                return await self.servicer.SubmitJob(await self._parse(raw, pb.JobRequest), ctx)

            return await self._encode(await self._before_servicer("SubmitJob", ctx, call), pb.Job)

        self._unary(h, route, query, authorization, work, body=True)

    def _get_job(self, h, route, query, authorization, id: str) -> None:  # noqa: A002 - the route's name
        try:
            include = self._flag(query, "include_result")
        except XaiError as e:
            return self._refused(h, route.rpc, e)

        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            job = await self.servicer.GetJob(pb.JobRef(id=id, include_result=include), ctx)
            return await self._encode(job, pb.Job)

        self._unary(h, route, query, authorization, work, body=False)

    def _cancel_job(self, h, route, query, authorization, id: str) -> None:  # noqa: A002
        try:
            include = self._flag(query, "include_result")
        except XaiError as e:
            return self._refused(h, route.rpc, e)

        async def work(ctx: HttpCall, raw: bytes) -> bytes:
            job = await self.servicer.CancelJob(pb.JobRef(id=id, include_result=include), ctx)
            return await self._encode(job, pb.Job)

        self._unary(h, route, query, authorization, work, body=False)

    # -- server-sent events --------------------------------------------------------------------
    def _watch_job(self, h, route, query, authorization, id: str) -> None:  # noqa: A002
        if not self._watchers.acquire(blocking=False):
            return self._refused(
                h,
                route.rpc,
                ResourceExhausted(
                    f"{self.max_watchers} job event streams are open on the web API; close one and retry"
                ),
            )
        try:
            self._stream(h, HttpCall(authorization, None), pb.JobRef(id=id))
        finally:
            self._watchers.release()

    def _stream(self, h: BaseHTTPRequestHandler, ctx: HttpCall, ref: pb.JobRef) -> None:
        end = object()
        events: queue.Queue = queue.Queue()

        async def pump() -> None:
            try:
                async for ev in self.servicer.WatchJob(ref, ctx):
                    if ev.type == pb.EVENT_PROGRESS and events.qsize() > SLOW_READER_BACKLOG:
                        continue  # a slow reader: the next event carries the newer state
                    events.put(ev)
            except Aborted as e:
                events.put(e)
            finally:
                events.put(end)

        try:
            fut = self._on_loop(pump())
        except Aborted as e:
            return self._error(h, e.code, e.message)
        try:
            try:
                first = events.get(timeout=FIRST_EVENT_TIMEOUT_S)
            except queue.Empty:
                return self._error(
                    h, "UNAVAILABLE", f"the job store did not answer within {FIRST_EVENT_TIMEOUT_S:g} s; retry"
                )
            if isinstance(first, Aborted):
                return self._error(h, first.code, first.message)
            if first is end:
                return self._error(h, "NOT_FOUND", f"job {quote(ref.id)} has no events")
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream; charset=utf-8")
            h.send_header("Cache-Control", "no-store")
            h.send_header("X-Accel-Buffering", "no")  # nginx: pass events on as they come
            h.send_header("X-Content-Type-Options", "nosniff")
            h.end_headers()
            item = first
            while True:
                if item is end:
                    return
                if isinstance(item, Aborted):
                    doc = {"code": item.code, "message": item.message, "status": http_status_of(item.code)}
                    h.wfile.write(b"event: error\ndata: " + json.dumps(doc).encode() + b"\n\n")
                    return
                ev_type = pb.JobEventType.Name(item.type)
                h.wfile.write(f"id: {item.sequence}\nevent: {ev_type}\ndata: ".encode() + to_json(item) + b"\n\n")
                h.wfile.flush()
                while True:
                    try:
                        item = events.get(timeout=KEEPALIVE_S)
                        break
                    except queue.Empty:
                        h.wfile.write(b": keepalive\n\n")  # also tells when the client has gone
                        h.wfile.flush()
        except OSError:
            return  # the client closed the stream: the watch ends (CANCELLED in the metrics)
        finally:
            if not fut.done():
                fut.cancel()
