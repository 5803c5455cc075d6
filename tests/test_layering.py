"""The math imports no server: importing a method family loads neither grpc nor protobuf."""

from __future__ import annotations

import subprocess
import sys

import pytest

# each case imports a module in a fresh interpreter (torch included): seconds each
pytestmark = pytest.mark.slow

FAMILIES = [
    "xaiserve.handlers.relax.relax",
    "xaiserve.handlers.ablation.optimiser",
    "xaiserve.handlers.saliency",
    "xaiserve.handlers.nem.models",
    "xaiserve.handlers.denoise.networks",
    "xaiserve.handlers.loading",
    "xaiserve.methods",
    "xaiserve.errors",
]


@pytest.mark.parametrize("module", FAMILIES)
def test_math_modules_load_no_grpc_or_protobuf(module):
    code = (
        f"import sys, {module}; bad = [m for m in ('grpc', 'google.protobuf', 'xaiserve.service', 'xaiserve.proto') "
        "if m in sys.modules]; print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"


def test_errors_are_builtin_exceptions_with_plain_codes():
    from xaiserve.errors import FailedPrecondition, InvalidArgument, NotFound, quote

    assert issubclass(InvalidArgument, ValueError) and InvalidArgument.code == "INVALID_ARGUMENT"
    assert issubclass(NotFound, LookupError) and issubclass(FailedPrecondition, RuntimeError)
    q = quote("x" * 10_000)
    assert len(q) < 260 and "10000 characters" in q


def test_the_package_has_one_top_level_name():
    import xaiserve

    assert xaiserve.Client.__name__ == "ExplainerClient"
