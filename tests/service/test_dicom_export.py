"""The DICOM writer: a round trip through pydicom, required attributes, deterministic UIDs,
and the series filed into the source study."""

import io
import shutil
import subprocess
import zipfile

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from service.dicom_export import (
    CT_IMAGE,
    MR_IMAGE,
    missing_attributes,
    series,
    source_attributes,
    to_bytes,
    zip_series,
)


def _source():
    return source_attributes(open(get_testdata_file("CT_small.dcm"), "rb").read())


def test_ct_series_round_trip_in_hu_and_files_into_the_source_study():
    hu = np.stack([np.linspace(-1000, 2000, 64 * 64).reshape(64, 64) + k for k in range(3)])
    src = _source()
    dss = series(hu, "CT", "a" * 32, "ct-default", src, (0.8, 0.8), 2.5)
    assert len(dss) == 3
    back = [pydicom.dcmread(io.BytesIO(to_bytes(d))) for d in dss]
    for k, ds in enumerate(back):
        assert (
            ds.SOPClassUID == CT_IMAGE and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        )
        assert missing_attributes(ds) == []
        assert ds.StudyInstanceUID == src["StudyInstanceUID"]
        assert ds.SeriesInstanceUID != src["SeriesInstanceUID"]
        # One source instance is the source of no slice of three: nothing referenced.
        assert "SourceImageSequence" not in ds and "ReferencedSeriesSequence" not in ds
        assert ds.PatientID == src["PatientID"]
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(values - hu[k]).max() <= 0.5
        # Three slices from one source instance: positions made here, so a frame of its own.
        assert ds.ImagePositionPatient[2] == pytest.approx(2.5 * k)
        assert ds.FrameOfReferenceUID != src["FrameOfReferenceUID"]
        assert "positions are nominal" in ds.ImageComments
        assert "ct-default" in ds.SeriesDescription and ds.InstanceNumber == k + 1
        assert ds.SeriesDescription.startswith("RESEARCH") and "RESEARCH" in ds.ImageComments
        assert ds.SeriesNumber == 101  # the source series (1) × 100 + 1
        assert ds.TimezoneOffsetFromUTC
    assert len({d.SOPInstanceUID for d in back}) == 3


def test_one_slice_takes_the_source_slices_geometry_and_frame_of_reference():
    """A 64² reconstruction of the 128² source slice: its position, orientation and frame of
    reference, and a pixel spacing twice the source's, so the field of view is the same."""
    src = _source()
    ds = series(np.zeros((1, 64, 64)), "CT", "a" * 32, "ct-default", src, model_hash="f" * 64)[0]
    assert ds.FrameOfReferenceUID == src["FrameOfReferenceUID"]
    assert "nominal" not in ds.ImageComments
    assert [float(v) for v in ds.ImagePositionPatient] == pytest.approx(
        [-158.135803, -179.035797, -75.699997]
    )
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert [float(v) for v in ds.PixelSpacing] == pytest.approx([2 * 0.661468] * 2)
    assert "ct-default, weights sha256 ffffffffffff" in ds.DerivationDescription
    ref = ds.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src["SeriesInstanceUID"]
    assert ref.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src["SOPInstanceUID"]
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src["SOPInstanceUID"]


def _slices(src: dict, n: int) -> list[dict]:
    """``n`` source slices 10 mm apart along z, with the geometry of ``src``'s."""
    return [
        {
            **{k: src[k] for k in ("SOPClassUID", "ImageOrientationPatient", "PixelSpacing")},
            "Rows": "128",
            "Columns": "128",
            "SOPInstanceUID": f"1.2.3.{z}",
            "ImagePositionPatient": f"-100\\-100\\{10 * z}",
        }
        for z in range(n)
    ]


def test_each_slice_takes_its_own_source_slices_geometry():
    """Three source slices (positions 10 mm apart along z): each reconstructed slice has its
    source's position and references its instance; one frame of reference, the source's."""
    src = _source()
    slices = _slices(src, 3)
    dss = series(np.zeros((3, 64, 64)), "CT", "s" * 32, "ct-default", src, slices=slices)
    for z, ds in enumerate(dss):
        assert [float(v) for v in ds.ImagePositionPatient] == [-100, -100, 10 * z]
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == f"1.2.3.{z}"
        assert ds.FrameOfReferenceUID == src["FrameOfReferenceUID"]
        assert [float(v) for v in ds.PixelSpacing] == pytest.approx([2 * 0.661468] * 2)


def test_the_uncertainty_series_never_clips():
    std = np.full((1, 8, 8), 50_000.0)  # HU beyond int16
    std[0, 0, 0] = 0.0
    ds = pydicom.dcmread(
        io.BytesIO(to_bytes(series(std, "CT", "u" * 32, "m", kind="uncertainty")[0]))
    )
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.abs(values - std[0]).max() <= float(ds.RescaleSlope)
    assert ds.DerivationCodeSequence[0].CodeMeaning == "Standard Deviation"
    assert ds.SeriesNumber == 2
    mapping = ds.RealWorldValueMappingSequence[0]  # what a viewer shows: the std in HU
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "[hnsf'U]"
    real = ds.pixel_array * float(mapping.RealWorldValueSlope)
    assert np.abs(real - std[0]).max() <= float(mapping.RealWorldValueSlope)
    mr = series(np.full((1, 4, 4), 0.2), "MR", "u" * 32, "m", kind="uncertainty")[0]
    mr = pydicom.dcmread(io.BytesIO(to_bytes(mr)))
    slope = float(mr.RealWorldValueMappingSequence[0].RealWorldValueSlope)
    assert np.allclose(mr.pixel_array * slope, 0.2, atol=slope)


DCIODVFY = shutil.which("dciodvfy")


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy missing: make dicom3tools (make test does)")
@pytest.mark.parametrize("modality", ["CT", "MR"])
@pytest.mark.parametrize("with_source", [True, False])
@pytest.mark.parametrize("kind", ["reconstruction", "uncertainty"])
def test_dciodvfy_reports_no_errors(tmp_path, modality, with_source, kind):
    """dicom3tools' validator on every instance of both series, CT and MR, with a source
    study and without, for one slice (the source's geometry) and for three (each with its own
    source slice)."""
    src = _source() if with_source else None
    if src is not None and modality == "MR":
        src = {**src, "Modality": "MR", "SOPClassUID": MR_IMAGE}
    rng = np.random.default_rng(0)
    for n in (1, 3):
        images = rng.random((n, 32, 32)) * (3000 if modality == "CT" else 1)
        slices = _slices(src, n) if src is not None and n > 1 else None
        for ds in series(images, modality, "v" * 32, "prior", src, kind=kind, slices=slices):
            path = tmp_path / f"{ds.InstanceNumber}.dcm"
            path.write_bytes(to_bytes(ds))
            run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
            assert errors == [], errors


def test_uids_are_deterministic_per_job_and_slice():
    img = np.zeros((2, 8, 8))
    a = series(img, "CT", "b" * 32, "m")
    b = series(img, "CT", "b" * 32, "m")
    c = series(img, "CT", "c" * 32, "m")
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    unc = series(img, "CT", "b" * 32, "m", kind="uncertainty")
    assert unc[0].SeriesInstanceUID != a[0].SeriesInstanceUID
    assert unc[0].StudyInstanceUID == a[0].StudyInstanceUID


def test_mr_series_and_zip():
    mag = np.random.default_rng(0).random((2, 16, 16))
    dss = series(mag, "MR", "d" * 32, "mri-default")
    ds = pydicom.dcmread(io.BytesIO(to_bytes(dss[0])))
    assert ds.SOPClassUID == MR_IMAGE and missing_attributes(ds) == []
    # The measurement's own units: the series' peak at 4095, the mapping back to the value.
    slope = float(ds.RealWorldValueMappingSequence[0].RealWorldValueSlope)
    assert np.abs(ds.pixel_array * slope - mag[0]).max() < 1e-3 * mag.max()
    assert max(int(pydicom.dcmread(io.BytesIO(to_bytes(d))).pixel_array.max()) for d in dss) == 4095
    scanner = series(mag * 1e-4, "MR", "d" * 32, "mri-default")  # k-space in arbitrary units
    assert np.array_equal(scanner[0].pixel_array, ds.pixel_array)
    slope = float(scanner[0].RealWorldValueMappingSequence[0].RealWorldValueSlope)
    assert np.abs(scanner[0].pixel_array * slope - mag[0] * 1e-4).max() < 1e-7
    with zipfile.ZipFile(io.BytesIO(zip_series(dss))) as z:
        names = z.namelist()
    assert names == [f"{dss[0].SeriesNumber}/0001.dcm", f"{dss[0].SeriesNumber}/0002.dcm"]
    with pytest.raises(ValueError, match="modality"):
        series(mag, "US", "d" * 32, "m")


def test_long_descriptions_are_cut_at_a_word_never_mid_word():
    from service.dicom_export import fit

    model = "a-site-prior trained on the neuro archive of the northern campus since 2019"
    ds = series(np.zeros((1, 4, 4)), "CT", "w" * 32, model)[0]
    assert len(ds.SeriesDescription) <= 64 and ds.SeriesDescription.endswith("…")
    assert ds.SeriesDescription[:-1] == "RESEARCH reconstruction (a-site-prior trained on the neuro"
    assert fit("short") == "short"


def test_validator_reports_missing_attributes():
    ds = series(np.zeros((1, 4, 4)), "CT", "e" * 32, "m")[0]
    del ds.PixelSpacing
    ds.PatientID = ""  # type 2: may be empty
    problems = missing_attributes(ds)
    assert problems == ["type 1 PixelSpacing missing or empty"]
