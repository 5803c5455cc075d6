"""gRPC (grpc.aio) handlers for the job RPCs, as a mixin for the Explainer servicer.

The servicer class must set `self.jobs: JobService`. Metrics and error statuses come from
service.rpc, as for every other RPC.
"""
from __future__ import annotations

from typing import AsyncIterator

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.rpc import Observed, observed_stream, observed_unary


class JobServicerMixin:
    jobs: "object"  # service.jobs.service.JobService

    async def SubmitJob(self, request: pb.JobRequest, context) -> pb.Job:
        async def body(obs: Observed) -> pb.Job:
            return await self.jobs.submit(request)

        return await observed_unary("SubmitJob", context, body)

    async def GetJob(self, request: pb.JobRef, context) -> pb.Job:
        async def body(obs: Observed) -> pb.Job:
            return await self.jobs.get(request)

        return await observed_unary("GetJob", context, body)

    async def CancelJob(self, request: pb.JobRef, context) -> pb.Job:
        async def body(obs: Observed) -> pb.Job:
            return await self.jobs.cancel(request)

        return await observed_unary("CancelJob", context, body)

    async def WatchJob(self, request: pb.JobRef, context) -> AsyncIterator[pb.JobEvent]:
        async for ev in observed_stream("WatchJob", context, lambda obs: self.jobs.watch(request)):
            yield ev
