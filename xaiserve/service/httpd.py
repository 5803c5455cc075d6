"""The plain-HTTP operations port of the gateway and of workers: three routes, 404 for the rest.

    GET /metrics   Prometheus text format (prometheus_client's default registry)
    GET /healthz   liveness: 200 while the process's event loop answers within `live_timeout_s`
                   (a loop blocked by a runaway call is a process to restart), else 503
    GET /readyz    readiness: 200 when serving (not draining), the models are loaded and the job
                   queue answers a ping; 503 with the failing check otherwise

Every other path (and every method but GET / HEAD) answers 404 / 405: the port never answers an
unknown path with the metrics page, so a probe pointed at a wrong path fails instead of passing.
/healthz and /readyz answer a small JSON document saying which check failed. The server runs in
its own threads (http.server.ThreadingHTTPServer), so the probes work while the event loop is busy
and tell when it is stuck.

Mounted routes (`mounts`): a path, or a prefix ending in "*", mapped to a callable that answers
the request on the handler itself (GET / HEAD / POST); the gateway mounts the web viewer and its
/api there (service/web) and the Open Inference Protocol's /v2 (service/oip_http). The three
routes above always win; unmounted paths still answer 404.

Connections: HTTP/1.1 keep-alive for the three routes when the request has no body, and for the
mounts named in `keep_alive` (which read every request body in full, or set close_connection);
every other answer says `Connection: close` and closes, as before. A kept connection idle for
IDLE_TIMEOUT_S is closed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

log = logging.getLogger("xaiserve.http")

ROUTES = ("/metrics", "/healthz", "/readyz")
IDLE_TIMEOUT_S = 60.0
Check = Callable[[], tuple[bool, str]]
Mount = Callable[[BaseHTTPRequestHandler], None]


class BoundedCheck:
    """Runs a blocking check (a queue ping) in its own thread with a time limit; at most one runs at
    a time, so a store that hangs cannot pile up probe threads."""

    def __init__(self, fn: Callable[[], Any], timeout_s: float, what: str):
        self.fn, self.timeout_s, self.what = fn, timeout_s, what
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="probe")
        self._lock = threading.Lock()
        self._fut: Future | None = None

    def __call__(self) -> tuple[bool, str]:
        with self._lock:
            if self._fut is None or self._fut.done():
                self._fut = self._pool.submit(self.fn)
            fut = self._fut
        try:
            fut.result(timeout=self.timeout_s)
        except FutureTimeout:
            return False, f"{self.what} did not answer within {self.timeout_s:g} s"
        except Exception as e:  # noqa: BLE001 - any failure of the check is "not ready", with its reason
            return False, f"{self.what} failed: {type(e).__name__}"
        return True, "ok"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # the listen backlog (socketserver's default is 5): beyond it the kernel drops a client's SYN and
    # the client retries after a second, which 8 clients connecting at once were paying
    request_queue_size = 128


class _SharedServer(_Server):
    allow_reuse_port = True  # SO_REUSEPORT (socketserver, Python 3.11): one port, several processes


class OpsServer:
    """The HTTP port; `live` and `ready` map check names to callables returning (ok, detail)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        live: dict[str, Check] | None = None,
        ready: dict[str, Check] | None = None,
        mounts: dict[str, Mount] | None = None,
        keep_alive: tuple[str, ...] = (),
        registry: Any = None,
        reuse_port: bool = False,
    ):
        """`registry`: what /metrics exports (default prometheus_client's REGISTRY; a gateway with
        several processes passes metrics.scrape_registry()). `reuse_port`: bind with SO_REUSEPORT so
        that the server processes of one gateway share the port (service/supervisor.py)."""
        self.live, self.ready = dict(live or {}), dict(ready or {})
        self.registry = REGISTRY if registry is None else registry
        self.mounts = dict(mounts or {})
        self.keep_alive = frozenset(keep_alive)  # mount keys that may keep their connection
        ops = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "xaiserve"
            sys_version = ""
            protocol_version = "HTTP/1.1"  # keep-alive only where ops.keeps_alive says (else closed)
            timeout = IDLE_TIMEOUT_S

            def setup(self) -> None:
                super().setup()
                # headers and body leave in separate writes: with Nagle's algorithm the body would wait
                # for the client's delayed ACK of the headers (40 ms per answer on a kept connection)
                with contextlib.suppress(OSError):
                    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def end_headers(self) -> None:
                if self.close_connection:
                    self.send_header("Connection", "close")
                super().end_headers()

            def _connection(self, path: str) -> None:
                if not ops.keeps_alive(path, self.command, self.headers):
                    self.close_connection = True

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's name
                pass  # probes every few seconds would flood the log; failures are in the answers

            def _send(self, code: int, body: bytes, ctype: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _checks(self, checks: dict[str, Check]) -> None:
                results = {}
                ok = True
                for name, check in checks.items():
                    try:
                        good, detail = check()
                    except Exception as e:  # noqa: BLE001
                        good, detail = False, f"check raised {type(e).__name__}"
                    results[name] = detail
                    ok = ok and good
                doc = {"status": "ok" if ok else "failing", "checks": results}
                self._send(200 if ok else 503, (json.dumps(doc) + "\n").encode(), "application/json")

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                self._connection(path)
                if path == "/metrics":
                    self._send(200, generate_latest(ops.registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    self._checks(ops.live)
                elif path == "/readyz":
                    self._checks(ops.ready)
                elif (mount := ops.mount_for(path)) is not None:
                    mount(self)
                else:
                    body = json.dumps({"status": "not found", "routes": list(ROUTES) + list(ops.mounts)}) + "\n"
                    self._send(404, body.encode(), "application/json")

            do_HEAD = do_GET  # noqa: N815

            def _not_allowed(self) -> None:
                self.close_connection = True  # its body, if any, is not read
                self.send_response(405)
                self.send_header("Allow", "GET, HEAD")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                path = self.path.split("?", 1)[0]
                self._connection(path)
                mount = ops.mount_for(path)
                if mount is None:
                    self._not_allowed()
                else:
                    mount(self)

            do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

        self.httpd = (_SharedServer if reuse_port else _Server)((host, port), Handler)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ops-http", daemon=True)

    def mount_for(self, path: str) -> Mount | None:
        """The mounted callable answering `path` (exact keys first, then the longest "*" prefix)."""
        key = self.mount_key(path)
        return self.mounts[key] if key is not None else None

    def mount_key(self, path: str) -> str | None:
        if path in ROUTES:
            return None
        if path in self.mounts:
            return path
        return max((k for k in self.mounts if k.endswith("*") and path.startswith(k[:-1])), key=len, default=None)

    def keeps_alive(self, path: str, command: str, headers: Any) -> bool:
        """Whether the connection may carry another request after this one (see the module docstring)."""
        key = self.mount_key(path)
        if key is not None:
            return key in self.keep_alive
        bodiless = headers.get("Content-Length") in (None, "0") and not headers.get("Transfer-Encoding")
        return command in ("GET", "HEAD") and bodiless

    def start(self) -> "OpsServer":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        for checks in (self.live, self.ready):
            for c in checks.values():
                if isinstance(c, BoundedCheck):
                    c.close()


def loop_responsive(loop: Any, timeout_s: float = 2.0) -> Check:
    """A liveness check: the asyncio loop runs a no-op callback within timeout_s."""

    def check() -> tuple[bool, str]:
        done = threading.Event()
        try:
            loop.call_soon_threadsafe(done.set)
        except RuntimeError:
            return False, "the event loop is closed"
        if not done.wait(timeout_s):
            return False, f"the event loop did not run a callback within {timeout_s:g} s"
        return True, "ok"

    return check
