"""Server configuration: defaults < config file (YAML/JSON) < environment (XAISERVE_*) < CLI flags.

Every field is documented here and in the README; `xaiserve serve --print-config` shows the
effective configuration.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from xaiserve.service.modelstore import DEFAULT_STORE


@dataclass(frozen=True)
class ServerConfig:
    # network
    host: str = "127.0.0.1"  # gRPC bind address ("0.0.0.0" in containers)
    port: int = 50051  # gRPC port; 0 picks a free port
    metrics_host: str = "127.0.0.1"  # /metrics and /healthz HTTP bind address
    metrics_port: int = 9100  # 0 picks a free port; -1 disables the HTTP endpoint
    max_message_mb: int = 64  # largest request or response message
    # models
    model_store: str = str(DEFAULT_STORE)
    load_models: str = "all"  # "all": load and warm every model at start; "lazy": on first use
    intra_op_threads: int = 0  # ONNX Runtime threads per session (0 = runtime default)
    prefer_cuda: bool = True  # use the CUDA execution provider when present
    spiral_runtime: bool = True  # spiral denoisers with compiled resampling (False: their single ONNX graph)
    # fast path
    max_batch: int = 16  # micro-batch size limit
    # extra wait for a batch to fill; 0 = natural batching: requests that arrive while the model
    # is busy form the next batch, and a lone request runs at once
    max_delay_ms: float = 0.0
    max_queue: int = 256  # requests waiting per model; beyond: RESOURCE_EXHAUSTED
    max_denoise_batch: int = 512  # particles per Denoise request
    inference_threads: int = 2  # threads running model calls off the event loop
    # streams
    stream_max_queue: int = 64  # upper bound of ExplainFrame.max_queue (policy ALL)
    stream_default_queue: int = 8
    # jobs
    queue: str = ""  # "sqlite:///path/jobs.sqlite" (default: jobs.sqlite in state_dir) or "redis://host:port/db"
    state_dir: str = "./xaiserve-state"
    job_workers: int = 1  # in-process job workers (embedded queue); 0 = gateway only
    job_max_queued: int = 1000
    job_result_ttl_s: float = 86400.0
    relax_batch_size: int = 64  # RELAX masks per forward batch when a job does not say
    # lifecycle
    grace_s: float = 10.0  # SIGTERM: drain in-flight calls for at most this long
    # security (see docs/DEPLOY.md)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set for mutual TLS
    tokens_file: str = ""  # bearer tokens with per-token method allow-lists
    # plain grpc.health.v1 port beside a TLS port, for Kubernetes probes (0 = off)
    health_port: int = 0
    health_host: str = "0.0.0.0"
    # logging
    log_level: str = "INFO"
    log_json: bool = True

    def replace(self, **kw: Any) -> "ServerConfig":
        return dataclasses.replace(self, **kw)

    @property
    def queue_url(self) -> str:
        return self.queue or f"sqlite:///{Path(self.state_dir).resolve() / 'jobs.sqlite'}"


def _coerce(name: str, value: Any, typ: Any) -> Any:
    t = typ if isinstance(typ, type) else {"int": int, "float": float, "bool": bool, "str": str}[str(typ)]
    if t is bool:
        if isinstance(value, bool):
            return value
        s = str(value).strip().lower()
        if s in ("1", "true", "yes", "on"):
            return True
        if s in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config {name}: {value!r} is not a boolean (true/false)")
    try:
        return t(value)
    except (TypeError, ValueError):
        raise ValueError(f"config {name}: {value!r} is not a valid {t.__name__}") from None


def load_config(file: str | os.PathLike | None = None, env: dict[str, str] | None = None, **overrides: Any) -> ServerConfig:
    """Build the effective config. Unknown keys in the file or flags are errors, not silently ignored."""
    known = {f.name: f.type for f in fields(ServerConfig)}
    values: dict[str, Any] = {}
    if file:
        p = Path(file)
        if not p.exists():
            raise ValueError(f"config file {p} does not exist")
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"config file {p} must hold a mapping of settings")
        for k, v in data.items():
            k2 = k.replace("-", "_")
            if k2 not in known:
                raise ValueError(f"config file {p}: unknown setting {k!r}; known: {', '.join(sorted(known))}")
            values[k2] = _coerce(k2, v, known[k2])
    env = os.environ if env is None else env
    for k, typ in known.items():
        ev = env.get(f"XAISERVE_{k.upper()}")
        if ev is not None:
            values[k] = _coerce(k, ev, typ)
    for k, v in overrides.items():
        if v is None:
            continue
        if k not in known:
            raise ValueError(f"unknown setting {k!r}")
        values[k] = _coerce(k, v, known[k])
    cfg = ServerConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: ServerConfig) -> None:
    checks = [
        (cfg.max_batch >= 1, "max_batch must be >= 1"),
        (cfg.max_delay_ms >= 0, "max_delay_ms must be >= 0"),
        (cfg.max_queue >= 1, "max_queue must be >= 1"),
        (cfg.max_message_mb >= 1, "max_message_mb must be >= 1"),
        (cfg.grace_s >= 0, "grace_s must be >= 0"),
        (cfg.load_models in ("all", "lazy"), "load_models must be 'all' or 'lazy'"),
        (bool(cfg.tls_cert) == bool(cfg.tls_key), "tls_cert and tls_key go together"),
        (not cfg.tls_client_ca or bool(cfg.tls_cert), "tls_client_ca (mutual TLS) needs tls_cert and tls_key"),
        (1 <= cfg.stream_default_queue <= cfg.stream_max_queue, "need 1 <= stream_default_queue <= stream_max_queue"),
        (cfg.inference_threads >= 1, "inference_threads must be >= 1"),
        (cfg.health_port >= 0, "health_port must be >= 0 (0 = off)"),
        (1 <= cfg.relax_batch_size <= 4096, "relax_batch_size must be in 1..4096"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(f"invalid configuration: {msg}")


def describe() -> list[tuple[str, Any, str]]:
    """(name, default, comment) for the README and --help."""
    import inspect

    src = inspect.getsource(ServerConfig).splitlines()
    comments: dict[str, str] = {}
    above: list[str] = []  # comment lines directly above a field belong to it
    for line in src:
        s = line.strip()
        if s.startswith("#"):
            above.append(s.lstrip("# "))
        elif ":" in s and "=" in s and not s.startswith(("def", "@", "return")):
            name = s.split(":", 1)[0].strip()
            inline = s.split("#", 1)[1].strip() if "#" in s else ""
            comments[name] = " ".join([*above, inline]).strip()
            above = []
        else:
            above = []
    return [(f.name, f.default, comments.get(f.name, "")) for f in fields(ServerConfig)]
