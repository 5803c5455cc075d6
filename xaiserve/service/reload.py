"""Reload without restart: the server watches its manifest and swaps the served models atomically.

How (docs/MODEL_STORE.md, "Reload"):
- the server polls store/manifest.json every `reload_interval_s` (default 1 s; 0 = off): when its
  (mtime, inode, size) differs from what the registry read last, it reloads. `xaiserve models add`
  and `remove` (and `xaiserve export`) replace the manifest atomically, so a reload never sees a
  half-written file;
- SIGHUP reloads at once (`kill -HUP <pid>`), for stores whose files change without the manifest;
- a reload runs off the event loop. New and changed entries are checked, loaded and warmed BEFORE
  the swap (Registry.reload(load=True)); a bad one is left unavailable with its reason and the others
  are swapped in. The swap is one assignment: a call resolves its model either before (old set) or
  after (new set), and keeps the session and batcher it resolved until it finishes. The batchers of
  removed or replaced versions stop once their queued calls are answered (FastPath.retire).
- Open streams (StreamExplain) are woken: one whose model version was rewritten goes on with the
  new version from its next frame; one whose model was removed or became unavailable ends, after
  the frames in flight are answered, with NOT_FOUND / FAILED_PRECONDITION saying so.
- A manifest that is not valid JSON is logged and the current set keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from xaiserve.service import metrics
from xaiserve.service.registry import Registry, manifest_stamp

log = logging.getLogger("xaiserve.reload")


class ManifestWatcher:
    """Polls the manifest and reloads the registry when it changes (and on `trigger()`)."""

    def __init__(
        self, registry: Registry, fast: Any, *, interval_s: float = 1.0, load: bool = True, streams: Any = None
    ):
        self.registry = registry
        self.fast = fast
        self.streams = streams  # service.streams.StreamHub: open streams re-check their model after a reload
        self.interval_s = float(interval_s)
        self.load = load
        self.reloads = 0
        self._task: asyncio.Task | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="manifest-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    def trigger(self) -> None:
        """Reload now (SIGHUP); safe to call from a signal handler on the event loop."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            timeout = self.interval_s if self.interval_s > 0 else None
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
                forced = True
            except asyncio.TimeoutError:
                forced = False
            self._wake.clear()
            if forced or manifest_stamp(self.registry.store) != self.registry.manifest_stamp:
                try:
                    await self.reload("signal" if forced else "manifest changed")
                except Exception:  # noqa: BLE001 - the watcher must survive any one reload
                    log.exception("reload failed; the current models keep serving")

    async def reload(self, why: str = "request") -> Any:
        """One reload (serialised); returns the registry's ReloadReport."""
        async with self._lock:
            try:
                report = await asyncio.to_thread(self.registry.reload, load=self.load)
            except ValueError as e:  # the manifest is not JSON: keep what serves
                log.error("manifest not reloaded", extra={"reason": str(e)})
                # do not retry until the file changes again
                self.registry.manifest_stamp = manifest_stamp(self.registry.store)
                return None
            self.fast.retire(report.retired)
            if self.streams is not None:
                self.streams.models_changed()
            for mid in report.added:
                if mid in self.registry.load_seconds:
                    metrics.MODEL_LOAD.labels(mid).set(self.registry.load_seconds[mid])
            self.reloads += 1
            log.info(
                "models reloaded",
                extra={
                    "why": why,
                    "added": report.added,
                    "removed": report.removed,
                    "unavailable": report.unavailable,
                    "models": [e.id for e in self.registry.entries()],
                },
            )
            return report


def with_availability(resp: Any, registry: Registry, kind: str = "") -> Any:
    """ListModels: the served models marked available, then every manifest entry that is not served,
    with available = false and the reason (schema error, missing file, wrong names, failed warm-up)."""
    from xaiserve.proto.explain.v1 import explainer_pb2 as pb

    for m in resp.models:
        m.available = True
    for b in registry.unavailable():
        if kind and b.kind != kind:
            continue
        inp = b.raw.get("input") if isinstance(b.raw.get("input"), dict) else {}
        spec = pb.InputSpec()
        for f in ("height", "width", "channels"):
            if isinstance(inp.get(f), int):
                setattr(spec, f, inp[f])
        if isinstance(inp.get("resize"), str):
            spec.resize = inp["resize"][:32]
        resp.models.append(
            pb.ModelInfo(
                name=b.name,
                version=b.version,
                kind=b.kind,
                input=spec,
                available=False,
                unavailable_reason=b.reason,
                description=str(b.raw.get("description", ""))[:500],
                explains=str(b.raw.get("explains", ""))[:200],
            )
        )
    return resp
