"""docs/pacs_registered.png: a source slice and its reconstruction, as the PACS holds them.

Starts Orthanc on loopback (temporary storage). Writes a real held-out CT slice (Cranium's
test slab, from ``make realdata``) as the "original" instance, with its own geometry, and
reconstructs it from 23 simulated views (the evaluation protocol's grid twice as fine) with
the bundled ``ct-default``, the series written with that instance as its source. Both go to
Orthanc by STOW-RS. The figure shows Orthanc's own rendering of each
(``/instances/{id}/preview``) beside the geometry Orthanc reports for each: the same
position, orientation, field of view and frame of reference, so a viewer registers them.
Stops Orthanc by the pid it started.

Run: ``python scripts/pacs_registered.py`` (needs scripts/install-orthanc.sh and the real data).
"""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from orthanc_local import local_orthanc  # noqa: E402  (scripts/, beside this file)
from PIL import Image  # noqa: E402

from models.inverse import Prior, ReconConfig, reconstruct  # noqa: E402
from models.io import HUMapping  # noqa: E402
from models.protocol import fine_slices, simulate  # noqa: E402
from service.dicom_export import series, source_attributes, to_bytes  # noqa: E402
from service.pacs import Destination, push  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs"
TAGS = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")


def original(hu: np.ndarray) -> bytes:
    """The source instance: an ORIGINAL CT slice of 256² at 0.96 mm, 40 mm above the origin,
    in a frame of reference of its own (as a scanner writes it)."""
    ds = series(
        hu[None], "CT", "0" * 32, "scanner", {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77"}
    )[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesDescription, ds.SeriesNumber = "Head CT, full views (source)", 3
    ds.ImageComments = "The source slice, written here from Cranium's held-out test slab."
    for kw in ("DerivationDescription", "DerivationCodeSequence", "ContributingEquipmentSequence"):
        delattr(ds, kw)
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.78"
    ds.PixelSpacing = [0.957031, 0.957031]
    ds.ImagePositionPatient = [-122.0, -131.5, 40.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    return to_bytes(ds)


def main() -> None:
    with local_orthanc() as base:
        fine = fine_slices("ct", "test", 128, 1)  # (1, 1, 256, 256)
        hu_source = HUMapping().to_hu(fine[0, 0].numpy())
        raw = original(hu_source)
        sim = simulate(fine, "ct-sparse", 23, "gaussian:0.005", seed=2)
        prior = Prior.load("ct-default")
        rec = reconstruct(sim.operator, sim.y, prior, ReconConfig.for_prior(prior, "ct"), 1, 0)
        hu = HUMapping().to_hu(rec.mean[:, 0].numpy())
        dest = Destination(name="docs", kind="stowrs", url=base + "/dicom-web")
        push(dest, [pydicom.dcmread(io.BytesIO(raw))])
        push(dest, series(hu, "CT", "r" * 32, "ct-default", source_attributes(raw)))
        panels = []
        for instance in httpx.get(base + "/instances").json():
            tags = httpx.get(f"{base}/instances/{instance}/simplified-tags").json()
            png = httpx.get(f"{base}/instances/{instance}/preview").content
            panels.append((tags, np.asarray(Image.open(io.BytesIO(png)).convert("L"))))
        panels.sort(key=lambda p: p[0]["ImageType"].startswith("DERIVED"))
        fig, axes = plt.subplots(1, 2, figsize=(11, 7.6))
        for ax, (tags, img) in zip(axes, panels, strict=True):
            ax.imshow(img, cmap="gray")
            ax.set_title(tags["SeriesDescription"], fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
            fov = [
                float(s) * int(tags[n])
                for s, n in zip(tags["PixelSpacing"].split("\\"), ("Rows", "Columns"), strict=True)
            ]
            lines = [f"{t}: {tags[t]}" for t in TAGS] + [
                f"field of view: {fov[0]:.1f} × {fov[1]:.1f} mm",
                f"FrameOfReferenceUID: …{tags['FrameOfReferenceUID'][-12:]}",
            ]
            ax.text(
                0,
                -0.02,
                "\n".join(lines),
                transform=ax.transAxes,
                va="top",
                fontsize=7.5,
                family="monospace",
            )
        fig.suptitle(
            "Source slice and its reconstruction (23 views, ct-default), as Orthanc renders them"
        )
        fig.subplots_adjust(left=0.02, right=0.98, top=0.9, bottom=0.2, wspace=0.05)
        fig.savefig(DOCS / "pacs_registered.png", dpi=90)
        print("wrote", DOCS / "pacs_registered.png")


if __name__ == "__main__":
    torch.set_num_threads(2)
    main()
