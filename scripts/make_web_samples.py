"""Writes the web viewer's sample inputs (xaiserve/service/web/static/samples/): two synthetic
lesion images, two scene images and a small simulated Cryo-EM particle stack, drawn from the test
splits of the default models' own (procedural, non-patient) datasets. Run from the repository root:

    python scripts/make_web_samples.py

The files are committed; rerun only to change them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

OUT = Path(__file__).resolve().parent.parent / "xaiserve" / "service" / "web" / "static" / "samples"


def _png(chw: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chw.transpose(1, 2, 0))).save(buf, "PNG", optimize=True)
    path.write_bytes(buf.getvalue())


def main() -> None:
    from xaiserve.handlers.denoise.client_io import write_stack
    from xaiserve.training.datasets.cryoem import CryoEMConfig, simulate
    from xaiserve.training.datasets.lesions import lesions
    from xaiserve.training.datasets.scenes import scenes

    OUT.mkdir(parents=True, exist_ok=True)
    les = lesions(sizes={"train": 1, "val": 1, "test": 8}).split("test")
    for i, name in ((1, "lesion-1.png"), (2, "lesion-2.png")):
        _png(les.images[i], OUT / name)
    sc = scenes(sizes={"train": 1, "val": 1, "test": 8}).split("test")
    for i, name in ((0, "scene-1.png"), (3, "scene-2.png")):
        _png(sc.images[i], OUT / name)
    ps = simulate(CryoEMConfig(seed=7, sizes={"train": 1, "val": 1, "test": 8}), "test", 8)
    write_stack(OUT / "particles.mrcs", np.asarray(ps.noisy, dtype=np.float32))
    for p in sorted(OUT.iterdir()):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
