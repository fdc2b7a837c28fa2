"""Training data: DICOM series assembly, HU mapping, NIfTI slicing, split by volume."""

import random

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from models.data import (
    augment,
    coarsen,
    load_dataset,
    read_nifti,
    scan,
    slices,
    split_by_volume,
    to_unit,
    write_nifti,
)
from models.io import HUMapping


def _write_series(folder, uid, n, intercept=-1024.0, rows=None, drop_rescale=False, tag=0):
    """n slices of CT_small.dcm re-labelled as one series; slice k holds the value 100k + tag
    (in HU) everywhere, at z = 2.5 k mm."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    names = []
    for k in range(n):
        ds = template.copy()
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = n - k  # deliberately disagrees with the geometric order
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        r = rows or ds.Rows
        ds.Rows = r
        hu = 100.0 * k + tag
        if drop_rescale:
            for keyword in ("RescaleSlope", "RescaleIntercept"):
                if keyword in ds:
                    delattr(ds, keyword)
            stored = hu
        else:
            ds.RescaleSlope, ds.RescaleIntercept = 1, intercept
            stored = hu - intercept
        ds.PixelData = np.full((r, ds.Columns), stored, dtype=np.int16).tobytes()
        name = folder / f"{random.random():.12f}.dcm"  # shuffled file names
        ds.save_as(name)
        names.append(name)
    return names


def test_dicom_series_are_grouped_sorted_and_converted(tmp_path):
    random.seed(0)
    a, b = generate_uid(), generate_uid()
    _write_series(tmp_path, a, 5)
    _write_series(tmp_path, b, 3, drop_rescale=True, tag=7)
    (tmp_path / "corrupt.dcm").write_bytes(b"\x00garbage" * 50)
    _write_series(tmp_path, a, 1, rows=64)  # wrong size for series a
    (tmp_path / "notes.txt").write_text("ignored")
    report = scan(tmp_path)
    by_uid = {v.id: v for v in report.volumes}
    assert set(by_uid) == {a, b}
    va = by_uid[a]
    assert va.data.shape[0] == 5 and va.modality == "CT"
    assert [float(s.mean()) for s in va.data] == [0.0, 100.0, 200.0, 300.0, 400.0]
    assert va.spacing[0] == pytest.approx(2.5)
    vb = by_uid[b]
    assert [float(s.mean()) for s in vb.data] == [7.0, 107.0, 207.0]  # stored values are HU
    reasons = " ".join(r for _, r in report.skipped)
    assert len(report.skipped) == 2 and "not readable as DICOM" in reasons and "differs" in reasons
    assert "corrupt.dcm" in report.summary()


def test_a_malformed_header_value_skips_that_file_not_the_scan(tmp_path):
    """Header values that do not parse (an orientation with 4 numbers, a slope that is not a
    number, a missing Rows) used to abort the whole scan; now only their file is skipped."""
    random.seed(1)
    uid = generate_uid()
    names = _write_series(tmp_path, uid, 6)
    bad = [pydicom.dcmread(n) for n in names[:3]]
    bad[0].ImageOrientationPatient = [1, 0, 0, 0]
    bad[1].add_new(0x00281053, "DS", "")  # RescaleSlope emptied, then made non-numeric
    bad[1][0x00281053]._value = "slope"
    del bad[2].Rows
    for ds, name in zip(bad, names[:3], strict=True):
        ds.save_as(name)
    report = scan(tmp_path)
    assert len(report.volumes) == 1 and report.volumes[0].data.shape[0] == 3
    reasons = [r for _, r in report.skipped]
    assert len(reasons) == 3 and all("malformed header value" in r for r in reasons), reasons


def test_a_nifti_declaring_a_huge_volume_is_skipped_before_it_is_inflated(tmp_path):
    """A few hundred bytes of .nii.gz can declare 2048³ voxels; the header is checked before
    any voxel is read. A 4-D series contributes its first volume only."""
    import gzip
    import struct

    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), tmp_path / "s.nii")
    raw = bytearray((tmp_path / "s.nii").read_bytes())
    raw[40:56] = struct.pack("<8h", 3, 2048, 2048, 2048, 1, 1, 1, 1)  # the header's dim
    (tmp_path / "s.nii").unlink()
    (tmp_path / "bomb.nii.gz").write_bytes(gzip.compress(bytes(raw)))
    series = np.arange(4 * 5 * 6 * 3, dtype=np.float32).reshape(4, 5, 6, 3)
    nib.save(nib.Nifti1Image(series, np.eye(4)), tmp_path / "series.nii.gz")
    report = scan(tmp_path)
    assert [r for _, r in report.skipped] == [
        f"ValueError: declares (2048, 2048, 2048) voxels, more than {2**29} per volume"
    ]
    (vol,) = report.volumes
    assert vol.data.shape == (6, 5, 4)
    assert np.array_equal(vol.data, np.transpose(series[..., 0], (2, 1, 0))[:, ::-1, :])


def test_hu_mapping_round_trip():
    m = HUMapping()
    hu = np.array([-1000.0, -500.0, 0.0, 40.0, 1000.0, 3000.0])
    assert np.allclose(m.to_hu(m.to_unit(hu)), hu)
    assert m.to_unit(np.array([-2000.0, 5000.0])).tolist() == [0.0, 1.0]


def test_nifti_volumes_slice_along_each_axis(tmp_path):
    vol = np.zeros((10, 12, 14), np.float32)  # (i, j, k)
    vol[2:8, 3:9, 4:10] = 100.0
    img = nib.Nifti1Image(vol, np.diag([1.0, 1.5, 2.0, 1.0]))
    nib.save(img, tmp_path / "brain.nii.gz")
    v = read_nifti(tmp_path / "brain.nii.gz")
    assert v.data.shape == (14, 12, 10) and v.spacing == (2.0, 1.5, 1.0) and v.modality == "MR"
    assert slices(v.data, 0).shape == (14, 12, 10)
    assert slices(v.data, 1).shape == (12, 14, 10)
    assert slices(v.data, 2).shape == (10, 14, 12)
    unit = to_unit(v)
    assert unit.max() == pytest.approx(1.0) and unit.min() == 0.0
    ds = load_dataset(tmp_path, 16, axes=(0, 1, 2), val_fraction=0.0)
    assert ds.train.shape[1:] == (1, 16, 16) and len(ds.train) == 6 + 6 + 6  # non-empty slices


def test_split_is_by_volume_never_by_slice(tmp_path):
    for i in range(10):
        np.save(tmp_path / f"vol{i}.npy", np.full((4, 8, 8), i / 10, np.float32))
    ds = load_dataset(tmp_path, 8, val_fraction=0.2, seed=3, min_foreground=0.0)
    assert len(ds.val_volumes) == 2 and not set(ds.val_volumes) & set(ds.train_volumes)
    val_values = {round(float(x.mean()), 3) for x in ds.val}
    train_values = {round(float(x.mean()), 3) for x in ds.train}
    assert not val_values & train_values
    assert len(ds.val) == 8 and len(ds.train) == 32
    report = scan(tmp_path)
    again = split_by_volume(report.volumes, 0.2, seed=3)[1]
    assert [v.id for v in again] == ds.val_volumes


def test_bad_files_are_skipped_not_fatal(tmp_path):
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 1.0]]))
    np.save(tmp_path / "words.npy", np.array(["a", "b"]))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n")
    with pytest.raises(ValueError, match="no readable"):
        load_dataset(tmp_path, 16)
    assert len(scan(tmp_path).skipped) == 3


def test_augment_keeps_range_and_shape():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 1, 32, 32)
    x[:, :, 8:24, 8:24] = 0.5
    y = augment(x, g)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    assert not torch.equal(x, y)
    assert float(y.sum()) == pytest.approx(float(x.sum()), rel=0.3)


def test_augment_with_max_zoom_adds_close_ups_to_half_the_batch():
    """Close-ups: about half the images magnified (the square grows by up to 2.5² in area,
    and may fill the field of view); the others keep the usual ±10 % scaling."""
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(200, 1, 32, 32)
    x[:, :, 10:22, 10:22] = 0.5
    area = (augment(x, g, max_zoom=2.5, intensity=0.0) > 0.25).float().mean((1, 2, 3)) * 1024
    grown = area > 144 * 1.1**2 * 1.15
    assert 0.35 < float(grown.float().mean()) < 0.65
    assert float(area.max()) > 144 * 4  # magnified past 2× in side
    plain = (augment(x, g, intensity=0.0) > 0.25).float().mean((1, 2, 3)) * 1024
    assert float(plain.max()) < 144 * 1.1**2 * 1.15


def test_coarsen_averages_away_detail_finer_than_its_voxels_and_adds_noise_there():
    x = torch.zeros(2, 1, 48, 48)
    x[:, :, ::2] = 1.0  # a line pattern of period 2: detail finer than any coarse voxel
    flat = coarsen(x, torch.tensor([4.0, 6.0]), torch.zeros(2))
    assert torch.allclose(flat, torch.full_like(x, 0.5), atol=0.05)
    smooth = torch.full((1, 1, 48, 48), 0.5)
    noisy = coarsen(smooth, torch.tensor([6.0]), torch.tensor([0.1]), torch.Generator())
    block = noisy[0, 0, 3::8, 3::8]  # the centres of the 8 × 8 coarse voxels
    assert 0.06 < float(block.std()) < 0.14
    assert float((noisy[0, 0, 1:] - noisy[0, 0, :-1]).abs().mean()) < float(block.std())


def test_half_the_close_ups_end_in_empty_bands_along_the_columns():
    """Straight edges against air, as a field padded to a square has: about a quarter of the
    batch (half the close-ups), with bands of 5-15 % of the width; no other image loses any
    column."""
    g = torch.Generator().manual_seed(3)
    x = torch.full((400, 1, 40, 40), 0.5)
    y = augment(x, g, max_rotation_deg=0.0, scale=(1.0, 1.0), intensity=0.0, max_zoom=2.5)
    empty = (y[:, 0].amax(1) < 1e-6).float()  # (N, W): columns with nothing in them
    banded = empty.sum(1) > 0
    assert 0.17 < float(banded.float().mean()) < 0.33
    widths = empty[banded, :20].sum(1)
    assert float(widths.min()) >= 2 and float(widths.max()) <= 6
    assert torch.equal(empty[banded, :20].sum(1), empty[banded, 20:].sum(1))
    assert float(y[~banded].amin()) > 0.4


def test_augment_with_low_res_coarsens_half_the_batch():
    """Coarse scans: about half the images lose the fine line pattern (it averages to a
    flat grey), the rest keep it."""
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(200, 1, 32, 32)
    x[:, :, 4:28:2, 4:28] = 1.0
    y = augment(
        x,
        g,
        flip=False,
        max_rotation_deg=0.0,
        scale=(1.0, 1.0),
        intensity=0.0,
        low_res=6.0,
        max_noise=0.0,
    )
    detail = (y[..., 5:27, 8:24] - y[..., 6:28, 8:24]).abs().mean((1, 2, 3))
    coarse = detail < 0.5
    assert 0.35 < float(coarse.float().mean()) < 0.65
    assert float(detail.max()) > 0.9
    assert float(y.min()) >= 0 and float(y.max()) <= 1


def test_links_out_of_a_training_folder_are_never_read(tmp_path):
    """Issue 17: a link in a training folder (to a file, or to a folder holding one) could
    make a training run read any server file; only regular files inside are read."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    np.save(root / "own.npy", np.zeros((2, 8, 8), np.float32))
    np.save(outside / "other.npy", np.ones((2, 8, 8), np.float32))
    (root / "file-link.npy").symlink_to(outside / "other.npy")
    (root / "folder-link").symlink_to(outside, target_is_directory=True)
    report = scan(root)
    assert [v.data.max() for v in report.volumes] == [0.0]
    assert any("file-link" in f and "link" in why for f, why in report.skipped)


def test_write_nifti_is_read_back_unchanged(tmp_path):
    vol = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 1024
    write_nifti(tmp_path / "v.nii.gz", vol, (2.0, 0.5, 0.25), np.int16, z0=7)
    got = read_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(got.data, vol)
    assert got.spacing == (2.0, 0.5, 0.25) and got.modality == "CT"
    assert nib.load(str(tmp_path / "v.nii.gz")).affine[2, 3] == 14.0  # slab position kept
