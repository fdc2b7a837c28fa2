"""Export to a real Orthanc (Debian's package, installed by scripts/install-orthanc.sh):
DICOMweb STOW-RS and DIMSE C-STORE, the series filed into the source study, and an
association rejection reported once as a configuration error."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time

import httpx
import pytest

from tests.service.conftest import auth
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
    bad = client.post(
        f"/v1/jobs/{job['id']}/export",
        json={"destination": "wrong-aet"},
        headers=auth(keys["alice"]),
    ).json()
    failed = wait(client, keys["alice"], bad["id"])
    assert failed["state"] == "failed" and "rejected the association" in failed["error"]
    assert failed["attempts"] == 1
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
