"""Where the server finds its models: the model_store setting (flag, XAISERVE_MODEL_STORE, config
file), else ./model_store of the working directory; never a path derived from the installed code.
At start the server logs the store it reads and how many models it serves, and warns loudly (a log
warning and a plain stderr line) when the store is missing or empty. Also: the spiral runtime's
numba is optional, and `xaiserve bench` finds the checkout without looking at the package's files.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest

from tests.conftest import DEFAULT_STORE
from tests.serverutil import running_server, server_process
from xaiserve.proto.explain.v1 import explainer_pb2 as pb


def _store_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "xaiserve.server" and r.getMessage() == "model store"]


def test_a_relative_store_is_read_from_the_working_directory(tiny_store, tmp_path, monkeypatch, caplog):
    shutil.copytree(tiny_store, tmp_path / "model_store")
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    with running_server(None, load_models="lazy") as srv:  # the default setting: model_store
        assert srv.config.model_store == "model_store"
        names = sorted(m.name for m in srv.stub().ListModels(pb.ListModelsRequest(), timeout=10).models)
    assert names == sorted(e["name"] for e in json.loads((tiny_store / "manifest.json").read_text())["models"])
    (rec,) = _store_records(caplog)
    assert rec.model_store == str(tmp_path / "model_store") and rec.models == len(names)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "model store" in r.getMessage()]


@pytest.mark.parametrize("case", ["missing", "no manifest", "empty manifest"])
def test_a_missing_or_empty_store_is_warned_about_in_the_log_and_on_stderr(case, tmp_path, monkeypatch, caplog, capfd):
    store = tmp_path / "store"
    if case != "missing":
        store.mkdir()
    if case == "empty manifest":
        (store / "manifest.json").write_text('{"format": 1, "models": []}\n')
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO)
    with running_server("store", load_models="lazy") as srv:
        assert list(srv.stub().ListModels(pb.ListModelsRequest(), timeout=10).models) == []
    (rec,) = _store_records(caplog)
    assert rec.model_store == str(store) and rec.models == 0
    want = {"missing": "does not exist", "no manifest": "has no manifest.json", "empty manifest": "lists no models"}[
        case
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and want in r.getMessage()]
    assert len(warnings) == 1 and str(store) in warnings[0] and "--model-store" in warnings[0]
    err = capfd.readouterr().err
    assert f"xaiserve serve: WARNING: model store {store} {want}" in err and "XAISERVE_MODEL_STORE" in err


@pytest.mark.slow
def test_xaiserve_serve_reads_the_store_of_the_environment_and_says_so(tiny_store, tmp_path):
    """The real command, started from a folder without a store, pointed at one by XAISERVE_MODEL_STORE."""
    with server_process(
        None,
        cwd=tmp_path,
        env={"XAISERVE_MODEL_STORE": str(tiny_store)},
        load_models="lazy",
        state_dir=tmp_path / "state",
        log_json="true",
    ) as srv:
        n = len(srv.stub().ListModels(pb.ListModelsRequest(), timeout=10).models)
    records = [json.loads(line) for line in srv.log_path.read_text().splitlines() if line.startswith("{")]
    (rec,) = [r for r in records if r.get("message") == "model store"]
    assert n >= 4 and rec["model_store"] == str(tiny_store.resolve()) and rec["models"] == n
    assert "WARNING" not in srv.log_path.read_text()


def test_without_numba_the_spiral_denoiser_is_served_by_its_onnx_graph(monkeypatch, caplog):
    """numba is the optional [spiral] extra: without it the registry serves the single ONNX graph
    (the same map) and logs why, instead of failing to load the model."""
    from xaiserve.service.registry import OnnxModel, Registry, RegistryConfig

    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` now raises ModuleNotFoundError
    monkeypatch.delitem(sys.modules, "xaiserve.handlers.denoise.spiral_runtime", raising=False)
    caplog.set_level(logging.INFO)
    reg = Registry(RegistryConfig(store=DEFAULT_STORE, warmup=True, prefer_cuda=False, intra_op_threads=1))
    served = reg.onnx("cryoem-spiral")
    assert isinstance(served, OnnxModel)
    (warn,) = [
        r for r in caplog.records if r.levelno == logging.WARNING and "spiral runtime unavailable" in r.getMessage()
    ]
    assert (
        "xaiserve[spiral]" in warn.getMessage()
        and warn.reason == "no module named 'numba'"
        and warn.model == "cryoem-spiral:1"
    )
    assert [r.backend for r in caplog.records if r.getMessage() == "model loaded"] == ["onnxruntime"]
    x = np.random.default_rng(0).normal(size=(2, 1, 64, 64)).astype(np.float32)
    out = served.run({"particles": x})["denoised"]
    assert out.shape == x.shape and np.isfinite(out).all()


def test_bench_lists_the_checkouts_benchmarks_from_a_subfolder(monkeypatch, capsys):
    from tests.conftest import ROOT
    from xaiserve.service import cli

    monkeypatch.chdir(ROOT / "docs")
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert f"benchmarks ({ROOT / 'bench'}):" in err and "grpc" in err and "denoise" in err


@pytest.mark.slow
def test_a_worker_without_a_store_warns_loudly_too(tmp_path):
    import os
    import signal
    import subprocess

    from tests.conftest import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("XAISERVE_")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xaiserve.service.worker",
            "--queue",
            f"sqlite:///{tmp_path}/jobs.sqlite",
            "--metrics-port",
            "-1",
            "--no-log-json",
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "worker ready"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert f"xaiserve worker: WARNING: model store {tmp_path / 'model_store'} does not exist" in err
