"""`xaiserve serve --processes N`: N server processes on one port under a supervisor.

Why: one grpc.aio server is one event loop holding the GIL for most of a call's Python (taking the
call from grpc, admission, parsing, answering). When that loop is the bound, calls wait in grpc's C
queue before admission even runs (docs/ARCHITECTURE.md "Overload: where a refusal's time goes"),
and the server cannot use more than about one core for its own per-call work. N processes are N
event loops and N GILs.

How:
- The supervisor (this process) resolves the configuration once (file < environment < flags),
  checks and reserves the ports (port 0 picks one here, so that every process gets the same), then
  starts N children (`python -m xaiserve.service.supervisor`, the resolved settings in the
  environment): each is an ordinary `xaiserve serve` server (service/server.py) with its own event
  loop, registry, admission, batchers, job workers and manifest watcher, bound to the same gRPC
  port, HTTP port and health port with SO_REUSEPORT (grpc.so_reuseport = 1 in the children; a
  single process keeps it off so that a second server on a port in use fails to start). The Linux
  kernel spreads *connections* over the processes that listen (a hash of the addresses): one
  client channel (one HTTP/2 connection) talks to one process; many clients spread.
- Metrics: prometheus_client's multiprocess mode. The supervisor sets PROMETHEUS_MULTIPROC_DIR
  (the one given, else a temporary folder removed at exit), deletes its old *.db files at start,
  and marks a dead child's live gauges dead; /metrics, answered by whichever child the connection
  reaches, aggregates the group (service/metrics.py scrape_registry). The supervisor counts the
  restarts itself (xaiserve_server_process_restarts_total, in the same folder).
- Signals: SIGTERM / SIGINT are forwarded to every child, which drains as a single server does
  (grace_s); the supervisor waits for them (SIGKILL after grace_s + KILL_MARGIN_S) and exits 0.
  SIGHUP (reload the model store) is forwarded.
- A child that exits unasked is logged and restarted (backoff 1 s, doubling up to 30 s while it
  keeps dying within MIN_UPTIME_S of its start); one that fails before it ever served (a bad model
  store, a port it cannot bind, a refused queue) stops the group with its exit status, as a single
  server would have. Children get SIGTERM when the supervisor dies (PR_SET_PDEATHSIG).
- Watchdog: a child that is alive but stuck (its event loop blocked by a bug, a deadlock, a frozen
  process) answers no call and fails a share of the probes without dying. Each child's event loop
  writes a heartbeat byte into the pipe that announced it ready, every HEARTBEAT_S; when none has
  come for `process_watchdog_s` the supervisor logs it, sends SIGUSR1 and SIGCONT (faulthandler in
  the child writes every thread's stack to the log, from C, without the blocked loop), kills the child
  STACK_DUMP_S later and restarts it as it would one that died (counted in the same metric).
- A child that dies takes the connections still waiting in its listening socket's accept queue
  with it: the kernel resets them (the client sees UNAVAILABLE once) unless
  net.ipv4.tcp_migrate_req = 1 (Linux >= 5.14, per network namespace), which hands them to another
  listener of the SO_REUSEPORT group. The supervisor reads it at start and says so when it is off
  (measured: 6-12 reset connections per 4 kills under a stream of new connections with 0, none with 1;
  calls already running in the killed child are lost either way).
- Jobs: the SQLite store is built for several processes (one BEGIN IMMEDIATE transaction per
  transition, claims fenced by worker id, a dead process's jobs recovered at once through its pid:
  service/jobs/sqlite_backend.py), so the children share it, each with its own `job_workers`;
  Redis is shared anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from xaiserve.service.config import ServerConfig

log = logging.getLogger("xaiserve.supervisor")

CHILD_ENV = "XAISERVE_GROUP_CHILD"  # JSON: {"index": i, "settings": {...}, "ready_fd": fd, "parent": pid}
KILL_MARGIN_S = 15.0  # after grace_s, the time a draining child has left to exit before SIGKILL
MIN_UPTIME_S = 30.0  # a child that dies sooner than this after its start backs off longer each time
MAX_BACKOFF_S = 30.0
HEARTBEAT_S = 1.0  # a child's event loop writes one byte into its pipe this often
STACK_DUMP_S = 1.0  # a stuck child's time to write its thread stacks (SIGUSR1) before SIGKILL


MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def connection_handover() -> str | None:
    """net.ipv4.tcp_migrate_req: "1" when the kernel hands a dying listener's queued connections to
    the other sockets of its SO_REUSEPORT group, "0" when it resets them, None where unknown
    (Linux < 5.14, or not Linux)."""
    try:
        return MIGRATE_REQ.read_text().strip()
    except OSError:
        return None


class GroupError(RuntimeError):
    """The group cannot start (a port in use, an address that does not resolve)."""


def _family(host: str) -> socket.AddressFamily:
    try:
        return socket.getaddrinfo(host or "0.0.0.0", None, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise GroupError(f"cannot resolve the bind address {host!r}: {e}") from None


def reserve_port(host: str, port: int, what: str) -> tuple[int, socket.socket]:
    """A port for every child: `port`, checked free (a bind without SO_REUSEPORT fails when any
    socket holds it, so a group never joins a port another server is using), or for 0 a free one.
    Returns (port, a socket bound to it with SO_REUSEPORT and not listening: it keeps the port
    reserved while the supervisor lives and never takes connections)."""
    fam = _family(host)
    bind_host = host or ("::" if fam == socket.AF_INET6 else "0.0.0.0")
    if port:
        with socket.socket(fam, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((bind_host, port))
            except OSError as e:
                raise GroupError(f"the {what} port {host}:{port} is in use or cannot be bound ({e.strerror})") from None
    hold = socket.socket(fam, socket.SOCK_STREAM)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        hold.bind((bind_host, port))
    except OSError as e:
        hold.close()
        raise GroupError(f"cannot bind the {what} port {host}:{port} ({e.strerror})") from None
    return hold.getsockname()[1], hold


@dataclass
class _Child:
    index: int
    proc: subprocess.Popen | None = None
    ready_fd: int = -1
    ready: bool = False
    ever_ready: bool = False
    started: float = 0.0
    restart_at: float = 0.0  # > 0: waiting to be restarted at this time.monotonic()
    backoff_s: float = 1.0
    restarts: int = 0
    last_beat: float = 0.0  # time.monotonic() of the last byte read from its pipe
    stuck_kill_at: float = 0.0  # > 0: found stuck; SIGKILL at this time


def _settings(cfg: ServerConfig, **override: Any) -> dict[str, Any]:
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
    out.update(override)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _clean_metrics_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for f in path.glob("*.db"):  # the values of an earlier run (prometheus_client: wipe at start)
        f.unlink()


class Supervisor:
    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.n = cfg.process_count
        self.children = [_Child(i) for i in range(self.n)]
        self.holds: list[socket.socket] = []
        self.stopping = False
        self.hup = False
        self.kill_at = 0.0
        self.exit_code = 0
        self._own_metrics_dir = False

    # -- setup ---------------------------------------------------------------------------------
    def prepare(self) -> None:
        given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if given:
            mdir = Path(given)
        else:
            mdir = Path(tempfile.mkdtemp(prefix="xaiserve-metrics-"))
            self._own_metrics_dir = True
        _clean_metrics_dir(mdir)
        self.metrics_dir = mdir
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(mdir)  # before prometheus_client is imported here
        from prometheus_client import Counter

        self.restart_counter = Counter(
            "xaiserve_server_process_restarts",
            "Server processes of a --processes group that exited unasked and were restarted",
        )
        c = self.cfg
        port, hold = reserve_port(c.host, c.port, "gRPC")
        self.holds.append(hold)
        over: dict[str, Any] = {"port": port}
        if c.metrics_port >= 0:
            mport, hold = reserve_port(c.metrics_host, c.metrics_port, "HTTP (metrics)")
            self.holds.append(hold)
            over["metrics_port"] = mport
        if c.health_port:
            hport, hold = reserve_port(c.health_host, c.health_port, "health")
            self.holds.append(hold)
            over["health_port"] = hport
        self.settings = _settings(c, **over)
        self.ports = over

    def _spawn(self, child: _Child) -> None:
        r, w = os.pipe()
        spec = {"index": child.index, "settings": self.settings, "ready_fd": w, "parent": os.getpid()}
        env = dict(os.environ, **{CHILD_ENV: json.dumps(spec)})
        child.proc = subprocess.Popen(
            [sys.executable, "-m", "xaiserve.service.supervisor"], env=env, pass_fds=(w,), close_fds=True
        )
        os.close(w)
        child.ready_fd, child.ready, child.started, child.restart_at = r, False, time.monotonic(), 0.0
        child.last_beat, child.stuck_kill_at = child.started, 0.0
        log.info("server process started", extra={"server_process": child.index, "pid": child.proc.pid})

    # -- the loop ------------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self.hup = True
        else:
            self.stopping = True

    def _forward(self, sig: int) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(sig)

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        log.info(
            "supervisor",
            extra={"processes": self.n, "pid": os.getpid(), **self.ports, "metrics_dir": str(self.metrics_dir)},
        )
        handover = connection_handover()
        if handover != "1":
            log.warning(
                "connections queued to a server process that dies are reset, not handed to the others: "
                "set sysctl net.ipv4.tcp_migrate_req=1 (Linux >= 5.14; in Kubernetes a pod sysctl)",
                extra={"tcp_migrate_req": handover if handover is not None else "unknown"},
            )
        for c in self.children:
            self._spawn(c)
        announced = False
        draining = False
        while True:
            if self.stopping and not draining:
                draining = True
                log.info("stopping the server processes", extra={"grace_s": self.cfg.grace_s})
                self._forward(signal.SIGTERM)
                self.kill_at = time.monotonic() + self.cfg.grace_s + KILL_MARGIN_S
            if self.hup:
                self.hup = False
                self._forward(signal.SIGHUP)
            fds = [c.ready_fd for c in self.children if c.ready_fd >= 0]
            try:
                readable = select.select(fds, [], [], 0.2)[0] if fds else []
            except InterruptedError:
                readable = []
            if not fds:
                time.sleep(0.2)
            for c in self.children:
                if c.ready_fd in readable:
                    data = os.read(c.ready_fd, 4096)  # "ready\n" once, then one byte per heartbeat
                    if not data:  # the child closed it: it is exiting (poll() below sees it)
                        os.close(c.ready_fd)
                        c.ready_fd = -1
                    elif c.proc is not None:
                        c.last_beat = time.monotonic()
                        if not c.ready and b"ready" in data:
                            c.ready = c.ever_ready = True
                            log.info("server process serving", extra={"server_process": c.index, "pid": c.proc.pid})
            if not announced and all(c.ready for c in self.children):
                announced = True
                log.info("serving", extra={"processes": self.n, **self.ports})
            now = time.monotonic()
            if not draining:
                self._watchdog(now)
            for c in self.children:
                if c.proc is None:
                    if not draining and c.restart_at and now >= c.restart_at:
                        self._spawn(c)
                    continue
                rc = c.proc.poll()
                if rc is None:
                    continue
                pid = c.proc.pid
                c.proc = None
                if c.ready_fd >= 0:
                    os.close(c.ready_fd)
                    c.ready_fd = -1
                self._mark_dead(pid)
                if draining:
                    log.info("server process stopped", extra={"server_process": c.index, "pid": pid, "exit_code": rc})
                    continue
                if not c.ever_ready:  # it never served: the same failure would repeat; stop as one server would
                    log.error("server process failed at start", extra={"server_process": c.index, "exit_code": rc})
                    self.exit_code = rc if rc and rc > 0 else 1
                    self.stopping = True
                    continue
                c.restarts += 1
                self.restart_counter.inc()
                quick = now - c.started < MIN_UPTIME_S
                c.backoff_s = min(MAX_BACKOFF_S, c.backoff_s * 2) if quick else 1.0
                c.restart_at = now + (c.backoff_s if quick else 0.0)
                c.ready = False
                log.warning(
                    "server process exited; restarting it",
                    extra={
                        "server_process": c.index,
                        "pid": pid,
                        "exit_code": rc,
                        "reason": "stuck" if c.stuck_kill_at else "exited",
                        "restarts": c.restarts,
                        "in_s": round(c.restart_at - now, 1),
                    },
                )
            if draining:
                if all(c.proc is None for c in self.children):
                    break
                if now >= self.kill_at:
                    log.error("server processes did not stop in time; killing them")
                    self._forward(signal.SIGKILL)
                    self.kill_at = now + 5.0
        return self.exit_code

    def _watchdog(self, now: float) -> None:
        """Kill (after a stack dump) a serving child whose event loop has not beaten for
        `process_watchdog_s`; the restart path then treats it as one that died."""
        limit = self.cfg.process_watchdog_s
        if limit <= 0:
            return
        for c in self.children:
            if c.proc is None or not c.ready or c.proc.poll() is not None:
                continue
            if c.stuck_kill_at:
                if now >= c.stuck_kill_at:
                    with contextlib.suppress(ProcessLookupError):
                        c.proc.kill()
                continue
            silent = now - c.last_beat
            if silent > limit:
                log.error(
                    "server process stuck: its event loop has not run; dumping its stacks and killing it",
                    extra={"server_process": c.index, "pid": c.proc.pid, "silent_s": round(silent, 1)},
                )
                c.stuck_kill_at = now + STACK_DUMP_S
                with contextlib.suppress(ProcessLookupError):
                    c.proc.send_signal(signal.SIGUSR1)
                    # a stopped process (SIGSTOP, a frozen container) takes the SIGUSR1 only once it
                    # runs: continue it so that its stacks are written too; it is killed either way
                    c.proc.send_signal(signal.SIGCONT)

    def _mark_dead(self, pid: int) -> None:
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(self.metrics_dir))

    def close(self) -> None:
        for c in self.children:
            if c.proc is not None and c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait(10)
        for h in self.holds:
            h.close()
        if self._own_metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)


def run_supervisor(cfg: ServerConfig) -> int:
    """Run `cfg.process_count` server processes until SIGTERM / SIGINT; the exit status."""
    sup = Supervisor(cfg)
    try:
        sup.prepare()
        return sup.run()
    except GroupError as e:
        print(f"xaiserve serve: {e}", file=sys.stderr)
        return 2
    finally:
        sup.close()


# ------------------------------------------------------------------------------------- child
class _ProcessIndex(logging.Filter):
    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.server_process = self.index  # in every JSON log line of a child
        return True


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the supervisor died before prctl
        os.kill(os.getpid(), signal.SIGTERM)


def child_main() -> int:
    spec = json.loads(os.environ.pop(CHILD_ENV))
    _die_with_parent(int(spec["parent"]))
    from xaiserve.service.config import load_config

    cfg = load_config(None, env={}, **spec["settings"])
    from xaiserve.service.logs import setup_logging

    setup_logging(cfg.log_level, cfg.log_json)
    for h in logging.getLogger().handlers:
        h.addFilter(_ProcessIndex(int(spec["index"])))
    import asyncio

    from xaiserve.devices import DeviceUnavailable
    from xaiserve.service.jobs.factory import VolatileQueue
    from xaiserve.service.registry import ManifestError
    from xaiserve.service.server import serve_forever

    fd = int(spec["ready_fd"])
    # the supervisor's watchdog sends SIGUSR1 to a stuck child: every thread's stack to stderr (the
    # log), written by faulthandler's C handler, which needs no event loop and no GIL holder's help
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    def ready(_rs: Any) -> None:
        os.write(fd, b"ready\n")
        os.set_blocking(fd, False)  # a heartbeat never blocks the loop (the supervisor reads them)
        loop = asyncio.get_running_loop()

        def beat() -> None:
            try:
                os.write(fd, b".")
            except BlockingIOError:  # the pipe is full: the supervisor is behind; the next one counts
                pass
            except OSError:  # the supervisor is gone (PR_SET_PDEATHSIG stops this process)
                return
            loop.call_later(HEARTBEAT_S, beat)

        loop.call_later(HEARTBEAT_S, beat)

    try:
        asyncio.run(serve_forever(cfg, ready))
    except (VolatileQueue, ManifestError, DeviceUnavailable) as e:
        print(f"xaiserve serve: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
