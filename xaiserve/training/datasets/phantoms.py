"""ct-phantoms: SYNTHETIC, procedurally generated CT-like axial slices (not real patient data).

Each slice is rendered in Hounsfield units (HU): air around an elliptical body of soft tissue with a
fat rim, two lungs with vessel dots, a vertebra with cortical bone and marrow, sometimes the scanner
table, CT noise, and exactly one finding whose class needs a different window to see:

- lung nodule: a small soft-tissue density (20..60 HU) inside a lung (lung window);
- calcification: a tiny very dense spot (500..1000 HU) in the soft tissue (bone window);
- hypodense lesion: a low-contrast round region (-5..15 HU against 40..60 HU) in the soft tissue
  (soft-tissue window);
- lytic bone lesion: a low-density hole (50..150 HU) in the vertebral body (bone window).

The ground truth is the finding's disc, pixel-exact (a pixel is in the mask iff the finding was drawn
there). The model input is the window stack of the slice: channel 0 the lung window, 1 soft tissue,
2 bone (WINDOWS), computed with the same xaiserve.clinical.windowing functions the server applies
to a DICOM image, so a slice served as DICOM reaches the model as it was trained.

`phantom_dicom` writes a slice as a CT Image Storage DICOM file (stored values + Rescale Intercept
-1024, 12 bits stored in 16), for tests, benchmarks and the README's round trip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from xaiserve.clinical.windowing import DicomDefaults, Window, grey_to_channels
from xaiserve.training.datasets.base import Rendered, SyntheticDataset, pixel_grid, smooth_noise

PHANTOM_LABELS = ("lung nodule", "calcification", "hypodense lesion", "lytic bone lesion")
WINDOWS = (
    Window(-600.0, 1500.0, "LINEAR", "lung"),
    Window(40.0, 400.0, "LINEAR", "soft tissue"),
    Window(400.0, 1800.0, "LINEAR", "bone"),
)
DICOM_INPUT = DicomDefaults("window_stack", WINDOWS)
AIR, FAT, SOFT, LUNG, BONE, MARROW = -1000.0, -100.0, 45.0, -850.0, 750.0, 250.0


@dataclass(frozen=True)
class PhantomsConfig:
    size: int = 64
    seed: int = 0
    sizes: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 500, "test": 500})
    noise_hu: float = 12.0
    table_prob: float = 0.5


def _disc(yy: np.ndarray, xx: np.ndarray, cy: np.ndarray, cx: np.ndarray, r: np.ndarray) -> np.ndarray:
    return (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 < (r[:, None, None]) ** 2


def _ellipse(yy: np.ndarray, xx: np.ndarray, cy, cx, ry, rx) -> np.ndarray:
    return ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2 + (
        (xx - cx[:, None, None]) / rx[:, None, None]
    ) ** 2 < 1.0


class Phantoms(SyntheticDataset):
    name = "ct-phantoms"
    labels = PHANTOM_LABELS
    dicom_input = DICOM_INPUT  # published as the manifest's input.dicom (training.zoo.input_spec)
    default_method = "saliency"  # its classifier's manifest default_method (no NEMt for it: see its card)

    def __init__(self, config: PhantomsConfig = PhantomsConfig()):
        super().__init__(size=config.size, seed=config.seed, sizes=config.sizes)
        self.config = config

    def slices(
        self, rng: np.random.Generator, n: int, *, draw_objects: bool = True, label: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(HU float32 [n,S,S], labels int64 [n], finding masks bool [n,S,S])."""
        s = float(self.size)
        yy, xx = pixel_grid(self.size)
        drawn = rng.integers(0, len(PHANTOM_LABELS), n)
        label = drawn if label is None else np.broadcast_to(np.asarray(label, np.int64), (n,)).copy()
        u = lambda lo, hi, shape=(n,): rng.uniform(lo, hi, shape)  # noqa: E731
        cy, cx = s * (0.5 + u(-0.03, 0.03)), s * (0.5 + u(-0.03, 0.03))
        ry, rx = s * u(0.30, 0.36), s * u(0.40, 0.46)
        rim = s * u(0.025, 0.045)
        body = _ellipse(yy, xx, cy, cx, ry, rx)
        inner = _ellipse(yy, xx, cy, cx, ry - rim, rx - rim)
        soft = SOFT + u(-5, 15)[:, None, None] + 40.0 * (smooth_noise(rng, n, 1, 6, self.size)[:, 0] - 0.5)
        hu = np.full((n, self.size, self.size), AIR, np.float32)
        hu = np.where(body, FAT, hu)
        hu = np.where(inner, soft, hu)
        # lungs: two ellipses in the upper (anterior-up) body, vessels as small dense dots
        lcy = cy - ry * u(0.05, 0.15)
        lung_off = rx * u(0.40, 0.48)
        lry, lrx = ry * u(0.45, 0.58), rx * u(0.25, 0.32)
        lungs = []
        for side in (-1.0, 1.0):
            lung = _ellipse(yy, xx, lcy, cx + side * lung_off, lry, lrx)
            lungs.append(lung)
            hu = np.where(lung, LUNG + 40.0 * (smooth_noise(rng, n, 1, 8, self.size)[:, 0] - 0.5), hu)
        lung_any = lungs[0] | lungs[1]
        vessels = (rng.random((n, self.size, self.size)) > 0.985) & lung_any
        hu = np.where(vessels, -350.0, hu)
        # vertebra: cortical bone ring with marrow, low in the body
        vcy, vcx = cy + ry * u(0.55, 0.65), cx + s * u(-0.01, 0.01)
        vr = s * u(0.07, 0.085)
        vert = _disc(yy, xx, vcy, vcx, vr)
        marrow = _disc(yy, xx, vcy, vcx, vr * 0.62)
        hu = np.where(vert, BONE + u(-50, 50)[:, None, None], hu)
        hu = np.where(marrow, MARROW + u(-40, 40)[:, None, None], hu)
        # scanner table (class-independent distractor): a dense band below the body
        ty = cy + ry + s * u(0.03, 0.06)
        table = (np.abs(yy - ty[:, None, None]) < s * 0.015) & (rng.random((n, 1, 1)) < self.config.table_prob)
        hu = np.where(table & ~body, 200.0, hu)

        # the finding; candidates are drawn for every class so the random stream does not depend on it
        mask = np.zeros((n, self.size, self.size), bool)
        cand = 12
        ang, rad = u(0, 2 * np.pi, (n, cand)), np.sqrt(u(0, 1, (n, cand)))
        side = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        nod_r, cal_r, cyst_r, lyt_r = s * u(0.03, 0.055), s * u(0.02, 0.032), s * u(0.05, 0.075), vr * u(0.30, 0.45)
        nod_hu, cal_hu, cyst_hu, lyt_hu = u(20, 60), u(500, 1000), u(-5, 15), u(50, 150)
        soft_y = cy[:, None] + ry[:, None] * 0.75 * rad * np.sin(ang)
        soft_x = cx[:, None] + rx[:, None] * 0.75 * rad * np.cos(ang)
        for k in range(n):
            lab = int(label[k])
            if lab == 0:  # inside one lung, away from its border
                y0 = lcy[k] + 0.55 * lry[k] * rad[k, 0] * np.sin(ang[k, 0])
                x0 = cx[k] + side[k] * lung_off[k] + 0.55 * lrx[k] * rad[k, 0] * np.cos(ang[k, 0])
                r, v = nod_r[k], nod_hu[k]
            elif lab == 3:  # inside the vertebral body's marrow
                y0 = vcy[k] + 0.25 * vr[k] * np.sin(ang[k, 0])
                x0 = vcx[k] + 0.25 * vr[k] * np.cos(ang[k, 0])
                r, v = lyt_r[k], lyt_hu[k]
            else:  # soft tissue: the first candidate whose disc misses the lungs, the vertebra and the rim
                r, v = (cal_r[k], cal_hu[k]) if lab == 1 else (cyst_r[k], cyst_hu[k])
                y0, x0 = cy[k], cx[k]
                for j in range(cand):
                    d = _disc(yy, xx, soft_y[k, j : j + 1], soft_x[k, j : j + 1], np.array([r + 1.0]))[0]
                    if not (d & (lung_any[k] | vert[k] | ~inner[k])).any():
                        y0, x0 = soft_y[k, j], soft_x[k, j]
                        break
            disc = _disc(yy, xx, np.array([y0]), np.array([x0]), np.array([r]))[0]
            if lab == 3:
                disc &= marrow[k] | vert[k]
            mask[k] = disc
            if draw_objects:
                hu[k] = np.where(disc, v, hu[k])
        hu = hu + rng.normal(0.0, self.config.noise_hu, hu.shape).astype(np.float32)
        return np.clip(hu, -1024.0, 3071.0).astype(np.float32), label.astype(np.int64), mask

    def render(
        self, rng: np.random.Generator, n: int, split: str, chunk: int, *, draw_objects: bool = True
    ) -> Rendered:
        hu, label, mask = self.slices(rng, n, draw_objects=draw_objects)
        img = np.stack([grey_to_channels(h, WINDOWS).transpose(2, 0, 1) for h in hu])
        return Rendered(img.astype(np.float32), label, mask)


def phantoms(*, seed: int = 0, size: int = 64, sizes: dict[str, int] | None = None) -> Phantoms:
    return Phantoms(PhantomsConfig(seed=seed, size=size, sizes=sizes or PhantomsConfig().sizes))


def phantom_slice(size: int = 64, *, seed: int = 0, label: int | None = None) -> tuple[np.ndarray, int, np.ndarray]:
    """One slice (HU [S,S], label, mask), reproducible from the seed (any size, e.g. 512 for benchmarks)."""
    ds = Phantoms(PhantomsConfig(size=size, seed=seed, sizes={"train": 1, "val": 1, "test": 1}))
    hu, lab, mask = ds.slices(
        np.random.default_rng([seed, 0xC7]), 1, label=None if label is None else np.array([label])
    )
    return hu[0], int(lab[0]), mask[0]


def phantom_dicom(
    hu: np.ndarray,
    *,
    patient_name: str = "Phantom^Synthetic",
    patient_id: str = "PHANTOM-0",
    birth_date: str = "",
    frames: int = 1,
    photometric: str = "MONOCHROME2",
    window: Window | None = WINDOWS[1],
) -> bytes:
    """A CT Image Storage Part 10 file of HU slice(s): stored = HU + 1024 (12 of 16 bits, unsigned),
    Rescale Intercept -1024. `frames` > 1 repeats the slice as a multi-frame image (frame k offset by
    k HU, so frames are distinguishable). `photometric` only labels the same stored values
    (MONOCHROME1: displayed inverted). The patient attributes are whatever the caller passes (tests
    use marker strings to check nothing leaks)."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = np.asarray(hu, np.float32)
    stack = np.stack([hu + k for k in range(frames)]) if frames > 1 else hu[None]
    stored = np.clip(np.rint(stack + 1024.0), 0, 4095).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient_name, patient_id, birth_date, "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
        "20260101",
        "120000",
        "",
        "",
        "1",
    )
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, 1
    ds.Manufacturer = "xaiserve synthetic phantom"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.Rows, ds.Columns = int(hu.shape[0]), int(hu.shape[1])
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = 1, -1024, "HU"
    ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
    ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, 0]
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window.center, window.width
    if frames > 1:
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00180050  # Slice Thickness: frames are a stack of repeated slices
    ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
