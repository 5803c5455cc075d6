"""`xaiserve train denoiser` -> `xaiserve export denoiser` -> the registry serves the exported
spiral model through the spiral runtime, agreeing with the exported ONNX graph; the card quotes the
latency JSON found next to the run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xaiserve.handlers.denoise.export import ort_denoise, ort_session
from xaiserve.handlers.denoise.spiral_runtime import SpiralRuntime
from xaiserve.service.registry import Registry, RegistryConfig
from xaiserve.training.cli_denoise import export_main, train_main


@pytest.mark.slow
def test_a_trained_and_exported_spiral_denoiser_is_served_by_the_runtime(tmp_path) -> None:
    run = tmp_path / "runs" / "spiral"
    assert (
        train_main(
            "denoiser",
            [
                "--arch",
                "spiral",
                "--snr",
                "1/4",
                "--epochs",
                "1",
                "--n-train",
                "48",
                "--n-val",
                "16",
                "--batch-size",
                "16",
                "--size",
                "32",
                "--channels",
                "4,8",
                "--threads",
                "1",
                "--run-dir",
                str(run),
                "--no-progress",
            ],
        )
        == 0
    )
    bench = {
        "limit": 1.5,
        "results": [
            {
                "size": 64,
                "batch": 1,
                "spiral_ms": 2.0,
                "spiral_graph_ms": 3.0,
                "cartesian_ms": 1.6,
                "ratio": 1.25,
                "graph_ratio": 1.875,
                "threads": 1,
                "channels": "default",
            }
        ],
    }
    (run.parent / "bench.json").write_text(json.dumps(bench))
    store = tmp_path / "store"
    assert (
        export_main(
            "denoiser", ["--run", str(run), "--store", str(store), "--name", "tiny", "--n-test", "16", "--threads", "1"]
        )
        == 0
    )
    card = (store / "tiny" / "1" / "card.md").read_text()
    assert "served / cartesian" in card and "| 64 x 64 | 1 | 2.00 | 3.00 | 1.60 | 1.25x | 1.88x |" in card
    assert (
        "handlers/denoise/spiral_runtime.py" in card.split("## Input handling")[0]
    )  # "What it does" says how it is served

    reg = Registry(RegistryConfig(store=store, warmup=True, prefer_cuda=False, intra_op_threads=1))
    served = reg.onnx("tiny")
    assert isinstance(served, SpiralRuntime)
    x = np.random.default_rng(0).standard_normal((5, 1, 32, 32)).astype(np.float32)
    got = served.run({"particles": x})["denoised"]
    want = ort_denoise(ort_session(reg.path(reg.resolve("tiny"), "onnx")), x)
    assert np.abs(got - want).max() / np.abs(want).max() < 2e-5
