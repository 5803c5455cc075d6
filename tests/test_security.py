"""TLS, mutual TLS and bearer-token authentication against a real grpc.aio server.

The server runs the real Explainer service definition (a minimal servicer defined here, so the test
does not depend on models), grpc.health.v1 and reflection, on 127.0.0.1 with a free port, in its own
event loop thread; clients use real channels. Certificates come from a CA made in the test with
`cryptography`, plus a second, rogue CA for the "wrong certificate" cases.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from xaiserve.errors import InvalidArgument
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc
from xaiserve.service.security import (
    PERMISSION_DENIED_MESSAGE,
    UNAUTHENTICATED_MESSAGE,
    RedactTokens,
    TokenAuthInterceptor,
    TokenPolicy,
    bearer_metadata,
    channel_credentials,
    health_only_server,
    load_tokens,
    server_credentials,
    token_call_credentials,
)

TIMEOUT = 10.0
ADMIN = "adm1n-" + "a" * 40
VIDEO = "v1deo-" + "b" * 40
JOBS = "j0bs-" + "c" * 40
UNKNOWN = "unkn0wn-" + "d" * 40
ALL_SECRETS = (ADMIN, VIDEO, JOBS, UNKNOWN)
SERVICE = "/explain.v1.Explainer/"


# ------------------------------------------------------------------------------------ certificates
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            b = b.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate | None = None, key=None) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return path


def make_pki(d: Path, label: str) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    ca_key, srv_key, cli_key = _key(), _key(), _key()
    ca_cn = f"{label} test CA"
    ca = _cert(ca_cn, ca_key, ca_cn, ca_key, ca=True)
    srv = _cert("localhost", srv_key, ca_cn, ca_key, ca=False, server=True)
    cli = _cert(f"{label} client", cli_key, ca_cn, ca_key, ca=False)
    return Pki(
        ca=_write(d / "ca.pem", ca),
        server_cert=_write(d / "server.pem", srv),
        server_key=_write(d / "server.key", key=srv_key),
        client_cert=_write(d / "client.pem", cli),
        client_key=_write(d / "client.key", key=cli_key),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-good"), "good")


@pytest.fixture(scope="module")
def rogue(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki-rogue"), "rogue")


# -------------------------------------------------------------------------------------- the server
class MiniExplainer(explainer_pb2_grpc.ExplainerServicer):
    """Just enough behaviour to tell a call that reached the servicer from one stopped before it."""

    async def ListModels(self, request, context):
        return pb.ListModelsResponse()

    async def StreamExplain(self, request_iterator, context):
        async for frame in request_iterator:
            yield pb.ExplainFrameResult(frame_id=frame.frame_id)

    async def WatchJob(self, request, context):
        yield pb.JobEvent()


class ServerThread:
    """A grpc.aio server on its own event loop in a daemon thread; stop() shuts it down."""

    def __init__(self, *, creds=None, interceptors=(), extra_health_port: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        self.health = health.aio.HealthServicer() if hasattr(health, "aio") else health.HealthServicer()
        self._ready = threading.Event()
        self._creds, self._interceptors, self._extra = creds, list(interceptors), extra_health_port
        self.health_port: int | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(TIMEOUT), "server did not start"
        if self._error:
            raise self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.loop.run_forever()

    async def _start(self) -> None:
        try:
            self.server = grpc.aio.server(interceptors=self._interceptors)
            explainer_pb2_grpc.add_ExplainerServicer_to_server(MiniExplainer(), self.server)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
            names = (
                pb.DESCRIPTOR.services_by_name["Explainer"].full_name,
                reflection.SERVICE_NAME,
                health.SERVICE_NAME,
            )
            reflection.enable_server_reflection(names, self.server)
            addr = "127.0.0.1:0"
            self.port = (
                self.server.add_secure_port(addr, self._creds) if self._creds else self.server.add_insecure_port(addr)
            )
            await self.server.start()
            self.health_server = None
            if self._extra:
                self.health_server, self.health_port = health_only_server(self.health, "127.0.0.1:0")
                await self.health_server.start()
        except BaseException as exc:  # surfaced in the test thread
            self._error = exc
        finally:
            self._ready.set()

    def call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(TIMEOUT)

    def stop(self) -> None:
        async def _stop():
            await self.server.stop(0)
            if self.health_server is not None:
                await self.health_server.stop(0)

        self.call(_stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(TIMEOUT)
        self.loop.close()


@pytest.fixture
def serve():
    servers: list[ServerThread] = []

    def start(**kw) -> ServerThread:
        s = ServerThread(**kw)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


def tls_channel(port: int, pki: Pki | None, *, client: Pki | None = None, token: str | None = None) -> grpc.Channel:
    creds = channel_credentials(
        pki.ca if pki else None, client.client_cert if client else None, client.client_key if client else None
    )
    if token:
        creds = grpc.composite_channel_credentials(creds, token_call_credentials(token))
    # A fresh subchannel pool per channel: otherwise gRPC could reuse a connection that another
    # channel in this process already handshook, and a "wrong certificate" case would not handshake.
    return grpc.secure_channel(f"localhost:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)])


def list_models(channel: grpc.Channel, metadata=None) -> grpc.StatusCode:
    try:
        explainer_pb2_grpc.ExplainerStub(channel).ListModels(pb.ListModelsRequest(), timeout=TIMEOUT, metadata=metadata)
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


# --------------------------------------------------------------------------------------------- TLS
def test_tls_handshake_succeeds_with_the_right_ca_and_fails_otherwise(serve, pki, rogue):
    srv = serve(creds=server_credentials(pki.server_cert, pki.server_key))
    with tls_channel(srv.port, pki) as ch:
        assert list_models(ch) == grpc.StatusCode.OK
    with tls_channel(srv.port, rogue) as ch:  # client trusts another CA: server cert not verifiable
        assert list_models(ch) == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}", options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
        assert list_models(ch) == grpc.StatusCode.UNAVAILABLE  # plaintext against the TLS port


def test_mutual_tls_requires_a_client_certificate_from_the_configured_ca(serve, pki, rogue):
    srv = serve(creds=server_credentials(pki.server_cert, pki.server_key, pki.ca))
    with tls_channel(srv.port, pki, client=pki) as ch:
        assert list_models(ch) == grpc.StatusCode.OK
    with tls_channel(srv.port, pki) as ch:  # no client certificate
        assert list_models(ch) == grpc.StatusCode.UNAVAILABLE
    with tls_channel(srv.port, pki, client=rogue) as ch:  # client certificate from a CA the server does not trust
        assert list_models(ch) == grpc.StatusCode.UNAVAILABLE


def test_rotated_certificate_files_are_picked_up_without_restart(serve, pki, tmp_path):
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "tls.crt", live / "tls.key"
    cert.write_bytes(pki.server_cert.read_bytes())
    key.write_bytes(pki.server_key.read_bytes())
    srv = serve(creds=server_credentials(cert, key))
    with tls_channel(srv.port, pki) as ch:
        assert list_models(ch) == grpc.StatusCode.OK

    new = make_pki(tmp_path / "new", "rotated")
    # Half-written rotation first (new key, old cert): the server must keep the old pair working.
    key.write_bytes(b"not a key")
    with tls_channel(srv.port, pki) as ch:
        assert list_models(ch) == grpc.StatusCode.OK
    cert.write_bytes(new.server_cert.read_bytes())
    key.write_bytes(new.server_key.read_bytes())
    bump = time.time() + 5  # make sure the mtime changes even on a coarse-grained file system
    os.utime(cert, (bump, bump))
    with tls_channel(srv.port, new) as ch:
        assert list_models(ch) == grpc.StatusCode.OK
    with tls_channel(srv.port, pki) as ch:
        assert list_models(ch) == grpc.StatusCode.UNAVAILABLE


def test_bad_tls_files_are_clear_errors(pki, tmp_path):
    with pytest.raises(InvalidArgument, match="does not exist"):
        server_credentials(tmp_path / "missing.pem", pki.server_key)
    with pytest.raises(InvalidArgument, match="no PEM block"):
        server_credentials(pki.server_key, pki.server_key)  # a key where the certificate belongs
    with pytest.raises(InvalidArgument, match="both cert_file and key_file"):
        channel_credentials(pki.ca, pki.client_cert, None)


# ------------------------------------------------------------------------------------------ tokens
@pytest.fixture
def token_file(tmp_path) -> Path:
    p = tmp_path / "tokens.yaml"
    p.write_text(
        "tokens:\n"
        f"  - {{name: admin, token: {ADMIN}, methods: ['*']}}\n"
        f"  - {{name: video, token: {VIDEO}, methods: [StreamExplain]}}\n"
        f"  - {{name: jobs, token: {JOBS}, methods: ['/explain.v1.Explainer/WatchJob', GetJob]}}\n"
    )
    return p


def test_load_tokens_from_yaml_json_and_a_kubernetes_secret_directory(token_file, tmp_path):
    from_yaml = load_tokens(token_file)
    assert {p.name for p in from_yaml.values()} == {"admin", "video", "jobs"}
    assert from_yaml[VIDEO] == TokenPolicy("video", frozenset({"StreamExplain"}))

    j = tmp_path / "tokens.json"
    j.write_text(json.dumps({"video": {"token": VIDEO, "methods": ["StreamExplain"]}, "admin": ADMIN}))
    from_json = load_tokens(j)
    assert from_json[ADMIN].allowed_methods == frozenset({"*"})
    assert from_json[VIDEO] == from_yaml[VIDEO]

    # A mounted secret: one file per token name, optional NAME.methods, plus Kubernetes' atomic
    # update entries (..data symlink, timestamped directory) which must be ignored.
    d = tmp_path / "secret"
    ts = d / "..2024_01_01_00_00_00.000000000"
    ts.mkdir(parents=True)
    (ts / "video").write_text(VIDEO + "\n")
    (ts / "video.methods").write_text("StreamExplain\n/explain.v1.Explainer/ListModels\n")
    (ts / "admin").write_text(ADMIN)
    (d / "..data").symlink_to(ts.name)
    for name in ("video", "video.methods", "admin"):
        (d / name).symlink_to(f"..data/{name}")
    from_dir = load_tokens(d)
    assert from_dir[VIDEO] == TokenPolicy("video", frozenset({"StreamExplain", "/explain.v1.Explainer/ListModels"}))
    assert from_dir[ADMIN] == TokenPolicy("admin", frozenset({"*"}))
    assert len(from_dir) == 2


@pytest.mark.parametrize(
    "content, message",
    [
        ("tokens: [{name: a, token: short}]", "at least 16"),
        (f"tokens: [{{name: a, token: {ADMIN}}}, {{name: b, token: {ADMIN}}}]", "same secret"),
        (f"tokens: [{{name: a, token: {ADMIN}}}, {{name: a, token: {VIDEO}}}]", "appears twice"),
        (f"tokens: [{{name: a, token: {ADMIN}, method: ['*']}}]", "unknown keys"),
        (f"tokens: [{{name: a, token: {ADMIN}, methods: []}}]", "empty"),
        ("tokens: []", "no tokens"),
        (f"tokens: [{{name: a, token: '{ADMIN} x'}}]", "characters"),
        (f"tokens:\n  - name: a\n    token: {ADMIN}\n   bad: [", "not valid YAML at line"),
    ],
)
def test_bad_token_files_are_clear_errors_that_never_quote_a_token(tmp_path, content, message):
    p = tmp_path / "tokens.yaml"
    p.write_text(content)
    with pytest.raises(InvalidArgument, match=message) as err:
        load_tokens(p)
    assert ADMIN not in str(err.value) and VIDEO not in str(err.value)


def test_policy_matches_full_short_and_wildcard_method_names():
    m = "/explain.v1.Explainer/StreamExplain"
    assert TokenPolicy("a", frozenset({"*"})).allows(m)
    assert TokenPolicy("a", frozenset({m})).allows(m)
    assert TokenPolicy("a", frozenset({"StreamExplain"})).allows(m)
    assert TokenPolicy("a", frozenset({"explain.v1.Explainer/*"})).allows(m)
    assert not TokenPolicy("a", frozenset({"Explain"})).allows(m)
    assert not TokenPolicy("a", frozenset({"/other.Service/*"})).allows(m)


def _rejected(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("xaiserve_auth_rejected_total", {"reason": reason}) or 0.0


def _code_and_details(fn) -> tuple[grpc.StatusCode, str | None]:
    try:
        fn()
        return grpc.StatusCode.OK, None
    except grpc.RpcError as err:
        return err.code(), err.details()


def test_tokens_missing_wrong_malformed_and_disallowed_get_the_right_codes(serve, token_file, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    before = {r: _rejected(r) for r in ("missing", "malformed", "unknown", "forbidden")}
    srv = serve(interceptors=[TokenAuthInterceptor(load_tokens(token_file))])
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        stub = explainer_pb2_grpc.ExplainerStub(ch)

        def unary(md):
            return lambda: stub.ListModels(pb.ListModelsRequest(), timeout=TIMEOUT, metadata=md)

        def bidi(md):
            frames = [pb.ExplainFrame(frame_id=i) for i in (1, 2, 3)]
            return lambda: [r.frame_id for r in stub.StreamExplain(iter(frames), timeout=TIMEOUT, metadata=md)]

        def server_stream(md):
            return lambda: list(stub.WatchJob(pb.JobRef(), timeout=TIMEOUT, metadata=md))

        unauth = (grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
        denied = (grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE)
        for call in (unary, bidi, server_stream):
            assert _code_and_details(call(None)) == unauth  # missing
            assert _code_and_details(call(bearer_metadata(UNKNOWN))) == unauth  # wrong
            assert _code_and_details(call((("authorization", f"Basic {ADMIN}"),))) == unauth  # wrong scheme
            assert _code_and_details(call((("authorization", "Bearer "),))) == unauth  # empty
            assert _code_and_details(call((("authorization", f"Bearer {ADMIN[:-1]}"),))) == unauth  # prefix
            two = bearer_metadata(ADMIN) + bearer_metadata(VIDEO)
            assert _code_and_details(call(two)) == unauth  # two credentials: refuse, do not pick one

        # Allowed: admin everywhere; video may only stream; jobs may only watch jobs (full name).
        assert _code_and_details(unary(bearer_metadata(ADMIN))) == (grpc.StatusCode.OK, None)
        assert _code_and_details(bidi(bearer_metadata(ADMIN)))[0] == grpc.StatusCode.OK
        assert bidi(bearer_metadata(VIDEO))() == [1, 2, 3]
        assert _code_and_details(unary(bearer_metadata(VIDEO))) == denied
        assert _code_and_details(server_stream(bearer_metadata(VIDEO))) == denied
        assert _code_and_details(server_stream(bearer_metadata(JOBS)))[0] == grpc.StatusCode.OK
        assert _code_and_details(bidi(bearer_metadata(JOBS))) == denied

        # An unauthenticated payload is never parsed: garbage bytes still get UNAUTHENTICATED.
        raw = ch.unary_unary(SERVICE + "ListModels")
        assert _code_and_details(lambda: raw(b"\xff\xfe not protobuf", timeout=TIMEOUT)) == unauth
        # Unknown methods do not reveal whether they exist to callers without a token.
        ghost = ch.unary_unary(SERVICE + "NoSuchMethod")
        assert _code_and_details(lambda: ghost(b"", timeout=TIMEOUT)) == unauth

        # Health and reflection pass without a token (probes carry none).
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT
        )
        listed = {s.name for r in refl for s in r.list_services_response.service}
        assert "explain.v1.Explainer" in listed

    # Counted for the XaiserveAuthenticationFailures alert. Per call kind (3): 1 missing, 2 unknown
    # (wrong token, truncated token), 3 malformed (Basic scheme, empty bearer, two credentials); then
    # 3 forbidden, and the garbage payload and unknown method, both without a token (2 missing).
    counted = {r: _rejected(r) - before[r] for r in before}
    assert counted == {"missing": 5, "malformed": 9, "unknown": 6, "forbidden": 3}

    # The rejections were logged (method and reason / token name), the secrets never were.
    text = caplog.text
    assert "reason=missing_token" in text and "reason=unknown_token" in text and "reason=malformed_token" in text
    assert "token_name=video status=PERMISSION_DENIED" in text
    out, err = capfd.readouterr()
    for secret in ALL_SECRETS:
        assert secret not in text and secret not in out and secret not in err
        assert secret[:12] not in text  # not even a prefix


def test_tokens_over_tls_with_call_credentials_and_health_on_a_separate_plain_port(serve, pki, token_file):
    interceptor = TokenAuthInterceptor(load_tokens(token_file), exempt=())  # hardened: nothing exempt
    srv = serve(
        creds=server_credentials(pki.server_cert, pki.server_key, pki.ca),
        interceptors=[interceptor],
        extra_health_port=True,
    )
    with tls_channel(srv.port, pki, client=pki, token=ADMIN) as ch:
        assert list_models(ch) == grpc.StatusCode.OK
    with tls_channel(srv.port, pki, client=pki, token=VIDEO) as ch:
        assert list_models(ch) == grpc.StatusCode.PERMISSION_DENIED
    with tls_channel(srv.port, pki, client=pki) as ch:
        assert list_models(ch) == grpc.StatusCode.UNAUTHENTICATED
        # Nothing exempt: even health needs a token on the main port...
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    # ...while the plaintext health-only port (what Kubernetes probes use) answers, shares the
    # status of the main server, and serves nothing else.
    with grpc.insecure_channel(f"127.0.0.1:{srv.health_port}") as plain:
        check = health_pb2_grpc.HealthStub(plain).Check
        assert check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.SERVING
        srv.call(srv.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING))
        assert (
            check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT).status == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        assert list_models(plain) == grpc.StatusCode.UNIMPLEMENTED


def _k8s_secret_update(d: Path, files: dict[str, str], generation: int) -> None:
    """What the kubelet does to a mounted secret: a new timestamped directory, then an atomic swap
    of the ..data symlink; the visible files are symlinks through ..data."""
    ts = d / f"..2024_01_01_00_00_0{generation}.000000000"
    ts.mkdir(parents=True)
    for name, content in files.items():
        (ts / name).write_text(content)
    tmp = d / "..data_tmp"
    tmp.symlink_to(ts.name)
    os.replace(tmp, d / "..data")
    for name in files:
        if not (d / name).is_symlink():
            (d / name).symlink_to(f"..data/{name}")
    for stale in d.iterdir():
        if not stale.name.startswith(".") and stale.name not in files:
            stale.unlink()


def test_tokens_are_reloaded_when_the_mounted_secret_changes(serve, tmp_path, caplog):
    d = tmp_path / "tokens"
    d.mkdir()
    _k8s_secret_update(d, {"admin": ADMIN}, 1)
    srv = serve(interceptors=[TokenAuthInterceptor.from_path(d, reload_after_s=0)])
    with grpc.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
        assert list_models(ch, bearer_metadata(ADMIN)) == grpc.StatusCode.OK
        assert list_models(ch, bearer_metadata(VIDEO)) == grpc.StatusCode.UNAUTHENTICATED

        # Rotation: admin revoked, video added with a restricted allow-list.
        _k8s_secret_update(d, {"video": VIDEO, "video.methods": "StreamExplain"}, 2)
        assert list_models(ch, bearer_metadata(ADMIN)) == grpc.StatusCode.UNAUTHENTICATED
        assert list_models(ch, bearer_metadata(VIDEO)) == grpc.StatusCode.PERMISSION_DENIED

        # A broken update (token too short) is refused and the previous tokens stay in force.
        _k8s_secret_update(d, {"video": "sh0rt-t0k"}, 3)
        with caplog.at_level(logging.WARNING, logger="xaiserve.security"):
            assert list_models(ch, bearer_metadata(VIDEO)) == grpc.StatusCode.PERMISSION_DENIED
        assert "could not be loaded, keeping the previous ones" in caplog.text
        assert "sh0rt-t0k" not in caplog.text  # the rejected secret is not echoed either


def test_client_helpers_refuse_unusable_tokens():
    with pytest.raises(InvalidArgument, match="at least 16"):
        bearer_metadata("short")
    with pytest.raises(InvalidArgument, match="characters"):
        token_call_credentials("a" * 20 + "\n")
    assert bearer_metadata(ADMIN) == (("authorization", f"Bearer {ADMIN}"),)


def test_redact_filter_scrubs_bearer_values_and_known_tokens(caplog):
    logger = logging.getLogger("xaiserve.test.redact")
    filt = RedactTokens([VIDEO])
    logger.addFilter(filt)
    try:
        with caplog.at_level(logging.INFO, logger=logger.name):
            logger.info("metadata: authorization=Bearer %s", ADMIN)
            logger.info("raw token in a message: %s", VIDEO)
    finally:
        logger.removeFilter(filt)
    assert ADMIN not in caplog.text and VIDEO not in caplog.text
    assert caplog.text.count("[REDACTED]") == 2
