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
from pathlib import Path

log = logging.getLogger("xaiserve.worker")


def _parser() -> argparse.ArgumentParser:
    from xaiserve.service.modelstore import DEFAULT_STORE

    p = argparse.ArgumentParser(prog="xaiserve worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", default=os.environ.get("XAISERVE_QUEUE", ""),
                   help="redis://host:port/db (or sqlite:///path/jobs.sqlite shared on one host); env XAISERVE_QUEUE")
    p.add_argument("--store", default=os.environ.get("XAISERVE_MODEL_STORE", str(DEFAULT_STORE)), help="model store")
    p.add_argument("--methods", default="relax,ablation_path",
                   help="comma-separated job methods: relax, ablation_path, or module:Class")
    p.add_argument("--concurrency", type=int, default=1, help="jobs run at once in this process (threads)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA when present, else CPU")
    p.add_argument("--torch-threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--metrics-host", default="127.0.0.1", help="bind address of /metrics (0.0.0.0 in containers)")
    p.add_argument("--metrics-port", type=int, default=9101, help="0 picks a free port, -1 disables /metrics")
    p.add_argument("--worker-id", default="", help="default: worker@HOST:PID")
    p.add_argument("--max-queued", type=int, default=None)
    p.add_argument("--result-ttl-s", type=float, default=None)
    p.add_argument("--claim-idle-s", type=float, default=None)
    p.add_argument("--heartbeat-s", type=float, default=None)
    p.add_argument("--max-attempts", type=int, default=None)
    p.add_argument("--progress-min-interval-s", type=float, default=None)
    p.add_argument("--grace-s", type=float, default=None, help="SIGTERM: time the running job may take to finish")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", dest="log_json", action="store_true", default=True)
    p.add_argument("--no-log-json", dest="log_json", action="store_false")
    return p


def _options(args):
    from xaiserve.service.jobs.options import JobOptions

    kw = {k: v for k, v in {
        "max_queued": args.max_queued, "result_ttl_s": args.result_ttl_s, "claim_idle_s": args.claim_idle_s,
        "heartbeat_s": args.heartbeat_s, "max_attempts": args.max_attempts,
        "progress_min_interval_s": args.progress_min_interval_s, "stop_grace_s": args.grace_s,
    }.items() if v is not None}
    if "claim_idle_s" in kw and "heartbeat_s" not in kw:
        kw["heartbeat_s"] = min(JobOptions.heartbeat_s, kw["claim_idle_s"] / 3.0)
    return JobOptions(embedded_workers=0, **kw)


def _prefer_cuda(device: str) -> bool:
    if device == "cpu":
        return False
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda, but torch sees no CUDA device")
    return True


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from xaiserve.service.logs import setup_logging

    setup_logging(args.log_level, args.log_json)
    if not args.queue:
        print("xaiserve worker: --queue is required (redis://host:port/db or sqlite:///path)", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print("xaiserve worker: --concurrency must be >= 1", file=sys.stderr)
        return 2
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
        methods = default_methods([m for m in args.methods.split(",") if m.strip()])
        registry = Registry(RegistryConfig(store=Path(args.store), prefer_cuda=_prefer_cuda(args.device), warmup=True))
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"xaiserve worker: {e}", file=sys.stderr)
        return 2
    try:
        backend = open_backend(args.queue, options)
    except ValueError as e:
        print(f"xaiserve worker: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - e.g. Redis unreachable: exit non-zero so the supervisor restarts us
        print(f"xaiserve worker: cannot open the job queue: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
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
        from prometheus_client import start_http_server

        http = start_http_server(args.metrics_port, addr=args.metrics_host)
        mport = http[0].server_port

    workers = [JobWorker(backend, methods, registry, options, ident if args.concurrency == 1 else f"{ident}#{i}",
                         stop=stop, hand_back=hand_back) for i in range(args.concurrency)]
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
    print(json.dumps({"event": "worker ready", "worker": ident, "methods": sorted(methods), "metrics_port": mport,
                      "queue": backend.kind}), flush=True)
    log.info("worker ready", extra={"worker": ident, "methods": sorted(methods), "metrics_port": mport})

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
        http[0].shutdown()
    log.info("worker stopped", extra={"worker": ident})
    return 0


if __name__ == "__main__":
    sys.exit(main())
