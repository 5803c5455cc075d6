"""The contract between the job queue and the job methods (RELAX, ablation paths).

A method is an object with a `name`, a `validate` that runs at SubmitJob time (so that nothing
known at submit time fails later) and a `run` that does the work, reporting progress and checking
for cancellation through a JobContext. Methods never see the queue backend (SQLite or Redis).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.errors import XaiError
from xaiserve.service.registry import Registry


class JobCancelled(XaiError):
    """Raised by JobContext.check_cancelled(); the queue marks the job CANCELLED."""


class JobContext(Protocol):
    def report(
        self,
        fraction: float,
        *,
        heatmap: np.ndarray | None = None,
        score: float | None = None,
        metrics: dict[str, float] | None = None,
        message: str = "",
    ) -> None:
        """Progress in [0, 1]; the queue rate-limits partial heatmaps, so call freely."""

    def check_cancelled(self) -> None:
        """Raise JobCancelled when the job was cancelled or expired; call once per batch/iteration."""

    @property
    def cancelled(self) -> bool: ...


class JobMethod(Protocol):
    name: str

    def validate(self, request: pb.JobRequest, registry: Registry) -> None:
        """Raise InvalidArgument / NotFound for anything wrong with the request."""

    def run(self, request: pb.JobRequest, registry: Registry, ctx: JobContext) -> pb.JobResult:
        """Do the work; return the result. Raise XaiError subclasses with a reason to fail."""
