"""The web viewer's JSON API (/api on the gateway's HTTP port) against the real server, over real
HTTP: every route with good and bad input, the same answers and metrics as the gRPC port, job events
as server-sent events, token auth with allow-lists and job ownership, and the page's static files
beside /metrics, /healthz and /readyz."""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from tests.conftest import DEFAULT_STORE
from tests.serverutil import running_server
from xaiserve.methods import METHODS
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.service.security import bearer_metadata
from xaiserve.service.tensors import from_tensor

SAMPLES = Path(__file__).resolve().parent.parent / "xaiserve" / "service" / "web" / "static" / "samples"
LESION = (SAMPLES / "lesion-1.png").read_bytes()
SCENE = (SAMPLES / "scene-1.png").read_bytes()
PARTICLES = (SAMPLES / "particles.mrcs").read_bytes()
B64 = lambda b: base64.b64encode(b).decode()  # noqa: E731


class Answer:
    def __init__(self, status: int, headers, body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def call(
    base: str,
    path: str,
    body=None,
    *,
    method: str | None = None,
    token: str | None = None,
    raw: bytes | None = None,
    headers: dict | None = None,
    timeout: float = 120,
) -> Answer:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    h = {"Content-Type": "application/json", **(headers or {})}
    if token:
        h["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Answer(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.headers, e.read())


def error_of(a: Answer) -> dict:
    doc = a.json()
    assert set(doc) == {"code", "message", "status"} and doc["status"] == a.status, doc
    assert len(doc["message"]) > 15, doc
    return doc


def events(base: str, job_id: str, token: str | None = None, stop_after: str | None = None) -> list[tuple[str, dict]]:
    """The server-sent events of a job, parsed (to the end of the stream, or the first `stop_after`)."""
    req = urllib.request.Request(
        f"{base}/api/jobs/{job_id}/events", headers={"Authorization": f"Bearer {token}"} if token else {}
    )
    out: list[tuple[str, dict]] = []
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        kind, data = "message", []
        for line in r:
            line = line.decode().rstrip("\n")
            if not line:
                if data:
                    out.append((kind, json.loads("\n".join(data))))
                    if kind == stop_after:
                        return out
                kind, data = "message", []
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                data.append(line[6:])
    return out


def counter(base: str, rpc: str, code: str) -> float:
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith("xaiserve_requests_total{") and f'rpc="{rpc}"' in line and f'code="{code}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def zoo():
    with running_server(DEFAULT_STORE, job_workers=1) as srv:
        srv.base = srv.metrics_url.rsplit("/", 1)[0]
        yield srv


@pytest.fixture(scope="module")
def base(zoo) -> str:
    return zoo.base


# ------------------------------------------------------------------------------ the port itself
def test_the_page_and_its_files_are_served_beside_the_ops_routes(base):
    page = call(base, "/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b'<script src="static/app.js"' in page.body
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    js = call(base, "/static/app.js")
    assert js.status == 200 and js.headers["Content-Type"].startswith("text/javascript") and b"watchEvents" in js.body
    again = call(base, "/static/app.js", headers={"If-None-Match": js.headers["ETag"]})
    assert again.status == 304 and again.body == b""
    for vendored in (
        "/static/vendor/marked.umd.js",
        "/static/vendor/purify.min.js",
        "/static/style.css",
        "/static/samples/lesion-1.png",
    ):
        assert call(base, vendored).status == 200, vendored
    for missing in ("/static/nope.js", "/static/../api.py", "/static/%2e%2e/api.py", "/static/"):
        assert call(base, missing).status == 404, missing
    assert call(base, "/", method="POST", raw=b"{}").status == 405
    assert call(base, "/metrics").body.startswith(b"# HELP")
    assert call(base, "/healthz").json()["status"] == "ok"
    assert call(base, "/readyz").status == 200
    nowhere = call(base, "/nowhere")
    assert nowhere.status == 404 and "/api/*" in nowhere.json()["routes"] and "/metrics" in nowhere.json()["routes"]
    assert call(base, "/metrics", method="POST", raw=b"").status == 405


def test_calls_another_site_could_forge_are_refused(base):
    body = json.dumps({"model": "lesions-nemt", "image": {"encoded": B64(LESION)}}).encode()
    e = error_of(call(base, "/api/explain", raw=body, headers={"Content-Type": "text/plain"}))
    assert e["code"] == "INVALID_ARGUMENT" and "application/json" in e["message"]
    e = error_of(call(base, "/api/jobs/nope/cancel", raw=b"{}", headers={"Origin": "http://evil.example"}))
    assert e["code"] == "PERMISSION_DENIED" and e["status"] == 403 and "evil.example" in e["message"]
    assert call(base, "/api/models", headers={"Origin": "null"}).status == 403
    same = base.split("//")[1]
    assert call(base, "/api/explain", raw=body, headers={"Origin": f"http://{same}"}).status == 200


def test_unknown_routes_and_methods_say_what_exists(base):
    e = error_of(call(base, "/api/nothing"))
    assert e["code"] == "NOT_FOUND" and "/api/models" in e["message"] and "/api/jobs/ID/events" in e["message"]
    a = call(base, "/api/explain")  # GET on a POST route
    assert a.status == 405 and a.headers["Allow"] == "POST" and "POST" in error_of(a)["message"]
    assert call(base, "/api/models", method="POST", raw=b"{}").status == 405
    e = error_of(call(base, "/api/models?timeout=abc"))
    assert e["code"] == "INVALID_ARGUMENT" and "timeout" in e["message"]
    assert error_of(call(base, "/api/models?timeout=9999"))["code"] == "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------- models and methods
def test_models_are_the_grpc_list_with_methods_and_cards(zoo, base):
    doc = call(base, "/api/models").json()
    grpc_models = zoo.stub().ListModels(pb.ListModelsRequest(), timeout=30).models
    assert [m["name"] for m in doc["models"]] == [m.name for m in grpc_models]
    nemt = next(m for m in doc["models"] if m["name"] == "lesions-nemt")
    assert nemt["kind"] == "nemt" and nemt["input"]["height"] == 64 and nemt["labels"][1] == "melanoma"
    assert (
        "nemt" in nemt["methods"] and "ablation_path" in nemt["methods"] and nemt["card"].startswith("# lesions-nemt")
    )
    only = call(base, "/api/models?kind=denoiser").json()["models"]
    assert only and {m["kind"] for m in only} == {"denoiser"}
    e = error_of(call(base, "/api/models?kind=wizard"))
    assert e["code"] == "INVALID_ARGUMENT" and "wizard" in e["message"] and e["status"] == 400


def test_methods_document_has_the_table_and_job_defaults(zoo, base):
    doc = call(base, "/api/methods").json()
    assert set(doc["methods"]) == set(METHODS)
    assert doc["methods"]["relax"]["rpc"] == "SubmitJob" and doc["methods"]["nemt"]["own"] is True
    from xaiserve.handlers.ablation.optimiser import AblationConfig
    from xaiserve.handlers.relax.relax import RelaxConfig

    relax = {f["name"]: f for f in doc["jobs"]["relax"]["fields"]}
    assert doc["jobs"]["relax"]["params"] == "relax"
    assert relax["num_masks"]["default"] == RelaxConfig().num_masks and relax["num_masks"]["type"] == "int"
    assert relax["num_masks"]["optional"] and relax["p_keep"]["default"] == RelaxConfig().p_keep
    assert relax["batch_size"]["default"] == zoo.config.relax_batch_size
    assert "zero" in relax["masking"]["choices"] and "median" in relax["threshold"]["choices"]
    assert "fixed N" in relax["num_masks"]["help"], "field help comes from the .proto comments"
    abl = {f["name"]: f for f in doc["jobs"]["ablation_path"]["fields"]}
    assert abl["num_slices"]["default"] == AblationConfig().num_slices
    assert abl["max_iterations"]["default"] == AblationConfig().max_iterations
    assert abl["mask_size"]["default"] == 64 and "straddling" in abl["score"]["choices"]
    assert abl["baseline"]["type"] == "image" and abl["return_images"]["type"] == "bool"
    assert doc["auth"] is False


# ------------------------------------------------------------------------------------- explain
def test_preview_is_the_image_as_the_server_decodes_it(base):
    doc = call(base, "/api/preview", {"model": "lesions-nemt", "image": {"encoded": B64(LESION)}}).json()
    assert (doc["model"], doc["height"], doc["width"], doc["channels"]) == ("lesions-nemt:1", 64, 64, 3)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["png"]))).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(Image.open(io.BytesIO(LESION)).convert("RGB")))
    assert (
        error_of(call(base, "/api/preview", {"model": "lesions-nemt", "image": {"encoded": B64(b"nope")}}))["code"]
        == "INVALID_ARGUMENT"
    )
    assert (
        error_of(call(base, "/api/preview", {"model": "ghost", "image": {"encoded": B64(LESION)}}))["code"]
        == "NOT_FOUND"
    )
    e = error_of(call(base, "/api/preview", {"model": "lesions-nemt"}))
    assert e["code"] == "INVALID_ARGUMENT" and "image" in e["message"]


def test_dicom_is_previewed_and_explained_at_its_own_resolution(base):
    from tests.dicomutil import sample

    dcm = {"encoded": B64(sample("CT_small.dcm"))}
    doc = call(base, "/api/preview", {"model": "lesions-classifier", "image": dcm}).json()
    assert (doc["height"], doc["width"], doc["channels"]) == (128, 128, 1), "a greyscale CT, windowed"
    grey = np.asarray(Image.open(io.BytesIO(base64.b64decode(doc["png"]))))
    assert grey.shape == (128, 128) and grey.max() > grey.min()
    ex = call(
        base, "/api/explain", {"model": "lesions-classifier", "image": dcm, "options": {"method": "saliency"}}
    ).json()
    assert [int(s) for s in ex["mask"]["shape"]] == [128, 128]


def test_explain_answers_what_the_grpc_explain_answers(zoo, base):
    body = {
        "model": "lesions-nemt",
        "image": {"encoded": B64(LESION)},
        "options": {"fidelity": True, "target_label": 2},
    }
    doc = call(base, "/api/explain", body).json()
    assert doc["model"] == "lesions-nemt:1" and doc["method"] == "nemt" and doc["target_label"] == 2
    assert doc["mask"]["dtype"] == "float32" and [int(s) for s in doc["mask"]["shape"]] == [64, 64]
    assert -1 <= doc["fidelity"] <= 1 and doc["timing"]["total_ms"] > 0
    mask = np.frombuffer(base64.b64decode(doc["mask"]["data"]), np.float32).reshape(64, 64)
    ref = zoo.stub().Explain(
        pb.ExplainRequest(
            model="lesions-nemt",
            image=pb.Image(encoded=LESION),
            options=pb.ExplainOptions(fidelity=True, target_label=2),
        ),
        timeout=60,
    )
    np.testing.assert_array_equal(mask, from_tensor(ref.mask))
    assert doc["fidelity"] == pytest.approx(ref.fidelity, abs=1e-6)
    grad = call(
        base,
        "/api/explain",
        {"model": "scenes-nemu", "image": {"encoded": B64(SCENE)}, "options": {"method": "guided_backprop"}},
    ).json()
    assert grad["method"] == "guided_backprop" and [int(s) for s in grad["mask"]["shape"]] == [64, 64]


@pytest.mark.parametrize(
    "body,code,fragment",
    [
        ({"model": "lesions-nemt", "image": {"encoded": B64(b"not an image")}}, "INVALID_ARGUMENT", "decoded"),
        ({"model": "ghost", "image": {"encoded": B64(LESION)}}, "NOT_FOUND", "ghost"),
        (
            {"model": "lesions-nemt", "image": {"encoded": B64(LESION)}, "options": {"target_label": 9}},
            "INVALID_ARGUMENT",
            "target_label",
        ),
        (
            {"model": "scenes-simclr", "image": {"encoded": B64(SCENE)}, "options": {"method": "relax"}},
            "INVALID_ARGUMENT",
            "job",
        ),
        (
            {"model": "lesions-nemt", "image": {"encoded": B64(LESION)}, "options": {"fidelity": "yes"}},
            "INVALID_ARGUMENT",
            "fidelity",
        ),
        ({"model": "lesions-nemt", "imagine": {}}, "INVALID_ARGUMENT", "imagine"),
        ({"model": "lesions-nemt", "image": {"encoded": "%%% not base64 %%%"}}, "INVALID_ARGUMENT", "ExplainRequest"),
        ([1, 2, 3], "INVALID_ARGUMENT", "not an object"),
    ],
)
def test_explain_refuses_bad_requests_with_the_grpc_status_and_message(base, body, code, fragment):
    e = error_of(call(base, "/api/explain", body))
    assert e["code"] == code and fragment in e["message"], e
    assert len(e["message"]) < 600, "messages quote at most 200 characters of what was sent"


def test_malformed_bodies_are_refused_and_counted(base):
    before = counter(base, "Explain", "INVALID_ARGUMENT")
    e = error_of(call(base, "/api/explain", raw=b"{ this is not json"))
    assert e["code"] == "INVALID_ARGUMENT" and "not JSON" in e["message"] and "line 1" in e["message"]
    e = error_of(call(base, "/api/explain", raw=b"\xff\xfe\x00garbage"))
    assert e["code"] == "INVALID_ARGUMENT"
    assert counter(base, "Explain", "INVALID_ARGUMENT") == before + 2, "refusals count in the gRPC request metrics"
    huge = call(base, "/api/explain", raw=b"x", headers={"Content-Length": str(10**10)})
    assert huge.status == 429 and "max_message_mb" in error_of(huge)["message"]
    host, port = base.split("//")[1].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/api/explain")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    conn.send(b"2\r\n{}\r\n0\r\n\r\n")
    r = conn.getresponse()
    assert r.status == 400 and "Content-Length" in json.loads(r.read())["message"]
    conn.close()


def test_explain_calls_count_in_the_grpc_metrics(base):
    before = counter(base, "Explain", "OK")
    call(base, "/api/explain", {"model": "lesions-nemt", "image": {"encoded": B64(LESION)}})
    assert counter(base, "Explain", "OK") == before + 1
    text = urllib.request.urlopen(base + "/metrics", timeout=30).read().decode()
    assert 'xaiserve_request_latency_seconds_count{model="lesions-nemt:1",rpc="Explain"}' in text


# ------------------------------------------------------------------------------------- denoise
def test_denoise_answers_the_grpc_denoise_with_the_particles_the_model_saw(zoo, base):
    doc = call(base, "/api/denoise?particles=1", {"model": "cryoem-cartesian", "mrc": B64(PARTICLES)}).json()
    den = np.frombuffer(base64.b64decode(doc["denoised"]["data"]), np.float32).reshape(8, 64, 64)
    seen = np.frombuffer(base64.b64decode(doc["particles"]["data"]), np.float32).reshape(8, 64, 64)
    ref = zoo.stub().Denoise(pb.DenoiseRequest(model="cryoem-cartesian", mrc=PARTICLES), timeout=60)
    np.testing.assert_allclose(den, from_tensor(ref.denoised), atol=1e-5)
    assert seen.std() > 2 * den.std(), "the input is the noisy stack, the output the denoised one"
    plain = call(base, "/api/denoise", {"model": "cryoem-cartesian", "mrc": B64(PARTICLES)}).json()
    assert "particles" not in plain and [int(s) for s in plain["denoised"]["shape"]] == [8, 64, 64]


@pytest.mark.parametrize(
    "path,body,code",
    [
        ("/api/denoise", {"model": "cryoem-cartesian", "mrc": B64(b"not an mrc file at all" * 20)}, "INVALID_ARGUMENT"),
        ("/api/denoise", {"model": "cryoem-cartesian"}, "INVALID_ARGUMENT"),
        ("/api/denoise", {"model": "scenes-nemu", "mrc": B64(PARTICLES)}, "INVALID_ARGUMENT"),
        ("/api/denoise", {"model": "cryoem-nope", "mrc": B64(PARTICLES)}, "NOT_FOUND"),
        ("/api/denoise?particles=maybe", {"model": "cryoem-cartesian", "mrc": B64(PARTICLES)}, "INVALID_ARGUMENT"),
    ],
)
def test_denoise_bad_input(base, path, body, code):
    assert error_of(call(base, path, body))["code"] == code


# ----------------------------------------------------------------------------------------- jobs
def test_relax_job_submit_watch_get_and_cancel_after_the_end(base):
    job = call(
        base,
        "/api/jobs",
        {
            "method": "relax",
            "model": "scenes-simclr",
            "image": {"encoded": B64(SCENE)},
            "relax": {"num_masks": 256, "batch_size": 64, "seed": 3},
        },
    ).json()
    assert job["state"] in ("QUEUED", "RUNNING") and job["method"] == "relax" and job["owner"] == "anonymous"
    evs = events(base, job["id"])
    kinds = [k for k, _ in evs]
    assert kinds[-1] == "EVENT_SUCCEEDED" and "EVENT_PROGRESS" in kinds, kinds
    seqs = [int(d["sequence"]) for _, d in evs]
    assert seqs == sorted(seqs)
    progress = [d for k, d in evs if k == "EVENT_PROGRESS"]
    assert any(d["partial_heatmap"].get("shape") for d in progress), "progress events carry the partial heatmap"
    final = evs[-1][1]["job"]
    assert final["state"] == "SUCCEEDED" and final["result"]["relax"]["num_masks"] == "256"
    for name in ("importance", "uncertainty", "u_relax"):
        assert [int(s) for s in final["result"]["relax"][name]["shape"]] == [64, 64]
    got = call(base, f"/api/jobs/{job['id']}?include_result=1").json()
    assert got["result"]["relax"]["importance"] == final["result"]["relax"]["importance"]
    assert "relax" not in call(base, f"/api/jobs/{job['id']}").json().get("result", {}), "the result only on request"
    again = call(base, f"/api/jobs/{job['id']}/cancel", {}).json()
    assert again["state"] == "SUCCEEDED", "cancelling a finished job leaves it as it is"
    replay = events(base, job["id"])
    assert [k for k, _ in replay] == ["EVENT_SUCCEEDED"], "watching a finished job answers its end at once"


def test_ablation_job_with_images_and_a_cancelled_one(base):
    job = call(
        base,
        "/api/jobs",
        {
            "method": "ablation_path",
            "model": "lesions-classifier",
            "image": {"encoded": B64(LESION)},
            "ablation": {"max_iterations": 3, "num_slices": 6, "mask_size": 32, "return_images": True},
        },
    ).json()
    kind, last = events(base, job["id"])[-1]
    assert kind == "EVENT_SUCCEEDED", last
    ab = last["job"]["result"]["ablation"]
    assert [int(s) for s in ab["path"]["shape"]] == [6, 64, 64] and [int(s) for s in ab["images"]["shape"]] == [
        8,
        64,
        64,
        3,
    ]
    assert [int(s) for s in ab["times"]["shape"]] == [8] and ab["stop_reason"] in ("saturation", "max_iterations")
    long = call(
        base,
        "/api/jobs",
        {
            "method": "ablation_path",
            "model": "lesions-classifier",
            "image": {"encoded": B64(LESION)},
            "ablation": {"max_iterations": 5000},
        },
    ).json()
    assert events(base, long["id"], stop_after="EVENT_PROGRESS")[-1][0] == "EVENT_PROGRESS"
    cancelled = call(base, f"/api/jobs/{long['id']}/cancel", {}).json()
    assert cancelled["state"] == "CANCELLED"
    assert events(base, long["id"])[-1][0] == "EVENT_CANCELLED"


@pytest.mark.parametrize(
    "body,code,fragment",
    [
        ({"method": "lime", "model": "scenes-simclr", "image": {"encoded": B64(SCENE)}}, "INVALID_ARGUMENT", "relax"),
        ({"method": "relax", "model": "ghost", "image": {"encoded": B64(SCENE)}}, "NOT_FOUND", "ghost"),
        (
            {"method": "relax", "model": "scenes-simclr", "image": {"encoded": B64(SCENE)}, "relax": {"num_masks": 0}},
            "INVALID_ARGUMENT",
            "num_masks",
        ),
        (
            {"method": "relax", "model": "scenes-simclr", "image": {"encoded": B64(SCENE)}, "relax": {"p_keep": 1.5}},
            "INVALID_ARGUMENT",
            "p_keep",
        ),
        (
            {"method": "relax", "model": "scenes-simclr", "image": {"encoded": B64(SCENE)}, "relax": {"cells": "many"}},
            "INVALID_ARGUMENT",
            "cells",
        ),
        (
            {
                "method": "ablation_path",
                "model": "lesions-classifier",
                "image": {"encoded": B64(LESION)},
                "ablation": {"target_label": 99},
            },
            "INVALID_ARGUMENT",
            "target_label",
        ),
        ({"method": "relax", "model": "scenes-simclr"}, "INVALID_ARGUMENT", "image"),
        (
            {"method": "relax", "model": "scenes-simclr", "image": {"encoded": B64(SCENE)}, "deadline_seconds": -1},
            "INVALID_ARGUMENT",
            "deadline",
        ),
    ],
)
def test_bad_jobs_are_refused_at_submit_time(base, body, code, fragment):
    e = error_of(call(base, "/api/jobs", body))
    assert e["code"] == code and fragment in e["message"], e


@pytest.mark.parametrize(
    "path,method,code",
    [
        ("/api/jobs/01ffffffffffffffffffffffffffffff", "GET", "NOT_FOUND"),
        ("/api/jobs/nope/events", "GET", "NOT_FOUND"),
        ("/api/jobs/nope/cancel", "POST", "NOT_FOUND"),
        ("/api/jobs/" + "x" * 200, "GET", "INVALID_ARGUMENT"),
        ("/api/jobs/%20%20", "GET", "INVALID_ARGUMENT"),
        ("/api/jobs/nope?include_result=perhaps", "GET", "INVALID_ARGUMENT"),
    ],
)
def test_unknown_and_malformed_job_ids(base, path, method, code):
    e = error_of(call(base, path, method=method, raw=b"{}" if method == "POST" else None))
    assert e["code"] == code, e


def test_a_draining_gateway_refuses_new_web_calls(zoo, base):
    zoo.running.serving.clear()
    try:
        e = error_of(call(base, "/api/models"))
        assert e["code"] == "UNAVAILABLE" and e["status"] == 503 and "draining" in e["message"]
    finally:
        zoo.running.serving.set()
    assert call(base, "/api/models").status == 200


# ----------------------------------------------------------------------------------------- auth
ALL, VIEWER, OTHER = "a" * 32, "v" * 32, "o" * 32


@pytest.fixture(scope="module")
def guarded(tiny_store, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("web-tokens") / "tokens.yaml"
    tokens.write_text(
        f"tokens:\n  - {{name: all, token: {ALL}}}\n  - {{name: viewer, token: {VIEWER}, methods: [ListModels]}}\n"
        f"  - {{name: other, token: {OTHER}}}\n"
    )
    with running_server(tiny_store, tokens_file=str(tokens), job_workers=1) as srv:
        srv.base = srv.metrics_url.rsplit("/", 1)[0]
        yield srv


def test_tokens_guard_every_api_route_as_they_guard_grpc(guarded):
    base = guarded.base
    assert call(base, "/").status == 200 and call(base, "/static/app.js").status == 200, "the page itself holds no data"
    a = call(base, "/api/models")
    assert (
        a.status == 401
        and a.headers["WWW-Authenticate"].startswith("Bearer")
        and error_of(a)["code"] == "UNAUTHENTICATED"
    )
    assert call(base, "/api/models", token="w" * 32).status == 401
    assert call(base, "/api/models", headers={"Authorization": "Basic dXNlcjpwdw=="}).status == 401
    assert call(base, "/api/models", token=VIEWER).status == 200
    assert call(base, "/api/methods", token=VIEWER).json()["auth"] is True
    body = {"model": "tiny-nemu", "image": {"encoded": B64(SCENE)}}
    forbidden = call(base, "/api/explain", body, token=VIEWER)
    assert forbidden.status == 403 and error_of(forbidden)["code"] == "PERMISSION_DENIED"
    assert call(base, "/api/jobs/nope/events", token=VIEWER).status == 403
    assert call(base, "/api/explain", body, token=ALL).status == 200
    unauth = call(base, "/api/explain", raw=b"{ not json", headers={"Authorization": "Bearer " + "z" * 32})
    assert unauth.status == 401, "an unauthenticated body is never parsed"


def test_jobs_belong_to_their_token_over_http_and_grpc_alike(guarded):
    base = guarded.base
    body = {"method": "relax", "model": "tiny-encoder", "image": {"encoded": B64(SCENE)}, "relax": {"num_masks": 64}}
    job = call(base, "/api/jobs", body, token=ALL).json()
    assert job["owner"] == "token:all"
    assert events(base, job["id"], token=ALL)[-1][0] == "EVENT_SUCCEEDED"
    theirs = call(base, f"/api/jobs/{job['id']}", token=OTHER)
    assert theirs.status == 404 and error_of(theirs)["code"] == "NOT_FOUND"
    assert call(base, f"/api/jobs/{job['id']}/cancel", {}, token=OTHER).status == 404
    over_grpc = guarded.stub().GetJob(pb.JobRef(id=job["id"]), metadata=bearer_metadata(ALL), timeout=30)
    assert over_grpc.owner == "token:all" and over_grpc.state == pb.SUCCEEDED
    with pytest.raises(grpc.RpcError) as e:
        guarded.stub().GetJob(pb.JobRef(id=job["id"]), metadata=bearer_metadata(OTHER), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_mutual_tls_without_tokens_keeps_the_api_closed(tiny_store, tmp_path):
    from tests.test_security import make_pki

    pki = make_pki(tmp_path / "pki", "web")
    with running_server(
        tiny_store, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca), job_workers=0
    ) as srv:
        base = srv.metrics_url.rsplit("/", 1)[0]
        e = error_of(call(base, "/api/models"))
        assert e["code"] == "UNAUTHENTICATED" and "client certificate" in e["message"] and "tokens_file" in e["message"]
        assert call(base, "/").status == 200 and call(base, "/metrics").status == 200


def test_web_off_leaves_only_the_ops_routes(tiny_store):
    with running_server(tiny_store, web=False, job_workers=0) as srv:
        base = srv.metrics_url.rsplit("/", 1)[0]
        assert call(base, "/").status == 404 and call(base, "/api/models").status == 404
        assert call(base, "/metrics").status == 200 and call(base, "/healthz").status == 200
        deadline = time.time() + 10
        while call(base, "/readyz").status != 200 and time.time() < deadline:
            time.sleep(0.1)
        assert call(base, "/readyz").status == 200
