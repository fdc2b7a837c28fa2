"""Pushing DICOM series to PACS: DICOMweb STOW-RS (batched) and DIMSE C-STORE (pynetdicom);
pulling training series from a DICOMweb PACS (QIDO-RS search, WADO-RS retrieve).

Destinations are configured by name (``SCORERECON_PACS``, JSON), e.g.::

    {"orthanc": {"kind": "stowrs", "url": "https://pacs.example/dicom-web",
                 "username": "scorerecon", "password": "..."},
     "modality-router": {"kind": "dimse", "host": "pacs", "port": 104,
                         "ae_title": "PACS", "calling_ae": "SCORERECON"},
     "research": {"kind": "stowrs", "url": "...", "deidentify": true}}

A destination with ``deidentify`` receives the series de-identified by
:mod:`service.deidentify` (PS3.15 basic profile) under ``SCORERECON_DEID_SALT``.

A DICOMweb URL must be ``https://``: patient data over plain ``http://`` can be read and
changed by anyone on the path. Plain http is accepted on loopback, or where the destination
says ``"allow_http": true`` (a network the site protects otherwise, such as a compose or
cluster network); the gateway refuses to start with any other.

A refused association or a rejected instance is a :class:`PermanentError` (retrying cannot
help: fix the configuration); an unreachable peer is a :class:`TransientError` (retried).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pydicom

BATCH = 16  # instances per STOW-RS request
ASSOCIATION_TRIES = 3  # DIMSE associations asked for within one attempt of an export
LOOPBACK = ("127.0.0.1", "::1", "localhost")


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
    deidentify: bool = False
    allow_http: bool = False  # plain http accepted off loopback (a protected network)

    @classmethod
    def from_settings(cls, name: str, config: dict[str, dict]) -> Destination:
        if name not in config:
            known = ", ".join(sorted(config)) or "none configured (SCORERECON_PACS)"
            raise PermanentError(f"unknown destination '{name}'; known: {known}")
        entry = config[name]
        if entry.get("kind") not in ("stowrs", "dimse"):
            raise PermanentError(f"destination '{name}': kind must be 'stowrs' or 'dimse'")
        unknown = sorted(set(entry) - set(cls.__dataclass_fields__))
        if unknown:
            raise PermanentError(f"destination '{name}': unknown settings {unknown}")
        dest = cls(name=name, **entry)
        if dest.kind == "stowrs":
            parts = urlsplit(dest.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise PermanentError(
                    f"destination '{name}': url must be the DICOMweb root, https://host[:port]/path"
                )
            if parts.scheme == "http" and not (dest.allow_http or parts.hostname in LOOPBACK):
                raise PermanentError(
                    f"destination '{name}': url {dest.url!r} is plain http, which exposes "
                    'patient data on the network; use https://, or set "allow_http": true for '
                    "a network the site protects otherwise"
                )
        return dest


def check_destinations(config: dict[str, dict]) -> dict[str, dict]:
    """``SCORERECON_PACS`` checked at start: every destination as an export would use it."""
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        raise PermanentError('SCORERECON_PACS must map names to settings: {"name": {...}}')
    for name in config:
        Destination.from_settings(name, config)
    return config


def push(dest: Destination, datasets: Sequence[pydicom.Dataset]) -> dict:
    """Send every instance; returns counts. Raises Permanent/TransientError."""
    if dest.kind == "stowrs":
        return _stow(dest, datasets)
    return _c_store(dest, datasets)


def _client(dest: Destination):
    import requests
    from dicomweb_client.api import DICOMwebClient

    if dest.kind != "stowrs":
        raise PermanentError(f"destination '{dest.name}' is DIMSE; DICOMweb is needed here")
    session = requests.Session()
    if dest.username:
        session.auth = (dest.username, dest.password)
    client = DICOMwebClient(url=dest.url, session=session)
    client.set_http_retry_params(retry=False)  # retries belong to the job, with back-off
    return client


def _http_error(dest: Destination, what: str, exc) -> RuntimeError:
    import requests

    if isinstance(exc, requests.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        kind = TransientError if status in (429, 502, 503, 504) else PermanentError
        return kind(f"{what} to {dest.name} refused with HTTP {status}")
    return TransientError(f"{what}: {dest.name} ({dest.url}) unreachable")


def retrieve(
    dest: Destination, query: dict[str, str], limit: int, out: Path, progress=None
) -> dict:
    """Training data from a PACS: QIDO-RS search for the series matching ``query`` (DICOM
    keywords, e.g. ``{"Modality": "CT"}``), WADO-RS retrieve of each into
    ``out/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``. Returns counts."""
    import requests

    client = _client(dest)
    try:
        found = client.search_for_series(search_filters=query, limit=limit)
    except (requests.HTTPError, requests.ConnectionError) as exc:
        raise _http_error(dest, "QIDO-RS", exc) from None
    instances = 0
    for i, item in enumerate(found[:limit]):
        study, series = item["0020000D"]["Value"][0], item["0020000E"]["Value"][0]
        folder = out / _uid_name(series)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            for ds in client.retrieve_series(study, series):
                ds.save_as(folder / f"{_uid_name(ds.SOPInstanceUID)}.dcm", enforce_file_format=True)
                instances += 1
        except (requests.HTTPError, requests.ConnectionError) as exc:
            raise _http_error(dest, "WADO-RS", exc) from None
        if progress is not None:
            progress(i + 1, len(found))
    return {"source": dest.name, "series": len(found[:limit]), "instances": instances}


def _uid_name(uid: str) -> str:
    """A UID as a file name: digits and dots only (a hostile peer cannot choose a path)."""
    if not uid or any(c not in "0123456789." for c in uid) or len(uid) > 64:
        raise PermanentError(f"the PACS returned an invalid UID {uid[:70]!r}")
    return uid


def _stow(dest: Destination, datasets: Sequence[pydicom.Dataset]) -> dict:
    import requests

    client = _client(dest)
    sent = 0
    for start in range(0, len(datasets), BATCH):
        batch = list(datasets[start : start + BATCH])
        try:
            response = client.store_instances(batch)
        except (requests.HTTPError, requests.ConnectionError) as exc:
            raise _http_error(dest, "STOW-RS", exc) from None
        failed = list(getattr(response, "FailedSOPSequence", None) or [])
        if failed:  # HTTP 202: some stored, these not; the export is retried, then fails
            named = ", ".join(
                f"{item.get('ReferencedSOPInstanceUID', '?')} "
                f"(reason 0x{int(item.get('FailureReason', 0)):04X})"
                for item in failed[:5]
            )
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            raise TransientError(
                f"STOW-RS to {dest.name}: {len(failed)} of {len(batch)} instances refused: "
                f"{named}{more}"
            )
        sent += len(batch)
    return {"destination": dest.name, "protocol": "STOW-RS", "sent": sent}


# Proposed for every SOP class: the DICOM default (implicit VR), which every PACS accepts,
# and the explicit VR syntaxes; pynetdicom re-encodes an instance for the one accepted.
TRANSFER_SYNTAXES = [
    pydicom.uid.ExplicitVRLittleEndian,
    pydicom.uid.ImplicitVRLittleEndian,
    pydicom.uid.DeflatedExplicitVRLittleEndian,
    pydicom.uid.ExplicitVRBigEndian,
]


def _c_store(dest: Destination, datasets: Sequence[pydicom.Dataset]) -> dict:
    from pynetdicom import AE

    ae = AE(ae_title=dest.calling_ae)
    for sop in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop, TRANSFER_SYNTAXES)
    for attempt in range(ASSOCIATION_TRIES):
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if assoc.is_established or assoc.is_rejected:
            break
        # An abort instead of an answer: a peer that closes the connection as it rejects
        # (its A-ASSOCIATE-RJ can be lost with the socket) or a busy one. Asking again tells
        # a rejection (permanent) from an unreachable peer (retried by the job, later).
        time.sleep(0.5 * (attempt + 1))
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
