from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests share 2 cores with the server under test: keep torch and ORT from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STORE = ROOT / "model_store"


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    from tests.tiny_models import build_store

    return build_store(tmp_path_factory.mktemp("store"))


@pytest.fixture(scope="session")
def server(tiny_store):
    """The real server on the tiny store, shared by the fast-path tests of a session."""
    from tests.serverutil import running_server

    with running_server(tiny_store, max_delay_ms=2.0, max_message_mb=4, job_workers=1) as srv:
        yield srv


@pytest.fixture(scope="session")
def stub(server):
    return server.stub()
