"""Bad input: no request crashes the gateway (issue 9, part 3).

Two attacks on an in-process gateway (the real app, database, result store and embedded
worker; SQLite and PostgreSQL), seeded with a finished reconstruction:

* schemathesis generates requests from the gateway's own OpenAPI schema, valid and invalid,
  with a submitter's and an admin's key;
* a corpus of malformed files and fields, one case each: broken and hostile NPY, NPZ, HDF5
  and DICOM files, archive bombs, non-UTF-8 and deeply nested JSON, wrong content types,
  missing fields, control characters in ids.

Every refusal is a 4xx ``application/problem+json`` body that names the field and says what
to do, never a 5xx; and nothing stored (jobs, results, models, datasets, API keys) changes.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import struct
import tarfile
import time
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import httpx
import numpy as np
import pydicom
import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from pydicom.data import get_testdata_file
from schemathesis.python import asgi
from sqlalchemy import select

from service.app import create_app
from service.auth import create_key
from service.db import ApiKey, Job
from service.settings import Settings
from tests import servers
from tests.reliability.conftest import count
from tests.service.conftest import (
    CT_SPEC,
    _drop_postgres_db,
    _postgres_db,
    auth,
    ct_measurement,
    tiny_model,
)

MRI_SPEC = (
    '{"modality": "mri", "image_size": 32, "mask": {"kind": "equispaced", "acceleration": 4}}'
)
MAX_UPLOAD_MB = 2
AREA = "bad input"

# pydicom warns, at length, about every invalid value the hostile files hold
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:pydicom.*")


@dataclass
class Gateway:
    """The app under attack, its keys, and a succeeded reconstruction to aim at."""

    client: TestClient
    app: FastAPI
    settings: Settings
    keys: dict[str, str]
    job_id: str
    backend: str
    baseline: dict = field(default_factory=dict)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, tmp_path_factory) -> Iterator[Gateway]:
    tmp = tmp_path_factory.mktemp(f"bad-input-{request.param}")
    pg = _postgres_db() if request.param == "postgresql" else None
    url = servers.database_url() + pg if pg else f"sqlite:///{tmp / 'jobs.db'}"
    settings = Settings(
        home=tmp / "home",
        database_url=url,
        rate_limit_per_minute=1_000_000,
        failed_auth_per_minute=1_000_000,
        max_upload_mb=MAX_UPLOAD_MB,
    ).prepare()
    tiny_model(settings.models)
    app = create_app(settings)
    jobs = app.state.jobs
    keys = {
        "alice": create_key(jobs, ["recon:submit", "recon:read"], "alice")[1],
        "admin": create_key(jobs, ["admin"], "ops")[1],
    }
    try:
        with TestClient(app, raise_server_exceptions=False) as client:
            source = '{"PatientID": "P-1", "StudyInstanceUID": "1.2.3.4"}'
            r = _submit(client, keys["alice"], source=source)
            assert r.status_code == 202, r.text
            job_id = r.json()["id"]
            deadline = time.monotonic() + 300
            while jobs.get(job_id).state not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline, "the seed reconstruction did not finish"
                time.sleep(0.1)
            assert jobs.get(job_id).state == "succeeded", jobs.get(job_id).error
            gateway = Gateway(client, app, settings, keys, job_id, request.param)
            gateway.baseline = stored(gateway)
            yield gateway
    finally:
        jobs.engine.dispose()
        if pg:
            _drop_postgres_db(pg)


def _submit(
    client: TestClient,
    key: str,
    data: bytes | None = None,
    spec: str = CT_SPEC,
    files: dict | None = None,
    headers: dict | None = None,
    **form: str,
) -> httpx.Response:
    """``POST /v1/reconstructions`` of the tiny model, with these parts replaced."""
    parts = {"measurement": ("y.npy", ct_measurement() if data is None else data)}
    fields = {"spec": spec, "model": "tiny32", "nfe": "6", "sampler": "fast", **form}
    return client.post(
        "/v1/reconstructions",
        files={**parts, **(files or {})},
        data=fields,
        headers={**auth(key), **(headers or {})},
    )


# --- What is stored -------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root``: size and sha256."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def stored(site: Gateway) -> dict:
    """Job rows, API keys, and the result store, models and datasets directories."""
    with site.app.state.jobs.sessions() as s:
        jobs = sorted(
            (j.id, j.state, j.phase, tuple(j.result_keys or ()), j.attempts)
            for j in s.scalars(select(Job))
        )
        keys = sorted((k.id, k.revoked_at is not None) for k in s.scalars(select(ApiKey)))
    home = site.settings
    return {
        "jobs": jobs,
        "api_keys": keys,
        "results": _tree(home.results),
        "models": _tree(home.models),
        "datasets": _tree(home.home / "datasets"),
    }


# --- Hostile files --------------------------------------------------------------------------


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=arr.dtype == object)
    return buf.getvalue()


def npy_header(shape: tuple, descr: str = "<f4", version: int = 1) -> bytes:
    """An NPY header declaring ``shape`` with no data behind it."""
    text = repr({"descr": descr, "fortran_order": False, "shape": shape}).encode()
    text += b" " * (63 - (10 + len(text)) % 64) + b"\n"
    return b"\x93NUMPY" + bytes([version, 0]) + struct.pack("<H", len(text)) + text


def npz(members: dict[str, bytes], level: int = 6) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


@functools.cache
def npz_bomb() -> bytes:
    """512 MiB of zeros behind a valid NPY header, deflated to about half a megabyte."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        with z.open("y.npy", "w", force_zip64=True) as f:
            f.write(npy_header((1, 8, 2**26)))
            chunk = bytes(1 << 24)
            for _ in range(32):
                f.write(chunk)
    return buf.getvalue()


def npz_lying_size(declared: int) -> bytes:
    """A valid .npz whose headers declare ``declared`` bytes for its member."""
    raw = bytearray(npz({"y.npy": ct_measurement()}))
    struct.pack_into("<I", raw, raw.find(b"PK\x03\x04") + 22, declared)
    struct.pack_into("<I", raw, raw.find(b"PK\x01\x02") + 24, declared)
    return bytes(raw)


def hdf5(build: Callable[[h5py.File], object]) -> bytes:
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        build(f)
    return buf.getvalue()


def hdf5_fill_bomb() -> bytes:
    """512 MiB of complex k-space that is never written: a file of a few kilobytes."""
    return hdf5(
        lambda f: f.create_dataset(
            "kspace", shape=(8, 8, 1024, 1024), dtype=np.complex64, chunks=(1, 1, 64, 64)
        )
    )


def ismrmrd_bomb() -> bytes:
    """One ISMRMRD acquisition whose header indices ask for a 1 GiB k-space array."""
    head = np.dtype(
        [
            ("number_of_samples", "<u2"),
            ("active_channels", "<u2"),
            ("idx", [("kspace_encode_step_1", "<u2"), ("slice", "<u2")]),
        ]
    )
    acq = np.dtype([("head", head), ("data", h5py.vlen_dtype(np.float32))])
    acqs = np.zeros(1, acq)
    acqs["head"]["number_of_samples"] = 512
    acqs["head"]["active_channels"] = 16
    acqs["head"]["idx"]["kspace_encode_step_1"] = 511
    acqs["head"]["idx"]["slice"] = 31
    acqs["data"][0] = np.zeros(16 * 512 * 2, np.float32)
    return hdf5(lambda f: f.create_dataset("dataset/data", data=acqs))


@functools.cache
def dicom() -> bytes:
    return Path(get_testdata_file("CT_small.dcm")).read_bytes()


def dicom_patched(tag: bytes, offset: int, value: bytes) -> bytes:
    """CT_small.dcm with ``value`` written ``offset`` bytes into the element ``tag``."""
    raw = bytearray(dicom())
    at = raw.find(tag)
    raw[at + offset : at + offset + len(value)] = value
    return bytes(raw)


def dicom_with(**elements: tuple[int, str, str]) -> bytes:
    """CT_small.dcm with elements replaced by (tag, VR, value), e.g. a DS given as LO text."""
    ds = pydicom.dcmread(io.BytesIO(dicom()))
    for keyword, (tag, vr, value) in elements.items():
        delattr(ds, keyword)
        ds.add_new(tag, vr, value)
    buf = io.BytesIO()
    ds.save_as(buf)
    return buf.getvalue()


def archive_zip(members: dict[str, bytes]) -> bytes:
    return npz(members)


def tar_gz_bomb() -> bytes:
    """64 MiB of zeros in a .tar.gz of about 64 KB (the site inflates at most 8 MB)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("zeros.npy")
        info.size = 64 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    return buf.getvalue()


def nested(depth: int, open_: str = "[", close: str = "]") -> str:
    return open_ * depth + close * depth


# --- The corpus ------------------------------------------------------------------------------

SEEDED = "{job}"  # replaced by the id of the site's succeeded reconstruction


@dataclass
class Bad:
    """One malformed request and what its refusal must say."""

    family: str
    name: str
    send: Callable[[Gateway], httpx.Response]
    status: int
    field: str | None
    hint: str  # a piece of the detail that tells what is wrong or what to do
    fixed: str = ""  # the defect this case found and that is fixed, if any


def recon(data: bytes | None = None, spec: str = CT_SPEC, **kw) -> Callable:
    return lambda s: _submit(s.client, s.keys["alice"], data, spec, **kw)


def dicom_source(raw: bytes) -> Callable:
    return recon(files={"source_dicom": ("source.dcm", raw)})


def post_json(
    path: str, body: bytes | str, key: str = "admin", ctype: str = "application/json"
) -> Callable:
    def send(s: Gateway) -> httpx.Response:
        headers = {**auth(s.keys[key]), "content-type": ctype}
        content = body.encode() if isinstance(body, str) else body
        return s.client.post(path.replace(SEEDED, s.job_id), content=content, headers=headers)

    return send


def export(body: bytes | str, job: str = SEEDED) -> Callable:
    return post_json(f"/v1/jobs/{job}/export", body, key="alice")


def dataset(raw: bytes) -> Callable:
    return upload("/v1/admin/datasets", "admin", {"archive": ("a.zip", raw)})


def upload(path: str, key: str, files: dict, data: dict | None = None) -> Callable:
    return lambda s: s.client.post(path, files=files, data=data, headers=auth(s.keys[key]))


def form(path: str, key: str, data: dict[str, str]) -> Callable:
    """An urlencoded form."""
    return lambda s: s.client.post(
        path.replace(SEEDED, s.job_id), data=data, headers=auth(s.keys[key])
    )


def get(path: str, key: str, method: str = "GET") -> Callable:
    """``key`` names a site key, or is the credential itself."""
    return lambda s: s.client.request(
        method, path.replace(SEEDED, s.job_id), headers=auth(s.keys.get(key, key))
    )


def raw_multipart(parts: dict[str, tuple[str | None, bytes]]) -> Callable:
    """Multipart parts sent as given bytes (a part without a filename is a form field)."""
    return upload(
        "/v1/reconstructions",
        "alice",
        {"measurement": ("y.npy", ct_measurement()), **parts},
        {"model": "tiny32", "nfe": "6", "sampler": "fast"},
    )


def group(family: str, *rows: tuple) -> list[Bad]:
    """Cases of one family: (name, send, status, field, hint[, fixed])."""
    return [Bad(family, *row) for row in rows]


M, SD, F32 = "measurement", "source_dicom", np.float32
STUDY_UID = b"\x20\x00\x0d\x00"  # the (0020,000D) tag as written in CT_small.dcm
SERIES_UID = b"\x20\x00\x0e\x00"
DEEP = 10_000
ADMIN_BODY = {"sampling": "/v1/admin/sampling", "training": "/v1/admin/training"}
PG_500 = "was a 500 on PostgreSQL"
MULTIPART = "multipart/form-data"
ZEROS = "0" * 32  # a well-formed dataset id that names no dataset

# fmt: off
CORPUS = [
    *group(
        "malformed NPY",
        ("truncated data", recon(ct_measurement()[:700]), 422, M, ".npy"),
        ("cut in the header", recon(ct_measurement()[:40]), 422, M, ".npy"),
        ("magic only", recon(b"\x93NUMPY"), 422, M, ".npy"),
        ("negative shape", recon(npy_header((-1, 8, 48)) + bytes(1536)), 422, M, ".npy"),
        ("unknown dtype", recon(npy_header((1, 8, 48), "<z9") + bytes(1536)), 422, M, ".npy"),
        ("v3 header of 1 GB", recon(b"\x93NUMPY\x03\x00" + struct.pack("<I", 10**9) + b"{"),
         422, M, ".npy"),
        ("a PNG", recon(b"\x89PNG\r\n\x1a\n" + bytes(64)), 422, M, ".npy"),
        ("CSV text", recon(b"1,2,3\n4,5,6\n"), 422, M, ".npy"),
    ),
    *group(
        "huge declared size",
        ("NPY of 4 TB in 100 bytes", recon(npy_header((2**40,)) + bytes(100)), 422, M, ".npy"),
        ("NPY of 64 GB in 100 bytes", recon(npy_header((1, 8, 2**31)) + bytes(100)),
         422, M, ".npy"),
        ("NPZ member of 4 TB", recon(npz({"y.npy": npy_header((2**40,)) + bytes(100)})),
         422, M, "numpy.savez"),
        ("HDF5 fill value of 512 MiB", recon(hdf5_fill_bomb(), MRI_SPEC), 413, M, "inflates",
         "was inflated in memory"),
        ("ISMRMRD indices asking for 1 GiB", recon(ismrmrd_bomb(), MRI_SPEC), 413, M, "inflates",
         "was allocated and copied"),
    ),
    *group(
        "zip bomb .npz",
        ("512 MiB of zeros in 0.5 MB", lambda s: recon(npz_bomb())(s), 413, M, "inflates"),
        ("member declares 2 GB", recon(npz_lying_size(2**31)), 413, M, "inflates"),
        ("member declares fewer bytes than it holds", recon(npz_lying_size(100)),
         422, M, "numpy.savez"),
        ("1000 members", recon(npz({f"a{i}.npy": ct_measurement() for i in range(1000)}, 1)),
         422, M, "one array"),
        ("pickled object member", recon(npz({"y.npy": npy(np.array([{"a": 1}], object))})),
         422, M, "no pickled objects"),
        ("member that is not NPY", recon(npz({"y.txt": b"hello"})), 422, M, "numpy.savez",
         "was a 500 (AttributeError)"),
        ("'real' and 'imag' of different shapes",
         recon(npz({"real.npy": ct_measurement(), "imag.npy": ct_measurement((1, 8, 47))}),
               MRI_SPEC), 422, M, "numpy.savez"),
        ("PK then garbage", recon(b"PK\x03\x04" + bytes(100)), 422, M, "numpy.savez"),
    ),
    *group(
        "wrong dtype",
        ("bool", recon(npy(np.ones((1, 8, 48), bool))), 422, M, "send float32"),
        ("pickled objects", recon(npy(np.array([[1.0]], object))), 422, M, "no pickled objects"),
        ("complex for CT", recon(npy(np.ones((1, 8, 48), np.complex64))),
         422, M, "send the real array"),
        ("real for MRI", recon(npy(np.ones((1, 32, 32), F32)), MRI_SPEC), 422, M, "be complex"),
        ("structured", recon(npy(np.zeros((1, 8, 48), [("a", "<f4")]))), 422, M, "send float32"),
        ("strings", recon(npy(np.full((1, 8, 48), "1.0"))), 422, M, "send float32"),
        ("datetime64", recon(npy(np.zeros((1, 8, 48), "M8[s]"))), 422, M, "send float32"),
        ("timedelta64", recon(npy(np.zeros((1, 8, 48), "m8[s]"))), 422, M, "send float32",
         "was accepted as integers"),
    ),
    *group(
        "NaN/Inf",
        ("NaN", recon(ct_measurement(value=np.nan)), 422, M, "send finite values"),
        ("+Inf", recon(ct_measurement(value=np.inf)), 422, M, "send finite values"),
        ("one -Inf", recon(npy(np.where(np.arange(384).reshape(1, 8, 48) == 7, -np.inf, 1.0))),
         422, M, "send finite values"),
        ("float64 1e300 (Inf as float32)", recon(npy(np.full((1, 8, 48), 1e300))),
         422, M, "float32 range", "was accepted and became Inf"),
        ("NaN in the imaginary part",
         recon(npy(np.full((1, 32, 32), complex(1, np.nan), np.complex64)), MRI_SPEC),
         422, M, "send finite values"),
    ),
    *group(
        "shape mismatch",
        ("one detector short", recon(ct_measurement((1, 8, 47))), 422, M, "expects (1, 8, 48)"),
        ("transposed", recon(ct_measurement((1, 48, 8))), 422, M, "expects (1, 8, 48)"),
        ("a scalar", recon(npy(np.float32(1))), 422, M, "expects (1, 8, 48)"),
        ("empty array", recon(npy(np.zeros((0,), F32))), 422, M, "expects (1, 8, 48)"),
        ("32 axes", recon(npy(np.zeros((1,) * 32, F32))), 422, M, "expects (1, 8, 48)"),
        ("extra axes", recon(ct_measurement((1, 1, 1, 8, 48))), 422, M, "expects (1, 8, 48)"),
        ("MRI k-space of 31 columns", recon(npy(np.ones((1, 32, 31), np.complex64)), MRI_SPEC),
         422, M, "does not match the spec"),
        ("spec far larger than the model",
         recon(spec='{"modality": "ct", "image_size": 1024, "n_views": 23}'),
         422, "spec.image_size", "set the spec's image_size", "the 1024² operator was built first"),
    ),
    *group(
        "malformed HDF5",
        ("magic then zeros", recon(b"\x89HDF\r\n\x1a\n" + bytes(100), MRI_SPEC), 422, M, "HDF5"),
        ("no kspace dataset",
         recon(hdf5(lambda f: f.create_dataset("image", data=np.ones(3))), MRI_SPEC),
         422, M, "needs a 'kspace' dataset"),
        ("kspace a group", recon(hdf5(lambda f: f.create_group("kspace")), MRI_SPEC),
         422, M, "must be a dataset"),
        ("kspace of strings",
         recon(hdf5(lambda f: f.create_dataset("kspace", data=["a"], dtype=h5py.string_dtype())),
               MRI_SPEC), 422, M, "send float32"),
        ("ISMRMRD data of plain floats",
         recon(hdf5(lambda f: f.create_dataset("dataset/data", data=np.zeros(3))), MRI_SPEC),
         422, M, "HDF5"),
    ),
    *group(
        "malformed DICOM",
        ("no preamble", dicom_source(dicom()[132:]), 422, SD, "with its preamble"),
        ("truncated after the preamble", dicom_source(dicom()[:200]), 422, SD, "StudyInstanceUID"),
        ("preamble then garbage", dicom_source(dicom()[:132] + b"\xff" * 500),
         422, SD, "StudyInstanceUID"),
        ("unknown VR 'ZZ'", dicom_source(dicom_patched(STUDY_UID, 4, b"ZZ")),
         422, SD, "with its preamble", "was a 500 (NotImplementedError)"),
        ("StudyInstanceUID length overruns", dicom_source(dicom_patched(STUDY_UID, 6, b"\xff\xff")),
         422, f"{SD}.StudyInstanceUID", "must be a DICOM UID", "garbage became the study UID"),
        ("StudyInstanceUID read as a sequence", dicom_source(dicom_patched(STUDY_UID, 4, b"SQ")),
         422, f"{SD}.StudyInstanceUID", "must be a DICOM UID", "garbage became the study UID"),
        ("StudyInstanceUID not a UID",
         dicom_source(dicom_with(StudyInstanceUID=(0x0020000D, "LO", "study one"))),
         422, f"{SD}.StudyInstanceUID", "must be a DICOM UID", "was accepted"),
        ("a PNG", dicom_source(b"\x89PNG\r\n\x1a\n" + bytes(200)), 422, SD, "with its preamble"),
    ),
    *group(
        "oversized upload",
        (f"source_dicom over {MAX_UPLOAD_MB} MB",
         lambda s: dicom_source(dicom() + bytes(MAX_UPLOAD_MB << 20))(s),
         413, SD, "send a smaller file", "named the measurement"),
        (f"measurement over {MAX_UPLOAD_MB} MB",
         lambda s: recon(ct_measurement((1, 8, (MAX_UPLOAD_MB << 16) + 1)))(s),
         413, M, "send a smaller file"),
        (f"archive over {MAX_UPLOAD_MB} MB",
         lambda s: dataset(bytes((MAX_UPLOAD_MB << 20) + 1))(s),
         413, "archive", "send a smaller file", "named the measurement"),
    ),
    *group(
        "non-UTF-8 JSON",
        ("spec with \\xff bytes",
         raw_multipart({"spec": (None, CT_SPEC[:-1].encode() + b', "\xff\xfe": 1}')}),
         422, "spec", "unknown field; remove it"),
        ("spec in UTF-16", raw_multipart({"spec": (None, CT_SPEC.encode("utf-16"))}),
         422, "spec", "invalid measurement spec"),
        ("source with a \\xff byte", recon(files={"source": (None, b'{"PatientID": "x"}\xff')}),
         422, "source", "JSON object"),
        ("export body", export(b'{"destination": "\xff"}'), 400, "body", "send UTF-8 JSON"),
        ("sampling body", post_json(ADMIN_BODY["sampling"], b'{"model": "\xc3\x28"}'),
         400, "body", "send UTF-8 JSON"),
        ("training body", post_json(ADMIN_BODY["training"], b'{"model_id": "\x80abc"}'),
         400, "body", "send UTF-8 JSON"),
        ("API key body", post_json("/v1/admin/api-keys", b'{"owner": "\xfe"}'),
         400, "body", "send UTF-8 JSON"),
    ),
    *group(
        "deeply nested JSON",
        ("spec: 10 000 arrays", recon(spec=nested(DEEP)), 422, "spec", "recursion limit"),
        ("spec: 10 000 objects", recon(spec=nested(DEEP, '{"a":', "}")),
         422, "spec", "recursion limit"),
        ("source: 10 000 arrays", recon(source=nested(DEEP)), 422, "source", "JSON object",
         "was a 500 (RecursionError)"),
        ("source: 10 000 objects", recon(source=nested(DEEP, '{"PatientID":', "}")),
         422, "source", "JSON object", "was a 500 (RecursionError)"),
        ("export body", export(nested(DEEP)), 400, "body", "not nested thousands"),
        ("export destination 500 deep", export('{"destination": ' + nested(500) + "}"),
         422, "destination", "valid string"),
        ("training body", post_json(ADMIN_BODY["training"], nested(DEEP, '{"a":', "}")),
         400, "body", "not nested thousands"),
        ("sampling body", post_json(ADMIN_BODY["sampling"], nested(DEEP)),
         400, "body", "not nested thousands"),
        ("API key body", post_json("/v1/admin/api-keys", nested(DEEP)),
         400, "body", "not nested thousands"),
    ),
    *group(
        "empty file",
        ("measurement", recon(b""), 422, M, ".npy"),
        ("source_dicom", dicom_source(b""), 422, SD, "with its preamble"),
        ("archive", dataset(b""), 422, "archive", "upload a .zip"),
        ("spec", recon(spec=""), 422, "spec", "Field required"),
        ("export body", export(b""), 422, "body", "Field required"),
        ("sampling body", post_json(ADMIN_BODY["sampling"], b""), 422, "body", "Field required"),
    ),
    *group(
        "wrong content type",
        ("JSON to reconstructions",
         post_json("/v1/reconstructions", json.dumps({"spec": CT_SPEC}), key="alice"),
         422, M, "Field required"),
        ("multipart without a boundary",
         post_json("/v1/reconstructions", b"abc", "alice", MULTIPART),
         400, "body", "with a boundary"),
        ("multipart with another boundary",
         post_json("/v1/reconstructions", b"--x\r\nabc", "alice", MULTIPART + "; boundary=y"),
         400, "body", "with a boundary"),
        ("measurement as a text field", form("/v1/reconstructions", "alice",
                                             {"measurement": "1,2,3", "spec": CT_SPEC}),
         422, M, "Expected UploadFile"),
        ("text/plain to sampling",
         post_json(ADMIN_BODY["sampling"], '{"model": "tiny32"}', ctype="text/plain"),
         422, "body", "valid dictionary"),
        ("form to export", form(f"/v1/jobs/{SEEDED}/export", "alice", {"destination": "x"}),
         422, "body", "valid dictionary"),
        ("JSON to datasets", post_json("/v1/admin/datasets", '{"archive": "x"}'),
         422, "archive", "Field required"),
        ("JSON array to API keys", post_json("/v1/admin/api-keys", "[1, 2]"),
         422, "body", "valid dictionary"),
    ),
    *group(
        "missing fields",
        ("no measurement", upload("/v1/reconstructions", "alice", {"x": ("x", b"1")},
                                  {"spec": CT_SPEC}), 422, M, "Field required"),
        ("no spec", upload("/v1/reconstructions", "alice", {M: ("y.npy", ct_measurement())}),
         422, "spec", "Field required"),
        ("no destination", export("{}"), 422, "destination", "Field required"),
        ("no model to sample", post_json(ADMIN_BODY["sampling"], "{}"),
         422, "model", "Field required"),
        ("no model_id to train", post_json(ADMIN_BODY["training"], '{"dataset": "' + ZEROS + '"}'),
         422, "model_id", "Field required"),
        ("no training data source", post_json(ADMIN_BODY["training"], '{"model_id": "ct-x"}'),
         422, "body", "exactly one data source"),
        ("no archive", upload("/v1/admin/datasets", "admin", {"x": ("a.zip", b"PK")}),
         422, "archive", "Field required"),
        ("no API key scopes", post_json("/v1/admin/api-keys", '{"owner": "x"}'),
         422, "scopes", "non-empty subset"),
    ),
    *group(
        "bad field values",
        ("nfe not a number", recon(nfe="many"), 422, "nfe", "valid integer"),
        ("nfe 10^400", recon(nfe="1" + "0" * 400), 422, "nfe", "less than or equal to 5000"),
        ("samples 0", recon(samples="0"), 422, "samples", "greater than or equal to 1"),
        ("seed 2^64", recon(seed=str(2**64)), 422, "seed", "less than or equal",
         "was accepted; the job failed"),
        ("sampler blank", recon(sampler=" "), 422, "sampler", "one of"),
        ("model a path", recon(model="../../etc/passwd"), 422, "model", "see GET /v1/models"),
        ("model with NUL", recon(model="tiny32\x00"), 422, "model", "see GET /v1/models"),
        ("job list offset 10^30", get("/v1/jobs?offset=" + "1" + "0" * 30, "alice"),
         422, "offset", "less than or equal", "was a 500 (the database's integer overflowed)"),
        ("job list limit -1", get("/v1/jobs?limit=-1", "alice"), 422, "limit", "greater than"),
        ("job list state unknown", get("/v1/jobs?state=lost", "alice"), 422, "state", "one of"),
        ("result format unknown", get(f"/v1/jobs/{SEEDED}/result?format=exe", "alice"),
         422, "format", "match pattern"),
        ("spec modality unknown", recon(spec='{"modality": "pet", "image_size": 32}'),
         422, "spec", "must be one of"),
        ("spec angles a string", recon(spec='{"modality": "ct", "image_size": 32, "angles": "x"}'),
         422, "spec", "angles"),
        ("spec a JSON array", recon(spec="[1, 2]"), 422, "spec", "invalid measurement spec"),
        ("source not an object", recon(source="[1]"), 422, "source", "JSON object"),
        ("source value a number", recon(source='{"PatientID": 7}'),
         422, "source.PatientID", "string of at most 64"),
        ("source UID not a UID", recon(source='{"StudyInstanceUID": "study one"}'),
         422, "source.StudyInstanceUID", "must be a DICOM UID", "was written into the DICOM"),
        ("source with NUL", recon(source='{"PatientID": "a\\u0000b"}'),
         422, "source.PatientID", "printable", "was accepted"),
        ("export_to unknown", recon(export_to="nowhere"), 422, "export_to", "none configured"),
        ("export to an unknown PACS", export('{"destination": "nowhere"}'),
         422, "destination", "none configured"),
        ("export with an extra field", export('{"destination": "x", "force": true}'),
         422, "force", "Extra inputs"),
        ("sampling n 10^6", post_json(ADMIN_BODY["sampling"], '{"model": "tiny32", "n": 1000000}'),
         422, "n", "less than or equal to 64"),
        ("sampling seed 2^64",
         post_json(ADMIN_BODY["sampling"], '{"model": "tiny32", "seed": 18446744073709551616}'),
         422, "seed", "less than or equal", "was accepted; the job failed"),
        ("training model_id a path",
         post_json(ADMIN_BODY["training"], '{"model_id": "../x", "dataset": "' + ZEROS + '"}'),
         422, "model_id", "match pattern"),
        ("training dataset not an id",
         post_json(ADMIN_BODY["training"], '{"model_id": "ct-x", "dataset": "../../etc"}'),
         422, "dataset", "32 hex digits"),
        ("API key scopes a number", post_json("/v1/admin/api-keys", '{"scopes": 5, "owner": "x"}'),
         422, "scopes", "list of scope names", "was a 500 (TypeError)"),
        ("API key scopes a string",
         post_json("/v1/admin/api-keys", '{"scopes": "admin", "owner": "x"}'),
         422, "scopes", "list of scope names", "was split into letters"),
        ("API key owner an object",
         post_json("/v1/admin/api-keys", '{"scopes": ["recon:read"], "owner": {"a": 1}}'),
         422, "owner", "printable characters", "was accepted as its repr"),
        ("API key owner with NUL",
         post_json("/v1/admin/api-keys", '{"scopes": ["recon:read"], "owner": "a\\u0000b"}'),
         422, "owner", "printable characters", PG_500),
    ),
    *group(
        "control characters",
        ("job id with NUL", get("/v1/jobs/" + "a" * 31 + "%00", "alice"),
         404, "job_id", "no job", PG_500),
        ("export of a job id with NUL", export('{"destination": "x"}', "a" * 31 + "%00"),
         404, "job_id", "no job", PG_500),
        ("API key id with NUL", get("/v1/admin/api-keys/%00", "admin", "DELETE"),
         404, "key_id", "no active key", PG_500),
        ("bearer key id with NUL", get("/v1/jobs", "sr_a\x00b_c"),
         401, "Authorization", "unknown", PG_500),
        ("Idempotency-Key with NUL", recon(headers={"Idempotency-Key": "a\x00b"}),
         422, "Idempotency-Key", "printable", PG_500),
        ("Idempotency-Key of 10 000 characters", recon(headers={"Idempotency-Key": "k" * 10_000}),
         422, "idempotency-key", "at most 256"),
    ),
    *group(
        "malformed archive",
        ("random bytes", dataset(bytes(range(256)) * 4), 422, "archive", "upload a .zip"),
        ("PK then garbage", dataset(b"PK\x03\x04" + bytes(100)), 422, "archive", "damaged"),
        ("gzip bomb (64 MiB of zeros)", lambda s: dataset(tar_gz_bomb())(s),
         422, "archive", "split it"),
        ("member climbing out", dataset(archive_zip({"../../escape.npy": npy(np.ones((4, 4)))})),
         422, "archive", "outside the dataset folder"),
        ("DICOM with an unknown VR",
         dataset(archive_zip({"a.dcm": dicom_patched(SERIES_UID, 4, b"ZZ")})),
         422, "archive", "fix or remove it", "was a 500 and left the dataset behind"),
        ("DICOM with text for a position",
         dataset(archive_zip({"a.dcm": dicom_with(ImagePositionPatient=(0x00200032, "LO", "a"))})),
         422, "archive", "fix or remove", "was a 500 and left the dataset behind"),
        ("DICOM with text for Rows",
         dataset(archive_zip({"a.dcm": dicom_with(Rows=(0x00280010, "LO", "many"))})),
         422, "archive", "fix or remove", "was a 500 and left the dataset behind"),
    ),
]
# fmt: on

# family -> backend -> (cases tried, 5xx seen, names of cases refused badly)
SEEN: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(lambda: [0, 0, []]))


def refusal_problems(r: httpx.Response, case: Bad) -> list[str]:
    """What is wrong with the response to a malformed request (empty when it is right)."""
    if r.status_code >= 500:
        return [f"{r.status_code}: {r.text[:300]}"]
    wrong = []
    if r.status_code != case.status:
        wrong.append(f"status {r.status_code}, not {case.status}: {r.text[:300]}")
    if not r.headers.get("content-type", "").startswith("application/problem+json"):
        wrong.append(f"content-type {r.headers.get('content-type')}")
        return wrong
    body = r.json()
    if body.get("field") != case.field:
        wrong.append(f"field {body.get('field')!r}, not {case.field!r}")
    if case.hint not in str(body.get("detail", "")):
        wrong.append(f"detail {body.get('detail')!r} lacks {case.hint!r}")
    if "Traceback" in r.text:
        wrong.append("a traceback in the body")
    return wrong


@pytest.mark.parametrize("case", CORPUS, ids=[f"{c.family}: {c.name}" for c in CORPUS])
def test_malformed_input_is_refused_naming_the_field(site: Gateway, case: Bad):
    before = stored(site)
    try:
        r = case.send(site)
    except Exception as exc:  # noqa: BLE001 - an exception out of the app is its 500
        r = httpx.Response(500, text=f"{type(exc).__name__}: {exc}")
    wrong = refusal_problems(r, case)
    after = stored(site)
    if after != before:
        wrong.append(
            "stored state changed: " + ", ".join(k for k in after if after[k] != before[k])
        )
    seen = SEEN[case.family][site.backend]
    seen[0] += 1
    seen[1] += r.status_code >= 500
    if wrong:
        seen[2].append(case.name)
    assert not wrong, wrong


def last_backend(request: pytest.FixtureRequest) -> bool:
    """Whether this is the last backend this test runs on in the session (which records the
    rows for all backends)."""
    name = request.node.originalname
    runs = [i for i in request.session.items if getattr(i, "originalname", None) == name]
    return runs[-1] is request.node


def test_the_corpus_changed_nothing_stored_and_is_recorded(
    site: Gateway, record, request: pytest.FixtureRequest
):
    """One row per family over the backends (the corpus runs first: tests run in file order);
    and what is stored is what was stored before the corpus."""
    if last_backend(request):
        for family, by in SEEN.items():
            tried = sum(n for n, _, _ in by.values())
            five_xx = sum(n for _, n, _ in by.values())
            bad = [f"{name} ({backend})" for backend, (_, _, names) in by.items() for name in names]
            guards = sum(1 for c in CORPUS if c.family == family and c.fixed)
            outcome = (
                f"all refused with a 4xx problem+json naming the field and the fix, on "
                f"{' and '.join(by)}; nothing stored changed"
                if not bad
                else f"refused wrongly: {'; '.join(bad)}"
            ) + (f" ({guards} cases guard defects found and fixed here)" if guards else "")
            record(AREA, family, tried=tried, five_xx=five_xx, outcome=outcome)
    seen = [by[site.backend] for by in SEEN.values() if site.backend in by]
    assert all(not names for _, _, names in seen), seen
    assert stored(site) == site.baseline


# --- schemathesis ---------------------------------------------------------------------------


@dataclass
class Tally:
    """What the generated requests got, on one backend."""

    sent: int = 0
    seconds: float = 0.0
    accepted: int = 0
    five_xx: list[str] = field(default_factory=list)
    unclear: list[str] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=lambda: defaultdict(int))


TALLIES: dict[str, Tally] = {}


def test_schemathesis_finds_no_5xx(site: Gateway, record, request: pytest.FixtureRequest):
    """Requests generated from the OpenAPI schema, valid and invalid, with a submitter's and
    an admin's key (path ids sometimes the seeded job's, so handlers get past the lookup):
    none may get a 5xx, and every 4xx is problem+json with a detail."""
    target = count(150, 1000)  # per backend: 300 in CI, 2000 for the report
    jobs_before = {row[0] for row in stored(site)["jobs"]}
    tally = TALLIES[site.backend] = Tally()
    session = asgi.get_client(site.app)  # in-process ASGI; the app is already started
    generated = st.one_of(_strategies(site))

    @hypothesis_settings(
        max_examples=target,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(generated)
    def run(drawn: tuple[str, schemathesis.Case]) -> None:
        key, case = drawn
        label = case.operation.label
        try:
            r = case.call(
                session=session, base_url="http://testserver", headers=auth(site.keys[key])
            )
        except schemathesis.errors.SerializationNotPossible:
            return
        except Exception as exc:  # noqa: BLE001 - the app raised: its 500
            tally.sent += 1
            tally.five_xx.append(f"{label}: {type(exc).__name__}: {exc}")
            return
        tally.sent += 1
        tally.statuses[r.status_code] += 1
        if r.status_code >= 500:
            tally.five_xx.append(f"{label}: {r.status_code} {r.text[:300]}")
        elif r.status_code >= 400:
            ctype = (r.headers.get("content-type") or [""])[0]  # header values are lists
            problem = ctype.startswith("application/problem+json")
            if not problem or not r.json().get("detail"):
                tally.unclear.append(f"{label}: {r.status_code} {r.text[:200]}")

    t0 = time.perf_counter()
    for _ in range(5):  # top up when draws were rejected (no negative form of a parameter)
        if tally.sent >= target:
            break
        try:
            run()
        except Unsatisfiable:
            pass
    tally.seconds = time.perf_counter() - t0
    tally.accepted = _cancel_new_jobs(site, jobs_before)
    if last_backend(request):
        _record_schemathesis(record)
    assert not tally.five_xx, tally.five_xx[:10]
    assert not tally.unclear, tally.unclear[:10]
    assert tally.sent >= 0.9 * target, f"only {tally.sent} of {target} requests were sent"


def _strategies(site: Gateway) -> list[st.SearchStrategy]:
    """(key, case) for every operation, positive and negative: the admin key everywhere, the
    submitter's where it has the scope."""
    schema = schemathesis.openapi.from_dict(site.app.openapi())
    out = []
    for result in schema.get_all_operations():
        op = result.ok()
        keys = ["admin"] if op.path.startswith("/v1/admin") else ["alice", "admin"]
        ids = [{}] + ([{"job_id": site.job_id}] if "{job_id}" in op.path else [])
        for mode in schemathesis.GenerationMode:
            for path_parameters in ids:
                cases = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)
                if op.path == "/v1/reconstructions" and mode.is_positive:
                    cases = st.one_of(cases, cases.map(_past_the_spec))
                out.append(st.tuples(st.sampled_from(keys), cases))
    return out


def _past_the_spec(case: schemathesis.Case) -> schemathesis.Case:
    """A valid spec, model and sampler, so that the generated measurement and optional
    parts reach their parsers."""
    if isinstance(case.body, dict):
        case.body = {**case.body, "spec": CT_SPEC, "model": "tiny32", "sampler": "fast"}
    return case


def _cancel_new_jobs(site: Gateway, before: set[str]) -> int:
    """Cancel the jobs generated requests got accepted, so none runs on after the test;
    returns how many there were."""
    with site.app.state.jobs.sessions() as s:
        new = [j.id for j in s.scalars(select(Job)) if j.id not in before]
    for job_id in new:
        site.client.delete(f"/v1/jobs/{job_id}", headers=auth(site.keys["admin"]))
    return len(new)


def _record_schemathesis(record: Callable[..., None]) -> None:
    statuses: dict[int, int] = defaultdict(int)
    for t in TALLIES.values():
        for status, n in t.statuses.items():
            statuses[status] += n
    unclear = sum(len(t.unclear) for t in TALLIES.values())
    accepted = sum(t.accepted for t in TALLIES.values())
    record(
        AREA,
        "schemathesis (OpenAPI)",
        tried=sum(t.sent for t in TALLIES.values()),
        five_xx=sum(len(t.five_xx) for t in TALLIES.values()),
        outcome=f"on {' and '.join(TALLIES)}: statuses {dict(sorted(statuses.items()))}; "
        f"{unclear} 4xx without problem+json; {accepted} accepted jobs cancelled",
        seconds=round(sum(t.seconds for t in TALLIES.values()), 1),
    )
