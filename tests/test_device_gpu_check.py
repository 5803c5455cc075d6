"""bench/gpu_check.py runs in its dry mode (tiny sizes, CPU only) in seconds, with its optional
dependencies and without them (captum, onnx, onnxruntime, and every service dependency blocked:
the machine it is meant for has torch, numpy and the checkout only). The GPU figures themselves
need a GPU machine; this only proves the script that measures them runs and reports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"

# what a bare torch machine lacks: the optional extras and everything the service needs
BLOCKED = (
    "captum",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "grpc",
    "google.protobuf",
    "prometheus_client",
    "redis",
    "yaml",
    "PIL",
    "scipy",
    "skimage",
    "pydicom",
    "highdicom",
    "matplotlib",
    "mrcfile",
    "isal",
    "jsonschema",
)
BLOCKER = f"""
import importlib.abc, runpy, sys
class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in {BLOCKED!r}):
            raise ImportError(f"blocked for the test: {{name}}")
        return None
sys.meta_path.insert(0, Blocker())
sys.argv = [{str(SCRIPT)!r}] + sys.argv[1:]
runpy.run_path({str(SCRIPT)!r}, run_name="__main__")
"""


def _run(tmp_path: Path, *prefix: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [sys.executable, *prefix, "--dry-run", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )  # not the checkout: the script finds it by its own path
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_dry_run_measures_every_section_and_writes_the_table(tmp_path):
    proc, data = _run(tmp_path, str(SCRIPT))
    rows = data["rows"]
    assert data["dry_run"] is True and data["seconds"] < 120
    assert {r["section"] for r in rows} == {
        "relax",
        "relax-ort",
        "nem-u",
        "ablation",
        "gradients",
        "precision",
        "memory",
    }
    assert not [r for r in rows if r["what"] == "FAILED"]
    goals = {r["section"]: r for r in rows if r["goal"]}
    assert set(goals) >= {"relax", "ablation", "nem-u", "memory"}
    for r in rows:
        if r["ratio"] is not None:
            assert r["ratio"] > 0 and r["value"] > 0 and r["baseline"] > 0, r
    drill = goals["memory"]
    assert drill["ok"] is True and drill["value"] >= 1  # the halving code path ran and kept the map
    assert {r["what"].split(" ")[0] for r in rows if r["section"] == "gradients"} >= {
        "saliency",
        "guided_backprop",
        "gradcam",
    }
    assert "section   | device" in proc.stdout and "rows in" in proc.stdout


@pytest.mark.slow
def test_dry_run_without_the_optional_dependencies(tmp_path):
    proc, data = _run(tmp_path, "-c", BLOCKER)
    rows = data["rows"]
    assert data["env"]["captum"] is False and data["env"]["onnxruntime"] is None
    skipped = {r["what"] for r in rows if r["note"].startswith("skipped: captum")}
    assert skipped == {"saliency", "integrated_gradients", "gradient_shap", "gradcam"}
    assert [r["note"] for r in rows if r["section"] == "relax-ort"] == ["skipped: onnx / onnxruntime not installed"]
    measured = {r["what"].split(" ")[0] for r in rows if r["section"] == "gradients" and r["ratio"]}
    assert measured == {"guided_backprop", "smoothgrad"}  # the two that need no captum
    assert not [r for r in rows if r["what"] == "FAILED"]
