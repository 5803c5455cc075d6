"""The built wheel, installed into a fresh virtual environment, as a user gets it with `pip install`.

One import package (`xaiserve`), no top-level service/handlers/training/explain modules, torch as a
range and the training-only dependencies in extras; `xaiserve serve` from it serves the repository's
default models over a real gRPC channel when pointed at them, warns loudly when started without a
store, and `xaiserve bench` says what to do. The environment sees the system site-packages for
the dependencies (so nothing is downloaded); the package itself comes only from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import DEFAULT_STORE, ROOT
from tests.serverutil import free_port
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.tensors import from_tensor, to_tensor

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel` of a copy of the sources (the build writes build/ and egg-info beside them)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "xaiserve", src / "xaiserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-w",
            str(out),
            str(src),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    (whl,) = out.glob("xaiserve-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env_dir = tmp_path_factory.mktemp("venv")
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir)], check=True, timeout=120
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env_dir / "bin" / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return env_dir


def _clean_env() -> dict[str, str]:
    """The user's environment: no PYTHONPATH into the checkout, no XAISERVE_* settings."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("XAISERVE_")}


def test_the_wheel_holds_one_package_and_declares_the_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        dist = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        record = z.read(f"{dist}/RECORD").decode()
        metadata = z.read(f"{dist}/METADATA").decode()
        top_level = (
            z.read(f"{dist}/top_level.txt").decode().split() if f"{dist}/top_level.txt" in names else ["xaiserve"]
        )
    tops = {line.split(",")[0].split("/")[0] for line in record.splitlines() if line}
    assert tops == {"xaiserve", dist}, sorted(tops)
    assert top_level == ["xaiserve"]
    assert (
        "xaiserve/proto/explain/v1/explainer.proto" in names and "xaiserve/proto/explain/v1/explainer_pb2.pyi" in names
    )
    for web in (
        "index.html",
        "app.js",
        "style.css",
        "vendor/marked.umd.js",
        "vendor/purify.min.js",
        "samples/particles.mrcs",
    ):
        assert f"xaiserve/service/web/static/{web}" in names, f"the web viewer's {web} is not in the wheel"
    requires = [
        line.removeprefix("Requires-Dist: ") for line in metadata.splitlines() if line.startswith("Requires-Dist:")
    ]
    core = {r.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip() for r in requires if ";" not in r}
    assert "torch<3,>=2.4" in requires and not any(r.startswith("torch==") for r in requires)
    for train_only in ("numba", "matplotlib", "prodigyopt", "onnxscript", "pytest", "ruff", "mypy"):
        assert train_only not in core, f"{train_only} must be an extra, not a core dependency"
    assert 'numba>=0.60; extra == "spiral"' in requires and 'prodigyopt>=1.0; extra == "train"' in requires
    assert not any(n.startswith(("model_store/", "bench/", "tests/")) for n in names)


def test_the_installed_package_imports_from_the_environment_not_the_checkout(venv, tmp_path):
    code = (
        "import importlib.util, json, xaiserve; from xaiserve import Client; "
        "print(json.dumps([xaiserve.__file__, [m for m in ('service', 'handlers', 'training', 'explain', 'proto') "
        "if importlib.util.find_spec(m)]]))"
    )
    r = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    where, tops = json.loads(r.stdout)
    assert Path(where).is_relative_to(venv) and tops == []


# The extras' modules, made unimportable: the serving core must run without [train] and [spiral].
# (matplotlib stays: captum, a core dependency, requires and imports it.)
WITHOUT_EXTRAS = """import sys
for name in ("numba", "llvmlite", "prodigyopt", "onnxscript"):
    sys.modules[name] = None  # `import name` raises ModuleNotFoundError
from xaiserve.service.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _serve(venv: Path, cwd: Path, *args: str, without_extras: bool = False) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = cwd / f"serve-{port}.log"
    if without_extras:
        (cwd / "without_extras.py").write_text(WITHOUT_EXTRAS)
        cmd = [str(venv / "bin" / "python"), str(cwd / "without_extras.py")]
    else:
        cmd = [str(venv / "bin" / "xaiserve")]
    proc = subprocess.Popen(
        [
            *cmd,
            "serve",
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--state-dir",
            str(cwd / "state"),
            "--log-json",
            "true",
            *args,
        ],
        cwd=cwd,
        env=_clean_env(),
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            with grpc.insecure_channel(address) as ch:
                if (
                    health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return proc, address, log
        except grpc.RpcError:
            pass
        assert time.time() < deadline, "the server did not become healthy in 120 s"
        time.sleep(0.2)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def test_xaiserve_serve_from_the_wheel_serves_the_default_models_without_the_extras(venv, tmp_path):
    proc, address, log = _serve(venv, tmp_path, "--model-store", str(DEFAULT_STORE), without_extras=True)
    try:
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.ExplainerStub(ch)
            models = stub.ListModels(pb.ListModelsRequest(), timeout=30).models
            img = pb.Image(tensor=to_tensor(np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)))
            for model, method in (("scenes-nemu", ""), ("scenes-classifier", "saliency")):
                r = stub.Explain(
                    pb.ExplainRequest(model=model, image=img, options=pb.ExplainOptions(method=method)), timeout=60
                )
                assert from_tensor(r.mask).shape == (48, 40)
            noisy = np.random.default_rng(1).normal(size=(2, 64, 64)).astype(np.float32)
            den = stub.Denoise(pb.DenoiseRequest(model="cryoem-spiral", tensor=to_tensor(noisy)), timeout=60)
            assert from_tensor(den.denoised).shape == (2, 64, 64)
    finally:
        assert _stop(proc) == 0
    manifest = json.loads((DEFAULT_STORE / "manifest.json").read_text())["models"]
    assert len(manifest) >= 8 and sorted(m.name for m in models) == sorted(e["name"] for e in manifest)
    records = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    (store,) = [r for r in records if r.get("message") == "model store"]
    assert store["model_store"] == str(DEFAULT_STORE.resolve()) and store["models"] == len(manifest)
    assert not [r for r in records if r.get("level") == "WARNING" and "model store" in r.get("message", "")]
    # without numba the spiral denoiser is served by its ONNX graph, and the log says why
    (fallback,) = [r for r in records if "spiral runtime unavailable" in r.get("message", "")]
    assert fallback["level"] == "WARNING" and fallback["reason"] == "no module named 'numba'"


def test_xaiserve_serve_from_the_wheel_without_a_store_warns_loudly(venv, tmp_path):
    proc, address, log = _serve(venv, tmp_path, "--load-models", "lazy")
    try:
        with grpc.insecure_channel(address) as ch:
            assert list(pb_grpc.ExplainerStub(ch).ListModels(pb.ListModelsRequest(), timeout=30).models) == []
    finally:
        assert _stop(proc) == 0
    text = log.read_text()
    assert f"xaiserve serve: WARNING: model store {tmp_path / 'model_store'} does not exist: serving no models" in text
    assert "--model-store DIR" in text and "XAISERVE_MODEL_STORE" in text


def test_xaiserve_bench_from_the_wheel_says_it_needs_a_checkout(venv, tmp_path):
    r = subprocess.run(
        [str(venv / "bin" / "xaiserve"), "bench", "grpc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_clean_env(),
        timeout=120,
    )
    assert r.returncode == 2 and "source checkout" in r.stderr and "pip install -e ." in r.stderr
