"""The export protocols against peers that behave as some PACS do and Orthanc does not by
default: a STOW-RS server that stores part of a batch (HTTP 202 with a FailedSOPSequence),
and a DIMSE storage SCP (pynetdicom's, on loopback) that accepts only the DICOM default
transfer syntax, implicit VR little endian."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from service.dicom_export import series
from service.pacs import Destination, TransientError, push


def _instances(n: int = 2):
    hu = np.stack([np.linspace(-1000, 1000, 32 * 32).reshape(32, 32)] * n)
    return series(hu, "CT", "c" * 32, "ct-default", {}, (1.0, 1.0), 2.0)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stow_rs_partial_failure_is_a_failure_naming_the_instances():
    datasets = _instances()
    refused = str(datasets[1].SOPInstanceUID)
    body = {
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": [str(datasets[1].SOPClassUID)]},
                    "00081155": {"vr": "UI", "Value": [refused]},
                    "00081197": {"vr": "US", "Value": [0xA700]},
                }
            ],
        }
    }
    posts = []

    class Partial(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            posts.append(self.rfile.read(int(self.headers["Content-Length"])))
            payload = json.dumps(body).encode()
            self.send_response(202)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", _port()), Partial)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
        dest = Destination(name="partial", kind="stowrs", url=url)
        with pytest.raises(TransientError, match=f"1 of 2 instances refused: {refused}"):
            push(dest, datasets)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert len(posts) == 1  # one batch, sent once: the export job's retries resend it


def test_c_store_reaches_a_pacs_that_accepts_only_implicit_vr():
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import CTImageStorage

    stored = []

    def on_store(event):
        stored.append(event.context.transfer_syntax)
        return 0x0000

    scp = AE(ae_title="IMPLICIT")
    scp.add_supported_context(CTImageStorage, "1.2.840.10008.1.2")  # implicit VR only
    port = _port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        dest = Destination(
            name="old-pacs", kind="dimse", host="127.0.0.1", port=port, ae_title="IMPLICIT"
        )
        report = push(dest, _instances())
    finally:
        server.shutdown()
    assert report["sent"] == 2
    assert stored == ["1.2.840.10008.1.2", "1.2.840.10008.1.2"]


def test_plain_http_destinations_are_refused_unless_allowed(monkeypatch, tmp_path):
    """Patient data over plain http off loopback: the gateway refuses to start, naming the
    destination and the fix; https, loopback and an explicit ``allow_http`` start; an
    export job with such a destination fails permanently with the same reason."""
    from pydantic import ValidationError

    from service.pacs import PermanentError
    from service.settings import Settings

    def settings(pacs: dict) -> Settings:
        monkeypatch.setenv("SCORERECON_PACS", json.dumps(pacs))
        return Settings(home=tmp_path)

    plain = {"kind": "stowrs", "url": "http://pacs.hospital.example:8042/dicom-web"}
    with pytest.raises(ValidationError, match=r"destination 'ward': url .* is plain http.*https"):
        settings({"ward": plain})
    with pytest.raises(ValidationError, match="url must be the DICOMweb root"):
        settings({"ward": {"kind": "stowrs", "url": "pacs:8042"}})
    with pytest.raises(ValidationError, match="kind must be 'stowrs' or 'dimse'"):
        settings({"ward": {"kind": "ftp"}})
    ok = {
        "tls": {"kind": "stowrs", "url": "https://pacs.hospital.example/dicom-web"},
        "local": {"kind": "stowrs", "url": "http://127.0.0.1:8042/dicom-web"},
        "compose": {**plain, "allow_http": True},
        "archive": {"kind": "dimse", "host": "pacs", "port": 104, "ae_title": "ARCHIVE"},
    }
    assert set(settings(ok).pacs) == set(ok)
    with pytest.raises(PermanentError, match="plain http"):
        Destination.from_settings("ward", {"ward": plain})  # what the export job runs
