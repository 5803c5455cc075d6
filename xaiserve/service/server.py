"""The gRPC server (grpc.aio): Explainer service, health, reflection, metrics, graceful drain."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from xaiserve.paths import code_version
from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service import metrics
from xaiserve.service.config import ServerConfig
from xaiserve.service.fastpath import FastPath
from xaiserve.service.modelstore import store_problem
from xaiserve.service.registry import MASK_KINDS, Registry, RegistryConfig
from xaiserve.service.reload import with_availability
from xaiserve.service.rpc import Observed, add_service, observed_stream, observed_unary
from xaiserve.service.streams import StreamHub, StreamSession

log = logging.getLogger("xaiserve.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Explainer"].full_name
VERSION = "0.1.0"


def _timeout(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


def _job_mixin() -> type:
    from xaiserve.service.jobs.grpc_adapter import JobServicerMixin

    return JobServicerMixin


class ExplainerServicer(_job_mixin(), pb_grpc.ExplainerServicer):  # type: ignore[misc]
    """Registered by service.rpc.add_service (never-raising deserializers, admission before a
    request is parsed); Explain and Denoise answer bytes serialised off the event loop when large."""

    def __init__(
        self,
        registry: Registry,
        fast: FastPath,
        config: ServerConfig,
        jobs: Any,
        principals: Any = None,
        streams: StreamHub | None = None,
    ):
        self.registry, self.fast, self.config, self.jobs = registry, fast, config, jobs
        self.principals = principals
        self.streams = streams if streams is not None else StreamHub()  # open streams, for the drain notice

    async def Explain(self, request: pb.ExplainRequest, context) -> pb.ExplainResponse:
        async def go(obs: Observed):
            entry = self.registry.resolve(request.model)
            obs.model = entry.id
            return await self.fast.serialize(await self.fast.explain(request, timeout=_timeout(context), entry=entry))

        return await observed_unary("Explain", context, go)

    async def Denoise(self, request: pb.DenoiseRequest, context) -> pb.DenoiseResponse:
        async def go(obs: Observed):
            entry = self.registry.resolve(request.model)
            obs.model = entry.id
            return await self.fast.serialize(await self.fast.denoise(request, timeout=_timeout(context), entry=entry))

        return await observed_unary("Denoise", context, go)

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        async def go(obs: Observed):
            return list_models(self.registry, request.kind, self.jobs)

        return await observed_unary("ListModels", context, go)

    async def StreamExplain(self, request_iterator, context) -> AsyncIterator[pb.ExplainFrameResult]:
        # frames take admission slots as unary calls do, per principal when that bound is set
        who = self.principals.of(context) if self.principals is not None and self.fast.admission.per_principal else ""
        session = StreamSession(self.fast, self.config, self.streams, context, principal=who)

        async def body(obs: Observed) -> AsyncIterator[pb.ExplainFrameResult]:
            metrics.ACTIVE_STREAMS.inc()
            try:
                async for res in session.run(request_iterator):
                    obs.model = session.model_label
                    yield res
            finally:
                obs.model = session.model_label
                metrics.ACTIVE_STREAMS.dec()

        async for res in observed_stream("StreamExplain", context, body):
            yield res


def list_models(registry: Registry, kind: str, jobs: Any = None) -> pb.ListModelsResponse:
    from xaiserve.service.errors import InvalidArgument, quote
    from xaiserve.service.registry import KINDS

    if kind and kind not in KINDS:
        raise InvalidArgument(f"kind {quote(kind)} is unknown; use one of {', '.join(KINDS)} or '' for all")
    # no job service (or one without a method) means SubmitJob refuses it: then it is not advertised
    job_methods = sorted(jobs.methods) if jobs is not None and hasattr(jobs, "methods") else []
    out = pb.ListModelsResponse()
    for e in registry.entries():
        if kind and e.kind != kind:
            continue
        methods = registry.methods(e, job_methods)
        card = ""
        if "card" in e.files and (registry.store / e.files["card"]).exists():
            card = (registry.store / e.files["card"]).read_text()
        out.models.append(
            pb.ModelInfo(
                name=e.name,
                version=e.version,
                kind=e.kind,
                input=pb.InputSpec(
                    height=e.input.height,
                    width=e.input.width,
                    channels=e.input.channels,
                    mean=list(e.input.mean),
                    std=list(e.input.std),
                    resize=e.input.resize,
                ),
                labels=list(e.labels),
                explains=e.explains,
                description=e.description,
                methods=methods,
                loaded=registry.loaded(e),
                card=card,
                output_dim=e.output_dim,
                default_method=e.default_method if e.default_method in methods else "",
            )
        )
    # then the manifest entries that are not served, with available = false and the reason
    return with_availability(out, registry, kind)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int
    health: health.aio.HealthServicer if hasattr(health, "aio") else Any  # type: ignore[valid-type]
    fast: FastPath
    jobs: Any
    registry: Registry
    config: ServerConfig
    _metrics_http: Any = None
    _health_server: Any = None
    watcher: Any = None  # service.reload.ManifestWatcher
    streams: StreamHub | None = None
    serving: Any = None  # threading.Event: set while serving, cleared when draining (readiness)

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting calls, report NOT_SERVING, let in-flight calls finish within the grace period."""
        grace = self.config.grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace})
        if self.watcher is not None:
            await self.watcher.stop()
        if self.streams is not None:  # a DrainNotice now; each stream ends itself just before `grace`
            self.streams.drain(grace)
        metrics.SERVING.set(0)
        metrics.PROCESSES.set(0)
        if self.serving is not None:
            self.serving.clear()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self._health_server is not None:
            await self._health_server.stop(0)
        if self.jobs is not None:
            await self.jobs.stop()
        await self.fast.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        log.info("stopped")


async def start_server(config: ServerConfig) -> RunningServer:
    store = Path(config.model_store).expanduser().resolve()  # a relative store is read from the working directory
    from xaiserve.devices import resolve_device
    from xaiserve.service import gpu_metrics

    device = resolve_device(config.device)  # RuntimeError at start when cuda is asked for and absent
    registry = Registry(
        RegistryConfig(
            store=store,
            intra_op_threads=config.intra_op_threads,
            prefer_cuda=config.prefer_cuda and config.device != "cpu",
            spiral_runtime=config.spiral_runtime,
            allow_spinning=config.ort_spinning,
            concurrent_calls=config.inference_threads,
            device=str(device),
            precision=config.precision,
            batch_by_memory=config.batch_by_memory,
        )
    )
    group = config.process_count  # > 1: one of the processes of `xaiserve serve --processes N` (service/supervisor.py)
    if group > 1 and config.intra_op_threads == 0:
        # auto intra-op threads: this process's share of the cores, not all of them in every process
        from xaiserve.service.registry import available_cores, serving_intra_op_threads

        onnx_models = sum(1 for e in registry.entries() if "onnx" in e.files)
        share = max(1, available_cores() // group)
        registry.config = dataclasses.replace(
            registry.config,
            intra_op_threads=serving_intra_op_threads(share, onnx_models, config.inference_threads),
        )
    gpu_metrics.register(str(device))
    log.info("device", extra={"device": str(device), "precision": config.precision, "gpus": gpu_metrics.gpu_names()})
    log.info("model store", extra={"model_store": str(store), "models": len(registry.entries())})
    problem = store_problem(store, len(registry.entries()))
    if problem:  # loudly: a server without models answers every call NOT_FOUND
        log.warning(problem, extra={"model_store": str(store)})
        print(f"xaiserve serve: WARNING: {problem}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    if config.load_models == "all":
        registry.load_all()
        for mid, s in registry.load_seconds.items():
            metrics.MODEL_LOAD.labels(mid).set(s)
    log.info(
        "models ready",
        extra={
            "models": [e.id for e in registry.entries()],
            "seconds": round(time.perf_counter() - t0, 3),
            "intra_op_threads": registry.onnx_intra_op_threads(),
            "ort_spinning": config.ort_spinning,
        },
    )
    metrics.init_stream_series([e.id for e in registry.entries() if e.kind in MASK_KINDS])
    metrics.set_build_info(VERSION, code_version())

    fast = FastPath(registry, config)
    # the image path's first-use costs (Pillow's plugins, the mask encoders) paid here, not by the
    # first frames of the first streams (FastPath.warm_image_path)
    fast.warm_image_path()
    from xaiserve.service.jobs.factory import build_job_service
    from xaiserve.service.jobs.methods import default_methods
    from xaiserve.service.jobs.options import JobOptions

    jobs = build_job_service(
        config.queue_url,
        registry,
        JobOptions(
            max_queued=config.job_max_queued, embedded_workers=config.job_workers, result_ttl_s=config.job_result_ttl_s
        ),
        methods=default_methods(settings={"relax": {"batch_size": config.relax_batch_size}}),
        allow_volatile=config.allow_volatile_queue,
        admins=config.job_admins,
    )
    await jobs.start()

    from xaiserve.service.security import Principals

    interceptors = []
    auth = None
    if config.tokens_file:
        from xaiserve.service.security import RedactTokens, TokenAuthInterceptor, load_tokens

        auth = TokenAuthInterceptor.from_path(config.tokens_file)
        interceptors.append(auth)
        redact = RedactTokens(load_tokens(config.tokens_file).keys())
        for h in logging.getLogger().handlers:
            h.addFilter(redact)
        if not config.tls_cert:
            log.warning("tokens_file is set without tls_cert: bearer tokens travel unencrypted; set tls_cert/tls_key")
    mb = config.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", mb),
            ("grpc.max_send_message_length", mb),
            # off for one process (a second server on a port in use fails to bind); on for the
            # processes of one group, which share the port (the kernel spreads connections over them)
            ("grpc.so_reuseport", 1 if group > 1 else 0),
            # calls grpc holds before our code takes them: beyond, it cancels new calls itself, in C,
            # when the event loop falls behind (see config.max_pending_calls)
            ("grpc.server.max_pending_requests", config.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", 2 * config.max_pending_calls),
        ],
    )
    principals = Principals(auth, config.job_admins)

    def admit(context):  # Explain / Denoise: refused at once when full, before the request is parsed
        return fast.admission.slot(principals.of(context) if fast.admission.per_principal else "")

    streams = StreamHub()
    servicer = ExplainerServicer(registry, fast, config, jobs, principals, streams)
    add_service(
        server,
        servicer,
        pb.DESCRIPTOR.services_by_name["Explainer"],
        pool=fast.cpu,
        admit={"Explain": admit, "Denoise": admit},
    )
    from xaiserve.service.oip import add_inference_service
    from xaiserve.service.reflection import enable_reflection

    # the Open Inference Protocol v2 on the same port, over the same registry, fast path and admission
    inference = add_inference_service(server, registry, fast, version=VERSION, admit=admit)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(
        server,
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, inference.service_name),
        (pb.DESCRIPTOR, health_pb2.DESCRIPTOR, inference.file),
    )
    addr = f"{config.host}:{config.port}"
    if config.tls_cert:
        from xaiserve.service.security import server_credentials

        port = server.add_secure_port(
            addr, server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca or None)
        )
    else:
        port = server.add_insecure_port(addr)
    if port == 0:
        raise RuntimeError(f"could not bind the gRPC port {addr}")
    await server.start()
    for svc in ("", SERVICE_NAME):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.SERVING)
    metrics.SERVING.set(1)
    metrics.PROCESSES.set(1)
    serving = threading.Event()  # per server: the metric is process-wide
    serving.set()
    inference.ready = serving.is_set
    health_server = None
    if config.health_port:
        from xaiserve.service.security import health_only_server

        health_server, _ = health_only_server(health_servicer, f"{config.health_host}:{config.health_port}")
        await health_server.start()
    http = None
    mport = -1
    if config.metrics_port >= 0:
        http = _ops_server(
            config,
            registry,
            jobs,
            asyncio.get_running_loop(),
            serving,
            servicer if config.web else None,
            (inference, principals) if config.oip_rest else None,
        )
        mport = http.port
    log.info(
        "serving",
        extra={
            "grpc": f"{config.host}:{port}",
            "metrics": f"{config.metrics_host}:{mport}",
            "tls": bool(config.tls_cert),
            "mtls": bool(config.tls_client_ca),
            "auth": bool(config.tokens_file),
            "queue": config.queue_url.split("://")[0],
        },
    )
    from xaiserve.service.reload import ManifestWatcher

    # models added, removed or changed in the manifest are swapped in without a restart (service/reload.py)
    watcher = ManifestWatcher(
        registry, fast, interval_s=config.reload_interval_s, load=config.load_models == "all", streams=streams
    )
    watcher.start()
    return RunningServer(
        server,
        port,
        mport,
        health_servicer,
        fast,
        jobs,
        registry,
        config,
        http,
        health_server,
        watcher,
        streams=streams,
        serving=serving,
    )


def _ops_server(
    config: ServerConfig,
    registry: Registry,
    jobs: Any,
    loop: asyncio.AbstractEventLoop,
    serving_flag: threading.Event,
    servicer: Any = None,
    oip: tuple[Any, Any] | None = None,
):
    """The HTTP port (service.httpd): /metrics, /healthz (the event loop answers), /readyz (serving,
    models loaded, job queue reachable); with `servicer`, the web viewer and its /api (service.web);
    with `oip` (the OIP servicer, the principals), the Open Inference Protocol's /v2 (service.oip_http)."""
    from xaiserve.service.httpd import BoundedCheck, OpsServer, loop_responsive

    def serving() -> tuple[bool, str]:
        return (True, "ok") if serving_flag.is_set() else (False, "draining")

    def models() -> tuple[bool, str]:
        if config.load_models != "all":
            return True, f"lazy loading ({len(registry.entries())} models in the store)"
        missing = [e.id for e in registry.entries() if "onnx" in e.files and not registry.loaded(e)]
        return (
            (False, f"not loaded: {', '.join(missing[:10])}")
            if missing
            else (True, f"{len(registry.entries())} loaded")
        )

    ready = {"serving": serving, "models": models}
    if jobs is not None:
        ready["queue"] = BoundedCheck(jobs.backend.ping, 1.0, f"the job queue ({jobs.backend.kind})")
    web = {}
    if servicer is not None:
        from xaiserve.service.web import mounts

        web = mounts(servicer, loop, serving_flag)
    keep: tuple[str, ...] = ()
    if oip is not None:
        from xaiserve.service import oip_http

        v2 = oip_http.mounts(oip[0], oip[1], config, loop, serving_flag)
        web.update(v2)
        keep = tuple(v2)
    ops = OpsServer(
        config.metrics_host,
        config.metrics_port,
        live={"event_loop": loop_responsive(loop)},
        ready=ready,
        mounts=web,
        keep_alive=keep,
        registry=metrics.scrape_registry(),
        reuse_port=config.process_count > 1,  # every process of a group answers the HTTP port too
    ).start()
    if web:
        log.info("web viewer", extra={"url": f"http://{config.metrics_host}:{ops.port}/"})
    return ops


async def serve_forever(config: ServerConfig, ready: Callable[[RunningServer], None] | None = None) -> None:
    rs = await start_server(config)
    if ready:
        ready(rs)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, rs.watcher.trigger)  # reload the model store now
    await stop.wait()
    await rs.drain()
