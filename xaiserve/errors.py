"""Errors that carry a status code (a plain string) and a message a person can act on.

The math, handlers and training code raise these; they import nothing of grpc or protobuf, and each
subclasses the built-in exception a Python caller would expect (an InvalidArgument is a ValueError,
a NotFound a LookupError, ...), so that library users can catch them without knowing xaiserve.
`code` is the name of the gRPC status the one gRPC adapter (xaiserve.service.rpc) maps it to.
"""

from __future__ import annotations

MAX_QUOTE = 200  # characters of any user-supplied value quoted in an error message


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """repr() of a user-supplied value, cut to `limit` characters (with the full length stated)."""
    text = repr(value)
    if len(text) <= limit:
        return text
    n = len(value) if isinstance(value, (str, bytes)) else len(text)
    return f"{text[:limit]}... ({n} characters)"


class XaiError(Exception):
    """Base class: `code` names the status the caller receives, `str(self)` is the message."""

    code: str = "INTERNAL"


class InvalidArgument(XaiError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(XaiError, LookupError):
    code = "NOT_FOUND"


class ResourceExhausted(XaiError, MemoryError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(XaiError, RuntimeError):
    code = "FAILED_PRECONDITION"


class Unavailable(XaiError, ConnectionError):
    code = "UNAVAILABLE"


class DeadlineExceeded(XaiError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class Cancelled(XaiError):
    code = "CANCELLED"


class Unimplemented(XaiError, NotImplementedError):
    code = "UNIMPLEMENTED"


class PermissionDenied(XaiError, PermissionError):
    code = "PERMISSION_DENIED"


class Unauthenticated(XaiError, PermissionError):
    code = "UNAUTHENTICATED"
