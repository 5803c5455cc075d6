"""gRPC (grpc.aio) handlers for the job RPCs, as a mixin for the Explainer servicer.

The servicer class must set `self.jobs: JobService`. XaiError -> its status code and message; any other
exception -> INTERNAL with a reference to the server log (never a traceback to the client).
"""
from __future__ import annotations

import logging
import uuid
from typing import AsyncIterator

import grpc

from explain.v1 import explainer_pb2 as pb
from service.errors import XaiError

log = logging.getLogger("xaiserve.jobs.grpc")


async def _abort(context, rpc: str, e: BaseException) -> None:
    if isinstance(e, XaiError):
        await context.abort(e.code, str(e))
    ref = uuid.uuid4().hex[:12]
    log.error("internal error in a job RPC", exc_info=e, extra={"rpc": rpc, "error_ref": ref})
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (reference {ref} in the server log)")


class JobServicerMixin:
    jobs: "object"  # service.jobs.service.JobService

    async def SubmitJob(self, request: pb.JobRequest, context) -> pb.Job:
        try:
            return await self.jobs.submit(request)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status
            await _abort(context, "SubmitJob", e)

    async def GetJob(self, request: pb.JobRef, context) -> pb.Job:
        try:
            return await self.jobs.get(request)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            await _abort(context, "GetJob", e)

    async def CancelJob(self, request: pb.JobRef, context) -> pb.Job:
        try:
            return await self.jobs.cancel(request)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            await _abort(context, "CancelJob", e)

    async def WatchJob(self, request: pb.JobRef, context) -> AsyncIterator[pb.JobEvent]:
        try:
            async for ev in self.jobs.watch(request):
                yield ev
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # noqa: BLE001
            await _abort(context, "WatchJob", e)
