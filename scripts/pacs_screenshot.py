"""docs/pacs_orthanc.png: a reconstructed series as the PACS shows it.

Starts Orthanc on loopback (temporary storage), reconstructs a held-out CT phantom from 23
views with the bundled ``ct-default``, pushes the series by STOW-RS into a study, and takes
screenshots of Orthanc Explorer's series page and of Orthanc's own rendering of a slice, in
headless Chromium. Stops Orthanc by the pid it started.

Run: ``python scripts/pacs_screenshot.py`` (needs scripts/install-orthanc.sh and
scripts/install-chromium.sh).
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import torch
from orthanc_local import local_orthanc  # scripts/, beside this file

from models.inverse import Prior, ReconConfig, reconstruct, steps_for_nfe
from models.io import HUMapping
from models.phantoms import ct_phantoms
from models.physics import from_spec
from service.dicom_export import series
from service.pacs import Destination, push

DOCS = Path(__file__).resolve().parents[1] / "docs"


def main() -> None:
    with local_orthanc() as base:
        truth = ct_phantoms(3, 128, seed=1)
        op = from_spec({"modality": "ct", "image_size": 128, "n_views": 23})
        with torch.no_grad():
            y = op.forward(truth)
        cfg_r = ReconConfig(sampler="fast")
        cfg_r.n_steps = steps_for_nfe(cfg_r, 60)
        rec = reconstruct(op, y, Prior.load("ct-default"), cfg_r, n_samples=2, seed=0)
        hu = HUMapping().to_hu(rec.mean[:, 0].numpy())
        source = {
            "PatientID": "PHANTOM-1",
            "PatientName": "PHANTOM^THORAX",
            "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.4242",
            "StudyDescription": "sparse-view CT (23 views), phantom",
        }
        dest = Destination(name="docs", kind="stowrs", url=base + "/dicom-web")
        push(dest, series(hu, "CT", "d" * 32, "ct-default", source, (1.0, 1.0), 1.0))
        series_id = httpx.get(base + "/series").json()[0]
        instance = httpx.get(f"{base}/series/{series_id}/instances").json()[1]["ID"]
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = "/usr/bin/chromium"
        for arg in ("--headless=new", "--no-sandbox", "--window-size=1200,800"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"{base}/app/explorer.html#series?uuid={series_id}")
            time.sleep(3)
            driver.save_screenshot(str(DOCS / "pacs_orthanc.png"))
            driver.get(f"{base}/instances/{instance}/preview")
            time.sleep(1)
            driver.save_screenshot(str(DOCS / "pacs_orthanc_preview.png"))
        finally:
            driver.quit()
        print("wrote", DOCS / "pacs_orthanc.png", DOCS / "pacs_orthanc_preview.png")


if __name__ == "__main__":
    main()
