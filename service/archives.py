"""Unpacking uploaded training archives (.zip, .tar, .tar.gz) safely.

Only regular files are written; a member whose name is absolute, climbs out with ``..``,
or is a link, device or FIFO is refused (the whole archive, with the member's name), and
inflation is capped while reading (a member's declared size is not trusted), so neither a
path traversal nor an archive bomb can touch anything outside the new folder.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

CHUNK = 1 << 20


class ArchiveError(ValueError):
    """The archive is unreadable or unsafe; the message names the member and the fix."""


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
        raise ArchiveError(f"member '{name}' would be written outside the dataset folder")
    return path


def _members(raw: bytes) -> Iterator[tuple[PurePosixPath, IO[bytes]]]:
    if raw.startswith(b"PK"):
        with zipfile.ZipFile(io.BytesIO(raw)) as z:
            for info in z.infolist():
                if info.is_dir():
                    continue
                mode = info.external_attr >> 16
                if mode and (mode & 0o170000) not in (0, 0o100000):
                    raise ArchiveError(f"member '{info.filename}' is not a regular file")
                name = _safe_name(info.filename)
                with z.open(info) as f:
                    yield name, f
        return
    try:
        tar = tarfile.open(fileobj=io.BytesIO(raw), mode="r:*")
    except tarfile.TarError:
        raise ArchiveError("upload a .zip, .tar or .tar.gz archive") from None
    with tar:
        for member in tar:
            if member.isdir():
                continue
            if not member.isfile():
                raise ArchiveError(f"member '{member.name}' is not a regular file")
            name = _safe_name(member.name)
            f = tar.extractfile(member)
            if f is not None:
                yield name, f


def extract(raw: bytes, dest: Path, max_bytes: int, max_files: int = 100_000) -> dict:
    """Unpack ``raw`` into the new folder ``dest``; returns counts. On any refusal the
    folder is removed, so nothing half-unpacked is left behind."""
    dest.mkdir(parents=True, exist_ok=False)
    files = total = 0
    try:
        for name, f in _members(raw):
            files += 1
            if files > max_files:
                raise ArchiveError(f"more than {max_files} files; split the archive")
            target = dest.joinpath(*name.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "xb") as out:
                while chunk := f.read(CHUNK):
                    total += len(chunk)
                    if total > max_bytes:
                        raise ArchiveError(
                            f"the archive inflates beyond {max_bytes >> 20} MB; split it or ask "
                            "the operator to register a server-side folder"
                        )
                    out.write(chunk)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError(f"the archive is damaged ({type(exc).__name__})") from None
    except ArchiveError:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    if files == 0:
        shutil.rmtree(dest, ignore_errors=True)
        raise ArchiveError("the archive holds no files")
    return {"files": files, "bytes": total}
