"""A small Python client for xaiserve.

from xaiserve.service.client import ExplainerClient
with ExplainerClient("127.0.0.1:50051") as c:
    r = c.explain("cat.png", model="scenes-nemu", fidelity=True)
    r.mask            # float32 [H, W] in [0, 1]
    for a in c.stream(frames, model="scenes-nemu"):   # paced: at most two frames unanswered
        decode_mask(a.result)                          # float32 [H, W] over the frame
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.mask_wire import decode_mask
from xaiserve.service.tensors import from_tensor, to_tensor

__all__ = ["ExplainerClient", "Explanation", "decode_mask", "image_message", "is_notice"]

ImageLike = str | os.PathLike | bytes | np.ndarray
MASK_ENCODINGS = {"float32": pb.MASK_FLOAT32, "uint8": pb.MASK_UINT8, "png": pb.MASK_PNG}
MASK_RESOLUTIONS = {"input": pb.MASK_AT_INPUT, "model": pb.MASK_AT_MODEL}


def image_message(image: ImageLike) -> pb.Image:
    """A path or encoded bytes travel as-is; an array as a raw tensor (uint8, or float32 in [0,1])."""
    if isinstance(image, np.ndarray):
        a = image if image.dtype == np.uint8 else image.astype(np.float32)
        return pb.Image(tensor=to_tensor(a))
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    return pb.Image(encoded=Path(image).read_bytes())


def is_notice(result: pb.ExplainFrameResult) -> bool:
    """A stream message that answers no frame: the server's DrainNotice, sent on its own."""
    return not result.HasField("result") and not result.HasField("status")


def _mask_choice(table: Mapping[str, int], value: str | int | None, what: str) -> Any:
    if value is None or value == "":
        return 0
    if isinstance(value, int):
        return value
    try:
        return table[value.lower()]
    except KeyError:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(table)}") from None


class _Pacer:
    """Blocks the sender while `window` frames are unanswered (answered or failed frames, and those
    the server reports dropped, are accounted for by the answer naming a later frame id)."""

    def __init__(self, window: int):
        self.window = window
        self.sent = 0
        self.accounted = 0
        self.closed = False
        self._cond = threading.Condition()

    def wait_for_room(self) -> bool:
        with self._cond:
            while not self.closed and self.sent - self.accounted >= self.window:
                self._cond.wait(0.5)
            return not self.closed

    def on_sent(self) -> None:
        with self._cond:
            self.sent += 1

    def on_answer(self, position: int) -> None:
        with self._cond:
            self.accounted = max(self.accounted, position + 1)
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class Explanation:
    model: str
    mask: np.ndarray
    output: np.ndarray | None
    fidelity: float | None
    target_label: int
    mask_png: bytes
    overlay_png: bytes
    timing: pb.Timing
    dicom: bytes = b""  # output_format: the DICOM Segmentation / Parametric Map
    dicom_overlay: bytes = b""  # dicom_overlay: the Secondary Capture

    @staticmethod
    def from_response(r: pb.ExplainResponse) -> "Explanation":
        return Explanation(
            model=r.model,
            mask=decode_mask(r),
            output=from_tensor(r.output) if r.output.shape else None,
            fidelity=r.fidelity if r.HasField("fidelity") else None,
            target_label=r.target_label,
            mask_png=r.mask_png,
            overlay_png=r.overlay_png,
            timing=r.timing,
            dicom=r.dicom,
            dicom_overlay=r.dicom_overlay,
        )


class ExplainerClient:
    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        max_message_mb: int = 64,
    ):
        opts = [
            ("grpc.max_receive_message_length", max_message_mb << 20),
            ("grpc.max_send_message_length", max_message_mb << 20),
        ]
        if ca_file:
            read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
            creds = grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))
            self.channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self.channel = grpc.insecure_channel(address, options=opts)
        self.stub = pb_grpc.ExplainerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __enter__(self) -> "ExplainerClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def explain(
        self,
        image: ImageLike,
        model: str,
        *,
        method: str = "",
        return_output: bool = False,
        fidelity: bool = False,
        return_png: bool = False,
        target_label: int | None = None,
        mask_encoding: str | int | None = None,
        mask_resolution: str | int | None = None,
        output_format: str = "",
        dicom_overlay: bool = False,
        dicom: pb.DicomOptions | None = None,
        timeout: float | None = 30.0,
    ) -> Explanation:
        """`mask_encoding` "float32" (default) / "uint8" / "png" and `mask_resolution` "input" (default)
        / "model" choose what travels; `Explanation.mask` is float32 over the image either way.
        DICOM input: `dicom` picks the frame / window, `output_format` "dicom-seg" / "dicom-pmap" (and
        `dicom_overlay`) return the result as DICOM objects referencing the image."""
        opts = pb.ExplainOptions(
            method=method,
            return_output=return_output,
            fidelity=fidelity,
            return_png=return_png,
            mask_encoding=_mask_choice(MASK_ENCODINGS, mask_encoding, "mask_encoding"),
            mask_resolution=_mask_choice(MASK_RESOLUTIONS, mask_resolution, "mask_resolution"),
            output_format=output_format,
            dicom_overlay=dicom_overlay,
        )
        if target_label is not None:
            opts.target_label = target_label
        img = image_message(image)
        if dicom is not None:
            img.dicom.CopyFrom(dicom)
        r = self.stub.Explain(
            pb.ExplainRequest(model=model, image=img, options=opts), timeout=timeout, metadata=self.metadata
        )
        return Explanation.from_response(r)

    def stream(
        self,
        frames: Iterable[ImageLike],
        model: str,
        *,
        policy: int = pb.LATEST,
        max_queue: int = 0,
        options: pb.ExplainOptions | None = None,
        pace: str | float | None = "auto",
        window: int = 2,
        max_consecutive_errors: int = 0,
        timeout: float | None = None,
    ) -> Iterator[pb.ExplainFrameResult]:
        """Frames in (ids 0, 1, ...), answers out in frame order (StreamExplain).

        pace: "auto" (default) pulls the next frame from `frames` only while fewer than `window`
        frames are unanswered: with policy LATEST the server then never drops (at the default window
        of 2 both frames run at once, the server's stream_latest_inflight) and no bandwidth goes
        to frames it would discard; `frames` is simply iterated more slowly (a live source should
        hand out its newest frame when asked). A number: at most that
        many frames per second, unanswered or not (a camera's own rate). None: as fast as `frames`
        yields. Each answer's dropped_total and answer_fps say how the server keeps up.

        An answer has `.result` (the mask: `decode_mask(answer.result)` maps it over the frame), or
        `.status` for a frame that failed on its own (the stream goes on). A message with neither
        (`is_notice`) is the server's DrainNotice: the stream will end with UNAVAILABLE in
        `.drain.seconds_left`; reconnect elsewhere. Masks come as uint8 on the model's grid unless
        `options` set mask_encoding / mask_resolution.
        """
        auto = pace == "auto"
        if not (pace is None or auto or (isinstance(pace, (int, float)) and pace > 0)):
            raise ValueError(f"pace must be 'auto', a positive frame rate or None; got {pace!r}")
        if window < 1:
            raise ValueError(f"window must be >= 1; got {window}")
        pacer = _Pacer(window)
        period = 1.0 / float(pace) if pace is not None and not auto else 0.0

        def gen():
            # A fixed rate never bursts to catch up: a source that was late (or blocked before its
            # first frame) restarts the schedule, since frames sent back to back would only be
            # replaced (dropped) by the server's LATEST policy.
            next_at: float | None = None
            for i, f in enumerate(frames):
                if period:
                    now = time.monotonic()
                    if next_at is None or next_at < now - period:
                        next_at = now
                    if next_at > now:
                        time.sleep(next_at - now)
                    next_at += period
                if auto and not pacer.wait_for_room():
                    return
                msg = pb.ExplainFrame(frame_id=i, image=image_message(f), client_timestamp_us=time.time_ns() // 1000)
                if i == 0:
                    msg.model, msg.policy, msg.max_queue = model, policy, max_queue
                    msg.max_consecutive_errors = max_consecutive_errors
                    if options is not None:
                        msg.options.CopyFrom(options)
                pacer.on_sent()
                yield msg

        call = self.stub.StreamExplain(gen(), metadata=self.metadata, timeout=timeout)
        try:
            for res in call:
                if not is_notice(res):
                    pacer.on_answer(res.frame_id)
                yield res
        finally:
            pacer.close()
            call.cancel()

    def denoise(
        self, particles: np.ndarray | bytes, model: str = "cryoem-spiral", *, timeout: float | None = 60.0
    ) -> np.ndarray:
        req = pb.DenoiseRequest(model=model)
        if isinstance(particles, bytes):
            req.mrc = particles
        else:
            req.tensor.CopyFrom(to_tensor(np.asarray(particles, dtype=np.float32)))
        return from_tensor(self.stub.Denoise(req, timeout=timeout, metadata=self.metadata).denoised)

    def models(self, kind: str = "") -> list[pb.ModelInfo]:
        return list(self.stub.ListModels(pb.ListModelsRequest(kind=kind), metadata=self.metadata).models)

    # jobs ----------------------------------------------------------------------------------
    def submit_job(self, request: pb.JobRequest, timeout: float | None = 30.0) -> pb.Job:
        return self.stub.SubmitJob(request, timeout=timeout, metadata=self.metadata)

    def watch_job(self, job_id: str) -> Iterator[pb.JobEvent]:
        yield from self.stub.WatchJob(pb.JobRef(id=job_id), metadata=self.metadata)

    def get_job(self, job_id: str, include_result: bool = True) -> pb.Job:
        return self.stub.GetJob(pb.JobRef(id=job_id, include_result=include_result), metadata=self.metadata)

    def cancel_job(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.JobRef(id=job_id), metadata=self.metadata)
