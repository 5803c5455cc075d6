"""The gRPC side of xaiserve.errors: the one place an error's code string becomes a grpc.StatusCode.

Everything else imports the errors from `xaiserve.errors` (no grpc there); the names are re-exported
here so that adapters can import errors and their status from one module.
"""
from __future__ import annotations

import grpc

from xaiserve.errors import (  # noqa: F401  (re-exported)
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    XaiError,
    quote,
)


def status_of(err: XaiError) -> grpc.StatusCode:
    """The gRPC status for an XaiError (INTERNAL for a code grpc does not know)."""
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)
