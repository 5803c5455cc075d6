"""Start the real xaiserve server for tests: in a background thread (fast) or as a subprocess.

with running_server(store=path, max_delay_ms=1) as srv:
    srv.stub().Explain(...)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.config import ServerConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    address: str
    metrics_url: str
    config: ServerConfig
    running: object = None  # service.server.RunningServer (thread mode)
    loop: asyncio.AbstractEventLoop | None = None
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    _channels: list = field(default_factory=list)

    def channel(self, **options) -> grpc.Channel:
        ch = grpc.insecure_channel(self.address, options=list(options.items()))
        self._channels.append(ch)
        return ch

    def stub(self) -> pb_grpc.ExplainerStub:
        return pb_grpc.ExplainerStub(self.channel())

    def call_in_loop(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close_channels(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()


@contextlib.contextmanager
def running_server(store: Path | str | None = None, **overrides) -> Iterator[ServerHandle]:
    """The real server in a thread with its own event loop, on free localhost ports."""
    from xaiserve.service.server import start_server

    tmp_state = overrides.pop("state_dir", None)
    if tmp_state is None:
        import tempfile

        tmp_state = tempfile.mkdtemp(prefix="xaiserve-state-")
    kw = dict(port=0, metrics_port=0, state_dir=str(tmp_state), grace_s=5.0)
    if store is not None:
        kw["model_store"] = str(store)
    kw.update(overrides)
    cfg = load_config(None, env={}, **kw)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict = {}

    def run():
        asyncio.set_event_loop(loop)

        async def main():
            try:
                box["rs"] = await start_server(cfg)
            except BaseException as e:  # surface start-up errors to the test
                box["err"] = e
            finally:
                started.set()

        loop.run_until_complete(main())
        loop.run_forever()

    th = threading.Thread(target=run, daemon=True, name="xaiserve-test-server")
    th.start()
    started.wait(120)
    if "err" in box:
        raise box["err"]
    rs = box["rs"]
    h = ServerHandle(f"127.0.0.1:{rs.port}", f"http://127.0.0.1:{rs.metrics_port}/metrics", cfg, rs, loop)
    try:
        yield h
    finally:
        h.close_channels()
        if not getattr(rs, "_drained", False):
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(rs.drain(0.5), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        th.join(10)


@contextlib.contextmanager
def server_process(
    store: Path | str | None = None,
    *args: str,
    env: dict | None = None,
    ready_port: int | None = None,
    cwd: Path | str | None = None,
    **overrides,
) -> Iterator[ServerHandle]:
    """`xaiserve serve` as a real subprocess (for SIGTERM/drain tests); waits until health is SERVING
    (on `ready_port`, a plain health port, when the main port speaks TLS)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    port, mport = free_port(), free_port()
    cmd = [sys.executable, "-m", "xaiserve.service.cli", "serve", "--port", str(port), "--metrics-port", str(mport)]
    if store is not None:
        cmd += ["--model-store", str(store)]
    for k, v in overrides.items():
        cmd += ["--" + k.replace("_", "-"), str(v)]
    cmd += list(args)
    e = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
    import tempfile

    log_file = tempfile.NamedTemporaryFile(prefix="xaiserve-log-", suffix=".jsonl", delete=False)
    proc = subprocess.Popen(cmd, cwd=cwd or ROOT, env=e, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    h = ServerHandle(f"127.0.0.1:{port}", f"http://127.0.0.1:{mport}/metrics", ServerConfig(), process=proc)
    h.log_path = Path(log_file.name)
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {h.log_path.read_text()[-3000:]}")
            try:
                with grpc.insecure_channel(f"127.0.0.1:{ready_port}" if ready_port else h.address) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if r.status == health_pb2.HealthCheckResponse.SERVING:
                        break
            except grpc.RpcError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not become healthy in 120 s")
            time.sleep(0.2)
        yield h
    finally:
        h.close_channels()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log_file.close()


# DICOM result elements that differ between two encodings of the same result (fresh UIDs, times, lengths)
DICOM_PER_RESULT = {
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "MediaStorageSOPInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "ContributionDateTime",
    "DimensionOrganizationUID",
    "FileMetaInformationGroupLength",
}


def dicom_elements(ds, skip=DICOM_PER_RESULT, pre: str = "") -> dict:
    """A dataset flattened to {path: value} (sequences as `Keyword[i].`), elements named in `skip` left out:
    two encodings of one result compare equal iff these dicts do."""
    out = {}
    for e in ds:
        if e.keyword in skip:
            continue
        if e.VR == "SQ":
            for i, item in enumerate(e.value):
                out.update(dicom_elements(item, skip, f"{pre}{e.keyword}[{i}]."))
        else:
            out[pre + (e.keyword or str(e.tag))] = e.value if isinstance(e.value, bytes) else str(e.value)
    return out
