"""The result store: measurements and results by job id, written atomically.

``LocalResultStore`` keeps ``<root>/<job id>/<name>``; names come from a fixed set and job
ids are hex, so nothing a client sends is ever joined into a path.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

NAMES = {
    "measurement.npy",
    "recon.npy",
    "std.npy",
    "baseline.npy",
    "preview.png",
    "report.json",
    "samples.npy",
    "metal_mask.npy",
}
_JOB = re.compile(r"^[0-9a-f]{32}$")


class LocalResultStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, name: str) -> Path:
        if not _JOB.match(job_id) or name not in NAMES:
            raise ValueError(f"invalid result key {job_id}/{name}")
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

    def delete(self, job_id: str) -> None:
        if _JOB.match(job_id):
            shutil.rmtree(self.root / job_id, ignore_errors=True)
