"""`xaiserve worker`: a job-worker process for a shared queue (Redis, or a SQLite file on one host).

    xaiserve worker --queue redis://redis:6379/0 --store model_store --methods relax,ablation_path \
        --metrics-port 9101 --concurrency 1 --device auto

It loads models lazily through service.registry.Registry (first job that needs one), takes jobs of
its methods, heart-beats and reports progress, and exposes /metrics (per-worker jobs run and run
time, plus queue depth and oldest-job age read from the shared store). SIGTERM/SIGINT: take no new
job; the running one may finish within --grace-s, otherwise it is handed back to the queue at its
next check_cancelled; then exit 0. A worker killed outright (SIGKILL, OOM, node loss) stops
heart-beating and its job is claimed by another worker after --claim-idle-s.

On start it prints one JSON line to stdout, {"event": "worker ready", "worker", "methods",
"metrics_port", "queue"}, for supervisors and tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("xaiserve.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """The worker's settings: defaults < --config file < environment (XAISERVE_QUEUE,
    XAISERVE_MODEL_STORE) < flags, read by the server's parser (service.config.parse_setting)."""

    queue: str = ""
    model_store: str = "model_store"
    methods: tuple[str, ...] = ("relax", "ablation_path")
    concurrency: int = 1
    device: str = "auto"  # cpu, cuda, cuda:N or auto (xaiserve.devices): torch modules and ONNX Runtime's CUDA device
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast of frozen-model forwards
    batch_by_memory: bool = True  # on a GPU, batch sizes of jobs that set none from free device memory
    torch_threads: int = 0
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9101
    worker_id: str = ""
    max_queued: int | None = None
    result_ttl_s: float | None = None
    claim_idle_s: float | None = None
    heartbeat_s: float | None = None
    max_attempts: int | None = None
    progress_min_interval_s: float | None = None
    grace_s: float | None = None
    allow_volatile_queue: bool = False  # start on a Redis that does not persist (its restart loses the jobs)
    log_level: str = "INFO"
    log_json: bool = True


# Only these two come from the environment: the other XAISERVE_* variables are the server's (a
# gateway and a worker may share one environment, e.g. XAISERVE_METRICS_PORT).
WORKER_ENV = ("queue", "model_store")


def _flag(name: str):
    """argparse `type=` for a setting: config.parse_setting, the parser of the config file and the
    environment too, so a value is accepted or refused the same way whatever its source."""
    from xaiserve.service.config import flag_name, parse_setting

    hint = typing.get_type_hints(WorkerConfig)[name]

    def convert(text: str):
        try:
            return parse_setting(name, text, hint, f"flag {flag_name(name)}")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    convert.__name__ = name  # argparse names the type in its own messages
    return convert


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xaiserve worker", description=__doc__.split("\n\n")[0])
    # default None = not given: the config file, the environment or WorkerConfig's default applies
    p.add_argument("--config", default=None, help="YAML or JSON file of worker settings (WorkerConfig field names)")
    p.add_argument(
        "--queue",
        type=_flag("queue"),
        help="redis://host:port/db (or sqlite:///path/jobs.sqlite shared on one host); env XAISERVE_QUEUE",
    )
    p.add_argument(
        "--store",
        "--model-store",
        dest="store",
        type=_flag("model_store"),
        help="model store folder (default ./model_store); env XAISERVE_MODEL_STORE",
    )
    # kept as text: the list rule of parse_setting splits it (as it does XAISERVE_* and file values)
    p.add_argument(
        "--methods",
        help="comma-separated job methods: relax, ablation_path, or module:Class (default relax,ablation_path)",
    )
    p.add_argument(
        "--concurrency", type=_flag("concurrency"), help="jobs run at once in this process (threads; default 1)"
    )
    p.add_argument(
        "--device", type=_flag("device"), help="auto (CUDA when present, else CPU), cpu, cuda or cuda:N (default auto)"
    )
    p.add_argument(
        "--precision",
        type=_flag("precision"),
        help="autocast of frozen-model forwards: auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16",
    )
    p.add_argument(
        "--batch-by-memory",
        dest="batch_by_memory",
        type=_flag("batch_by_memory"),
        help="on a GPU, size RELAX / ablation batches by free device memory when a job sets none (default true)",
    )
    p.add_argument(
        "--torch-threads", type=_flag("torch_threads"), help="torch intra-op threads (0: leave torch's default)"
    )
    p.add_argument(
        "--metrics-host",
        type=_flag("metrics_host"),
        help="bind address of /metrics (default 127.0.0.1; 0.0.0.0 in containers)",
    )
    p.add_argument(
        "--metrics-port", type=_flag("metrics_port"), help="default 9101; 0 picks a free port, -1 disables /metrics"
    )
    p.add_argument("--worker-id", type=_flag("worker_id"), help="default: worker@HOST:PID")
    for name in (
        "max_queued",
        "result_ttl_s",
        "claim_idle_s",
        "heartbeat_s",
        "max_attempts",
        "progress_min_interval_s",
    ):
        p.add_argument("--" + name.replace("_", "-"), type=_flag(name))
    p.add_argument("--grace-s", type=_flag("grace_s"), help="SIGTERM: time the running job may take to finish")
    p.add_argument(
        "--allow-volatile-queue",
        dest="allow_volatile_queue",
        action="store_const",
        const=True,
        default=None,
        help="start even when the Redis queue neither appends nor snapshots (a Redis restart loses every job)",
    )
    p.add_argument("--log-level", type=_flag("log_level"))
    p.add_argument("--log-json", dest="log_json", action="store_const", const=True, default=None)
    p.add_argument("--no-log-json", dest="log_json", action="store_const", const=False)
    return p


def load_worker_config(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> WorkerConfig:
    """Flags, --config file and environment as a WorkerConfig; a bad value is a ConfigError (or,
    for a flag, argparse's exit 2) naming the setting and its source."""
    from xaiserve.service.config import ConfigError, gather

    args = _parser().parse_args(argv)
    flags = {f.name: getattr(args, "store" if f.name == "model_store" else f.name) for f in fields(WorkerConfig)}
    values, sources = gather(
        WorkerConfig, file=args.config, env=os.environ if env is None else env, env_settings=WORKER_ENV, flags=flags
    )
    cfg = WorkerConfig(**values)
    if not cfg.queue:
        raise ConfigError(
            "--queue is required (redis://host:port/db or sqlite:///path); or set XAISERVE_QUEUE", "queue"
        )
    if cfg.concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1 (from {sources.get('concurrency')})", "concurrency")
    if not cfg.methods:
        raise ConfigError(f"--methods names no method (from {sources.get('methods', 'the default')})", "methods")
    from xaiserve.devices import check_device_setting

    try:
        check_device_setting(cfg.device)
    except ValueError as e:
        raise ConfigError(f"{e} (from {sources.get('device', 'the default')})", "device") from None
    return cfg


def _options(args: WorkerConfig):
    from xaiserve.service.jobs.options import JobOptions

    kw: dict[str, Any] = {
        k: v
        for k, v in {
            "max_queued": args.max_queued,
            "result_ttl_s": args.result_ttl_s,
            "claim_idle_s": args.claim_idle_s,
            "heartbeat_s": args.heartbeat_s,
            "max_attempts": args.max_attempts,
            "progress_min_interval_s": args.progress_min_interval_s,
            "stop_grace_s": args.grace_s,
        }.items()
        if v is not None
    }
    if "claim_idle_s" in kw and "heartbeat_s" not in kw:
        kw["heartbeat_s"] = min(JobOptions.heartbeat_s, kw["claim_idle_s"] / 3.0)
    return JobOptions(embedded_workers=0, **kw)


def main(argv: list[str] | None = None) -> int:
    try:
        args = load_worker_config(argv)
    except ValueError as e:
        print(f"xaiserve worker: {e}", file=sys.stderr)
        return 2
    from xaiserve.service.logs import setup_logging

    setup_logging(args.log_level, args.log_json)
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)

    from xaiserve.service.jobs.backend import worker_identity
    from xaiserve.service.jobs.factory import open_backend
    from xaiserve.service.jobs.methods import default_methods
    from xaiserve.service.jobs.runner import Housekeeper, JobWorker, count
    from xaiserve.service.registry import Registry, RegistryConfig

    try:
        options = _options(args)
        methods = default_methods(list(args.methods))
        from xaiserve.devices import resolve_device
        from xaiserve.service import gpu_metrics

        device = resolve_device(args.device)  # DeviceUnavailable (a RuntimeError): cuda asked for, none present
        registry = Registry(
            RegistryConfig(
                store=Path(args.model_store).expanduser(),
                prefer_cuda=args.device != "cpu",
                warmup=True,
                device=str(device),
                precision=args.precision,
                batch_by_memory=args.batch_by_memory,
            )
        )
        gpu_metrics.register(str(device))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"xaiserve worker: {e}", file=sys.stderr)
        return 2
    from xaiserve.service.modelstore import store_problem

    store = registry.store.resolve()
    log.info("model store", extra={"model_store": str(store), "models": len(registry.entries())})
    problem = store_problem(store, len(registry.entries()))
    if problem:  # loudly: every job of this worker would fail with NOT_FOUND
        log.warning(problem, extra={"model_store": str(store)})
        print(f"xaiserve worker: WARNING: {problem}", file=sys.stderr, flush=True)
    try:
        backend = open_backend(args.queue, options)
    except ValueError as e:
        print(f"xaiserve worker: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. Redis unreachable: exit non-zero so the supervisor restarts us
        print(f"xaiserve worker: cannot open the job queue: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    from xaiserve.service.jobs.factory import VolatileQueue, check_durability

    try:
        check_durability(backend, allow_volatile=args.allow_volatile_queue)
    except VolatileQueue as e:
        print(f"xaiserve worker: {e}", file=sys.stderr)
        backend.close()
        return 2
    backend.observer = count
    ident = args.worker_id or worker_identity("worker")

    stop, hand_back = threading.Event(), threading.Event()

    def on_signal(signum, _frame) -> None:
        log.info("signal received; finishing the running job", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    mport = -1
    http = None
    if args.metrics_port >= 0:
        from xaiserve.service.httpd import BoundedCheck, OpsServer

        # /metrics, /healthz (the process runs), /readyz (the queue answers); 404 elsewhere
        http = OpsServer(
            args.metrics_host,
            args.metrics_port,
            live={"process": lambda: (True, "ok")},
            ready={"queue": BoundedCheck(backend.ping, 1.0, f"the job queue ({backend.kind})")},
        ).start()
        mport = http.port

    workers = [
        JobWorker(
            backend,
            methods,
            registry,
            options,
            ident if args.concurrency == 1 else f"{ident}#{i}",
            stop=stop,
            hand_back=hand_back,
        )
        for i in range(args.concurrency)
    ]
    threads = [threading.Thread(target=w.run, name=f"job-worker-{i}", daemon=True) for i, w in enumerate(workers)]
    house = Housekeeper(backend, options, ident)

    def housekeeping() -> None:
        while not stop.wait(house.interval_s):
            try:
                house.tick()
            except Exception as e:  # noqa: BLE001 - keep going through store outages
                log.warning("housekeeping failed", extra={"error": repr(e)})

    try:
        house.tick()
    except backend.transient_errors as e:
        log.warning("job store unreachable at start; retrying in the loop", extra={"error": repr(e)})
    for t in threads:
        t.start()
    hk = threading.Thread(target=housekeeping, name="housekeeping", daemon=True)
    hk.start()
    print(
        json.dumps(
            {
                "event": "worker ready",
                "worker": ident,
                "methods": sorted(methods),
                "metrics_port": mport,
                "queue": backend.kind,
            }
        ),
        flush=True,
    )
    log.info(
        "worker ready",
        extra={
            "worker": ident,
            "methods": sorted(methods),
            "metrics_port": mport,
            "device": str(registry.device),
            "gpus": gpu_metrics.gpu_names(),
        },
    )

    while not stop.wait(0.5):
        if not any(t.is_alive() for t in threads):
            log.error("all worker threads exited")
            break
    # Graceful stop: the running job may finish within the grace period, then it is handed back.
    stop.set()
    try:
        backend.wake_workers(sorted(methods), len(threads))  # idle threads leave their wait at once
    except backend.transient_errors:
        pass
    end = time.monotonic() + options.stop_grace_s
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()))
    if any(t.is_alive() for t in threads):
        hand_back.set()
        end = time.monotonic() + 10.0
        for t in threads:
            t.join(timeout=max(0.0, end - time.monotonic()))
    busy = [w.current.job_id for w in workers if w.current is not None]
    if busy:
        log.warning("jobs still running at exit; they will be recovered after claim_idle_s", extra={"jobs": busy})
    else:
        backend.close()
    if http is not None:
        http.shutdown()
    log.info("worker stopped", extra={"worker": ident})
    return 0


if __name__ == "__main__":
    sys.exit(main())
