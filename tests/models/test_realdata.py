"""Real data: the .inv3 and MetaImage readers, the fetch and conversion (on synthetic packages
built here, so no Debian package is needed), the split, and the fetched real volumes when
``make realdata`` has put them in ``.cache/realdata``."""

import gzip
import io
import json
import plistlib
import tarfile
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from models import realdata
from models.cli import main
from models.formats import read_inv3, read_metaimage
from models.realdata import (
    GAP,
    SPLIT_NAMES,
    SPLITS,
    FetchError,
    check_split,
    fetch,
    load_manifest,
    real_complex_slices,
    real_slices,
)

# --------------------------------------------------------------------------------------
# Synthetic files in the packages' formats
# --------------------------------------------------------------------------------------


def _inv3_bytes(volume: np.ndarray, spacing=(0.9, 0.9, 1.5), order="<", scalar_range=None):
    """An InVesalius project (gzip tar, one folder) holding ``volume`` as matrix.dat."""
    meta = {
        "format_version": 1,
        "modality": "CT",
        "name": "synthetic",
        "matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(volume.shape)},
        "spacing": list(spacing),
    }
    if scalar_range is not None:
        meta["scalar_range"] = list(scalar_range)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in (
            ("tmpabc/main.plist", plistlib.dumps(meta)),
            ("tmpabc/matrix.dat", volume.astype(order + "i2").tobytes()),
            ("tmpabc/mask_0.plist", plistlib.dumps({"index": 0})),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _mha_bytes(data: np.ndarray, channels=1, compressed=False, msb=False, datafile="LOCAL"):
    dims = data.shape[:2][::-1]
    etype = {"f": "MET_FLOAT", "u": "MET_UCHAR", "i": "MET_SHORT"}[data.dtype.kind]
    raw = data.astype((">" if msb else "<") + data.dtype.str[1:]).tobytes()
    lines = [
        "ObjectType = Image",
        "NDims = 2",
        "BinaryData = True",
        f"BinaryDataByteOrderMSB = {msb}",
        f"CompressedData = {compressed}",
    ]
    if compressed:
        raw = zlib.compress(raw)
        lines.append(f"CompressedDataSize = {len(raw)}")
    lines += [
        "ElementSpacing = 0.5 2",
        f"DimSize = {dims[0]} {dims[1]}",
        *([f"ElementNumberOfChannels = {channels}"] if channels > 1 else []),
        f"ElementType = {etype}",
        f"ElementDataFile = {datafile}",
    ]
    header = ("\n".join(lines) + "\n").encode()
    return header, raw


def _head_ct(n=108, size=32) -> np.ndarray:
    """Air (-1024 HU) around a head: brain 40 HU inside a 1500 HU skull ring."""
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    sl = np.where(r < 0.42 * size, 1500, -1024)
    sl = np.where(r < 0.36 * size, 40, sl)
    return np.repeat(sl[None], n, axis=0).astype(np.int16)


# --------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------


def test_inv3_reader_reads_volume_spacing_and_byte_order(tmp_path):
    vol = _head_ct(5, 8)
    vol[2, 1, 1] = 3000
    path = tmp_path / "a.inv3"
    path.write_bytes(_inv3_bytes(vol, spacing=(0.8, 0.7, 2.0)))
    got = read_inv3(path)
    assert got.data.shape == (5, 8, 8) and got.data.dtype == np.int16
    np.testing.assert_array_equal(got.data, vol)
    assert got.spacing == (2.0, 0.7, 0.8)  # (z, y, x) from the plist's (x, y, z)
    assert got.modality == "CT" and got.byte_order == "<"
    # A big-endian matrix is recognised by the plist's scalar range.
    path.write_bytes(_inv3_bytes(vol, order=">", scalar_range=(-1024, 3000)))
    got = read_inv3(path)
    assert got.byte_order == ">"
    np.testing.assert_array_equal(got.data, vol)


def test_inv3_reader_refuses_inconsistent_projects(tmp_path):
    good = _inv3_bytes(_head_ct(2, 4))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        meta = plistlib.dumps({"matrix": {"dtype": "int16", "shape": [3, 4, 4]}})
        for name, data in (("p/main.plist", meta), ("p/matrix.dat", b"\0" * 10)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "bad.inv3"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match="expected 96"):
        read_inv3(path)
    path.write_bytes(gzip.compress(b"not a tar"))
    with pytest.raises(tarfile.TarError):
        read_inv3(path)
    path.write_bytes(good)
    assert read_inv3(path).data.shape == (2, 4, 4)


def test_metaimage_reader_local_compressed_external_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    cplx = rng.normal(size=(6, 5, 2)).astype(np.float32)
    for compressed in (False, True):
        header, raw = _mha_bytes(cplx, channels=2, compressed=compressed)
        path = tmp_path / f"c{compressed}.mha"
        path.write_bytes(header + raw)
        img = read_metaimage(path)
        assert img.data.shape == (6, 5, 2) and img.data.dtype == np.float32
        np.testing.assert_array_equal(img.data, cplx)
        assert img.spacing == (2.0, 0.5)  # (y, x), DimSize order reversed
    # A header naming a raw file next to it, big-endian shorts.
    short = rng.integers(-500, 500, size=(4, 7)).astype(np.int16)
    header, raw = _mha_bytes(short, msb=True, datafile="s.raw")
    (tmp_path / "s.mhd").write_bytes(header)
    (tmp_path / "s.raw").write_bytes(raw)
    np.testing.assert_array_equal(read_metaimage(tmp_path / "s.mhd").data, short)
    # Truncated data and files outside the header's folder are refused.
    (tmp_path / "t.mha").write_bytes(header.replace(b"s.raw", b"LOCAL") + raw[:10])
    with pytest.raises(ValueError, match="bytes of data"):
        read_metaimage(tmp_path / "t.mha")
    (tmp_path / "u.mhd").write_bytes(header.replace(b"s.raw", b"../s.raw"))
    with pytest.raises(ValueError, match="not next to it"):
        read_metaimage(tmp_path / "u.mhd")


# --------------------------------------------------------------------------------------
# The split
# --------------------------------------------------------------------------------------


def _indices(spec: dict, split: str) -> set[int]:
    return {i for start, stop in spec[split] for i in range(start, stop)}


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_split_is_disjoint_with_gaps(name):
    spec = SPLITS[name]
    check_split(spec["n"], spec)
    sets = {s: _indices(spec, s) for s in SPLIT_NAMES}
    assert all(sets.values())
    for a in SPLIT_NAMES:
        for b in SPLIT_NAMES:
            if a < b:
                assert not sets[a] & sets[b]
                gap = min(abs(i - j) for i in sets[a] for j in sets[b])
                assert gap > GAP, (a, b, gap)  # GAP slices lie between them
    # Most slices train; the gaps are the only ones left out.
    assert len(sets["train"]) > 0.5 * spec["n"]
    assert len(set().union(*sets.values())) >= spec["n"] - 4 * GAP


def test_check_split_refuses_overlaps_and_missing_gaps():
    with pytest.raises(ValueError, match="overlaps"):
        check_split(20, {"train": ((0, 10),), "test": ((8, 12),)})
    with pytest.raises(ValueError, match="at least"):
        check_split(20, {"train": ((0, 10),), "test": ((12, 20),)}, gap=4)
    with pytest.raises(ValueError, match="not inside"):
        check_split(20, {"train": ((0, 21),)})
    check_split(20, {"train": ((0, 5), (5, 10)), "test": ((14, 20),)}, gap=4)


def test_colin27_test_slab_holds_the_itk_slices_levels():
    """The ITK BrainWeb slices are Colin27's axial slices ~88 (PD) and 94 (T1): they must lie
    in Colin27's test slab, at least GAP slices inside it, to stay unseen by training."""
    (start, stop), *_ = SPLITS["colin27"]["test"]
    assert start + GAP <= 88 and 94 < stop - GAP


# --------------------------------------------------------------------------------------
# Fetch and conversion on synthetic packages
# --------------------------------------------------------------------------------------


def _fake_packages(root):
    """Unpacked-package trees with synthetic files where the real packages have theirs."""
    inv = root / "invesalius-examples"
    f = inv / "usr/share/doc/invesalius-examples/examples/Cranium.inv3"
    f.parent.mkdir(parents=True)
    ct = _head_ct()
    ct[:10] = -1024  # air slices (below the head): skipped by real_slices
    f.write_bytes(_inv3_bytes(ct, scalar_range=(-1024, 1500)))
    (inv / "usr/share/doc/invesalius-examples/copyright").write_text("License: GPL-2\n")

    mri = root / "mricron-data"
    f = mri / "usr/share/mricron/templates/ch2.nii.gz"
    f.parent.mkdir(parents=True)
    yy, xx = np.mgrid[:24, :20]
    blob = (np.hypot(yy - 12, xx - 10) < 8) * 100.0 + 20 * (xx > 10)
    vol = np.repeat(blob[None], 181, axis=0).astype(np.uint8)  # (z, y, x)
    nib.save(nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), np.eye(4)), str(f))
    (mri / "usr/share/doc/mricron-data").mkdir(parents=True)
    (mri / "usr/share/doc/mricron-data/copyright").write_text("License: BSD-3-clause\n")

    itk = root / "insighttoolkit4-examples"
    data = itk / realdata.ITK_DATA
    data.mkdir(parents=True)
    img = (np.hypot(*np.mgrid[-20:21, -16:17]) < 14) * 180 + 10
    grey = Image.fromarray(img.astype(np.uint8), "L")
    grey.convert("RGB").save(data / "BrainT1Slice.png")
    grey.convert("P").save(data / "BrainProtonDensitySlice.png")
    grey.save(data / "FatMRISlice.png")
    c = np.stack([img, img[::-1]], -1).astype(np.float32)
    header, raw = _mha_bytes(c, channels=2, compressed=True)
    (data / "itkBrainSliceComplex.mha").write_bytes(header + raw)
    (itk / "usr/share/doc/insighttoolkit4-examples/copyright").write_text("Apache-2.0\n")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A real-data folder fetched from synthetic packages; mricron-data 'cannot be had'."""
    pkgs = tmp_path_factory.mktemp("packages")
    _fake_packages(pkgs)

    def get(self, package):
        if package == "mricron-data" and not getattr(get, "allow", False):
            raise FetchError("`apt-get download mricron-data` failed: E: no such package")
        return pkgs / package, "1.0-test"

    dest = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(realdata._Apt, "get", get)
        first = fetch(dest)
        get.allow = True
        second = fetch(dest, only=["colin27"])
    return dest, first, second


def test_fetch_converts_each_source_and_reports_the_one_that_failed(synthetic):
    dest, first, second = synthetic
    assert [f["name"] for f in first.failed] == ["colin27"]
    failure = first.failed[0]
    assert "mricron-data" in failure["needs"] and "ch2.nii.gz" in failure["needs"]
    assert "no such package" in failure["reason"]
    assert {e["name"] for e in first.fetched} == {
        "cranium",
        "itk-mr",
        "itk-complex",
        "nibabel-anatomical",
    }
    assert [e["name"] for e in second.fetched] == ["colin27"] and not second.failed
    manifest = load_manifest(dest)
    names = [e["name"] for e in manifest["sources"]]
    assert names == [s.name for s in realdata.SOURCES]  # the earlier ones kept, in order
    for e in manifest["sources"]:
        for key in ("package", "version", "file", "licence", "shape", "spacing_mm", "intensity"):
            assert e[key], (e["name"], key)
        for item in e["outputs"]:
            assert (dest / item["path"]).is_file()
        assert (dest / e["licence_file"]).is_file()
    cranium = manifest["sources"][0]
    assert cranium["shape"] == [108, 32, 32] and cranium["intensity"]["unit"] == "HU"
    assert cranium["spacing_mm"] == [1.5, 0.9, 0.9]
    # The split on disk is SPLITS: one NIfTI per slab, in HU, with its slices.
    slabs = {tuple(o["slices"]): o for o in cranium["outputs"]}
    for split in SPLIT_NAMES:
        for start, stop in SPLITS["cranium"][split]:
            item = slabs[(start, stop)]
            assert item["split"] == split
            vol = realdata.read_nifti(dest / item["path"])
            assert vol.modality == "CT" and vol.data.shape == (stop - start, 32, 32)
            assert vol.spacing == pytest.approx((1.5, 0.9, 0.9))
            assert vol.data.min() == -1024 and vol.data.max() == 1500
    assert json.loads((dest / "sources.json").read_text())["split"] == realdata.split_record()


def test_real_slices_shapes_ranges_and_air_slices(synthetic):
    dest = synthetic[0]
    n_train = sum(stop - max(start, 10) for start, stop in SPLITS["cranium"]["train"])
    for modality in ("ct", "mr"):
        for split in SPLIT_NAMES:
            x = real_slices(modality, split, 16, root=dest)
            assert x.dtype == np.float32 and x.ndim == 3 and x.shape[1:] == (16, 16)
            assert len(x) > 0 and float(x.min()) >= 0 and float(x.max()) <= 1
    ct = real_slices("ct", "train", 16, root=dest)
    assert len(ct) == n_train  # slices 0..9 are air and skipped
    centre = ct[:, 8, 8]
    np.testing.assert_allclose(centre, (40 + 1000) / 4000, atol=0.02)  # brain: HU mapping
    # MR test: Colin27's test slab, 3 ITK slices and nibabel's volume (every slice in it).
    mr_test = real_slices("mr", "test", 16, root=dest)
    colin = SPLITS["colin27"]["test"][0]
    assert len(mr_test) == (colin[1] - colin[0]) + 3 + 25
    assert len(real_slices("mr", "test", 16, root=dest, sources=["itk-mr"])) == 3
    # Complex: magnitude at most 1, phase kept; nothing in train.
    z = real_complex_slices("test", 16, root=dest)
    assert z.dtype == np.complex64 and z.shape == (1, 16, 16)
    assert float(np.abs(z).max()) <= 1 + 1e-6 and float(np.angle(z).min()) >= -1e-6
    assert real_complex_slices("train", 16, root=dest).shape == (0, 16, 16)


def test_real_slices_errors_say_what_to_do(tmp_path, synthetic):
    with pytest.raises(FileNotFoundError, match="scorerecon data fetch"):
        real_slices("ct", "train", 16, root=tmp_path)
    with pytest.raises(ValueError, match="modality"):
        real_slices("pet", "train", 16, root=synthetic[0])
    with pytest.raises(ValueError, match="split"):
        real_slices("ct", "validation", 16, root=synthetic[0])
    stale = tmp_path / "stale"
    stale.mkdir()
    manifest = json.loads((synthetic[0] / "sources.json").read_text())
    manifest["split"]["gap"] = 1
    (stale / "sources.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="another split"):
        real_slices("ct", "train", 16, root=stale)


def test_data_fetch_command(tmp_path, monkeypatch, capsys):
    # nibabel's test volume comes from the installed nibabel: no Debian package needed.
    assert main(["data", "fetch", "--dest", str(tmp_path), "--only", "nibabel-anatomical"]) == 0
    assert "nibabel-anatomical" in capsys.readouterr().out
    assert real_slices("mr", "test", 8, root=tmp_path).shape[1:] == (8, 8)
    # Nothing fetched: status 1, and the reason names what was missing.
    monkeypatch.setattr(realdata.shutil, "which", lambda name: None)
    assert main(["data", "fetch", "--dest", str(tmp_path / "x"), "--only", "cranium"]) == 1
    out = capsys.readouterr().out
    assert "FAILED cranium" in out and "invesalius-examples" in out and "not found" in out
    assert main(["data", "fetch", "--only", "nope"]) == 2


def test_apt_failures_say_what_failed(tmp_path, monkeypatch):
    """Without package lists `apt-get download` fails: as root the fetch runs `apt-get
    update` once and retries; otherwise it says that the update needs root."""
    import subprocess

    calls = []

    def run(cmd, cwd=None):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] not in calls:
            return subprocess.CompletedProcess(cmd, 100, "", "E: Unable to locate package x")
        if cmd[:2] == ["apt-get", "download"]:
            (cwd / f"{cmd[2]}_1.0_all.deb").write_bytes(b"")
        return subprocess.CompletedProcess(cmd, 0, "1.0\n", "")

    monkeypatch.setattr(realdata, "_run", run)
    monkeypatch.setattr(realdata.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(realdata.os, "geteuid", lambda: 1000)
    with pytest.raises(FetchError, match="needs root: run `sudo apt-get update`"):
        realdata._Apt(tmp_path).get("x")
    assert ["apt-get", "update"] not in calls
    monkeypatch.setattr(realdata.os, "geteuid", lambda: 0)
    root, version = realdata._Apt(tmp_path).get("x")
    assert ["apt-get", "update"] in calls and version == "1.0"
    assert calls.count(["apt-get", "download"]) == 3


def test_train_default_can_add_the_real_train_split(synthetic, monkeypatch):
    import dataclasses

    from models.default_priors import RECIPES

    monkeypatch.setenv(realdata.ENV, str(synthetic[0]))
    recipe = dataclasses.replace(
        RECIPES["ct-default"],
        image_size=16,
        n_train=200,
        make_data=lambda n, size, split: torch.zeros(n, 1, size, size),  # phantoms stand-in
    )
    data = recipe.training_data("train", real=True, real_fraction=0.5)
    real = torch.from_numpy(real_slices("ct", "train", 16))
    assert data.shape == (200, 1, 16, 16)
    reps = round(100 / len(real))  # repeated to about half of the set
    assert torch.equal(data[: reps * len(real), 0], real.repeat(reps, 1, 1))
    assert not data[reps * len(real) :].any()  # the rest: the recipe's own data
    val = recipe.training_data("val", real=True)
    assert torch.equal(val[256:, 0], torch.from_numpy(real_slices("ct", "val", 16)))


# --------------------------------------------------------------------------------------
# The real data, when fetched (make realdata)
# --------------------------------------------------------------------------------------

real = pytest.mark.skipif(
    not realdata.available(),
    reason=f"no fetched real data in {realdata.data_dir()} (run `make realdata` or "
    "`scorerecon data fetch`)",
)


@real
def test_real_cranium_has_plausible_hounsfield_units():
    manifest = load_manifest()
    cranium = next(e for e in manifest["sources"] if e["name"] == "cranium")
    assert cranium["shape"] == [108, 256, 256] and cranium["intensity"]["unit"] == "HU"
    item = next(o for o in cranium["outputs"] if o["split"] == "test")
    hu = realdata.read_nifti(realdata.data_dir() / item["path"]).data
    air = hu[:, :20, :20]  # a corner outside the head
    assert -1030 <= float(np.median(air)) <= -950
    assert float(np.percentile(hu, 99.9)) > 1000  # skull
    brain = hu[len(hu) // 2, 100:156, 100:156]
    assert 0 < float(np.median(brain)) < 80  # brain tissue


@real
def test_real_splits_do_not_leak_the_itk_slices():
    """The ITK T1 slice (Colin27 slice 94) is nearly identical to a Colin27 *test* slice and
    to no training or validation slice."""
    itk = real_slices("mr", "test", 64, sources=["itk-mr"])[0]

    def best(x):
        a = (x - x.mean(axis=(1, 2), keepdims=True)).reshape(len(x), -1)
        b = (itk - itk.mean()).ravel()
        return float(np.max(a @ b / (np.linalg.norm(a, axis=1) * np.linalg.norm(b))))

    assert best(real_slices("mr", "test", 64, sources=["colin27"])) > 0.95
    assert best(real_slices("mr", "train", 64)) < 0.9
    assert best(real_slices("mr", "val", 64)) < 0.9


def test_training_says_which_real_sources_it_uses_and_which_it_goes_on_without(tmp_path):
    from models.realdata import training_report

    pkgs = tmp_path / "packages"
    pkgs.mkdir()
    _fake_packages(pkgs)

    def get(self, package):
        if package == "mricron-data":
            raise FetchError("`apt-get download mricron-data` failed: E: no such package")
        return pkgs / package, "1.0-test"

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(realdata._Apt, "get", get)
        fetch(tmp_path / "real")
    ct = training_report("train", "ct", tmp_path / "real")
    assert ct.startswith("real ct data (train): cranium") and "colin27" in ct
    mr = training_report("train", "mr", tmp_path / "real")
    assert "(train): none" in mr  # Colin27 is the only MR source with a train split
    assert "training goes on without: colin27 (`apt-get download mricron-data` failed" in mr
