"""Fixtures shared by the test modules: the stores and the real servers on them, a redis-server,
and the marker directory of the job tests' methods.

Fast target: `python -m pytest -m "not slow"` (well under a minute); `.ci/run` runs everything.
"""

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


@pytest.fixture(scope="session")
def zoo():
    """The real server on the committed default models (model_store/), loaded once per session."""
    from tests.serverutil import running_server

    with running_server(DEFAULT_STORE, job_workers=1) as srv:
        yield srv


@pytest.fixture(scope="module")
def redis_srv(tmp_path_factory):
    """A real redis-server (Debian package) on a free port, one per test module; tests keep apart
    by key prefix."""
    from tests.jobs_support import redis_server

    with redis_server(tmp_path_factory.mktemp("redis")) as srv:
        yield srv


@pytest.fixture
def marks(tmp_path, monkeypatch):
    """The directory where the job tests' methods (tests/jobs_support.py) leave their run markers."""
    d = tmp_path / "markers"
    d.mkdir()
    monkeypatch.setenv("XAI_TEST_MARKERS", str(d))
    return d
