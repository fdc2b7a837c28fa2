"""A throwaway Orthanc on loopback for the documentation scripts (temporary storage, no
authentication, DICOMweb on), stopped by the pid it started."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_orthanc(name: str = "scorerecon-docs") -> Iterator[str]:
    """Orthanc's base URL while the block runs (needs scripts/install-orthanc.sh)."""
    tmp = Path(tempfile.mkdtemp())
    http = _port()
    cfg = {
        "Name": name,
        "StorageDirectory": str(tmp),
        "IndexDirectory": str(tmp),
        "HttpPort": http,
        "DicomPort": _port(),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (tmp / "orthanc.json").write_text(json.dumps(cfg))
    proc = subprocess.Popen(
        ["Orthanc", str(tmp / "orthanc.json")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{http}"
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/system").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
