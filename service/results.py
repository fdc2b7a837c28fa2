"""The result store: measurements and results by job id, written atomically.

Two implementations of one interface (``ResultStore``): ``LocalResultStore`` keeps
``<root>/<job id>/<name>`` on a local or shared file system (the default), and
``S3ResultStore`` keeps ``<prefix>/<job id>/<name>`` objects in an S3-compatible bucket
(AWS S3, MinIO, Ceph RGW; the ``s3`` extra installs boto3). Names come from a fixed set and
job ids are hex, so nothing a client sends is ever joined into a path or an object key.
``open_result_store`` picks one from the settings.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from service.settings import Settings

NAMES = {
    "measurement.npy",
    "noise.npy",
    "recon.npy",
    "std.npy",
    "baseline.npy",
    "preview.png",
    "report.json",
    "samples.npy",
    "metal_mask.npy",
    "phase.npy",
    "slab.npz",  # a slab of a volume split across workers (workers/kinds/reconstruct.py)
    "slab.json",
}
_JOB = re.compile(r"^[0-9a-f]{32}$")


def _check(job_id: str, name: str) -> None:
    if not _JOB.match(job_id) or name not in NAMES:
        raise ValueError(f"invalid result key {job_id}/{name}")


class ResultStore(Protocol):
    """Bytes by (job id, name). ``put`` is atomic: a reader sees the old or the new object,
    never part of one. ``get`` of a missing object raises ``FileNotFoundError``."""

    def put(self, job_id: str, name: str, data: bytes) -> None: ...

    def get(self, job_id: str, name: str) -> bytes: ...

    def exists(self, job_id: str, name: str) -> bool: ...

    def delete(self, job_id: str, names: Iterable[str] | None = None) -> None:
        """Remove the job's objects: all of them, or only ``names`` (missing ones are fine)."""
        ...


class LocalResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, name: str) -> Path:
        _check(job_id, name)
        return self.root / job_id / name

    def put(self, job_id: str, name: str, data: bytes) -> None:
        """Write via a temporary file and an atomic rename: readers never see half a file."""
        path = self._path(job_id, name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, job_id: str, name: str) -> bytes:
        return self._path(job_id, name).read_bytes()

    def exists(self, job_id: str, name: str) -> bool:
        return self._path(job_id, name).exists()

    def delete(self, job_id: str, names: Iterable[str] | None = None) -> None:
        if not _JOB.match(job_id):
            return
        if names is None:
            shutil.rmtree(self.root / job_id, ignore_errors=True)
            return
        for name in names:
            self._path(job_id, name).unlink(missing_ok=True)


class S3ResultStore:
    """Objects ``<prefix>/<job id>/<name>`` in an S3-compatible bucket.

    A PUT is atomic in S3 (an object appears whole or not at all), and each upload carries
    a checksum the server verifies, so a torn network write is refused rather than stored.
    Credentials come from boto3's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
    an instance or pod role); ``endpoint_url`` points at MinIO or another S3-compatible server.
    """

    def __init__(self, url: str, endpoint_url: str | None = None, region: str | None = None):
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the installed extras
            raise RuntimeError(
                "an s3:// result store needs boto3: pip install 'scorerecon[s3]'"
            ) from exc
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"result store URL {url!r}: expected s3://BUCKET[/PREFIX]")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, job_id: str, name: str = "") -> str:
        if name:
            _check(job_id, name)
        elif not _JOB.match(job_id):
            raise ValueError(f"invalid job id {job_id!r}")
        return "/".join(p for p in (self.prefix, job_id, name) if p) + ("" if name else "/")

    def put(self, job_id: str, name: str, data: bytes) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self._key(job_id, name), Body=data, ChecksumAlgorithm="SHA256"
        )

    def get(self, job_id: str, name: str) -> bytes:
        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self._key(job_id, name))
        except self.client.exceptions.NoSuchKey as exc:
            raise FileNotFoundError(f"{job_id}/{name}") from exc
        return obj["Body"].read()

    def exists(self, job_id: str, name: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(job_id, name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
        return True

    def delete(self, job_id: str, names: Iterable[str] | None = None) -> None:
        if not _JOB.match(job_id):
            return
        if names is not None:
            keys = [{"Key": self._key(job_id, n)} for n in names]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})
            return
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._key(job_id)
        )
        for page in pages:
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})


def open_result_store(settings: Settings) -> ResultStore:
    """The store the settings name: ``SCORERECON_RESULT_STORE=s3://bucket/prefix`` (with
    ``SCORERECON_S3_ENDPOINT_URL`` for a non-AWS server) or the local results directory."""
    url = settings.result_store
    if not url:
        return LocalResultStore(settings.results)
    if not url.startswith("s3://"):
        raise ValueError(
            f"SCORERECON_RESULT_STORE={url!r}: expected s3://BUCKET[/PREFIX]; "
            "for a local directory set SCORERECON_STORAGE_DIR instead"
        )
    return S3ResultStore(url, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region)
