"""Uploaded training archives: unpacked into their own folder, or refused whole with the
member named (path traversal, links, bombs, damage)."""

import io
import tarfile
import zipfile

import numpy as np
import pytest

from service.archives import ArchiveError, extract


def _npy(seed: int) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(seed).random((8, 8)).astype(np.float32))
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _tar(members: dict[str, bytes], mode: str = "w:gz", link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)
    return buf.getvalue()


@pytest.mark.parametrize("pack", [_zip, _tar, lambda m: _tar(m, "w")])
def test_archives_unpack_into_their_folder(tmp_path, pack):
    raw = pack({"a/s0.npy": _npy(0), "a/b/s1.npy": _npy(1)})
    counts = extract(raw, tmp_path / "ds", 1 << 20)
    assert counts["files"] == 2
    assert np.load(tmp_path / "ds" / "a" / "b" / "s1.npy").shape == (8, 8)


@pytest.mark.parametrize(
    "raw,message",
    [
        (_zip({"../escape.npy": b"x"}), "outside"),
        (_zip({"/etc/cron.d/x": b"x"}), "outside"),
        (_tar({"ok.npy": b"x", "a/../../escape": b"x"}), "outside"),
        (_tar({"ok.npy": b"x"}, link="evil"), "not a regular file"),
        (_zip({"big.npy": b"\0" * (3 << 20)}), "inflates beyond"),
        (_zip({}), "no files"),
        (b"not an archive", "upload a .zip"),
        (_zip({"s.npy": _npy(0)})[:-30], "damaged"),
    ],
)
def test_unsafe_or_broken_archives_are_refused_and_leave_nothing(tmp_path, raw, message):
    with pytest.raises(ArchiveError, match=message):
        extract(raw, tmp_path / "ds", 1 << 20)
    assert not (tmp_path / "ds").exists()
    assert [p.name for p in tmp_path.iterdir()] == []
