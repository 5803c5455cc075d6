"""Durable, cancellable jobs for the slow explanations (RELAX, optimised ablation paths).

contract.py      JobMethod / JobContext: what a job method implements (handlers/*/job.py)
options.py       JobOptions (frozen dataclass of queue settings)
backend.py       JobBackend interface and its contract (fenced claims, events with sequences)
sqlite_backend   the embedded default: one SQLite file in WAL mode
redis_backend    the distributed queue: Redis sorted sets + a Streams consumer group as leases
runner.py        the worker loop (embedded threads and `xaiserve worker` processes), housekeeping
service.py       JobService: submit / watch / get / cancel, start / stop
grpc_adapter.py  JobServicerMixin: the four job RPCs for grpc.aio
factory.py       build_job_service(queue_url, registry, options, methods=None)
methods.py       default_methods(): "relax", "ablation_path" (imported lazily, errors raised)
metrics.py       Prometheus metrics of the queue and its workers
"""
