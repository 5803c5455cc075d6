"""gRPC (grpc.aio) handlers for the job RPCs, as a mixin for the Explainer servicer.

The servicer class must set `self.jobs: JobService` and may set `self.principals`
(service.security.Principals; without it every caller is "anonymous"). Each call passes the caller's
principal, so a job is only seen by the principal that submitted it (and the admin allow-list).
Metrics and error statuses come from service.rpc, as for every other RPC.
"""

from __future__ import annotations

from typing import AsyncIterator

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.jobs.backend import ANONYMOUS
from xaiserve.service.rpc import Observed, observed_stream, observed_unary


class JobServicerMixin:
    jobs: "object"  # service.jobs.service.JobService
    principals: "object | None" = None  # service.security.Principals

    def _principal(self, context) -> str:
        return self.principals.of(context) if self.principals is not None else ANONYMOUS

    async def SubmitJob(self, request: pb.JobRequest, context) -> pb.Job:
        async def body(obs: Observed) -> pb.Job:
            return await self.jobs.submit(request, principal=self._principal(context))

        return await observed_unary("SubmitJob", context, body)

    async def GetJob(self, request: pb.JobRef, context) -> pb.Job:
        async def body(obs: Observed) -> pb.Job:
            return await self.jobs.get(request, principal=self._principal(context))

        return await observed_unary("GetJob", context, body)

    async def CancelJob(self, request: pb.JobRef, context) -> pb.Job:
        async def body(obs: Observed) -> pb.Job:
            return await self.jobs.cancel(request, principal=self._principal(context))

        return await observed_unary("CancelJob", context, body)

    async def WatchJob(self, request: pb.JobRef, context) -> AsyncIterator[pb.JobEvent]:
        principal = self._principal(context)
        async for ev in observed_stream("WatchJob", context, lambda obs: self.jobs.watch(request, principal=principal)):
            yield ev
