"""The Helm chart renders, lints and validates against the Kubernetes schemas, without a cluster.

Rendering: helm-python-sdk (the real Helm v4 engine through its C ABI, no helm binary): `lint` and
`Chart.load(...).render(values, name=, namespace=)`. Validation: every rendered manifest with
kubernetes-validate (strict: unknown fields are errors) against the oldest and newest Kubernetes
versions it ships schemas for that the chart supports. The Prometheus operator's CRDs
(ServiceMonitor, PrometheusRule) have no schema there, so their structure is checked here, the
PrometheusRule's rules with promtool. Cross-references kubernetes-validate cannot see are checked
too: selectors match pod labels, named ports exist, mounts have volumes, referenced Secrets and
ConfigMaps are rendered or supplied, and the rendered server config loads with service.config.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from dataclasses import fields
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from xaiserve.service.config import ServerConfig, load_config
from xaiserve.service.jobs.redis_backend import parse_redis_url
from xaiserve.service.security import TokenPolicy, load_tokens

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm/xaiserve"
RELEASE, NAMESPACE = "xai", "serving"
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_GROUPS = ("monitoring.coreos.com/",)
TOKEN_VIDEO = "video-" + "v" * 40
TOKEN_ADMIN = "admin-" + "a" * 40
FAKE_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
FAKE_KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"

INLINE_HARDENED = {
    "tls": {"enabled": True, "mtls": True, "cert": FAKE_PEM, "key": FAKE_KEY, "clientCA": FAKE_PEM},
    "auth": {
        "enabled": True,
        "tokens": [
            {"name": "video", "token": TOKEN_VIDEO, "methods": ["StreamExplain"]},
            {"name": "admin", "token": TOKEN_ADMIN},
        ],
    },
    "redis": {"enabled": False, "external": {"url": "rediss://:s3cret@redis.example.internal:6380/2"}},
    "worker": {"gpu": 2, "nodeSelector": {"gpu-pool": "a100"}, "autoscaling": {"enabled": True, "metric": "queue"}},
    "modelStore": {"source": "volume", "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}},
    "metrics": {
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
        "grafanaDashboard": {"enabled": True},
    },
    "networkPolicy": {"enabled": True},
}
EXAMPLE_HARDENED = yaml.safe_load((CHART / "examples/values-hardened.yaml").read_text())


@pytest.fixture(scope="module")
def chart():
    with helm_python.Chart.load(CHART) as c:
        yield c


class Rendered:
    """The manifests of one render, with lookups by kind and name."""

    def __init__(self, chart, values: dict):
        self.values = chart.merge_values(values)
        self.files = chart.render(values, name=RELEASE, namespace=NAMESPACE)
        self.docs: list[dict] = []
        for path, text in self.files.items():
            if path.endswith("NOTES.txt"):
                continue
            self.docs += [d for d in yaml.safe_load_all(text) if d]
        self.notes = next(t for p, t in self.files.items() if p.endswith("NOTES.txt"))

    def all(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.all(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, (
            f"{kind}/{name}: {len(found)} rendered; have {[(d['kind'], d['metadata']['name']) for d in self.docs]}"
        )
        return found[0]

    def names(self, kind: str) -> set[str]:
        return {d["metadata"]["name"] for d in self.all(kind)}


def fn(suffix: str = "") -> str:
    return f"{RELEASE}-xaiserve" + (f"-{suffix}" if suffix else "")


@pytest.fixture(scope="module")
def default(chart) -> Rendered:
    return Rendered(chart, {})


@pytest.fixture(scope="module")
def hardened(chart) -> Rendered:
    return Rendered(chart, INLINE_HARDENED)


@pytest.fixture(scope="module")
def example(chart) -> Rendered:
    return Rendered(chart, EXAMPLE_HARDENED)


# -------------------------------------------------------------------------------- lint and schema
@pytest.mark.parametrize(
    "values", [{}, INLINE_HARDENED, EXAMPLE_HARDENED], ids=["default", "inline-hardened", "example-hardened"]
)
def test_helm_lint_has_no_warnings_or_errors(values):
    report = helm_python.lint(CHART, values, namespace=NAMESPACE)
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert not bad and not report["errors"], report


@pytest.mark.slow
@pytest.mark.parametrize("which", ["default", "hardened", "example"])
def test_every_manifest_is_valid_for_kubernetes(which, request):
    r: Rendered = request.getfixturevalue(which)
    crds = 0
    for doc in r.docs:
        assert doc["metadata"]["name"] and len(doc["metadata"]["name"]) <= 63
        if doc["apiVersion"].startswith(CRD_GROUPS):
            crds += 1
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    assert crds == (0 if which == "default" else 2)


def test_validation_really_rejects_bad_manifests(default):
    """Guards the test above: a typo'd field and a wrong type must fail strict validation."""
    dep = json.loads(json.dumps(default.get("Deployment", fn("gateway"))))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)
    dep = json.loads(json.dumps(default.get("Deployment", fn("gateway"))))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "grpc"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)


# ------------------------------------------------------------------------------- cross-references
def _matches(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
        if e["operator"] == "Exists" and e["key"] not in labels:
            return False
    return True


def _workloads(r: Rendered) -> list[dict]:
    return r.all("Deployment") + r.all("StatefulSet")


@pytest.mark.parametrize("which", ["default", "hardened", "example"])
def test_references_between_manifests_resolve(which, request):
    r: Rendered = request.getfixturevalue(which)
    supplied = {  # Secrets the values say exist outside the chart
        r.values["tls"]["existingSecret"],
        r.values["auth"]["existingSecret"],
        r.values["redis"]["auth"]["existingSecret"],
        r.values["redis"]["external"]["existingSecret"],
    } - {""}
    secrets = r.names("Secret") | supplied
    configmaps = r.names("ConfigMap")
    for w in _workloads(r):
        name = w["metadata"]["name"]
        pod = w["spec"]["template"]
        assert _matches(w["spec"]["selector"], pod["metadata"]["labels"]), f"{name}: selector misses its pods"
        spec = pod["spec"]
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, (
                    f"{name}: volume from missing Secret {v['secret']['secretName']}"
                )
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claim_templates, f"{name}: mount {m['name']} has no volume"
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{name}: env {e['name']} from missing Secret {ref['name']}"
            ports = {p["name"] for p in c.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                p = c.get(probe) or {}
                for how in ("httpGet", "tcpSocket"):
                    if how in p and isinstance(p[how]["port"], str):
                        assert p[how]["port"] in ports, f"{name}: {probe} on unknown port {p[how]['port']}"
                if "grpc" in p:
                    assert p["grpc"]["port"] in {cp["containerPort"] for cp in c["ports"]}
        # the secrets a chart-made Secret holds: the keys the pods ask for exist
        for c in spec["containers"]:
            for e in c.get("env", []):
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref["name"] in r.names("Secret"):
                    assert ref["key"] in r.get("Secret", ref["name"])["data"]
    for svc in r.all("Service"):
        pods = [
            w["spec"]["template"]
            for w in _workloads(r)
            if _matches({"matchLabels": svc["spec"]["selector"]}, w["spec"]["template"]["metadata"]["labels"])
        ]
        assert len(pods) == 1, f"Service {svc['metadata']['name']} selects {len(pods)} workloads"
        names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in names, f"Service {svc['metadata']['name']}: targetPort {port['targetPort']}"
    for hpa in r.all("HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = r.get(ref["kind"], ref["name"])
        assert "replicas" not in target["spec"], "an autoscaled Deployment must not pin replicas"
    for pdb in r.all("PodDisruptionBudget"):
        assert (
            sum(_matches(pdb["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"]) for w in _workloads(r))
            == 1
        )


# --------------------------------------------------------------------------------- default values
def _container(r: Rendered, kind: str, name: str) -> dict:
    return r.get(kind, name)["spec"]["template"]["spec"]["containers"][0]


def _config(r: Rendered, key: str = "config.yaml") -> dict:
    return yaml.safe_load(r.get("ConfigMap", fn())["data"][key])


def test_default_render_has_every_component(default):
    kinds = {(d["kind"], d["metadata"]["name"]) for d in default.docs}
    assert {
        ("Deployment", fn("gateway")),
        ("Service", fn()),
        ("HorizontalPodAutoscaler", fn("gateway")),
        ("PodDisruptionBudget", fn("gateway")),
        ("Deployment", fn("worker")),
        ("Service", fn("worker-metrics")),
        ("StatefulSet", fn("redis")),
        ("Service", fn("redis")),
        ("Secret", fn("redis")),
        ("ConfigMap", fn()),
        ("ServiceAccount", fn()),
    } <= kinds
    assert not default.all("ServiceMonitor") and not default.all("PrometheusRule") and not default.all("NetworkPolicy")


def test_gateway_ports_probes_and_hardening(default):
    c = _container(default, "Deployment", fn("gateway"))
    assert c["args"] == ["serve", "--config", "/etc/xaiserve/config/config.yaml"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"grpc": 50051, "metrics": 9100}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe  # grpc.health.v1 on the (plaintext) gRPC port
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
    pod = default.get("Deployment", fn("gateway"))["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/tmp", "/var/lib/xaiserve", "/etc/xaiserve/config"} <= mounts  # writable paths exist
    svc = default.get("Service", fn())
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "metrics": 9100}
    assert pod["terminationGracePeriodSeconds"] > _config(default)["grace_s"], "drain must fit in the grace period"


def test_rendered_server_config_loads_with_the_servers_own_loader(default, tmp_path):
    f = tmp_path / "config.yaml"
    f.write_text(default.get("ConfigMap", fn())["data"]["config.yaml"])
    cfg = load_config(f, env={})
    assert (cfg.host, cfg.port, cfg.metrics_host, cfg.metrics_port) == ("0.0.0.0", 50051, "0.0.0.0", 9100)
    assert cfg.model_store == "/app/model_store" and cfg.job_workers == 0 and not cfg.tls_cert and not cfg.tokens_file


def test_queue_url_is_a_redis_url_built_from_the_password_secret(default):
    env = {e["name"]: e for e in _container(default, "Deployment", fn("gateway"))["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": fn("redis"), "key": "redis-password"}
    password = base64.b64decode(default.get("Secret", fn("redis"))["data"]["redis-password"]).decode()
    assert len(password) == 32
    url = env["XAISERVE_QUEUE"]["value"].replace("$(REDIS_PASSWORD)", password)  # what the kubelet does
    parsed, prefix = parse_redis_url(url)
    assert parsed == f"redis://:{password}@{fn('redis')}:6379/0" and prefix
    redis = _container(default, "StatefulSet", fn("redis"))
    args = " ".join(redis["args"])
    assert (
        "--appendonly yes" in args
        and "--maxmemory-policy noeviction" in args
        and "--requirepass $(REDIS_PASSWORD)" in args
    )
    sts = default.get("StatefulSet", fn("redis"))
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"


def test_worker_args_parse_with_the_workers_own_parser(default):
    from xaiserve.service.worker import _parser

    c = _container(default, "Deployment", fn("worker"))
    assert c["args"][0] == "worker"
    args = _parser().parse_args(c["args"][1:])
    assert (args.store, args.methods, args.metrics_host, args.metrics_port) == (
        "/app/model_store",
        "relax,ablation_path",
        "0.0.0.0",
        9100,
    )
    pod = default.get("Deployment", fn("worker"))["spec"]["template"]["spec"]
    assert args.grace_s < pod["terminationGracePeriodSeconds"], "the job hand-back must fit in the grace period"
    assert "XAISERVE_QUEUE" in {e["name"] for e in c["env"]}  # the worker's --queue default


def test_worker_probes_use_the_workers_health_routes(default):
    from xaiserve.service.httpd import ROUTES

    c = _container(default, "Deployment", fn("worker"))
    live, ready = c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"]
    assert (live["path"], ready["path"]) == ("/healthz", "/readyz")
    assert {live["path"], ready["path"]} <= set(ROUTES) and live["port"] == ready["port"] == "metrics"


def test_worker_requests_gpus_on_selected_nodes(default):
    c = _container(default, "Deployment", fn("worker"))
    assert c["image"].endswith(":0.1.0-cuda")
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    pod = default.get("Deployment", fn("worker"))["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert not any(m["name"] in ("tls", "tokens", "config") for m in c["volumeMounts"]), (
        "workers get no TLS keys or tokens"
    )
    assert default.get("Deployment", fn("worker"))["spec"]["replicas"] == 1
    assert fn("worker") not in default.names("HorizontalPodAutoscaler")


def test_cpu_only_workers_and_cpu_autoscaling(chart):
    r = Rendered(
        chart,
        {
            "worker": {
                "gpu": 0,
                "image": {"tagSuffix": ""},
                "nodeSelector": None,
                "tolerations": [],
                "autoscaling": {"enabled": True, "maxReplicas": 6},
            }
        },
    )
    c = _container(r, "Deployment", fn("worker"))
    assert "nvidia.com/gpu" not in json.dumps(c["resources"]) and c["image"].endswith(":0.1.0")
    hpa = r.get("HorizontalPodAutoscaler", fn("worker"))
    assert hpa["spec"]["maxReplicas"] == 6 and hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert "nodeSelector" not in r.get("Deployment", fn("worker"))["spec"]["template"]["spec"]


# -------------------------------------------------------------------- hardened: TLS, tokens, Redis
def test_tls_probes_move_to_the_plain_health_port(hardened):
    c = _container(hardened, "Deployment", fn("gateway"))
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["health"] == 50052
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50052, probe
    cfg = _config(hardened)
    assert cfg["health_port"] == 50052
    # Health port is not in the Service: only the kubelet reaches it.
    assert 50052 not in {p["port"] for p in hardened.get("Service", fn())["spec"]["ports"]}


def test_tls_and_token_paths_in_the_config_are_the_mounted_secret_files(hardened):
    cfg = _config(hardened)
    c = _container(hardened, "Deployment", fn("gateway"))
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    tls = hardened.get("Secret", fn("tls"))
    assert tls["type"] == "kubernetes.io/tls"
    assert cfg["tls_cert"] == f"{mounts['tls']}/tls.crt" and cfg["tls_key"] == f"{mounts['tls']}/tls.key"
    assert cfg["tls_client_ca"] == f"{mounts['tls']}/ca.crt"
    assert {"tls.crt", "tls.key", "ca.crt"} <= set(tls["data"])
    assert base64.b64decode(tls["data"]["tls.key"]).decode() == FAKE_KEY
    assert cfg["tokens_file"] == mounts["tokens"]
    assert cfg["model_store"] == mounts["models"] == "/models"
    worker = _container(hardened, "Deployment", fn("worker"))
    assert worker["args"][worker["args"].index("--store") + 1] == "/models"
    assert {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}["models"] == "/models"


def test_config_keys_are_server_settings(hardened, tmp_path):
    known = {f.name for f in fields(ServerConfig)}
    cfg = _config(hardened)
    # health_port is the plaintext health-only port the server opens when TLS is on
    # (service.security.health_only_server)
    assert set(cfg) <= known, sorted(set(cfg) - known)
    assert cfg["health_port"] == 50052
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(cfg))
    loaded = load_config(f, env={})
    assert loaded.tls_client_ca == "/etc/xaiserve/tls/ca.crt"


def test_token_secret_is_what_load_tokens_reads(hardened, tmp_path):
    secret = hardened.get("Secret", fn("tokens"))
    d = tmp_path / "tokens"
    d.mkdir()
    for key, value in secret["data"].items():  # what the kubelet writes into the mount
        (d / key).write_bytes(base64.b64decode(value))
    tokens = load_tokens(d)
    assert tokens == {
        TOKEN_VIDEO: TokenPolicy("video", frozenset({"StreamExplain"})),
        TOKEN_ADMIN: TokenPolicy("admin", frozenset({"*"})),
    }
    # tokens never leak into plain objects: ConfigMaps, env values, annotations
    plain = json.dumps([d for d in hardened.docs if d["kind"] != "Secret"])
    assert TOKEN_VIDEO not in plain and TOKEN_ADMIN not in plain and "s3cret" not in plain


def test_external_redis_replaces_the_statefulset(hardened):
    assert not hardened.all("StatefulSet")
    assert fn("redis") not in hardened.names("Service")
    url = base64.b64decode(hardened.get("Secret", fn("redis-url"))["data"]["redis-url"]).decode()
    assert url == INLINE_HARDENED["redis"]["external"]["url"]
    for d in ("gateway", "worker"):
        env = {e["name"]: e for e in _container(hardened, "Deployment", fn(d))["env"]}
        assert env["XAISERVE_QUEUE"]["valueFrom"]["secretKeyRef"] == {"name": fn("redis-url"), "key": "redis-url"}
        assert "REDIS_PASSWORD" not in env


def test_worker_gpu_count_node_selector_and_queue_autoscaling(hardened):
    c = _container(hardened, "Deployment", fn("worker"))
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert hardened.get("Deployment", fn("worker"))["spec"]["template"]["spec"]["nodeSelector"]["gpu-pool"] == "a100"
    metric = hardened.get("HorizontalPodAutoscaler", fn("worker"))["spec"]["metrics"][0]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "xaiserve_job_queue_depth"
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "4"}


def test_network_policies_keep_redis_to_the_release(chart):
    r = Rendered(chart, {"networkPolicy": {"enabled": True}})
    pol = r.get("NetworkPolicy", fn("redis"))
    peers = pol["spec"]["ingress"][0]["from"]
    gateway_labels = r.get("Deployment", fn("gateway"))["spec"]["template"]["metadata"]["labels"]
    worker_labels = r.get("Deployment", fn("worker"))["spec"]["template"]["metadata"]["labels"]
    assert all(_matches(peers[0]["podSelector"], labels) for labels in (gateway_labels, worker_labels))
    assert not _matches(
        peers[0]["podSelector"], {"app.kubernetes.io/instance": "other", "app.kubernetes.io/component": "gateway"}
    )


# ----------------------------------------------------------------------- Prometheus operator CRDs
def test_service_monitor_selects_gateway_and_worker_metrics(hardened):
    sm = hardened.get("ServiceMonitor", fn())
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(sm["spec"]) == {"selector", "namespaceSelector", "endpoints"}
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selected = [s for s in hardened.all("Service") if _matches(sm["spec"]["selector"], s["metadata"]["labels"])]
    assert {s["metadata"]["name"] for s in selected} == {fn(), fn("worker-metrics")}
    for ep in sm["spec"]["endpoints"]:
        assert set(ep) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "relabelings"}
        assert re.fullmatch(r"\d+[smh]", ep["interval"]) and ep["path"] == "/metrics"
        for s in selected:
            assert ep["port"] in {p["name"] for p in s["spec"]["ports"]}
        for rl in ep["relabelings"]:
            assert set(rl) <= {"sourceLabels", "targetLabel", "action", "regex", "replacement"}


def test_prometheus_rule_is_the_checked_alerts_file(hardened, tmp_path):
    pr = hardened.get("PrometheusRule", fn())
    assert pr["apiVersion"] == "monitoring.coreos.com/v1" and set(pr["spec"]) == {"groups"}
    source = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    assert pr["spec"]["groups"] == source["groups"]  # Helm left Prometheus' {{ $value }} templates alone
    f = tmp_path / "rendered.yml"
    f.write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
    proc = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "rules", str(f)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_grafana_dashboard_configmap(hardened):
    cm = hardened.get("ConfigMap", fn("dashboard"))
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["xaiserve-dashboard.json"]) == json.loads(
        (ROOT / "deploy/grafana/xaiserve-dashboard.json").read_text()
    )


def test_chart_copies_of_rules_and_dashboard_are_identical():
    assert (CHART / "files/alerts.yml").read_bytes() == (ROOT / "deploy/prometheus/alerts.yml").read_bytes(), (
        "copy deploy/prometheus/alerts.yml to helm/xaiserve/files/"
    )
    assert (CHART / "files/xaiserve-dashboard.json").read_bytes() == (
        ROOT / "deploy/grafana/xaiserve-dashboard.json"
    ).read_bytes(), "copy deploy/grafana/xaiserve-dashboard.json to helm/xaiserve/files/"


# ------------------------------------------------------------------------ bad values, clear errors
@pytest.mark.parametrize(
    "values, message",
    [
        ({"tls": {"enabled": True}}, "tls.enabled needs tls.existingSecret"),
        ({"tls": {"enabled": True, "mtls": True, "cert": FAKE_PEM, "key": FAKE_KEY}}, "tls.mtls needs the client CA"),
        ({"tls": {"mtls": True}}, "tls.mtls needs tls.enabled"),
        ({"auth": {"enabled": True}}, "auth.enabled needs auth.existingSecret"),
        ({"auth": {"enabled": True, "tokens": [{"name": "a", "token": "short"}]}}, "at least 16 characters"),
        ({"auth": {"enabled": True, "tokens": [{"name": "a b", "token": TOKEN_ADMIN}]}}, "names may only hold"),
        ({"redis": {"enabled": False}}, "redis.enabled=false needs redis.external.url"),
        ({"redis": {"auth": {"password": "p@ss/word"}}}, "redis.auth.password may only hold"),
        ({"modelStore": {"source": "volume"}}, "modelStore.source=volume needs modelStore.volume"),
        ({"modelStore": {"source": "s3"}}, "modelStore.source must be image or volume"),
        ({"worker": {"autoscaling": {"metric": "gpu"}}}, "worker.autoscaling.metric must be cpu or queue"),
        ({"worker": {"graceSeconds": 200}}, "worker.graceSeconds must be shorter"),
        ({"worker": {"methods": []}}, "worker.methods needs at least one job method"),
    ],
)
def test_bad_values_fail_rendering_with_a_clear_message(chart, values, message):
    with pytest.raises(helm_python.HelmError, match=re.escape(message)):
        chart.render(values, name=RELEASE, namespace=NAMESPACE)


def test_notes_warn_about_an_unprotected_deployment(default, hardened):
    assert "WARNING: gRPC is plaintext" in default.notes and "no caller authentication" in default.notes
    assert "WARNING" not in hardened.notes and "client certificates required" in hardened.notes
