"""What every RPC handler shares: metrics per call and errors turned into gRPC statuses.

`observed_unary` and `observed_stream` wrap a handler body: they count the call in the request
metrics (latency, status code, in-flight) and turn an XaiError into its status with its message,
a timeout into DEADLINE_EXCEEDED, and anything else into INTERNAL with a reference to the server
log (never a traceback to the client).
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from xaiserve.service import metrics
from xaiserve.service.errors import XaiError, status_of

log = logging.getLogger("xaiserve.rpc")
T = TypeVar("T")


class Observed:
    """Per-call bookkeeping; handlers set `model` once they resolved it (low-cardinality label)."""

    def __init__(self, rpc: str):
        self.rpc, self.model, self.code = rpc, "unknown", "OK"
        self.t0 = time.perf_counter()
        metrics.INFLIGHT.labels(rpc).inc()

    def done(self) -> None:
        metrics.INFLIGHT.labels(self.rpc).dec()
        metrics.REQUESTS.labels(self.rpc, self.model, self.code).inc()
        metrics.REQUEST_LATENCY.labels(self.rpc, self.model).observe(time.perf_counter() - self.t0)


async def abort(context: grpc.aio.ServicerContext, obs: Observed, e: BaseException) -> None:
    """End the call with the status that `e` stands for (always raises)."""
    if isinstance(e, XaiError):
        obs.code = e.code
        await context.abort(status_of(e), str(e))
    if isinstance(e, asyncio.TimeoutError):
        obs.code = "DEADLINE_EXCEEDED"
        await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed before the work finished")
    ref = uuid.uuid4().hex[:12]
    log.error("internal error", exc_info=e, extra={"rpc": obs.rpc, "model": obs.model, "error_ref": ref})
    obs.code = "INTERNAL"
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the server log)")


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


async def observed_stream(rpc: str, context: grpc.aio.ServicerContext,
                          body: Callable[[Observed], AsyncIterator[T]]) -> AsyncIterator[T]:
    obs = Observed(rpc)
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

