"""DICOM benchmarks, printed as ratios measured in one run (contestants interleaved round by round).

1. Decode: a 512 x 512 CT slice (16-bit, 12 stored, Explicit VR Little Endian) through
   images.decode_image with the demo model's input spec (window stack lung / soft tissue / bone),
   and with one window (replicate), vs decoding a PNG of the same size (16-bit grey, same stored
   values; and 8-bit RGB of the window stack). Goal: <= 2x the PNG.
2. Encode: a 512 x 512 mask as a DICOM Segmentation (FRACTIONAL, 8 bits) and as a Parametric Map
   (float32), vs the PNG rendering the fast path makes (images.render_pngs: mask PNG + overlay PNG),
   and vs the mask PNG alone. Goal: SEG <= 2x the PNG rendering. Warm: the same source frame again;
   cold: a new source file each call (another patient, study, series, instance, position) of a header
   structure seen before, so its values are spliced into the structure's template
   (service/dicom_template.py); uncached: highdicom from the source every call; first of structure:
   the process's first source of that structure (two stand-in builds by highdicom).
3. End to end: Explain over gRPC on the same model and method (ct-phantoms-classifier, saliency)
   and the same 512 x 512 slice: DICOM in + SEG out, vs PNG in (the window stack as 8-bit RGB) +
   tensor out, server in-process.

4. Cine: the CPU cost per frame of a multi-frame file sent once with image.dicom.all_frames on
   StreamExplain, before (each frame re-read the whole file) and now (read once, frames cut lazily),
   on pydicom's bundled multi-frame files and a 30-frame 512 x 512 phantom.

Usage: python bench/bench_dicom.py [--rounds 40] [--calls 30] [--parts 1,2,3,4] [--size 512]
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

    from pydicom.uid import generate_uid

    from xaiserve.service import dicom_template

    def another(k: int):  # the same structure, every source-specific value new: another patient's slice
        h = source.header.copy()
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            setattr(h, kw, generate_uid())
        h.PatientName, h.PatientID, h.StudyDate = (
            f"Bench^Patient{k}",
            f"ID{k:06d}",
            f"2024{1 + k % 12:02d}{1 + k % 28:02d}",
        )
        h.ImagePositionPatient = [-100.0, -100.0, float(k)]
        return dataclasses.replace(source, header=h)

    others = [another(k) for k in range(2 * rounds + 8)]
    fresh = itertools.count()

    def cold(fn):  # a source file never seen before, of a structure seen before (template hit)
        return fn(others[next(fresh) % len(others)], maps, algo)

    def first(fn):  # the first source of its structure in the process: two stand-in builds by highdicom
        kept = dict(dicom_template._templates)
        dicom_template.clear()
        try:
            return fn(source, maps, algo)
        finally:
            dicom_template._templates.update(kept)  # the other contestants' templates, as they were

    t = interleaved(
        {
            "dicom seg (fractional)": lambda: dicom_out.segmentation(source, maps, algo),
            "dicom parametric map": lambda: dicom_out.parametric_map(source, maps, algo),
            "dicom seg, cold": lambda: cold(dicom_out.segmentation),
            "dicom parametric map, cold": lambda: cold(dicom_out.parametric_map),
            "dicom seg, uncached": lambda: dicom_out.segmentation(source, maps, algo, cache=False),
            "dicom pmap, uncached": lambda: dicom_out.parametric_map(source, maps, algo, cache=False),
            "dicom seg, first of structure": lambda: first(dicom_out.segmentation),
            "png rendering (mask+overlay)": lambda: render_pngs(image, mask),
            "png mask alone": lambda: encode_png(mask),
        },
        rounds,
    )
    print(f"\n2. encoding a {size} x {size} mask, median ms:")
    for k, v in t.items():
        print(f"   {k:30s} {v * 1e3:7.3f}")
    print(
        "   (warm: the same source frame again; cold: a source file not seen before (new patient, UIDs, position) "
        "whose header structure was seen (dicom_template); uncached: highdicom from the source on every call, "
        "as before templates; first of structure: the template built from two stand-ins)"
    )
    for k in (
        "dicom seg (fractional)",
        "dicom parametric map",
        "dicom seg, cold",
        "dicom parametric map, cold",
        "dicom seg, uncached",
        "dicom pmap, uncached",
        "dicom seg, first of structure",
    ):
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


def part_cine(rounds: int) -> None:
    """Per-frame CPU cost of image.dicom.all_frames on StreamExplain: before, every frame was the
    whole file with image.dicom.frame = k (the request copied it, probe and decode parsed it, the
    decode hashed it); now the file is read once per message (dicom_in.Cine) and each frame is cut
    from it as a single-frame file. Both then go through the same probe (admission) and decode."""
    from tests.dicomutil import sample
    from xaiserve.service.dicom_in import Cine, probe_dicom
    from xaiserve.service.images import decode_image_source

    hu, _, _ = phantom_slice(512, seed=9)
    files = {
        "examples_ybr_color.dcm (30 x 240 x 320, JPEG)": sample("examples_ybr_color.dcm"),
        "rtdose.dcm (15 x 10 x 10, implicit)": sample("rtdose.dcm"),
        "SC_rgb_rle_2frame.dcm (2 x 100 x 100, RLE)": sample("SC_rgb_rle_2frame.dcm"),
        "phantom CT (30 x 512 x 512, explicit)": phantom_dicom(hu, frames=30),
    }
    spec = InputSpec(64, 64, 3, (0.5,) * 3, (0.25,) * 3, dicom=DICOM_INPUT)
    print(f"\n4. cine on StreamExplain (image.dicom.all_frames), CPU per frame (median ms over {rounds} passes):")
    for name, data in files.items():
        msg = pb.Image(encoded=data, dicom=pb.DicomOptions(all_frames=True))
        n = Cine(msg).frames

        def before():
            for k in range(n):
                req = pb.ExplainRequest(model="m", image=msg)
                req.image.dicom.ClearField("all_frames")
                req.image.dicom.frame = k
                probe_dicom(req.image)
                decode_image_source(req.image, spec)

        def after():
            cine = Cine(msg)
            for k in range(n):
                req = pb.ExplainRequest(model="m", image=cine.image(k))
                probe_dicom(req.image)
                decode_image_source(req.image, spec)

        t = interleaved({"before": before, "after": after}, rounds)
        print(
            f"   {name:46s} before {t['before'] / n * 1e3:7.2f}  after {t['after'] / n * 1e3:7.2f}  "
            f"({t['before'] / t['after']:.1f}x; {len(data) / 1e6:.2f} MB)"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--calls", type=int, default=30)
    ap.add_argument("--parts", default="1,2,3,4")
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
    if 4 in parts:
        part_cine(max(3, a.rounds // 8))


if __name__ == "__main__":
    main()
