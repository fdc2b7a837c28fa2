"""Export to a real Orthanc (Debian's package, installed by scripts/install-orthanc.sh):
DICOMweb STOW-RS and DIMSE C-STORE, the series filed into the source study, and an
association rejection reported once as a configuration error."""

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pydicom
import pytest

from tests.service.conftest import CT_SPEC, auth, ct_measurement
from tests.service.test_gateway import submit, wait

ORTHANC = shutil.which("Orthanc")
PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
pytestmark = pytest.mark.skipif(
    ORTHANC is None or not os.path.exists(PLUGIN),
    reason="Orthanc missing: run scripts/install-orthanc.sh (make test does)",
)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def orthanc(tmp_path):
    http, dicom = _port(), _port()
    cfg = {
        "Name": "scorerecon-test",
        "StorageDirectory": str(tmp_path / "orthanc"),
        "IndexDirectory": str(tmp_path / "orthanc"),
        "HttpPort": http,
        "DicomPort": dicom,
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"scorerecon": "s3cret"},
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    path = tmp_path / "orthanc.json"
    path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        [ORTHANC, str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{http}"
    end = time.monotonic() + 30
    while True:
        try:
            if httpx.get(base + "/system", auth=("scorerecon", "s3cret")).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < end and proc.poll() is None, "Orthanc did not start"
        time.sleep(0.1)
    yield base, dicom
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)


def test_export_by_stow_rs_and_c_store_into_the_source_study(gateway, settings, orthanc):
    client, keys, _ = gateway
    base, dicom_port = orthanc
    settings.pacs = {
        "web": {
            "kind": "stowrs",
            "url": base + "/dicom-web",
            "username": "scorerecon",
            "password": "s3cret",
        },
        "dimse": {"kind": "dimse", "host": "127.0.0.1", "port": dicom_port, "ae_title": "ORTHANC"},
        "wrong-aet": {
            "kind": "dimse",
            "host": "127.0.0.1",
            "port": dicom_port,
            "ae_title": "NOT-ORTHANC",
        },
    }
    source = '{"PatientID": "P-7", "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.1"}'
    job = submit(client, keys["alice"], samples="2", source=source).json()
    assert wait(client, keys["alice"], job["id"])["state"] == "succeeded"
    for name in ("web", "dimse"):
        r = client.post(
            f"/v1/jobs/{job['id']}/export", json={"destination": name}, headers=auth(keys["alice"])
        )
        assert r.status_code == 202, r.text
        done = wait(client, keys["alice"], r.json()["id"])
        assert done["state"] == "succeeded", done
        report = client.get(done["links"]["result_json"], headers=auth(keys["alice"])).json()
        assert report["sent"] == 2
    pacs = httpx.Client(base_url=base, auth=("scorerecon", "s3cret"))
    studies = pacs.get("/studies").json()
    assert len(studies) == 1  # both protocols, same deterministic instances, one study
    study = pacs.get(f"/studies/{studies[0]}").json()
    assert study["MainDicomTags"]["StudyInstanceUID"] == "1.2.826.0.1.3680043.8.498.1"
    assert study["PatientMainDicomTags"]["PatientID"] == "P-7"
    assert len(study["Series"]) == 2  # reconstruction and uncertainty
    # Geometry and HU read back from the PACS match the reconstruction.
    import io

    import numpy as np

    from models.io import HUMapping

    recon = np.load(
        io.BytesIO(
            client.get(
                f"/v1/jobs/{job['id']}/result?format=npy", headers=auth(keys["alice"])
            ).content
        )
    )[0, 0]
    std = np.load(
        io.BytesIO(
            client.get(
                f"/v1/jobs/{job['id']}/result?format=std", headers=auth(keys["alice"])
            ).content
        )
    )[0, 0]
    for series_id in study["Series"]:
        ser = pacs.get(f"/series/{series_id}").json()
        if "uncertainty" in ser["MainDicomTags"].get("SeriesDescription", ""):
            (instance,) = ser["Instances"]
            ds = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{instance}/file").content))
            slope = float(ds.RealWorldValueMappingSequence[0].RealWorldValueSlope)
            std_hu = std * (HUMapping().hu_max - HUMapping().hu_air)
            assert np.abs(ds.pixel_array * slope - std_hu).max() <= 0.5 * slope + 1e-3
    for series_id in study["Series"]:
        ser = pacs.get(f"/series/{series_id}").json()
        if "reconstruction" not in ser["MainDicomTags"].get("SeriesDescription", ""):
            continue
        assert len(ser["Instances"]) == 1
        ds = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{ser['Instances'][0]}/file").content))
        assert (ds.Rows, ds.Columns) == recon.shape
        assert [float(v) for v in ds.PixelSpacing] == [1.0, 1.0]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        expected = np.clip(HUMapping().to_hu(recon), -32768, 32767)  # int16 storage
        assert np.abs(hu - expected).max() <= 0.5 + 1e-3
        break
    else:
        raise AssertionError("no reconstruction series in the PACS")
    bad = client.post(
        f"/v1/jobs/{job['id']}/export",
        json={"destination": "wrong-aet"},
        headers=auth(keys["alice"]),
    ).json()
    failed = wait(client, keys["alice"], bad["id"])
    assert failed["state"] == "failed" and "rejected the association" in failed["error"]
    assert failed["attempts"] == 1, failed
    unknown = client.post(
        f"/v1/jobs/{job['id']}/export", json={"destination": "nope"}, headers=auth(keys["alice"])
    )
    assert unknown.status_code == 422 and unknown.json()["field"] == "destination"


def test_unreachable_pacs_fails_clearly_and_keeps_the_result(gateway, settings):
    client, keys, _ = gateway
    settings.max_retries = 1
    settings.pacs = {"down": {"kind": "stowrs", "url": f"http://127.0.0.1:{_port()}/dicom-web"}}
    job = submit(client, keys["alice"]).json()
    assert wait(client, keys["alice"], job["id"])["state"] == "succeeded"
    r = client.post(
        f"/v1/jobs/{job['id']}/export", json={"destination": "down"}, headers=auth(keys["alice"])
    )
    failed = wait(client, keys["alice"], r.json()["id"], timeout=60)
    assert failed["state"] == "failed" and "unreachable" in failed["error"], failed
    assert failed["attempts"] == 2 and "gave up after 2 attempts" in failed["error"]
    result = client.get(f"/v1/jobs/{job['id']}/result?format=npy", headers=auth(keys["alice"]))
    assert result.status_code == 200  # the reconstruction is untouched


def test_automatic_deidentified_export_of_a_job_sourced_from_dicom(gateway, settings, orthanc):
    """The spec's study comes from an uploaded instance; the series goes to a research
    destination by itself when the job succeeds, with no patient identity left."""
    from pydicom.data import get_testdata_file

    from service.deidentify import new_uid, pseudonym

    client, keys, _ = gateway
    base, _ = orthanc
    settings.deid_salt = "site-secret"
    settings.pacs = {
        "research": {
            "kind": "stowrs",
            "url": base + "/dicom-web",
            "username": "scorerecon",
            "password": "s3cret",
            "deidentify": True,
        }
    }
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    r = client.post(
        "/v1/reconstructions",
        files={"measurement": ("y.npy", ct_measurement()), "source_dicom": ("s.dcm", ct)},
        data={
            "spec": CT_SPEC,
            "model": "tiny32",
            "nfe": "4",
            "sampler": "fast",
            "export_to": "research",
        },
        headers=auth(keys["alice"]),
    )
    assert r.status_code == 202, r.text
    done = wait(client, keys["alice"], r.json()["id"])
    assert done["state"] == "succeeded"
    export = wait(client, keys["alice"], done["links"]["export"].rsplit("/", 1)[-1])
    assert export["state"] == "succeeded" and export["kind"] == "export", export
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    pacs = httpx.Client(base_url=base, auth=("scorerecon", "s3cret"))
    (study_id,) = pacs.get("/studies").json()
    study = pacs.get(f"/studies/{study_id}").json()
    salt = settings.deid_salt
    assert study["MainDicomTags"]["StudyInstanceUID"] == new_uid(source.StudyInstanceUID, salt)
    assert study["PatientMainDicomTags"]["PatientID"] == pseudonym(source.PatientID, salt)
    instance = pacs.get(f"/studies/{study_id}/instances").json()[0]["ID"]
    tags = pacs.get(f"/instances/{instance}/simplified-tags").json()
    assert tags["PatientIdentityRemoved"] == "YES"
    assert "CompressedSamples" not in json.dumps(tags) and source.PatientID not in json.dumps(tags)
    # Still labelled as research output, and registered to the source slice it reconstructs.
    assert tags["SeriesDescription"].startswith("RESEARCH") and "RESEARCH" in tags["ImageComments"]
    stored = pydicom.dcmread(io.BytesIO(pacs.get(f"/instances/{instance}/file").content))
    assert [float(v) for v in stored.ImagePositionPatient] == [
        float(v) for v in source.ImagePositionPatient
    ]
    assert [float(v) for v in stored.ImageOrientationPatient] == [
        float(v) for v in source.ImageOrientationPatient
    ]
    assert stored.FrameOfReferenceUID == new_uid(source.FrameOfReferenceUID, salt)


def test_training_on_series_retrieved_from_the_pacs(gateway, settings, orthanc):
    """QIDO-RS finds the CT series in Orthanc, WADO-RS fetches them, a prior trains on them."""
    from models.io import HUMapping
    from models.phantoms import ct_phantoms
    from service.dicom_export import series
    from service.pacs import Destination, push

    client, keys, _ = gateway
    base, _ = orthanc
    settings.pacs = {
        "archive": {
            "kind": "stowrs",
            "url": base + "/dicom-web",
            "username": "scorerecon",
            "password": "s3cret",
        },
        "dimse-only": {"kind": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "X"},
    }
    hu = HUMapping().to_hu(ct_phantoms(6, 16, seed=5)[:, 0].numpy())
    for v in range(2):  # two volumes of three slices, in two studies
        study = {
            "PatientID": f"TRAIN-{v}",
            "StudyInstanceUID": f"1.2.826.0.1.3680043.8.498.{v + 7}",
        }
        push(
            Destination.from_settings("archive", settings.pacs),
            series(hu[3 * v : 3 * v + 3], "CT", f"{v:032x}", "phantom", study),
        )
    train = {
        "pacs": {"destination": "archive", "query": {"Modality": "CT"}, "limit": 10},
        "model_id": "pacs-ct",
        "preset": "tiny",
        "image_size": 16,
        "steps": 2,
        "batch_size": 2,
        "checkpoint_every": 2,
        "preview": 1,
        "val_fraction": 0.5,
    }
    wrong = client.post(
        "/v1/admin/training",
        json={**train, "pacs": {**train["pacs"], "destination": "dimse-only"}},
        headers=auth(keys["admin"]),
    )
    assert wrong.status_code == 422 and wrong.json()["field"] == "pacs.destination"
    r = client.post("/v1/admin/training", json=train, headers=auth(keys["admin"]))
    assert r.status_code == 202, r.text
    done = wait(client, keys["admin"], r.json()["id"], timeout=180)
    assert done["state"] == "succeeded", done
    card = client.get("/v1/models/pacs-ct", headers=auth(keys["admin"])).json()
    data = card["training_data"]
    assert len(data["train_volumes"]) == len(data["validation_volumes"]) == 1
    assert card["n_images"] == 3  # one volume of three slices trains, the other validates
