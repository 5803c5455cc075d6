"""Transport security and caller authentication for the gRPC server.

Three independent layers, each optional, wired by service/server.py from ServerConfig:

1. TLS on the gRPC port (`server_credentials`): certificate and key from PEM files; with a client CA
   file the server *requires* a client certificate signed by that CA (mutual TLS). Certificates are
   re-read when their files change on disk (cert-manager or a Kubernetes secret rotation updates the
   mounted files in place), so a rotation does not need a restart; a rotated pair that does not load
   is logged and the previous pair stays in service.
2. Bearer tokens (`load_tokens` + `TokenAuthInterceptor`): every call must carry
   `authorization: Bearer <token>`. The presented token is compared in constant time with *every*
   configured token (hmac.compare_digest, no early exit), so response time does not tell how many
   leading characters were right, nor which token was close. A missing, malformed or unknown token
   gets UNAUTHENTICATED; a known token calling a method outside its allow-list gets
   PERMISSION_DENIED. Both carry a fixed message: the caller learns nothing about which tokens or
   methods exist. Health checks and reflection are exempt by default (probes carry no token).
   `TokenAuthInterceptor.from_path` re-reads the tokens when their file or secret directory
   changes, so tokens are added and revoked without a restart.
3. A plain health-only gRPC server (`health_only_server`) for a separate interface or port: Kubernetes
   gRPC probes speak neither TLS nor tokens, so with TLS on the probes target this port instead.

Nothing here logs a token, a token prefix or request payloads; rejections are logged with the
method, the reason and (for PERMISSION_DENIED) the token's *name*. `RedactTokens` is a logging
filter that scrubs bearer values and configured tokens from any record, as a second line of defence
for log lines written elsewhere (for example a library that dumps metadata).

Principals (`Principals`): whoever calls is one principal, "token:<name>" for a bearer token (its
name in the tokens file, never the secret), else "cert:<identity>" for a mutual-TLS client
certificate (its common name, else its first subject alternative name), else "anonymous". Jobs
belong to the principal that submitted them; principals in the admin allow-list see all jobs.

Client side: `channel_credentials` (TLS / mTLS) and `token_call_credentials` (attaches the bearer
token on a secure channel) or `bearer_metadata` (explicit metadata, also on plaintext channels, which
should only be used on a trusted loopback since the token then travels in clear).
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import Counter

from xaiserve.service.errors import InvalidArgument

log = logging.getLogger("xaiserve.security")

AUTH_METADATA_KEY = "authorization"
# Exempt by default: Kubernetes probes and grpc_health_probe carry no token; reflection only lists
# the public API (drop it from the exemptions in a hardened deployment, see docs/DEPLOY.md).
DEFAULT_EXEMPT: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
MIN_TOKEN_LENGTH = 16  # shorter secrets are guessable; `openssl rand -hex 32` gives 64
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9._~+/=-]+")  # RFC 6750 b64token: safe in a metadata value
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")

# Calls the interceptor refused, by reason (missing, malformed, unknown token; forbidden method).
# Low cardinality on purpose: never the token name, which would single out a client.
AUTH_REJECTED = Counter("xaiserve_auth_rejected", "Calls refused by token authentication", ["reason"])

# Fixed messages: no hint whether the token was absent, malformed or unknown, nor what is allowed.
UNAUTHENTICATED_MESSAGE = "authentication required: send a valid bearer token in 'authorization' metadata"
PERMISSION_DENIED_MESSAGE = "this credential is not allowed to call this method"


# --------------------------------------------------------------------------------------------- TLS
def _read_pem(path: str | os.PathLike[str], what: str, marker: bytes) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise InvalidArgument(f"{what} file {p} does not exist or is not a file")
    data = p.read_bytes()
    if marker not in data:
        raise InvalidArgument(f"{what} file {p} holds no PEM block ({marker.decode()}...); give a PEM-encoded file")
    return data


def _read_cert(path: str | os.PathLike[str], what: str) -> bytes:
    return _read_pem(path, what, b"-----BEGIN CERTIFICATE-----")


def _read_key(path: str | os.PathLike[str]) -> bytes:
    # PKCS#8 ("BEGIN PRIVATE KEY"), PKCS#1 ("BEGIN RSA PRIVATE KEY") and SEC1 ("BEGIN EC PRIVATE KEY")
    return _read_pem(path, "TLS private key", b"PRIVATE KEY-----")


class _CertificateFiles:
    """Holds the PEM files and re-reads them when any file's mtime or size changes.

    Called by gRPC core on every new TLS handshake (dynamic credentials); a stat of three files is
    cheap next to a handshake. Returning None tells gRPC to keep the configuration it has.
    """

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None) -> None:
        self._paths = [Path(cert_file), Path(key_file)] + ([Path(client_ca_file)] if client_ca_file else [])
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()  # raises InvalidArgument on bad files at start: fail fast

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for p in self._paths:
            try:
                st = p.stat()
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert = _read_cert(self._paths[0], "TLS certificate")
        key = _read_key(self._paths[1])
        ca = _read_cert(self._paths[2], "TLS client CA") if len(self._paths) > 2 else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            stamp = self._stat()
            if stamp == self._stamp:
                return None
            try:
                config = self._load()
            except (InvalidArgument, OSError) as exc:
                # A half-written rotation (key updated, cert not yet) must not take the port down:
                # keep serving the previous pair and try again on the next handshake.
                log.warning("TLS files changed but could not be loaded, keeping the previous ones: %s", exc)
                return None
            self._stamp = stamp
            log.info("TLS certificate files changed on disk: reloaded")
            return config


def server_credentials(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    client_ca_file: str | os.PathLike[str] | None = None,
    *,
    reload: bool = True,
) -> grpc.ServerCredentials:
    """TLS credentials for `server.add_secure_port`.

    With `client_ca_file` the server requires a client certificate signed by that CA (mutual TLS)
    and refuses the handshake otherwise. With `reload` (default) the files are re-read when they
    change on disk. Raises InvalidArgument when a file is missing or is not PEM.
    """
    if not cert_file or not key_file:
        raise InvalidArgument("TLS needs both a certificate file and a private key file")
    ca = os.fspath(client_ca_file) if client_ca_file else None
    files = _CertificateFiles(os.fspath(cert_file), os.fspath(key_file), ca)
    fetch = files.fetch if reload else (lambda: None)
    return grpc.dynamic_ssl_server_credentials(files.initial, fetch, require_client_authentication=ca is not None)


def channel_credentials(
    ca_file: str | os.PathLike[str] | None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """Client TLS credentials: trust `ca_file` (None: the system roots); present a client
    certificate (mutual TLS) when `cert_file` and `key_file` are given."""
    if bool(cert_file) != bool(key_file):
        raise InvalidArgument("a client certificate needs both cert_file and key_file")
    root = _read_cert(ca_file, "TLS CA") if ca_file else None
    cert = _read_cert(cert_file, "TLS client certificate") if cert_file else None
    key = _read_key(key_file) if key_file else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Per-call credentials that send `authorization: Bearer <token>`; combine with TLS credentials
    via `grpc.composite_channel_credentials(channel_credentials(...), token_call_credentials(t))`.
    gRPC refuses to send call credentials over a plaintext channel; use `bearer_metadata` there."""
    _check_token_text(token, "token")
    return grpc.access_token_call_credentials(token)


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Metadata to pass as `metadata=` on a call: works on any channel (in clear on plaintext)."""
    _check_token_text(token, "token")
    return ((AUTH_METADATA_KEY, f"Bearer {token}"),)


# ------------------------------------------------------------------------------------------ tokens
@dataclass(frozen=True)
class TokenPolicy:
    """What one token may do. `allowed_methods` holds full method names
    ("/explain.v1.Explainer/StreamExplain"), short names ("StreamExplain"), service wildcards
    ("/explain.v1.Explainer/*") or "*" (everything)."""

    name: str
    allowed_methods: frozenset[str] = frozenset({"*"})

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidArgument("a token policy needs a non-empty name")
        if not self.allowed_methods:
            raise InvalidArgument(f"token {self.name!r}: allowed methods is empty; use ['*'] to allow all")
        for m in self.allowed_methods:
            if not isinstance(m, str) or not m.strip():
                raise InvalidArgument(f"token {self.name!r}: method {m!r} is not a method name")

    def allows(self, method: str) -> bool:
        """`method` is the full gRPC method name, as in HandlerCallDetails.method."""
        if "*" in self.allowed_methods or method in self.allowed_methods:
            return True
        service, _, short = method.lstrip("/").rpartition("/")
        return (
            short in self.allowed_methods
            or f"{service}/{short}" in self.allowed_methods
            or f"/{service}/*" in self.allowed_methods
            or f"{service}/*" in self.allowed_methods
        )


def _check_token_text(token: Any, where: str) -> str:
    if not isinstance(token, str) or not token:
        raise InvalidArgument(f"{where}: the token is empty or not a string")
    if len(token) < MIN_TOKEN_LENGTH:
        # Say the length rule, never the token.
        raise InvalidArgument(
            f"{where}: tokens must have at least {MIN_TOKEN_LENGTH} characters (e.g. `openssl rand -hex 32`)"
        )
    if not _TOKEN_CHARS.fullmatch(token):
        raise InvalidArgument(f"{where}: tokens may only hold the characters A-Z a-z 0-9 . _ ~ + / = -")
    return token


def _methods(value: Any, where: str) -> frozenset[str]:
    if value is None:
        return frozenset({"*"})
    if isinstance(value, str):
        items = [s.strip() for s in re.split(r"[,\s]+", value) if s.strip()]
    elif isinstance(value, (list, tuple)):
        items = [str(s).strip() for s in value]
    else:
        raise InvalidArgument(f"{where}: methods must be a list of method names or '*'")
    return frozenset(items)


def _policies_from_entries(entries: Iterable[tuple[str, Any, Any]], source: str) -> dict[str, TokenPolicy]:
    out: dict[str, TokenPolicy] = {}
    names: set[str] = set()
    for name, token, methods in entries:
        where = f"{source}: token {name!r}"
        if name in names:
            raise InvalidArgument(f"{source}: token name {name!r} appears twice")
        names.add(name)
        token = _check_token_text(token, where)
        if token in out:
            raise InvalidArgument(f"{where} has the same secret as token {out[token].name!r}; give each its own")
        out[token] = TokenPolicy(str(name), _methods(methods, where))
    if not out:
        raise InvalidArgument(f"{source} defines no tokens; with authentication on, nobody could call")
    return out


def _parse_document(data: Any, source: str) -> dict[str, TokenPolicy]:
    """Accepted shapes:
        tokens: [{name: video, token: "...", methods: [StreamExplain]}, ...]
        tokens: {video: {token: "...", methods: [...]}, admin: {token: "..."}}   (methods default "*")
    The top-level `tokens:` key may be omitted."""
    if isinstance(data, dict) and "tokens" in data:
        extra = set(data) - {"tokens"}
        if extra:
            raise InvalidArgument(f"{source}: unknown keys {sorted(extra)}; expected only 'tokens'")
        data = data["tokens"]
    entries: list[tuple[str, Any, Any]] = []
    if isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "name" not in item or "token" not in item:
                raise InvalidArgument(f"{source}: entry {i} needs 'name' and 'token' (and optional 'methods')")
            extra = set(item) - {"name", "token", "methods"}
            if extra:
                raise InvalidArgument(f"{source}: entry {item['name']!r} has unknown keys {sorted(extra)}")
            entries.append((str(item["name"]), item["token"], item.get("methods")))
    elif isinstance(data, dict):
        for name, item in data.items():
            if isinstance(item, str):
                entries.append((str(name), item, None))
                continue
            if not isinstance(item, dict) or "token" not in item:
                raise InvalidArgument(f"{source}: token {name!r} needs a 'token' value (and optional 'methods')")
            extra = set(item) - {"token", "methods"}
            if extra:
                raise InvalidArgument(f"{source}: token {name!r} has unknown keys {sorted(extra)}")
            entries.append((str(name), item["token"], item.get("methods")))
    else:
        raise InvalidArgument(f"{source}: expected a list or mapping of tokens")
    return _policies_from_entries(entries, source)


def _load_directory(d: Path) -> dict[str, TokenPolicy]:
    """A mounted Kubernetes secret: file NAME holds the token, optional file NAME.methods holds the
    allowed methods (comma or newline separated; absent = all). Kubernetes adds `..data` and
    timestamped `..2024_...` entries (the atomic-update symlinks): names starting with '.' are skipped."""
    files = {p.name: p for p in d.iterdir() if not p.name.startswith(".") and p.is_file()}
    entries = []
    for name in sorted(files):
        if name.endswith(".methods"):
            if name[: -len(".methods")] not in files:
                raise InvalidArgument(f"{d}: {name} has no matching token file {name[: -len('.methods')]}")
            continue
        token = files[name].read_text().strip()
        methods = files[f"{name}.methods"].read_text() if f"{name}.methods" in files else None
        entries.append((name, token, methods))
    return _policies_from_entries(entries, str(d))


def load_tokens(path: str | os.PathLike[str]) -> dict[str, TokenPolicy]:
    """Tokens from a YAML/JSON file or a Kubernetes secret directory: {token: TokenPolicy}.

    Raises InvalidArgument (with the file and entry, never the token) on a missing file, a short or
    non-ASCII token, a duplicate name or secret, unknown keys, or an empty set."""
    p = Path(path)
    if p.is_dir():
        return _load_directory(p)
    if not p.is_file():
        raise InvalidArgument(f"tokens file {p} does not exist")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:  # message gives line/column only, no content
            raise InvalidArgument(f"tokens file {p} is not valid JSON: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            # yaml's message quotes the offending line, which may hold a token: give the position only.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise InvalidArgument(f"tokens file {p} is not valid YAML{where}") from None
    return _parse_document(data, str(p))


def _stamp_of(path: Path) -> tuple:
    """What changes when the token source changes: (name, mtime, size) of the file or of every
    file of the directory, following Kubernetes' ..data symlinks."""
    try:
        if path.is_dir():
            entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
            return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in entries if p.is_file())
        st = path.stat()
        return ((path.name, st.st_mtime_ns, st.st_size),)
    except OSError:
        return (("<unreadable>",),)


# ------------------------------------------------------------------------------------- interceptor
def _abort_handler(handler: grpc.RpcMethodHandler | None, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as `handler` that aborts at once.

    Requests are not deserialised (no deserializer): an unauthenticated caller's payload is never
    parsed. Matching the kind matters for streams: a unary handler on a streaming method would make
    gRPC wait for a single request message."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    async def stream(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, message)

    req_stream = bool(handler and handler.request_streaming)
    resp_stream = bool(handler and handler.response_streaming)
    if req_stream and resp_stream:
        return grpc.stream_stream_rpc_method_handler(stream)
    if req_stream:
        return grpc.stream_unary_rpc_method_handler(stream)
    if resp_stream:
        return grpc.unary_stream_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Bearer-token authentication and per-token method allow-lists for a grpc.aio server.

    `tokens` maps token -> TokenPolicy (as returned by `load_tokens`). `exempt` lists full method
    names or service prefixes ending in "/" that pass without a token (default: health, reflection).
    Build it with `from_path` to re-read the tokens when their file or secret directory changes.
    """

    def __init__(self, tokens: Mapping[str, TokenPolicy], exempt: Sequence[str] = DEFAULT_EXEMPT) -> None:
        self._set_tokens(tokens)
        self._exempt_exact = frozenset(e for e in exempt if not e.endswith("/"))
        self._exempt_prefix = tuple(e for e in exempt if e.endswith("/"))
        self._source: Path | None = None
        self._reload_after_s = 0.0
        self._next_check = 0.0
        self._stamp: tuple = ()

    def _set_tokens(self, tokens: Mapping[str, TokenPolicy]) -> None:
        if not tokens:
            raise InvalidArgument("TokenAuthInterceptor needs at least one token")
        # Kept as a list of (bytes, policy): the presented token is never used as a dict key.
        entries = []
        for token, policy in tokens.items():
            _check_token_text(token, f"token {policy.name!r}")
            entries.append((token.encode("ascii"), policy))
        self._tokens: list[tuple[bytes, TokenPolicy]] = entries  # swapped in one assignment

    @classmethod
    def from_path(
        cls, path: str | os.PathLike[str], exempt: Sequence[str] = DEFAULT_EXEMPT, *, reload_after_s: float = 30.0
    ) -> "TokenAuthInterceptor":
        """Tokens from `load_tokens(path)`, re-read when the file (or a file of the secret
        directory) changes, checked at most every `reload_after_s` seconds on the call path.
        Kubernetes updates a mounted secret in place, so tokens can be added and revoked without a
        restart. A changed source that does not load (half-written, invalid) is logged and the
        previous tokens stay in force."""
        self = cls(load_tokens(path), exempt)
        self._source = Path(path)
        self._reload_after_s = max(0.0, float(reload_after_s))
        self._stamp = _stamp_of(self._source)
        self._next_check = time.monotonic() + self._reload_after_s
        return self

    def _maybe_reload(self) -> None:
        if self._source is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + self._reload_after_s
        stamp = _stamp_of(self._source)
        if stamp == self._stamp:
            return
        try:
            tokens = load_tokens(self._source)
        except (InvalidArgument, OSError) as exc:  # messages never quote a token
            log.warning(
                "tokens at %s changed but could not be loaded, keeping the previous ones: %s", self._source, exc
            )
            return
        self._set_tokens(tokens)
        self._stamp = stamp
        log.info("tokens at %s changed on disk: reloaded %d tokens", self._source, len(tokens))

    def is_exempt(self, method: str) -> bool:
        return method in self._exempt_exact or method.startswith(self._exempt_prefix)

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> tuple[TokenPolicy | None, str]:
        """(policy, "") when the metadata carries a known token, else (None, reason) with reason in
        missing / malformed / unknown (for the log; the caller only sees UNAUTHENTICATED)."""
        self._maybe_reload()
        values = [v for k, v in (metadata or ()) if k.lower() == AUTH_METADATA_KEY]
        if not values:
            return None, "missing"
        if len(values) > 1:
            return None, "malformed"  # two credentials: refuse rather than pick one
        value = values[0]
        if isinstance(value, bytes):
            try:
                value = value.decode("ascii")
            except UnicodeDecodeError:
                return None, "malformed"
        scheme, _, presented = value.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return None, "malformed"
        try:
            candidate = presented.encode("ascii")
        except UnicodeEncodeError:
            return None, "malformed"
        match: TokenPolicy | None = None
        for secret, policy in self._tokens:  # one list object, even if a reload swaps it meanwhile
            # No short-circuit: every configured token is compared, whatever matched before.
            if hmac.compare_digest(candidate, secret):
                match = policy
        return (match, "") if match is not None else (None, "unknown")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        if self.is_exempt(method):
            return await continuation(handler_call_details)
        policy, reason = self.authenticate(handler_call_details.invocation_metadata)
        if policy is None:
            AUTH_REJECTED.labels(reason).inc()
            log.warning("rejected call: method=%s reason=%s_token status=UNAUTHENTICATED", method, reason)
            return _abort_handler(
                await continuation(handler_call_details), grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE
            )
        if not policy.allows(method):
            AUTH_REJECTED.labels("forbidden").inc()
            log.warning("rejected call: method=%s token_name=%s status=PERMISSION_DENIED", method, policy.name)
            return _abort_handler(
                await continuation(handler_call_details), grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE
            )
        return await continuation(handler_call_details)


# -------------------------------------------------------------------------------------- principals
ANONYMOUS = "anonymous"


def certificate_identity(auth_context: Mapping[str, Sequence[bytes]] | None) -> str:
    """The verified client certificate's identity from grpc's auth context: its common name, else
    its first subject alternative name; "" without a client certificate."""
    for key in ("x509_common_name", "x509_subject_alternative_name"):
        values = (auth_context or {}).get(key) or ()
        for v in values:
            text = v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
            if text.strip():
                return text.strip()
    return ""


class Principals:
    """Says who calls (see the module docstring) and whether that principal is an admin.

    With tokens on, the token decides (the interceptor has already refused calls without a known
    token); otherwise a mutual-TLS identity; otherwise everyone is the one anonymous principal."""

    def __init__(self, auth: TokenAuthInterceptor | None = None, admins: Iterable[str] = ()) -> None:
        self.auth = auth
        self.admins = frozenset(a.strip() for a in admins if a and a.strip())

    def of(self, context: Any) -> str:
        if self.auth is not None:
            policy, _ = self.auth.authenticate(context.invocation_metadata())
            if policy is not None:
                return f"token:{policy.name}"
        try:
            ident = certificate_identity(context.auth_context())
        except Exception:  # noqa: BLE001 - a context without transport details (tests, in-process)
            ident = ""
        return f"cert:{ident}" if ident else ANONYMOUS

    def is_admin(self, principal: str) -> bool:
        return principal in self.admins


# ----------------------------------------------------------------------------------------- logging
class RedactTokens(logging.Filter):
    """Scrubs `Bearer <value>` and every configured token from log records (message and args).

    Install on the handlers of the root logger: `handler.addFilter(RedactTokens(tokens))`. The
    server's own code never logs tokens; this guards against libraries that log metadata."""

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        super().__init__()
        secrets = sorted({t for t in tokens if t}, key=len, reverse=True)
        self._secrets = re.compile("|".join(re.escape(t) for t in secrets)) if secrets else None

    def _scrub(self, text: str) -> str:
        text = _BEARER.sub("Bearer [REDACTED]", text)
        return self._secrets.sub("[REDACTED]", text) if self._secrets else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        scrubbed = self._scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        return True


# ------------------------------------------------------------------------------- health-only server
def health_only_server(health_servicer: Any, address: str) -> tuple[grpc.aio.Server, int]:
    """A plaintext grpc.aio server with only grpc.health.v1 on `address` ("0.0.0.0:50052"), and the
    bound port (port 0 in `address` picks a free one).

    Share the main server's HealthServicer object, so both ports report the same status (and
    NOT_SERVING while draining). The caller starts and stops it with the main server. Kubernetes
    gRPC probes cannot do TLS, hence this port when the main port is TLS-only."""
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise InvalidArgument(f"cannot bind the health port {address}: {exc}") from None
    return server, port
