"""Server configuration: defaults < config file (YAML/JSON) < environment (XAISERVE_*) < CLI flags.

Every field is documented here and in the README; `xaiserve serve --print-config` shows the
effective configuration.

One parser for every source: `parse_setting` turns a value from a flag, the environment, a config
file or code into the field's type with the same rules everywhere (booleans: 1/0, true/false,
yes/no, on/off; integers in decimal; finite floats; lists as comma-separated text or a YAML/JSON
list), and a value it cannot read is a `ConfigError` that names the setting and where it came from
(`--prefer-cuda maybe` and XAISERVE_PREFER_CUDA=maybe fail alike). `gather` applies it to a
settings dataclass (ServerConfig here, the worker's settings in service/worker.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

from xaiserve.errors import quote

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
ENV_PREFIX = "XAISERVE_"


class ConfigError(ValueError):
    """A setting that cannot be used; the message names the setting and its source."""

    def __init__(self, message: str, setting: str = "", source: str = ""):
        super().__init__(message)
        self.setting, self.source = setting, source


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def parse_setting(name: str, value: Any, typ: Any, source: str) -> Any:
    """`value` (text from a flag or the environment, or a YAML/JSON/Python value) as type `typ`.

    The rules do not depend on the source: a native value of the right type is taken as it is,
    anything else is read as text with the rules of its type. Raises ConfigError naming the setting
    and `source` (e.g. "flag --prefer-cuda", "environment XAISERVE_PREFER_CUDA").
    """

    def bad(what: str) -> ConfigError:
        return ConfigError(f"setting {name} ({source}): {quote(value)} is not {what}", name, source)

    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None and len(inner) < len(args):
            return None
        if len(inner) != 1:
            raise TypeError(f"setting {name}: unsupported type {typ!r}")
        return parse_setting(name, value, inner[0], source)
    if value is None:
        raise bad("set (an empty value); leave the setting out to keep its default")
    if origin is Literal:
        text = value if isinstance(value, str) else str(value)
        if text.strip() not in args:
            raise bad("one of " + ", ".join(map(str, args)))
        return text.strip()
    if origin in (tuple, list):
        item = args[0] if args else str
        if isinstance(value, str):
            parts: Iterable[Any] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, (list, tuple)):
            parts = value
        else:
            raise bad("a list (comma-separated text or a list)")
        return tuple(parse_setting(f"{name}[{i}]", v, item, source) for i, v in enumerate(parts))
    if typ is bool:
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower() if isinstance(value, (str, int)) else None
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise bad("a boolean (true/false, yes/no, on/off, 1/0)")
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip(), 10)
            except ValueError:
                pass
        raise bad("an integer")
    if typ is float:
        number: float | None = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                pass
        if number is None or not math.isfinite(number):
            raise bad("a finite number")
        return number
    if typ is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # a YAML number where text is meant (e.g. a host or a path)
        raise bad("text")
    raise TypeError(f"setting {name}: unsupported type {typ!r}")


def read_settings_file(path: str | os.PathLike) -> dict[str, Any]:
    """The mapping of settings in a YAML (.yaml/.yml) or JSON file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist", source=f"config file {p}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # noqa: BLE001 - yaml.YAMLError or json.JSONDecodeError: say where
        raise ConfigError(
            f"config file {p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}",
            source=f"config file {p}",
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings", source=f"config file {p}")
    return data


def gather(
    cls: type,
    *,
    file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    env_settings: Iterable[str] | None = None,
    flags: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Values for the fields of dataclass `cls` from, in rising precedence, `file`, `env` (the
    XAISERVE_<NAME> variable of each field in `env_settings`, default all), `flags` (command-line
    text) and `overrides` (Python values from code); None means "not given" in flags and overrides.

    Returns (values, sources): the parsed values and, per setting, where it came from. Unknown
    settings in the file, flags or overrides are errors, not silently ignored.
    """
    hints = typing.get_type_hints(cls)
    known = [f.name for f in fields(cls)]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}

    def put(name: str, raw: Any, source: str) -> None:
        values[name] = parse_setting(name, raw, hints[name], source)
        sources[name] = source

    if file:
        where = f"config file {Path(file)}"
        for k, v in read_settings_file(file).items():
            name = str(k).replace("-", "_")
            if name not in hints:
                raise ConfigError(f"{where}: unknown setting {k!r}; known: {', '.join(sorted(known))}", str(k), where)
            put(name, v, where)
    env = os.environ if env is None else env
    for name in known if env_settings is None else env_settings:
        raw = env.get(env_name(name))
        if raw is not None:
            put(name, raw, f"environment {env_name(name)}")
    for given, label in ((flags, "flag"), (overrides, "argument")):
        for name, raw in (given or {}).items():
            if raw is None:
                continue
            if name not in hints:
                raise ConfigError(f"unknown setting {name!r}; known: {', '.join(sorted(known))}", name, label)
            put(name, raw, f"flag {flag_name(name)}" if label == "flag" else f"argument {name}")
    return values, sources


@dataclass(frozen=True)
class ServerConfig:
    # network
    host: str = "127.0.0.1"  # gRPC bind address ("0.0.0.0" in containers)
    port: int = 50051  # gRPC port; 0 picks a free port
    metrics_host: str = "127.0.0.1"  # /metrics and /healthz HTTP bind address
    metrics_port: int = 9100  # 0 picks a free port; -1 disables the HTTP endpoint
    web: bool = True  # the web viewer (/) and its JSON API (/api/...) on the metrics HTTP port
    oip_rest: bool = True  # the Open Inference Protocol v2 over HTTP (/v2/...) on the metrics HTTP port
    max_message_mb: int = 64  # largest request or response message
    # models
    # folder holding manifest.json and the model files; a relative path is read from the working
    # directory (the repository root holds the default models: see docs/MODEL_STORE.md)
    model_store: str = "model_store"
    load_models: Literal["all", "lazy"] = "all"  # "all": load and warm every model at start; "lazy": on first use
    # ONNX Runtime threads per session; 0 = auto: the cores this process may use (CPU affinity and
    # cgroup quota) divided by the model calls that can run at once (min(inference_threads, models)),
    # at least 1. On 2 cores with the default store that is 1, which measured lowest in both latency
    # and CPU per frame (bench/bench_stream.py; the runtime's own default spins 2 threads)
    intra_op_threads: int = 0
    # ONNX Runtime's idle worker threads spin-wait for work (session.intra_op.allow_spinning): a faster
    # hand-off between calls, paid with a busy core; off, they sleep (less CPU per answered frame)
    ort_spinning: bool = False
    prefer_cuda: bool = True  # use the CUDA execution provider when present (never with device = cpu)
    # where torch work runs (gradient baselines, ablation paths, RELAX on a torch encoder, SIFT
    # methods): cpu, cuda, cuda:N or auto (the first CUDA device when torch sees one, else the CPU);
    # cuda:N also picks ONNX Runtime's CUDA device. Checked at start: cuda without a CUDA device fails
    device: str = "auto"
    # autocast of the frozen models' forwards in RELAX's torch path: auto = bfloat16 on CUDA, float32
    # on the CPU (docs/METHODS.md "Devices and precision"); gradients and estimators stay float32/float64
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # on a GPU, RELAX and ablation jobs that do not set a batch size take the largest that fits in
    # half the free device memory (at least relax_batch_size); off: relax_batch_size / all slices
    batch_by_memory: bool = True
    spiral_runtime: bool = True  # spiral denoisers with compiled resampling (False: their single ONNX graph)
    # poll manifest.json this often and swap in added/removed/changed models (0 = off; SIGHUP always reloads)
    reload_interval_s: float = 1.0
    # fast path
    max_batch: int = 16  # micro-batch size limit
    # extra wait for a batch to fill; 0 = natural batching: requests that arrive while the model
    # is busy form the next batch, and a lone request runs at once
    max_delay_ms: float = 0.0
    max_queue: int = 256  # requests waiting per model; beyond: RESOURCE_EXHAUSTED
    max_denoise_batch: int = 512  # particles per Denoise request
    inference_threads: int = 2  # threads running model calls off the event loop
    decode_threads: int = 2  # threads decoding images / MRC stacks and building responses off the event loop
    # Explain/Denoise calls and StreamExplain frames in progress at once; beyond, RESOURCE_EXHAUSTED at
    # once (before any decoding; for a frame, its own frame status)
    max_inflight: int = 64
    max_inflight_per_principal: int = 0  # the same bound per caller (token / client certificate); 0 = off
    # calls that reached the server but not yet its event loop; beyond, grpc itself cancels new calls at
    # once (status CANCELLED; some at first, all at twice this): the one refusal that costs no Python
    # when the loop falls behind
    max_pending_calls: int = 64
    # streams
    stream_max_queue: int = 64  # upper bound of ExplainFrame.max_queue (policy ALL)
    stream_default_queue: int = 8
    # frames of one LATEST stream in progress at once (started, not yet answered); beyond, only the
    # newest waits. 2 absorbs one slow frame without a drop; 1 = strictly one at a time
    stream_latest_inflight: int = 2
    # failed frames in a row that end a stream (ExplainFrame.max_consecutive_errors = 0 takes this)
    stream_max_consecutive_errors: int = 10
    # jobs
    queue: str = ""  # "sqlite:///path/jobs.sqlite" (default: jobs.sqlite in state_dir) or "redis://host:port/db"
    state_dir: str = "./xaiserve-state"
    job_workers: int = 1  # in-process job workers (embedded queue); 0 = gateway only
    job_max_queued: int = 1000
    job_result_ttl_s: float = 86400.0
    # start even when the Redis queue does not persist (no appendonly, no RDB save policy): a Redis
    # restart then loses every queued and running job
    allow_volatile_queue: bool = False
    relax_batch_size: int = 64  # RELAX masks per forward batch when a job does not say
    # lifecycle
    # server processes on the same gRPC and HTTP ports (SO_REUSEPORT; the kernel spreads connections,
    # not calls, over them), each with its own event loop, models, admission and batchers, under a
    # supervisor that forwards signals and restarts one that dies; "auto" = the cores this process may
    # use; 1 = a single process, no supervisor. Per-process bounds (max_inflight, max_queue, job_workers,
    # ...) apply in each (docs/ARCHITECTURE.md "Process model")
    processes: str = "1"
    # --processes groups: a server process whose event loop has not run for this long (it writes a
    # heartbeat every second) has its thread stacks dumped to the log, is killed and restarted (0 = off)
    process_watchdog_s: float = 30.0
    # SIGTERM: drain in-flight calls for at most this long; open streams get a DrainNotice at once and
    # are ended (UNAVAILABLE, "xaiserve-draining" trailer) shortly before it runs out
    grace_s: float = 10.0
    # security (see docs/DEPLOY.md)
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""  # set for mutual TLS
    tokens_file: str = ""  # bearer tokens with per-token method allow-lists
    # principals that see every job ("token:NAME" or "cert:IDENTITY", comma-separated); others see their own
    job_admins: tuple[str, ...] = ()
    # plain grpc.health.v1 port beside a TLS port, for Kubernetes probes (0 = off)
    health_port: int = 0
    health_host: str = "0.0.0.0"
    # logging
    log_level: str = "INFO"
    log_json: bool = True

    def replace(self, **kw: Any) -> "ServerConfig":
        return dataclasses.replace(self, **kw)

    @property
    def process_count(self) -> int:
        """`processes` as a number ("auto": the cores this process may use)."""
        text = str(self.processes).strip().lower()
        if text == "auto":
            from xaiserve.service.registry import available_cores

            return available_cores()
        return int(text, 10)

    @property
    def queue_url(self) -> str:
        return self.queue or f"sqlite:///{Path(self.state_dir).resolve() / 'jobs.sqlite'}"


def load_config(
    file: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    **overrides: Any,
) -> ServerConfig:
    """The effective config: defaults < `file` < `env` (default os.environ) < `flags` (text from the
    command line) < `overrides` (values from code). Raises ConfigError naming setting and source."""
    values, sources = gather(ServerConfig, file=file, env=env, flags=flags, overrides=overrides)
    cfg = ServerConfig(**values)
    validate(cfg, sources)
    return cfg


def validate(cfg: ServerConfig, sources: Mapping[str, str] | None = None) -> None:
    """Rules across settings; the message says where each setting involved came from."""
    checks: list[tuple[bool, tuple[str, ...], str]] = [
        (0 <= cfg.port <= 65535, ("port",), "port must be in 0..65535 (0 picks a free port)"),
        (
            -1 <= cfg.metrics_port <= 65535,
            ("metrics_port",),
            "metrics_port must be in -1..65535 (0 picks a free port, -1 disables)",
        ),
        (0 <= cfg.health_port <= 65535, ("health_port",), "health_port must be in 0..65535 (0 = off)"),
        (cfg.max_batch >= 1, ("max_batch",), "max_batch must be >= 1"),
        (cfg.max_delay_ms >= 0, ("max_delay_ms",), "max_delay_ms must be >= 0"),
        (cfg.max_queue >= 1, ("max_queue",), "max_queue must be >= 1"),
        (cfg.max_message_mb >= 1, ("max_message_mb",), "max_message_mb must be >= 1"),
        (cfg.max_denoise_batch >= 1, ("max_denoise_batch",), "max_denoise_batch must be >= 1"),
        (cfg.intra_op_threads >= 0, ("intra_op_threads",), "intra_op_threads must be >= 0 (0 = auto)"),
        (
            cfg.stream_max_consecutive_errors >= 1,
            ("stream_max_consecutive_errors",),
            "stream_max_consecutive_errors must be >= 1",
        ),
        (cfg.job_workers >= 0, ("job_workers",), "job_workers must be >= 0 (0 = gateway only)"),
        (cfg.job_max_queued >= 1, ("job_max_queued",), "job_max_queued must be >= 1"),
        (cfg.job_result_ttl_s > 0, ("job_result_ttl_s",), "job_result_ttl_s must be > 0"),
        (cfg.grace_s >= 0, ("grace_s",), "grace_s must be >= 0"),
        (cfg.load_models in ("all", "lazy"), ("load_models",), "load_models must be 'all' or 'lazy'"),
        (cfg.reload_interval_s >= 0, ("reload_interval_s",), "reload_interval_s must be >= 0 (0 = off)"),
        (bool(cfg.tls_cert) == bool(cfg.tls_key), ("tls_cert", "tls_key"), "tls_cert and tls_key go together"),
        (
            not cfg.tls_client_ca or bool(cfg.tls_cert),
            ("tls_client_ca", "tls_cert"),
            "tls_client_ca (mutual TLS) needs tls_cert and tls_key",
        ),
        (
            1 <= cfg.stream_default_queue <= cfg.stream_max_queue,
            ("stream_default_queue", "stream_max_queue"),
            "need 1 <= stream_default_queue <= stream_max_queue",
        ),
        (
            1 <= cfg.stream_latest_inflight <= 8,
            ("stream_latest_inflight",),
            "stream_latest_inflight must be 1..8",
        ),
        (cfg.inference_threads >= 1, ("inference_threads",), "inference_threads must be >= 1"),
        (cfg.decode_threads >= 1, ("decode_threads",), "decode_threads must be >= 1"),
        (cfg.max_inflight >= 1, ("max_inflight",), "max_inflight must be >= 1"),
        (cfg.max_pending_calls >= 1, ("max_pending_calls",), "max_pending_calls must be >= 1"),
        (
            cfg.max_inflight_per_principal >= 0,
            ("max_inflight_per_principal",),
            "max_inflight_per_principal must be >= 0 (0 = off)",
        ),
        (1 <= cfg.relax_batch_size <= 4096, ("relax_batch_size",), "relax_batch_size must be in 1..4096"),
        (_processes_ok(cfg.processes), ("processes",), "processes must be an integer >= 1 or auto"),
        (
            cfg.process_watchdog_s == 0 or cfg.process_watchdog_s >= 3,
            ("process_watchdog_s",),
            "process_watchdog_s must be 0 (off) or >= 3 (seconds; heartbeats come every second)",
        ),
        (_device_ok(cfg.device), ("device",), "device must be cpu, cuda, cuda:N (a device index) or auto"),
    ]
    for ok, names, msg in checks:
        if not ok:
            where = ", ".join(f"{n} from {(sources or {}).get(n, 'the default')}" for n in names)
            raise ConfigError(
                f"invalid configuration: {msg} ({where})", names[0], (sources or {}).get(names[0], "default")
            )


def _processes_ok(text: str) -> bool:
    t = str(text).strip().lower()
    return t == "auto" or (t.isdigit() and int(t) >= 1)


def _device_ok(text: str) -> bool:
    from xaiserve.devices import check_device_setting

    try:
        check_device_setting(text)
    except ValueError:
        return False
    return True


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
