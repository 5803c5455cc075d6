"""What every RPC handler shares: metrics per call and errors turned into gRPC statuses.

`observed_unary` and `observed_stream` wrap a handler body: they count the call in the request
metrics (latency, status code, in-flight) and turn an XaiError into its status with its message,
a timeout into DEADLINE_EXCEEDED, and anything else into INTERNAL with a reference to the server
log (never a traceback to the client).

`add_service` registers a servicer with request deserializers that never raise: bytes that are not
the request message become INVALID_ARGUMENT "... is not a valid explain.v1.<Message>" (grpc would
answer UNKNOWN), for a stream naming the position of the bad message. Large requests are parsed in
the CPU pool rather than on the event loop, after the admission hook has let them in.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, ContextManager, Protocol, TypeVar

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from xaiserve.service import metrics
from xaiserve.service.errors import InvalidArgument, XaiError, quote, status_of

log = logging.getLogger("xaiserve.rpc")
T = TypeVar("T")


_children: dict[tuple, Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """metric.labels(*labels), remembered: labels() takes a lock and builds its key on every call,
    which an overloaded event loop pays three times per call (the label sets are few)."""
    key = (id(metric), *labels)
    c = _children.get(key)
    if c is None:
        c = _children[key] = metric.labels(*labels)
    return c


class Observed:
    """Per-call bookkeeping; handlers set `model` once they resolved it (low-cardinality label)."""

    def __init__(self, rpc: str, duration: Any = None):
        self.rpc, self.model, self.code = rpc, "unknown", "OK"
        # streaming calls go to their own long-bucket histogram (metrics.STREAM_DURATION)
        self.duration = metrics.REQUEST_LATENCY if duration is None else duration
        self.t0 = time.perf_counter()
        _child(metrics.INFLIGHT, rpc).inc()

    def done(self) -> None:
        _child(metrics.INFLIGHT, self.rpc).dec()
        _child(metrics.REQUESTS, self.rpc, self.model, self.code).inc()
        _child(self.duration, self.rpc, self.model).observe(time.perf_counter() - self.t0)


def failure(obs: Observed, e: BaseException) -> tuple[str, str]:
    """(status code name, message) that `e` stands for, recorded in `obs.code`; anything but an
    XaiError or a timeout is INTERNAL, logged with a reference the message gives. Shared by the
    gRPC calls (`abort`) and the web API (service/web/api.py)."""
    if isinstance(e, XaiError):
        obs.code = e.code
        return e.code, str(e)
    if isinstance(e, asyncio.TimeoutError):
        obs.code = "DEADLINE_EXCEEDED"
        return obs.code, "the call's deadline passed before the work finished"
    ref = uuid.uuid4().hex[:12]
    log.error("internal error", exc_info=e, extra={"rpc": obs.rpc, "model": obs.model, "error_ref": ref})
    obs.code = "INTERNAL"
    return obs.code, f"internal error (reference {ref} in the server log)"


async def abort(context: grpc.aio.ServicerContext, obs: Observed, e: BaseException) -> None:
    """End the call with the status that `e` stands for (always raises)."""
    code, message = failure(obs, e)
    await context.abort(status_of(e) if isinstance(e, XaiError) else getattr(grpc.StatusCode, code), message)


async def observed_unary(rpc: str, context: grpc.aio.ServicerContext, body: Callable[[Observed], Awaitable[T]]) -> T:
    obs = Observed(rpc)
    try:
        return await body(obs)
    except asyncio.CancelledError:
        obs.code = "CANCELLED"
        raise
    except grpc.aio.AbortError:
        raise
    except BaseException as e:  # noqa: BLE001 - every failure becomes a status, never a crash
        await abort(context, obs, e)
        raise  # unreachable: abort raises
    finally:
        obs.done()


async def observed_stream(
    rpc: str, context: grpc.aio.ServicerContext, body: Callable[[Observed], AsyncIterator[T]]
) -> AsyncIterator[T]:
    obs = Observed(rpc, metrics.STREAM_DURATION)
    try:
        async for item in body(obs):
            yield item
    except asyncio.CancelledError:
        obs.code = "CANCELLED"
        raise
    except grpc.aio.AbortError:
        raise
    except BaseException as e:  # noqa: BLE001
        await abort(context, obs, e)
    finally:
        obs.done()


# ------------------------------------------------------------------------------------- requests
# Requests above this size are parsed in the CPU pool (a 64 MB message costs the loop ~20 ms).
LAZY_PARSE_BYTES = 1 << 20


class BadMessage:
    """What the deserializer hands on for bytes that are not a valid request message."""

    __slots__ = ("type_name", "size", "reason")

    def __init__(self, type_name: str, size: int, reason: str):
        self.type_name, self.size, self.reason = type_name, size, reason

    def error(self, what: str = "the request") -> InvalidArgument:
        return InvalidArgument(
            f"{what} is not a valid {self.type_name} ({self.size} bytes; protobuf says: "
            f"{quote(self.reason)}); send the serialised message the .proto defines"
        )


class LazyMessage:
    """A large request, still bytes: parsed in the CPU pool once the call is admitted."""

    __slots__ = ("cls", "data")

    def __init__(self, cls: type[Message], data: bytes):
        self.cls, self.data = cls, data


def _parse(cls: type[Message], data: bytes) -> Message | BadMessage:
    try:
        return cls.FromString(data)
    except (DecodeError, RecursionError, ValueError) as e:  # ValueError: invalid UTF-8 in a string field
        return BadMessage(cls.DESCRIPTOR.full_name, len(data), str(e) or type(e).__name__)


def request_deserializer(cls: type[Message], lazy_bytes: int = LAZY_PARSE_BYTES) -> Callable[[bytes], Any]:
    """A deserializer that never raises: the message, a LazyMessage (large) or a BadMessage."""

    def deserialize(data: bytes) -> Any:
        if len(data) > lazy_bytes:
            return LazyMessage(cls, data)
        return _parse(cls, data)

    return deserialize


def serialize_response(message: Message | bytes) -> bytes:
    """Handlers may return bytes they serialised off the event loop."""
    return message if isinstance(message, (bytes, bytearray)) else message.SerializeToString()


class Pool(Protocol):  # the part of fastpath.CpuPool this module needs
    async def run(self, fn: Callable[..., T], *args: Any) -> T: ...


async def materialize(request: Any, pool: Pool | None, what: str = "the request") -> Message:
    """The parsed request; raises InvalidArgument for a BadMessage."""
    if isinstance(request, LazyMessage):
        request = (
            await pool.run(_parse, request.cls, request.data) if pool is not None else _parse(request.cls, request.data)
        )
    if isinstance(request, BadMessage):
        raise request.error(what)
    return request


async def _frames(requests: AsyncIterator[Any], pool: Pool | None) -> AsyncIterator[Message]:
    i = 0
    async for item in requests:
        yield await materialize(item, pool, f"stream message {i} (counting from 0)")
        i += 1


Admit = Callable[[grpc.aio.ServicerContext], ContextManager[Any]]


def _no_admission(context: grpc.aio.ServicerContext) -> ContextManager[Any]:
    return contextlib.nullcontext()


def method_handlers(
    servicer: Any, service: ServiceDescriptor, *, pool: Pool | None = None, admit: Mapping[str, Admit] | None = None
) -> grpc.GenericRpcHandler:
    """A generic handler for every method of `service` on `servicer` (grpc.aio), with the
    never-raising deserializers. `admit[name](context)` is entered before a unary request is
    parsed and held for the call; its exception (ResourceExhausted) is the call's status."""
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    admit = admit or {}
    for m in service.methods:
        req_cls = message_factory.GetMessageClass(m.input_type)
        fn = getattr(servicer, m.name)
        gate = admit.get(m.name, _no_admission)
        de = request_deserializer(req_cls)
        kw = dict(request_deserializer=de, response_serializer=serialize_response)
        if m.client_streaming:

            def make_stream(fn=fn):
                async def handler(request_iterator, context):
                    async for item in fn(_frames(request_iterator, pool), context):
                        yield item

                return handler

            factory = (
                grpc.stream_stream_rpc_method_handler if m.server_streaming else grpc.stream_unary_rpc_method_handler
            )
            handlers[m.name] = factory(make_stream(), **kw)
        elif m.server_streaming:

            def make_unary_stream(fn=fn, name=m.name, gate=gate):
                async def handler(request, context):
                    obs_failed = None
                    try:
                        with gate(context):
                            request = await materialize(request, pool)
                            async for item in fn(request, context):
                                yield item
                    except XaiError as e:  # refused or malformed before the servicer ran
                        obs_failed = e
                    if obs_failed is not None:
                        await _refuse(name, context, obs_failed)

                return handler

            handlers[m.name] = grpc.unary_stream_rpc_method_handler(make_unary_stream(), **kw)
        else:

            def make_unary(fn=fn, name=m.name, gate=gate):
                async def handler(request, context):
                    try:
                        with gate(context):
                            request = await materialize(request, pool)
                            return await fn(request, context)
                    except XaiError as e:  # refused or malformed before the servicer ran
                        await _refuse(name, context, e)

                return handler

            handlers[m.name] = grpc.unary_unary_rpc_method_handler(make_unary(), **kw)
    return grpc.method_handlers_generic_handler(service.full_name, handlers)


async def _refuse(rpc: str, context: grpc.aio.ServicerContext, e: XaiError) -> None:
    """End a call refused before its servicer ran, counted in the request metrics like any other."""
    obs = Observed(rpc)
    try:
        await abort(context, obs, e)
    finally:
        obs.done()


def add_service(server: grpc.aio.Server, servicer: Any, service: ServiceDescriptor, **kw: Any) -> None:
    """Register `servicer` for `service` (see method_handlers)."""
    server.add_generic_rpc_handlers((method_handlers(servicer, service, **kw),))
