"""Build the job service from a queue URL: `sqlite:///path/jobs.sqlite` (default) or `redis://host:port/db`."""

from __future__ import annotations

import logging
from typing import Mapping

from xaiserve.service.jobs.backend import JobBackend
from xaiserve.service.jobs.contract import JobMethod
from xaiserve.service.jobs.options import JobOptions
from xaiserve.service.jobs.service import JobService

log = logging.getLogger("xaiserve.jobs")


class VolatileQueue(ValueError):
    """The job store would lose every job when it restarts, and that was not allowed."""


def check_durability(backend: JobBackend, *, allow_volatile: bool) -> str:
    """Refuse (VolatileQueue) a store that does not persist, unless allowed (then log a warning).
    Returns how the store persists, for the start-up log."""
    durable, how = backend.durability()
    if durable:
        return how
    if not allow_volatile:
        raise VolatileQueue(
            f"the {backend.kind} job queue does not persist: {how}. A restart of it would lose every queued and "
            "running job. Enable `appendonly yes` (or an RDB save policy) on the Redis server, or start with "
            "--allow-volatile-queue to accept that risk"
        )
    log.warning(
        "the job queue does not persist; a restart of it loses every job (allowed by --allow-volatile-queue)",
        extra={"backend": backend.kind, "persistence": how},
    )
    return how


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


def build_job_service(
    queue: str,
    registry,
    options: JobOptions | None = None,
    methods: Mapping[str, JobMethod] | None = None,
    *,
    allow_volatile: bool = False,
    admins: frozenset[str] | set[str] | tuple[str, ...] = (),
) -> JobService:
    """The JobService for a queue URL; methods default to service.jobs.methods.default_methods().

    The service owns the backend: `await svc.start()` recovers and starts workers, `await svc.stop()`
    drains them and closes the store. With a Redis queue, set options.embedded_workers=0 for gateways
    that should only queue (workers then run as `xaiserve worker` processes). A Redis that does not
    persist is refused (VolatileQueue) unless `allow_volatile`. `admins` are the principals that see
    every job.
    """
    options = options or JobOptions()
    if methods is None:
        from xaiserve.service.jobs.methods import default_methods

        methods = default_methods()
    backend = open_backend(queue, options)
    try:
        check_durability(backend, allow_volatile=allow_volatile)
    except VolatileQueue:
        backend.close()
        raise
    return JobService(backend, methods, registry, options, admins=admins)
