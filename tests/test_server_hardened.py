"""The real `xaiserve serve` process in its hardened configuration: mutual TLS, bearer tokens with a
per-token allow-list, plain health port. Uses the documented client (service.client)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.serverutil import free_port, server_process
from tests.test_security import make_pki
from xaiserve.service.client import ExplainerClient

# certificates are generated and a TLS server started for the module
pytestmark = pytest.mark.slow

ADMIN = "adm1n-token-0123456789abcdef"
VIDEO = "v1deo-token-0123456789abcdef"


@pytest.fixture(scope="module")
def hardened(tiny_store, tmp_path_factory):
    d = tmp_path_factory.mktemp("hardened")
    pki, rogue = make_pki(d / "pki", "good"), make_pki(d / "rogue", "rogue")
    tokens = d / "tokens.yaml"
    tokens.write_text(
        "tokens:\n"
        f"  - {{name: admin, token: {ADMIN}, methods: ['*']}}\n"
        f"  - {{name: video, token: {VIDEO}, methods: [StreamExplain]}}\n"
    )
    hport = free_port()
    with server_process(
        tiny_store,
        "--tls-cert",
        str(pki.server_cert),
        "--tls-key",
        str(pki.server_key),
        "--tls-client-ca",
        str(pki.ca),
        "--tokens-file",
        str(tokens),
        "--health-port",
        str(hport),
        "--health-host",
        "127.0.0.1",
        state_dir=d / "state",
        ready_port=hport,
    ) as srv:
        yield srv, pki, rogue, hport


def client(srv, pki, token, cert_pki=None) -> ExplainerClient:
    c = cert_pki or pki
    return ExplainerClient(
        srv.address.replace("127.0.0.1", "localhost"),
        token=token,
        ca_file=str(pki.ca),
        cert_file=str(c.client_cert),
        key_file=str(c.client_key),
    )


IMG = np.zeros((32, 32, 3), np.uint8)


def test_right_certificate_and_token_is_served(hardened):
    srv, pki, _, _ = hardened
    with client(srv, pki, ADMIN) as c:
        assert c.explain(IMG, "tiny-nemu").mask.shape == (32, 32)
    with client(srv, pki, VIDEO) as c:
        frames = list(c.stream([IMG, IMG], "tiny-nemu"))
        assert frames[-1].frame_id == 1


@pytest.mark.parametrize(
    "token,code",
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("wrong-token-0123456789abcdef", grpc.StatusCode.UNAUTHENTICATED),
        (VIDEO, grpc.StatusCode.PERMISSION_DENIED),  # the video token may only stream
    ],
)
def test_missing_wrong_and_disallowed_tokens(hardened, token, code):
    srv, pki, _, _ = hardened
    with client(srv, pki, token) as c, pytest.raises(grpc.RpcError) as e:
        c.explain(IMG, "tiny-nemu", timeout=10)
    assert e.value.code() == code
    if token:
        assert token not in (e.value.details() or ""), "a status message must never echo a token"


def test_client_certificate_from_another_ca_fails_the_handshake(hardened):
    srv, pki, rogue, _ = hardened
    with client(srv, pki, ADMIN, cert_pki=rogue) as c, pytest.raises(grpc.RpcError) as e:
        c.explain(IMG, "tiny-nemu", timeout=5)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_plain_health_port_and_no_token_in_logs(hardened):
    srv, _, _, hport = hardened
    with grpc.insecure_channel(f"127.0.0.1:{hport}") as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    log = srv.log_path.read_text()
    assert ADMIN not in log and VIDEO not in log
    assert "wrong-token" not in log
