"""Build the job service from a queue URL: `sqlite:///path/jobs.sqlite` (default) or `redis://host:port/db`."""
from __future__ import annotations

from typing import Mapping

from xaiserve.service.jobs.backend import JobBackend
from xaiserve.service.jobs.contract import JobMethod
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.service import JobService


def open_backend(queue: str, options: JobOptions) -> JobBackend:
    """sqlite:///relative/path, sqlite:////absolute/path, redis://host:port/db[?prefix=xai], rediss://..., unix://..."""
    q = (queue or "").strip()
    if q.startswith("sqlite:"):
        from xaiserve.service.jobs.sqlite_backend import SqliteBackend, parse_sqlite_url

        return SqliteBackend(parse_sqlite_url(q), options)
    if q.startswith(("redis://", "rediss://", "unix://")):
        from xaiserve.service.jobs.redis_backend import RedisBackend, parse_redis_url

        url, prefix = parse_redis_url(q)
        return RedisBackend(url, options, prefix=prefix)
    raise ValueError(f"queue {queue!r} is neither sqlite:///path/jobs.sqlite nor redis://host:port/db")


def build_job_service(queue: str, registry, options: JobOptions | None = None,
                      methods: Mapping[str, JobMethod] | None = None) -> JobService:
    """The JobService for a queue URL; methods default to service.jobs.methods.default_methods().

    The service owns the backend: `await svc.start()` recovers and starts workers, `await svc.stop()`
    drains them and closes the store. With a Redis queue, set options.embedded_workers=0 for gateways
    that should only queue (workers then run as `xaiserve worker` processes).
    """
    options = options or JobOptions()
    if methods is None:
        from xaiserve.service.jobs.methods import default_methods

        methods = default_methods()
    backend = open_backend(queue, options)
    return JobService(backend, methods, registry, options)
