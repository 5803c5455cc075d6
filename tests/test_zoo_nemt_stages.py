"""The two-stage NEMt recipe of the zoo says in its card where stage 1 came from (training/zoo.py)."""

from __future__ import annotations

import json
from pathlib import Path

from xaiserve.training.zoo import _stage1_text

STORE = Path(__file__).resolve().parents[1] / "model_store"


def test_stage1_text_names_the_source_of_the_first_stage() -> None:
    taken = _stage1_text(
        {"from_store": "lesions-nemt:1", "smoothing": 7, "form": "preservation", "test_relevance_mass": 0.863},
        "lesions-nemt",
    )
    assert "`lesions-nemt:1`" in taken and "not trained in this run" in taken and "0.8630" in taken
    assert "7x7" in taken and "xaiserve train zoo --only lesions-nemt" in taken
    trained = _stage1_text(
        {"epochs": 3, "smoothing": 7, "form": "preservation", "test_relevance_mass": 0.856}, "lesions-nemt"
    )
    assert "3 epochs per network, trained in this run" in trained and "0.8560" in trained
    assert "from the store" not in trained


def test_committed_two_stage_cards_describe_their_first_stage() -> None:
    entries = json.loads((STORE / "manifest.json").read_text())["models"]
    two_stage = [e for e in entries if e["kind"] == "nemt" and "stage1" in e.get("metrics", {})]
    assert {e["name"] for e in two_stage} >= {"lesions-nemt", "lesions-nemt-cond"}
    for e in two_stage:
        card = (STORE / e["files"]["card"]).read_text()
        assert "## Training stages" in card
        assert _stage1_text(e["metrics"]["stage1"], e["name"]) in card


def test_the_conditional_recipe_pins_one_cpu_thread() -> None:
    # with 2 threads its stage 1 collapsed (nevus and seborrheic keratosis masks all zero); with 1 it
    # repeats the committed stage 1 exactly (docs/evaluation/README.md, reproducibility)
    from xaiserve.training.cli_nem import ZOO

    recipe = {name: extra for name, _, extra in ZOO}
    assert recipe["lesions-nemt-cond"]["threads"] == 1
    assert "threads" not in recipe["lesions-nemt"]
