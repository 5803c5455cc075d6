"""The gateway pod's shutdown budget covers the preStop sleep, the server's drain (grace_s, in which
streams get their notice and end) and a margin; a chart whose budget is too short does not render."""

from __future__ import annotations

import re

import helm_python
import pytest
import yaml

from tests.test_helm_chart import CHART, NAMESPACE, RELEASE, fn


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


def gateway(chart, values: dict) -> tuple[dict, dict]:
    files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
    docs = [d for p, t in files.items() if not p.endswith("NOTES.txt") for d in yaml.safe_load_all(t) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == fn("gateway"))
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "config.yaml" in d.get("data", {}))
    return dep["spec"]["template"]["spec"], yaml.safe_load(cm["data"]["config.yaml"])


@pytest.mark.parametrize("values", [{}, {"config": {"grace_s": 40}, "gateway": {"terminationGracePeriodSeconds": 60}}])
def test_termination_grace_covers_prestop_drain_and_margin(chart, values):
    pod, config = gateway(chart, values)
    merged = chart.merge_values(values)
    sleep = int(pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    assert sleep == merged["gateway"]["preStopSleepSeconds"]
    assert (
        pod["terminationGracePeriodSeconds"] >= sleep + config["grace_s"] + merged["gateway"]["shutdownMarginSeconds"]
    )


@pytest.mark.parametrize(
    "values",
    [
        {"config": {"grace_s": 25}},
        {"gateway": {"preStopSleepSeconds": 20}},
        {"gateway": {"terminationGracePeriodSeconds": 20}},
        {"config": {"grace_s": 20.5}, "gateway": {"terminationGracePeriodSeconds": 30}},
    ],
)
def test_a_grace_period_too_short_for_the_drain_fails_rendering(chart, values):
    with pytest.raises(
        helm_python.HelmError, match=re.escape("must be at least gateway.preStopSleepSeconds + config.grace_s")
    ):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_a_zero_grace_needs_only_the_prestop_sleep_and_the_margin(chart):
    pod, config = gateway(chart, {"config": {"grace_s": 0}, "gateway": {"terminationGracePeriodSeconds": 10}})
    assert config["grace_s"] == 0 and pod["terminationGracePeriodSeconds"] == 10
