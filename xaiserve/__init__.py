"""xaiserve: serve explanations of image models over gRPC.

The import package holds the layout users know: ``xaiserve.service`` (the gRPC server, registry,
jobs, CLI), ``xaiserve.handlers`` (one package per method family: pure math plus its training and
export), ``xaiserve.training`` (datasets, training loops, evaluation) and ``xaiserve.proto`` (the
``explain.v1`` wire API and its generated stubs). The public client is ``from xaiserve import Client``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client", "__version__"]

try:
    from importlib.metadata import version as _version

    __version__ = _version("xaiserve")
except Exception:  # not installed (a bare checkout on sys.path)
    __version__ = "0+unknown"

if TYPE_CHECKING:
    from xaiserve.service.client import ExplainerClient as Client


def __getattr__(name: str) -> Any:
    # Lazy, so that `import xaiserve.handlers.relax` does not pull grpc in through the client.
    if name == "Client":
        from xaiserve.service.client import ExplainerClient

        return ExplainerClient
    raise AttributeError(f"module 'xaiserve' has no attribute {name!r}")
