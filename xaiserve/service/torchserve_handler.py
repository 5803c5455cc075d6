"""A TorchServe handler over one model of an xaiserve store (what `xaiserve export torchserve` archives).

It follows TorchServe's BaseHandler contract: `initialize(context)` once per worker, then
`handle(data, context)` per batch, which runs `preprocess` -> `inference` -> `postprocess` and
returns one answer per request. The archive's handler.py subclasses this class and TorchServe's
BaseHandler; this module imports nothing of TorchServe, so the same handler also runs in-process
(tests, bench/bench_peers.py).

The same model as xaiserve, with the same steps: the archive holds a small store (manifest
entries of the model and of the model it explains, their ONNX graphs and state dicts), read by
service.registry; images are decoded and preprocessed by service.images (decode, channels,
resize by the entry's fit, normalise), explained by the ONNX graph (masking networks) or by the
gradient baselines of handlers.saliency on the torch module (methods of the methods table), and
the mask is mapped back over the input (service.images.to_input_geometry): xaiserve's Explain
answer for the same image, within float rounding of a different batch.

A request is a dict as TorchServe passes it: the image under "data" or "body" (encoded PNG/JPEG
bytes), and optionally "method", "target_label", "fidelity" (form fields or gRPC input entries).
The answer is JSON: {"model", "method", "mask": {"dtype", "shape", "data" (base64 of little-endian
float32)}, "output": [...], "label", "fidelity"}. A request that cannot be served (an image that
does not decode, an unknown method, ...) gets status 400 and {"error", "code"} through
context.set_response_status for its index alone: the rest of the batch is answered as usual.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xaiserve.errors import InvalidArgument, XaiError, quote
from xaiserve.methods import MASK_KINDS, METHODS

log = logging.getLogger("xaiserve.torchserve")
ARCHIVE_CONFIG = "xaiserve_archive.json"
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "NOT_FOUND": 404,
    "FAILED_PRECONDITION": 400,
    "RESOURCE_EXHAUSTED": 413,
    "UNAVAILABLE": 503,
}


@dataclass
class Row:
    """One request of a batch: its decoded input, options, and (after inference) its answer or error."""

    index: int
    image: np.ndarray | None = None  # HWC [0, 1], the input's resolution
    x: np.ndarray | None = None  # [1, C, H, W], the model's input
    method: str = ""
    target: int = -1
    fidelity: bool = False
    error: XaiError | None = None
    answer: dict[str, Any] = field(default_factory=dict)


def _text(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def decode_array(d: dict[str, Any]) -> np.ndarray:
    """The array of an answer's "mask" (clients and tests)."""
    return np.frombuffer(base64.b64decode(d["data"]), dtype="<f4").reshape(d["shape"])


class XaiserveHandler:
    """TorchServe's handler contract over one model of an xaiserve store (see the module docstring)."""

    def __init__(self) -> None:
        self.initialized = False
        self.context: Any = None

    # -- BaseHandler contract -------------------------------------------------------------------
    def initialize(self, context: Any) -> None:
        from xaiserve.service.registry import Registry, RegistryConfig

        model_dir = Path(context.system_properties.get("model_dir", "."))
        cfg = json.loads((model_dir / ARCHIVE_CONFIG).read_text())
        threads = int(cfg.get("intra_op_threads", 1))
        self.registry = Registry(RegistryConfig(store=model_dir, intra_op_threads=threads, prefer_cuda=False))
        self.entry = self.registry.resolve(cfg["model"])
        self.frozen = self.registry.frozen_for(self.entry)
        self.registry.onnx(self.entry)  # load and warm now, not on the first request
        if self.frozen is not self.entry and "onnx" in self.frozen.files:
            self.registry.onnx(self.frozen)
        self.context = context
        self.initialized = True
        log.info("xaiserve handler ready", extra={"model": self.entry.id})

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[Any]:
        t0 = time.perf_counter()
        self.context = context
        out = self.postprocess(self.inference(self.preprocess(data)))
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            metrics.add_time("HandlerTime", round((time.perf_counter() - t0) * 1000, 2), None, "ms")
        return out

    def preprocess(self, data: list[dict[str, Any]]) -> list[Row]:
        from xaiserve.proto.explain.v1 import explainer_pb2 as pb
        from xaiserve.service.images import decode_image_source, probe_image, to_model_input

        rows = []
        for i, req in enumerate(data):
            row = Row(i)
            try:
                body = next((req[k] for k in ("data", "body", "image") if req.get(k) is not None), None)
                if body is None:
                    raise InvalidArgument(
                        "the request has no image: send PNG or JPEG bytes as the body (HTTP) or as input 'data' (gRPC)"
                    )
                if isinstance(body, str):  # TorchServe hands a text body over as str
                    body = body.encode("latin-1")
                self._options(row, req)
                image = pb.Image(encoded=bytes(body))
                probe_image(image)  # size limits from the header, before any decoding
                row.image, _ = decode_image_source(image, self.entry.input)
                row.x = to_model_input(row.image, self.entry.input)[None]
            except XaiError as e:
                row.error = e
            rows.append(row)
        return rows

    def inference(self, rows: list[Row]) -> list[Row]:
        good = [r for r in rows if r.error is None]
        groups: dict[tuple[str, int, bool], list[Row]] = {}
        for r in good:
            groups.setdefault((r.method, r.target, r.fidelity), []).append(r)
        for (method, _, _), group in groups.items():
            try:
                if method:
                    for r in group:
                        self._gradient(r)
                else:
                    self._own(group)
                for r in group:
                    if r.fidelity:
                        r.answer["fidelity"] = self._fidelity(r)
            except XaiError as e:
                for r in group:
                    r.error = e
        return rows

    def postprocess(self, rows: list[Row]) -> list[Any]:
        from xaiserve.service.images import to_input_geometry

        out = []
        for r in rows:
            if r.error is None:
                try:
                    h, w = r.image.shape[:2]  # type: ignore[union-attr]
                    mask = r.answer.pop("_mask", None)
                    if mask is not None:
                        r.answer["mask"] = _encode(to_input_geometry(mask, self.entry.input, h, w))
                except XaiError as e:
                    r.error = e
            if r.error is not None:
                msg = str(r.error)
                if self.context is not None and hasattr(self.context, "set_response_status"):
                    self.context.set_response_status(HTTP_STATUS.get(r.error.code, 400), msg, r.index)
                out.append(json.dumps({"error": msg, "code": r.error.code}))
            else:
                out.append(json.dumps({"model": self.entry.id, **r.answer, "batch_size": len(rows)}))
        return out

    # -- the model ---------------------------------------------------------------------------------
    def _options(self, row: Row, req: dict[str, Any]) -> None:
        method = _text(req.get("method") or "").strip()
        entry = self.entry
        if not method:
            if entry.kind not in MASK_KINDS:
                offered = [m for m in self.registry.methods(entry) if METHODS[m].rpc == "Explain"]
                if req.get("fidelity") or req.get("target_label") is not None:
                    raise InvalidArgument(
                        f"model {entry.id} is a {entry.kind}: fidelity and target_label need a method, "
                        f"one of {', '.join(offered) or '(none)'}"
                    )
        else:
            spec = self.registry.check_method(entry, method)
            if spec.rpc != "Explain":
                raise InvalidArgument(f"method {method!r} is served by {spec.rpc}, not by this handler")
            row.method = "" if spec.own else method
        if req.get("target_label") is not None:
            if self.frozen.kind != "classifier":
                raise InvalidArgument(
                    f"target_label applies to classifiers and NEMt models; {entry.id} explains an {self.frozen.kind}"
                )
            try:
                t = int(_text(req["target_label"]))
            except ValueError:
                raise InvalidArgument(f"target_label {quote(_text(req['target_label']))} is not an integer") from None
            n = len(self.frozen.labels) or self.frozen.output_dim
            if not 0 <= t < n:
                raise InvalidArgument(f"target_label {t} is out of range for {self.frozen.id}: labels 0..{n - 1}")
            row.target = t
        row.fidelity = _text(req.get("fidelity") or "").strip().lower() in ("1", "true", "yes")

    def _own(self, rows: list[Row]) -> None:
        """The model's ONNX graph on the rows as one batch: a masking network's mask and output, or a
        frozen model's output alone (no method)."""
        x = np.concatenate([r.x for r in rows])  # type: ignore[misc]
        feeds = {"image": x}
        if self.entry.kind == "nemt":
            feeds["target"] = np.array([r.target for r in rows], dtype=np.int64)
        res = self.registry.onnx(self.entry).run(feeds)
        for i, r in enumerate(rows):
            r.answer["method"] = self.entry.kind if self.entry.kind in MASK_KINDS else ""
            r.answer["output"] = res["output"][i].astype(np.float32).tolist()
            if "mask" in res:
                r.answer["_mask"] = res["mask"][i, 0]
            if "label" in res:
                r.answer["label"] = int(res["label"][i])

    def _gradient(self, r: Row) -> None:
        """A gradient baseline ([RELAX] sec. 4.2) on the frozen torch module, as the fast path runs it."""
        import torch

        from xaiserve.handlers import saliency

        frozen = self.frozen
        module = self.registry.torch_module(frozen)
        xt = torch.from_numpy(r.x.copy())  # type: ignore[union-attr]
        with torch.no_grad():
            out = module(xt)
        target = None
        if frozen.kind == "classifier":
            target = int(out.argmax(dim=1)[0]) if r.target < 0 else r.target
            r.answer["label"] = target
        maps = saliency.attribute(r.method, module, xt, kind=frozen.kind, target=target)
        r.answer["method"] = r.method
        r.answer["output"] = out[0].numpy().astype(np.float32).tolist()
        r.answer["_mask"] = np.asarray(maps[0], dtype=np.float32)

    def _fidelity(self, r: Row) -> float:
        """Explain's fidelity ([NEM-U] sec. 3.1, last paragraph; handlers/fidelity.py, the evaluation's
        definition): m min-max normalised; softmax(Phi(x*m))_label for a classifier, the embedding cosine
        for an encoder."""
        from xaiserve.handlers import fidelity as fid_score
        from xaiserve.service.images import resize_mask

        x, m = r.x, np.asarray(r.answer["_mask"], dtype=np.float32)
        assert x is not None  # rows reach inference decoded
        if m.shape != x.shape[2:]:
            m = resize_mask(m, x.shape[2], x.shape[3])
        m = fid_score.normalise_map(m).astype(np.float32)
        o = self.registry.onnx(self.frozen).run({"image": x * m[None, None]})["output"]
        ref = np.asarray(r.answer["output"], dtype=np.float32)[None]
        if self.frozen.kind == "classifier":
            label = int(r.answer.get("label", -1))
            target = np.array([label if label >= 0 else int(np.argmax(ref[0]))])
            return float(fid_score.fidelity("classifier", ref, o, target)[0])
        return float(fid_score.fidelity("encoder", ref, o)[0])
