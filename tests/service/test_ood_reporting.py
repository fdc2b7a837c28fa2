"""A reconstruction's out-of-distribution verdict reaches everything a reader sees (issue 24):
report.json, the job JSON, the console page and the DICOM series' ImageComments.

The tiny test prior is untrained (its loss is about 1 on any image), so its check is
calibrated on the submission's own reconstruction: as it is (not flagged), and with the
reference losses ten times larger, a validation set unlike the input (flagged). Whether
the bundled priors flag what they should is tests/models/test_ood.py's business."""

import io
import zipfile

import numpy as np
import pydicom
import torch

from models.inverse import Prior
from models.ood import calibrate, dsm_losses
from models.registry import update_card
from tests.service.conftest import auth
from tests.service.test_gateway import submit, wait


def _calibrate(settings, images: torch.Tensor, percentile: float, shift: float = 1.0) -> None:
    """tiny32's card gets the DSM check calibrated on ``images`` (N, 1, 32, 32), its
    reference losses multiplied by ``shift`` (a validation set unlike the input)."""
    prior = Prior.load(str(settings.models / "tiny32"))
    times = (0.1, 0.3, 0.5)
    losses = dsm_losses(prior.score_fn, prior.sde, images, times)
    check = calibrate(losses * shift, times, percentile, tuned_by="test")
    update_card(settings.models / "tiny32", {"ood": check.to_card()})


def _first_reconstruction(client, key: str) -> torch.Tensor:
    """The test request's reconstruction, 8 times: (8, 1, 32, 32)."""
    first = wait(client, key, submit(client, key, samples="2").json()["id"])
    recon = client.get(first["links"]["result_npy"], headers=auth(key)).content
    return torch.from_numpy(np.load(io.BytesIO(recon))).repeat(8, 1, 1, 1)


def _console_page(client, key: str, job_id: str) -> str:
    client.get("/ui/login")
    token = client.cookies.get("scorerecon_csrf")
    r = client.post(
        "/ui/login",
        data={"key": key, "csrf_token": token},
        headers={"Origin": str(client.base_url)},
        follow_redirects=False,
    )
    assert r.status_code == 303, r.text
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    return page.text


def _dicom_comments(client, key: str, done: dict) -> list[str]:
    r = client.get(done["links"]["result_dicom"], headers=auth(key))
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        return [pydicom.dcmread(io.BytesIO(z.read(n))).ImageComments for n in z.namelist()]


def test_a_flagged_result_says_so_in_the_report_the_job_the_console_and_the_dicom(
    gateway, settings
):
    client, keys, _ = gateway
    _calibrate(settings, _first_reconstruction(client, keys["alice"]), 99.0, shift=10.0)
    r = submit(client, keys["alice"], samples="2")
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"])
    assert done["state"] == "succeeded", done["error"]
    ood = done["ood"]
    assert ood["flag"] is True and ood["flagged_slices"] == [0], ood
    assert ood["score"] > ood["threshold"] and ood["method"] == "dsm on the reconstruction"
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["ood"] == ood
    assert any("OUT OF DISTRIBUTION" in w for w in report["warnings"])
    comments = _dicom_comments(client, keys["alice"], done)
    assert len(comments) == 2 and all(c.startswith("OUT OF DISTRIBUTION") for c in comments)
    assert all("RESEARCH" in c for c in comments)  # the research notice stays
    page = _console_page(client, keys["alice"], done["id"])
    assert 'class="ood-warning"' in page and "Out of distribution" in page


def test_an_input_like_the_validation_data_is_not_flagged(gateway, settings):
    client, keys, _ = gateway
    # The threshold is the largest score of the noise draws of seeds 0-7: the same request
    # (seed 0, so the same image and draw) scores one of them.
    _calibrate(settings, _first_reconstruction(client, keys["alice"]), 100.0)
    done = wait(client, keys["alice"], submit(client, keys["alice"], samples="2").json()["id"])
    assert done["state"] == "succeeded", done["error"]
    assert done["ood"]["flag"] is False and done["ood"]["flagged_slices"] == []
    comments = _dicom_comments(client, keys["alice"], done)
    assert all(c.startswith("In-distribution check passed") for c in comments)
    page = _console_page(client, keys["alice"], done["id"])
    assert 'class="ood-warning"' not in page and "In-distribution check passed" in page


def test_a_prior_without_a_check_reports_none(gateway):
    client, keys, _ = gateway
    done = wait(client, keys["alice"], submit(client, keys["alice"]).json()["id"])
    assert done["state"] == "succeeded" and done["ood"] is None
    report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
    assert report["ood"] is None
