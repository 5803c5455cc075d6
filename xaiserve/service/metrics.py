"""Prometheus metrics of the gRPC gateway (prometheus_client, default registry, one HTTP port).

With `processes` > 1 (service/supervisor.py) every server process writes its values to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and /metrics, answered by any of
them, aggregates the group (`scrape_registry`): counters and histograms summed over every process
that ever ran, gauges by their `multiprocess_mode` (in-flight, queues, streams, processes: summed
over the live processes; serving and load times: their maximum). Info metrics and the GPU collector
are the answering process's (the same in every process of the group).

Labels stay low-cardinality: rpc names, resolved model ids ("unknown" for names not in the store),
status code names, stream events. Never a request id, job id, user or token.
"""

from __future__ import annotations

import platform
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, Info, start_http_server

# Millisecond-resolution buckets: the fast path answers in 1-50 ms, jobs take seconds.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128, 256, 512)
# Streaming calls last seconds to a day; in the request-latency buckets they all landed in +Inf.
STREAM_DURATION_BUCKETS = (
    1.0,
    5.0,
    15.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
    14400.0,
    43200.0,
    86400.0,
)

REQUEST_LATENCY = Histogram(
    "xaiserve_request_latency_seconds",
    "End-to-end server-side latency per unary RPC and model",
    ["rpc", "model"],
    buckets=LATENCY_BUCKETS,
)
STREAM_DURATION = Histogram(
    "xaiserve_stream_duration_seconds",
    "Duration of streaming RPCs (StreamExplain, WatchJob), open to end",
    ["rpc", "model"],
    buckets=STREAM_DURATION_BUCKETS,
)
REQUESTS = Counter("xaiserve_requests", "Finished RPCs by status code", ["rpc", "model", "code"])
INFLIGHT = Gauge("xaiserve_inflight_requests", "RPCs being served", ["rpc"], multiprocess_mode="livesum")
QUEUE_WAIT = Histogram(
    "xaiserve_queue_wait_seconds",
    "Time a request waited for its micro-batch to start",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INFERENCE = Histogram(
    "xaiserve_inference_seconds",
    "Model call time per micro-batch",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("xaiserve_batch_size", "Requests per micro-batch", ["model"], buckets=BATCH_BUCKETS)
BATCHER_QUEUE = Gauge(
    "xaiserve_batcher_queue_depth", "Requests waiting for a micro-batch", ["model"], multiprocess_mode="livesum"
)
STREAM_EVENTS = ("received", "answered", "failed", "dropped")
STREAM_FRAMES = Counter(
    "xaiserve_stream_frames",
    "StreamExplain frames by event (received, answered, failed = answered with an error "
    "status, dropped = replaced by a newer frame)",
    ["model", "event"],
)
FRAME_LATENCY = Histogram(
    "xaiserve_frame_latency_seconds",
    "StreamExplain, per answered frame: received to answer sent",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
FRAME_QUEUE_WAIT = Histogram(
    "xaiserve_frame_queue_wait_seconds",
    "StreamExplain, per answered frame: received to work starting on it (waiting behind the stream's earlier frames)",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
ACTIVE_STREAMS = Gauge("xaiserve_active_streams", "Open StreamExplain calls", multiprocess_mode="livesum")
MODEL_LOAD = Gauge(
    "xaiserve_model_load_seconds", "Time to load and warm a model", ["model"], multiprocess_mode="livemax"
)
BUILD = Info("xaiserve_build", "Build information")
SERVING = Gauge("xaiserve_serving", "1 while the server accepts calls, 0 while draining", multiprocess_mode="livemax")
# 1 per server process while it serves: with `processes` > 1 the sum over the group (multiprocess mode)
PROCESSES = Gauge("xaiserve_server_processes", "Server processes serving on this port", multiprocess_mode="livesum")


def init_stream_series(models: list[str]) -> None:
    """Create the per-model stream series at 0 (a rate() over a series that appears with the first
    stream misses its first increments, and dashboards show "no data" instead of 0)."""
    for m in models:
        for ev in STREAM_EVENTS:
            STREAM_FRAMES.labels(m, ev)
        FRAME_LATENCY.labels(m)
        FRAME_QUEUE_WAIT.labels(m)
        STREAM_DURATION.labels("StreamExplain", m)


def set_build_info(version: str, git: str) -> None:
    import onnxruntime
    import torch

    BUILD.info(
        {
            "version": version,
            "git": git,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
    )


def scrape_registry() -> Any:
    """What /metrics of the gateway exports: the default registry, or in multiprocess mode
    (PROMETHEUS_MULTIPROC_DIR set) the aggregate of every process's files plus this process's
    Info metrics and custom collectors (which multiprocess mode does not write to files)."""
    import os

    from prometheus_client import REGISTRY, CollectorRegistry

    from xaiserve.service import gpu_metrics

    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    from prometheus_client.multiprocess import MultiProcessCollector

    reg = CollectorRegistry()
    MultiProcessCollector(reg)

    class _Local:
        def collect(self):  # noqa: ANN202 - prometheus_client's collector protocol
            yield from BUILD.collect()
            yield from gpu_metrics.DEVICE_INFO.collect()
            for c in list(gpu_metrics._registered.values()):  # the NVML collector, when a GPU was found
                if c is not None:
                    yield from c.collect()

    reg.register(_Local())  # type: ignore[arg-type]
    return reg


def start_metrics_http(host: str, port: int) -> Any:
    """Start the /metrics HTTP server in a thread; returns (server, thread). Port 0 picks one."""
    server, thread = start_http_server(port, addr=host)
    return server, thread
