"""Errors that carry a gRPC status code and a message a person can act on.

Handlers (pure code) raise these; the gRPC adapters turn them into statuses. Nothing here imports
the server, so handlers and training code can use them freely.
"""
from __future__ import annotations

import grpc


class XaiError(Exception):
    """Base class: `code` is the gRPC status the caller receives, `str(self)` the message."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(XaiError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(XaiError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(XaiError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(XaiError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(XaiError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(XaiError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(XaiError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(XaiError):
    code = grpc.StatusCode.UNIMPLEMENTED
