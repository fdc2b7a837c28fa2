"""Pushing DICOM series to PACS: DICOMweb STOW-RS (batched) and DIMSE C-STORE (pynetdicom).

Destinations are configured by name (``SCORERECON_PACS``, JSON), e.g.::

    {"orthanc": {"kind": "stowrs", "url": "http://pacs:8042/dicom-web",
                 "username": "scorerecon", "password": "..."},
     "modality-router": {"kind": "dimse", "host": "pacs", "port": 104,
                         "ae_title": "PACS", "calling_ae": "SCORERECON"}}

A refused association or a rejected instance is a :class:`PermanentError` (retrying cannot
help: fix the configuration); an unreachable peer is a :class:`TransientError` (retried).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pydicom

BATCH = 16  # instances per STOW-RS request


class PermanentError(RuntimeError):
    """The destination refused: a configuration or data problem a retry cannot fix."""


class TransientError(RuntimeError):
    """The destination was unreachable or busy: worth retrying later."""


@dataclass(frozen=True)
class Destination:
    name: str
    kind: str  # stowrs | dimse
    url: str = ""
    username: str = ""
    password: str = ""
    host: str = ""
    port: int = 104
    ae_title: str = ""
    calling_ae: str = "SCORERECON"

    @classmethod
    def from_settings(cls, name: str, config: dict[str, dict]) -> Destination:
        if name not in config:
            known = ", ".join(sorted(config)) or "none configured (SCORERECON_PACS)"
            raise PermanentError(f"unknown destination '{name}'; known: {known}")
        entry = config[name]
        if entry.get("kind") not in ("stowrs", "dimse"):
            raise PermanentError(f"destination '{name}': kind must be 'stowrs' or 'dimse'")
        return cls(name=name, **entry)


def push(dest: Destination, datasets: Sequence[pydicom.Dataset]) -> dict:
    """Send every instance; returns counts. Raises Permanent/TransientError."""
    if dest.kind == "stowrs":
        return _stow(dest, datasets)
    return _c_store(dest, datasets)


def _stow(dest: Destination, datasets: Sequence[pydicom.Dataset]) -> dict:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if dest.username:
        session.auth = (dest.username, dest.password)
    client = DICOMwebClient(url=dest.url, session=session)
    client.set_http_retry_params(retry=False)  # retries belong to the export job, with back-off
    sent = 0
    for start in range(0, len(datasets), BATCH):
        batch = list(datasets[start : start + BATCH])
        try:
            client.store_instances(batch)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            kind = TransientError if status in (429, 502, 503, 504) else PermanentError
            raise kind(f"STOW-RS to {dest.name} refused with HTTP {status}") from None
        except requests.ConnectionError:
            raise TransientError(f"STOW-RS: {dest.name} ({dest.url}) unreachable") from None
        sent += len(batch)
    return {"destination": dest.name, "protocol": "STOW-RS", "sent": sent}


def _c_store(dest: Destination, datasets: Sequence[pydicom.Dataset]) -> dict:
    from pynetdicom import AE

    ae = AE(ae_title=dest.calling_ae)
    for sop in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop, pydicom.uid.ExplicitVRLittleEndian)
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if assoc.is_rejected:
        raise PermanentError(f"C-STORE: {dest.name} rejected the association (check AE titles)")
    if not assoc.is_established:
        raise TransientError(f"C-STORE: {dest.name} ({dest.host}:{dest.port}) unreachable")
    sent = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None:
                raise TransientError(f"C-STORE: no response from {dest.name}")
            if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
                raise PermanentError(f"C-STORE: {dest.name} refused an instance (0x{code:04X})")
            sent += 1
    finally:
        assoc.release()
    return {"destination": dest.name, "protocol": "C-STORE", "sent": sent}
