"""Alerting rules and the Grafana dashboard, checked with the real promtool.

- `promtool check rules` on deploy/prometheus/alerts.yml;
- `promtool test rules` on deploy/prometheus/alerts_test.yml: synthetic series in, expected alerts
  (labels and rendered annotations) out, at given times (pending vs firing), plus the p99 PromQL;
- every PromQL expression of the dashboard parsed by promtool (as recording rules, with Grafana's
  variables substituted), and every metric name in rules and dashboard one the service exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "deploy/prometheus/alerts_test.yml"
DASHBOARD = ROOT / "deploy/grafana/xaiserve-dashboard.json"

# What the dashboard must show: gateway metrics (service/metrics.py) and the job
# queue's (service/jobs/metrics.py). Histograms are listed by base name. Note: the queue exports
# xaiserve_job_queue_depth / xaiserve_job_oldest_queued_age_seconds (singular "job"), which is what
# the rules use; `exported_metrics` below is the authority, so a rename on either side fails here.
GATEWAY_METRICS = {
    "xaiserve_request_latency_seconds",
    "xaiserve_requests_total",
    "xaiserve_inflight_requests",
    "xaiserve_batch_size",
    "xaiserve_queue_wait_seconds",
    "xaiserve_inference_seconds",
    "xaiserve_stream_frames_total",
    "xaiserve_model_load_seconds",
    "xaiserve_build_info",
    "xaiserve_frame_latency_seconds",
    "xaiserve_frame_queue_wait_seconds",
    "xaiserve_stream_duration_seconds",
    "xaiserve_active_streams",
}
JOB_METRICS = {
    "xaiserve_job_queue_depth",
    "xaiserve_job_oldest_queued_age_seconds",
    "xaiserve_jobs_total",
    "xaiserve_job_run_seconds",
    "xaiserve_job_queue_wait_seconds",
}
DEVICE_METRICS = {
    "xaiserve_gpu_utilization_ratio",
    "xaiserve_gpu_memory_used_bytes",
    "xaiserve_gpu_memory_total_bytes",
    "xaiserve_device_oom_total",
    "xaiserve_device_info",
}


def exported_metrics() -> set[str]:
    """Every metric name the gateway, the job queue / workers and the auth layer register, as
    Prometheus sees them (counters with _total, info with _info; histograms by base name)."""
    from prometheus_client import REGISTRY

    import xaiserve.service.jobs.metrics  # noqa: F401  (job queue and worker metrics)
    import xaiserve.service.metrics  # noqa: F401  (gateway metrics)
    import xaiserve.service.security  # noqa: F401  (auth rejections)
    from xaiserve.service import gpu_metrics  # device info and out-of-memory events

    names = set()
    for family in REGISTRY.collect():
        suffix = {"counter": "_total", "info": "_info"}.get(family.type, "")
        names.add(family.name + suffix)
    # the per-GPU gauges come from a collector registered only where NVML finds a GPU (not here);
    # tests/test_device_service.py checks that collector exports exactly these names
    names.update(gpu_metrics.GPU_METRICS)
    return {n for n in names if n.startswith("xaiserve_")}


KNOWN = exported_metrics()


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: apt-get install prometheus (scripts/setup.sh does)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(xaiserve_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def test_alerting_rules_pass_promtool_check():
    proc = promtool("check", "rules", str(ALERTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    assert f"SUCCESS: {len(rules)} rules found" in proc.stdout
    names = {r["alert"] for r in rules}
    # the alerts an operator cannot do without: queue age and error rate
    assert {"XaiserveJobQueueBacklog", "XaiserveJobQueueStalled", "XaiserveHighErrorRate", "XaiserveNoWorkers"} <= names
    for r in rules:
        assert r["labels"]["severity"] in ("info", "warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        assert metric_names(r["expr"]) <= KNOWN, f"{r['alert']}: unknown metric in {r['expr']}"


def test_promtool_rejects_a_broken_rule(tmp_path):
    """Guards the check above: promtool must really parse the PromQL."""
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n- name: g\n  rules:\n  - alert: A\n    expr: sum by (rpc (rate(x[5m]))\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


def test_alert_unit_tests_pass():
    proc = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout + proc.stderr
    tested = {
        t["alertname"]
        for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for t in case.get("alert_rule_test", [])
    }
    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a unit test: {sorted(alerts - tested)}"


@pytest.mark.slow
def test_alert_unit_test_detects_a_changed_threshold(tmp_path):
    """The unit tests pin the behaviour: raising the backlog threshold must make them fail."""
    changed = ALERTS.read_text().replace(
        "max(xaiserve_job_oldest_queued_age_seconds) > 300", "max(xaiserve_job_oldest_queued_age_seconds) > 900"
    )
    assert changed != ALERTS.read_text()
    (tmp_path / "alerts.yml").write_text(changed)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    proc = promtool("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert proc.returncode != 0 and "XaiserveJobQueueBacklog" in proc.stdout + proc.stderr


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$namespace": ".*", "$rpc": ".*", "$model": ".*"}


def test_dashboard_queries_are_valid_promql_on_known_metrics(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    rules = []
    for i, (title, expr) in enumerate(exprs):
        for var, value in GRAFANA_VARS.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown Grafana variable in {expr}"
        assert metric_names(expr) <= KNOWN, f"{title}: unknown metric in {expr}"
        rules.append({"record": f"dashboard:panel_{i}:expr", "expr": expr})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = promtool("check", "rules", str(f))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dashboard_covers_latency_throughput_queue_and_errors():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dash["uid"] and dash["title"]
    text = " ".join(e for _, e in dashboard_exprs())
    for q in ("0.50", "0.99"):
        assert f"histogram_quantile({q}, sum by (le) (rate(xaiserve_request_latency_seconds_bucket" in text
    assert "rate(xaiserve_requests_total" in text  # throughput
    assert 'code!="OK"' in text  # errors
    assert "xaiserve_job_queue_depth" in text and "xaiserve_job_oldest_queued_age_seconds" in text
    used = set().union(*(metric_names(e) for _, e in dashboard_exprs()))
    wanted = GATEWAY_METRICS | JOB_METRICS | DEVICE_METRICS
    assert wanted <= used, f"not on the dashboard: {sorted(wanted - used)}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "namespace", "rpc", "model"} <= variables


def test_required_metrics_are_exported_by_the_code():
    """The dashboard's must-haves are not wishful: the service registers every one of them."""
    missing = (GATEWAY_METRICS | JOB_METRICS | DEVICE_METRICS | {"xaiserve_auth_rejected_total"}) - KNOWN
    assert not missing, f"not exported by service/: {sorted(missing)}"


def test_alert_runbooks_point_at_an_existing_section():
    runbooks = {r["annotations"]["runbook"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert runbooks == {"docs/DEPLOY.md#alerts"}
    assert re.search(r"^## Alerts$", (ROOT / "docs/DEPLOY.md").read_text(), re.M)
