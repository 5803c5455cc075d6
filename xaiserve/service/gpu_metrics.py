"""Device metrics of a gateway or worker process (prometheus_client default REGISTRY).

- Per GPU, only when nvidia-ml-py (the `pynvml` module) finds an NVIDIA driver and at least one
  device: `xaiserve_gpu_utilization_ratio` (share of the last sample period in which a kernel ran,
  0..1), `xaiserve_gpu_memory_used_bytes`, `xaiserve_gpu_memory_total_bytes`, labelled by `gpu`
  (NVML index) and `name` (the product name). Without a GPU (no package, no driver, no device) the
  series do not exist at all: a dashboard shows "no data" instead of a misleading 0.
- Always: `xaiserve_device_info{device=...}` (the torch device of this process, "cpu" or
  "cuda:N") and `xaiserve_device_oom_total{method=...}` (out-of-memory errors a job method caught by
  halving its batch; xaiserve.devices.run_chunked).

The readings are taken at scrape time by a collector; `families` turns readings into metric
families and is what the tests exercise with readings built in memory where no GPU exists.
Labels stay low-cardinality (GPU index and model name, device, method).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import REGISTRY, Counter, Info
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

log = logging.getLogger("xaiserve.gpu_metrics")

GPU_METRICS = ("xaiserve_gpu_utilization_ratio", "xaiserve_gpu_memory_used_bytes", "xaiserve_gpu_memory_total_bytes")

DEVICE_OOM = Counter(
    "xaiserve_device_oom",
    "Out-of-memory errors a job method caught by halving its batch (the job went on with the smaller batch)",
    ["method"],
)
DEVICE_INFO = Info("xaiserve_device", "The torch device of this process (cpu or cuda:N)")


def count_oom(method: str) -> Callable[[int, int], None]:
    """The on_oom callback of a job method (xaiserve.devices.ChunkSize): count the event, log the new size."""

    def on_oom(old: int, new: int) -> None:
        DEVICE_OOM.labels(method).inc()
        log.warning(
            "out of device memory; batch halved, the job goes on", extra={"method": method, "batch": old, "now": new}
        )

    return on_oom


@dataclass(frozen=True)
class GpuReading:
    """One device's sample, as NVML reports it."""

    index: int
    name: str
    utilization: float  # 0..1: share of the sample period with a kernel running
    memory_used: int  # bytes
    memory_total: int  # bytes


def families(readings: Iterable[GpuReading]) -> list[GaugeMetricFamily]:
    """The per-GPU metric families of `readings`; empty families for no reading are left out."""
    rows = list(readings)
    if not rows:
        return []
    util = GaugeMetricFamily(
        GPU_METRICS[0],
        "GPU utilisation: share of the last sample period in which a kernel ran (NVML), per device",
        labels=["gpu", "name"],
    )
    used = GaugeMetricFamily(
        GPU_METRICS[1], "GPU memory in use on the device, all processes (NVML)", labels=["gpu", "name"]
    )
    total = GaugeMetricFamily(GPU_METRICS[2], "GPU memory of the device (NVML)", labels=["gpu", "name"])
    for r in rows:
        labels = [str(r.index), r.name]
        util.add_metric(labels, float(r.utilization))
        used.add_metric(labels, float(r.memory_used))
        total.add_metric(labels, float(r.memory_total))
    return [util, used, total]


class NvmlSource:
    """Readings through nvidia-ml-py. `open()` is None when the package, the driver or a device is missing."""

    def __init__(self, nvml: Any, handles: list[Any]):
        self.nvml = nvml
        self.handles = handles
        self.names = [self._text(nvml.nvmlDeviceGetName(h)) for h in handles]

    @staticmethod
    def _text(v: Any) -> str:
        return v.decode() if isinstance(v, bytes) else str(v)

    @classmethod
    def open(cls) -> "NvmlSource | None":
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            if count < 1:
                pynvml.nvmlShutdown()
                return None
            return cls(pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)])
        except pynvml.NVMLError as e:  # no driver (the usual case on a CPU machine), or no permission
            log.debug("NVML unavailable; no GPU metrics", extra={"reason": str(e)})
            return None

    def read(self) -> list[GpuReading]:
        out = []
        for i, h in enumerate(self.handles):
            util = self.nvml.nvmlDeviceGetUtilizationRates(h)
            mem = self.nvml.nvmlDeviceGetMemoryInfo(h)
            out.append(GpuReading(i, self.names[i], float(util.gpu) / 100.0, int(mem.used), int(mem.total)))
        return out


class GpuCollector(Collector):
    """Reads `source` at every scrape; a failed reading (a GPU fallen off the bus) is logged once
    and yields no samples for that scrape rather than failing /metrics."""

    def __init__(self, source: Any):
        self.source = source
        self._warned = False

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            readings = self.source.read()
        except Exception as e:  # noqa: BLE001 - pynvml.NVMLError and friends: keep /metrics answering
            if not self._warned:
                log.warning("GPU metrics reading failed", extra={"error": repr(e)})
                self._warned = True
            return
        yield from families(readings)


_lock = threading.Lock()
_registered: dict[int, GpuCollector | None] = {}


def register(device: str, registry: CollectorRegistry = REGISTRY) -> bool:
    """Export this process's device and, when NVML finds a GPU, the per-GPU metrics (once per
    registry; later calls only update the device label). True when GPU metrics are exported."""
    DEVICE_INFO.info({"device": device})
    with _lock:
        key = id(registry)
        if key not in _registered:
            source = NvmlSource.open()
            collector = GpuCollector(source) if source is not None else None
            if collector is not None:
                registry.register(collector)
            _registered[key] = collector
        return _registered[key] is not None


def gpu_names() -> list[str]:
    """The GPUs NVML sees (for the start-up log), [] without a GPU."""
    for c in _registered.values():
        if c is not None:
            return list(c.source.names)
    return []
