"""bench/bench_denoise.py runs against the store's denoisers and its JSON feeds the model card's
latency table (timings themselves are not asserted: benchmarks measure, tests check behaviour)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    spec = importlib.util.spec_from_file_location("bench_denoise", ROOT / "bench" / "bench_denoise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_bench_times_the_served_spiral_its_graph_and_the_baseline_and_the_card_quotes_them(tmp_path, capsys) -> None:
    from xaiserve.training.cli_denoise import latency_section

    out = tmp_path / "bench.json"
    status = _bench().main(["--sizes", "64", "--batches", "1,3", "--rounds", "1", "--reps", "1", "--json", str(out)])
    data = json.loads(out.read_text())
    assert data["limit"] == 1.5 and [r["batch"] for r in data["results"]] == [1, 3]
    for r in data["results"]:
        assert r["spiral_ms"] > 0 and r["spiral_graph_ms"] > 0 and r["cartesian_ms"] > 0
        assert abs(r["ratio"] - r["spiral_ms"] / r["cartesian_ms"]) < 1e-9
        assert abs(r["graph_ratio"] - r["spiral_graph_ms"] / r["cartesian_ms"]) < 1e-9
    assert status == (1 if any(r["ratio"] > 1.5 for r in data["results"]) else 0)
    printed = capsys.readouterr().out
    assert "SpiralRuntime" in printed and "spiral-graph/cartesian" in printed
    card = latency_section(data)
    assert "| 64 x 64 | 3 |" in card and "served / cartesian" in card
    assert ("met at every batch size" in card) == (status == 0)
