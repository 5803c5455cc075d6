"""The gRPC side of xaiserve.errors: the one place an error's code string becomes a grpc.StatusCode
(and, for the web API, an HTTP status).

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


# The HTTP status of each code for the web API (service/web/api.py), as google.rpc.Code documents
# it (and grpc-gateway answers); CANCELLED is nginx's 499 "client closed request".
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}


def http_status_of(code: str) -> int:
    """The HTTP status for a status code name (500 for a name not in HTTP_STATUS)."""
    return HTTP_STATUS.get(code, 500)
