"""DICOM benchmarks, printed as ratios measured in one run (contestants interleaved round by round).

1. Decode: a 512 x 512 CT slice (16-bit, 12 stored, Explicit VR Little Endian) through
   images.decode_image with the demo model's input spec (window stack lung / soft tissue / bone),
   and with one window (replicate), vs decoding a PNG of the same size (16-bit grey, same stored
   values; and 8-bit RGB of the window stack). Goal: <= 2x the PNG.
2. Encode: a 512 x 512 mask as a DICOM Segmentation (FRACTIONAL, 8 bits) and as a Parametric Map
   (float32), vs the PNG rendering the fast path makes (images.render_pngs: mask PNG + overlay PNG),
   and vs the mask PNG alone. Goal: SEG <= 2x the PNG rendering. Warm: the source frame's result
   template is cached (dicom_out templates: the same file and frame again, e.g. a second method or a
   retry); cold: a new source file each call, so highdicom builds the template in the call.
3. End to end: Explain over gRPC on the same model and method (ct-phantoms-classifier, saliency)
   and the same 512 x 512 slice: DICOM in + SEG out, vs PNG in (the window stack as 8-bit RGB) +
   tensor out, server in-process.

Usage: python bench/bench_dicom.py [--rounds 40] [--calls 30] [--parts 1,2,3] [--size 512]
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np

from xaiserve.paths import checkout_root

ROOT = checkout_root()
sys.path.insert(0, str(ROOT))
from xaiserve.clinical.windowing import DicomDefaults, grey_to_channels  # noqa: E402
from xaiserve.proto.explain.v1 import explainer_pb2 as pb  # noqa: E402
from xaiserve.service import dicom_out  # noqa: E402
from xaiserve.service.images import InputSpec, decode_image, decode_image_source, encode_png, render_pngs  # noqa: E402
from xaiserve.training.datasets.phantoms import DICOM_INPUT, WINDOWS, phantom_dicom, phantom_slice  # noqa: E402


def interleaved(contestants: dict, rounds: int, reps: int = 1) -> dict[str, float]:
    """Median seconds per call of each contestant, contestants alternating within every round."""
    times = {k: [] for k in contestants}
    for fn in contestants.values():  # warm-up
        fn()
    for _ in range(rounds):
        for k, fn in contestants.items():
            t = time.perf_counter()
            for _ in range(reps):
                fn()
            times[k].append((time.perf_counter() - t) / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def png16(stored: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(stored.astype(np.uint16)).save(buf, format="PNG")  # mode I;16
    return buf.getvalue()


def part_decode(data: bytes, hu: np.ndarray, rounds: int) -> None:
    stored = np.clip(np.rint(hu + 1024), 0, 4095).astype(np.uint16)
    p16 = png16(stored)
    rgb = encode_png(grey_to_channels(hu, WINDOWS))
    stack = InputSpec(64, 64, 3, (0.5,) * 3, (0.25,) * 3, dicom=DICOM_INPUT)
    single = InputSpec(64, 64, 3, (0.5,) * 3, (0.25,) * 3, dicom=DicomDefaults("replicate", (WINDOWS[1],)))
    img_d, img_16, img_rgb = pb.Image(encoded=data), pb.Image(encoded=p16), pb.Image(encoded=rgb)
    t = interleaved(
        {
            "dicom, window stack (3 ch)": lambda: decode_image(img_d, stack),
            "dicom, one window": lambda: decode_image(img_d, single),
            "png 16-bit grey": lambda: decode_image(img_16),
            "png 8-bit rgb": lambda: decode_image(img_rgb),
        },
        rounds,
        reps=5,
    )
    print(
        f"\n1. decode + windowing, {hu.shape[0]} x {hu.shape[1]} (DICOM {len(data)} B, PNG16 {len(p16)} B, PNG RGB {len(rgb)} B), median ms:"
    )
    for k, v in t.items():
        print(f"   {k:30s} {v * 1e3:7.3f}")
    for k in ("dicom, window stack (3 ch)", "dicom, one window"):
        print(
            f"   ratio {k} / png 16-bit grey: {t[k] / t['png 16-bit grey']:.2f}x   / png 8-bit rgb: {t[k] / t['png 8-bit rgb']:.2f}x"
            "   (goal <= 2x)"
        )


def part_encode(data: bytes, rounds: int, size: int = 512) -> None:
    image, source = decode_image_source(
        pb.Image(encoded=data), InputSpec(64, 64, 3, (0.5,) * 3, (0.25,) * 3, dicom=DICOM_INPUT)
    )
    yy, xx = np.mgrid[:size, :size] * (512.0 / size)
    mask = np.exp(-(((yy - 260) / 60.0) ** 2 + ((xx - 200) / 80.0) ** 2)).astype(np.float32)
    algo = dicom_out.Algorithm("ct-phantoms-classifier", "1", "saliency")
    maps = [dicom_out.Map("mask", mask, "bench mask")]
    import dataclasses
    import itertools

    fresh = itertools.count()

    def cold(fn):  # a source file never seen before: the template is built (highdicom) on this call
        return fn(dataclasses.replace(source, digest=f"cold-{next(fresh)}"), maps, algo)

    t = interleaved(
        {
            "dicom seg (fractional)": lambda: dicom_out.segmentation(source, maps, algo),
            "dicom parametric map": lambda: dicom_out.parametric_map(source, maps, algo),
            "dicom seg, cold": lambda: cold(dicom_out.segmentation),
            "dicom parametric map, cold": lambda: cold(dicom_out.parametric_map),
            "png rendering (mask+overlay)": lambda: render_pngs(image, mask),
            "png mask alone": lambda: encode_png(mask),
        },
        rounds,
    )
    print(f"\n2. encoding a {size} x {size} mask, median ms:")
    for k, v in t.items():
        print(f"   {k:30s} {v * 1e3:7.3f}")
    print(
        "   (warm: the same source frame as the call before, its template cached; cold: a source file not seen "
        "before, the template built by highdicom in the call)"
    )
    for k in ("dicom seg (fractional)", "dicom parametric map", "dicom seg, cold", "dicom parametric map, cold"):
        print(
            f"   ratio {k} / png rendering: {t[k] / t['png rendering (mask+overlay)']:.2f}x (goal <= 2x)   "
            f"/ png mask alone: {t[k] / t['png mask alone']:.2f}x"
        )


def part_e2e(data: bytes, hu: np.ndarray, calls: int) -> None:
    from tests.serverutil import running_server

    rgb = encode_png(grey_to_channels(hu, WINDOWS))
    with running_server(store=ROOT / "model_store", load_models="lazy", max_delay_ms=0) as srv:
        stub = srv.stub()
        req_d = pb.ExplainRequest(
            model="ct-phantoms-classifier",
            image=pb.Image(encoded=data),
            options=pb.ExplainOptions(output_format="dicom-seg", method="saliency"),
        )
        req_p = pb.ExplainRequest(
            model="ct-phantoms-classifier", image=pb.Image(encoded=rgb), options=pb.ExplainOptions(method="saliency")
        )
        server = {"dicom": [], "png": []}

        def call(req, key):
            r = stub.Explain(req, timeout=60)
            server[key].append(r.timing.total_ms / 1e3)

        t = interleaved(
            {"dicom in, seg out": lambda: call(req_d, "dicom"), "png in, tensor out": lambda: call(req_p, "png")}, calls
        )
    print(
        f"\n3. Explain end to end, ct-phantoms-classifier + saliency, {hu.shape[0]} x {hu.shape[1]}, median of {calls} interleaved calls (ms):"
    )
    for k, v in t.items():
        print(f"   {k:30s} {v * 1e3:7.2f} round trip")
    print(
        f"   server-side total: dicom {np.median(server['dicom']) * 1e3:.2f}, png {np.median(server['png']) * 1e3:.2f}"
    )
    print(f"   ratio dicom/seg vs png/tensor: {t['dicom in, seg out'] / t['png in, tensor out']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--parts", default="1,2,3")
    ap.add_argument("--size", type=int, default=512, help="slice side (the goals are stated for 512)")
    a = ap.parse_args()
    hu, label, _ = phantom_slice(a.size, seed=7)
    data = phantom_dicom(hu)
    print(
        f"phantom slice {a.size} x {a.size}, finding {label}; DICOM {len(data)} bytes; one process, contestants interleaved"
    )
    parts = {int(p) for p in a.parts.split(",")}
    if 1 in parts:
        part_decode(data, hu, a.rounds)
    if 2 in parts:
        part_encode(data, a.rounds, a.size)
    if 3 in parts:
        part_e2e(data, hu, a.calls)


if __name__ == "__main__":
    main()
