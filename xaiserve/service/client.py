"""A small Python client for xaiserve.

    from xaiserve.service.client import ExplainerClient
    with ExplainerClient("127.0.0.1:50051") as c:
        r = c.explain("cat.png", model="scenes-nemu", fidelity=True)
        r.mask            # float32 [H, W] in [0, 1]
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from xaiserve.proto.explain.v1 import explainer_pb2 as pb
from xaiserve.proto.explain.v1 import explainer_pb2_grpc as pb_grpc
from xaiserve.service.tensors import from_tensor, to_tensor

ImageLike = str | os.PathLike | bytes | np.ndarray


def image_message(image: ImageLike) -> pb.Image:
    """A path or encoded bytes travel as-is; an array as a raw tensor (uint8, or float32 in [0,1])."""
    if isinstance(image, np.ndarray):
        a = image if image.dtype == np.uint8 else image.astype(np.float32)
        return pb.Image(tensor=to_tensor(a))
    if isinstance(image, bytes):
        return pb.Image(encoded=image)
    return pb.Image(encoded=Path(image).read_bytes())


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

    @staticmethod
    def from_response(r: pb.ExplainResponse) -> "Explanation":
        return Explanation(
            model=r.model, mask=from_tensor(r.mask), output=from_tensor(r.output) if r.output.shape else None,
            fidelity=r.fidelity if r.HasField("fidelity") else None, target_label=r.target_label,
            mask_png=r.mask_png, overlay_png=r.overlay_png, timing=r.timing,
        )


class ExplainerClient:
    def __init__(self, address: str = "127.0.0.1:50051", *, token: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, max_message_mb: int = 64):
        opts = [("grpc.max_receive_message_length", max_message_mb << 20), ("grpc.max_send_message_length", max_message_mb << 20)]
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

    def explain(self, image: ImageLike, model: str, *, method: str = "", return_output: bool = False,
                fidelity: bool = False, return_png: bool = False, target_label: int | None = None,
                timeout: float | None = 30.0) -> Explanation:
        opts = pb.ExplainOptions(method=method, return_output=return_output, fidelity=fidelity, return_png=return_png)
        if target_label is not None:
            opts.target_label = target_label
        r = self.stub.Explain(pb.ExplainRequest(model=model, image=image_message(image), options=opts),
                              timeout=timeout, metadata=self.metadata)
        return Explanation.from_response(r)

    def stream(self, frames: Iterable[ImageLike], model: str, *, policy: int = pb.LATEST, max_queue: int = 0,
               options: pb.ExplainOptions | None = None) -> Iterator[pb.ExplainFrameResult]:
        def gen():
            for i, f in enumerate(frames):
                msg = pb.ExplainFrame(frame_id=i, image=image_message(f))
                if i == 0:
                    msg.model, msg.policy, msg.max_queue = model, policy, max_queue
                    if options is not None:
                        msg.options.CopyFrom(options)
                yield msg

        yield from self.stub.StreamExplain(gen(), metadata=self.metadata)

    def denoise(self, particles: np.ndarray | bytes, model: str = "cryoem-spiral", *, timeout: float | None = 60.0) -> np.ndarray:
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
