"""The DICOM writer: a round trip through pydicom, required attributes, deterministic UIDs,
and the series filed into the source study."""

import io
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
    to_bytes,
    zip_series,
)


def _source():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    return {
        kw: ds.get(kw)
        for kw in (
            "PatientName",
            "PatientID",
            "StudyInstanceUID",
            "StudyDate",
            "SeriesInstanceUID",
            "AccessionNumber",
        )
    }


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
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src["SeriesInstanceUID"]
        assert ds.PatientID == src["PatientID"] and list(ds.ImageType) == [
            "ORIGINAL",
            "SECONDARY",
            "AXIAL",
        ]
        values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.abs(values - hu[k]).max() <= 0.5
        assert ds.ImagePositionPatient[2] == pytest.approx(2.5 * k)
        assert "ct-default" in ds.SeriesDescription and ds.InstanceNumber == k + 1
    assert len({d.SOPInstanceUID for d in back}) == 3


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
    assert np.abs(ds.pixel_array / 4095 - mag[0]).max() < 1e-3
    with zipfile.ZipFile(io.BytesIO(zip_series(dss))) as z:
        names = z.namelist()
    assert names == [f"{dss[0].SeriesNumber}/0001.dcm", f"{dss[0].SeriesNumber}/0002.dcm"]
    with pytest.raises(ValueError, match="modality"):
        series(mag, "US", "d" * 32, "m")


def test_validator_reports_missing_attributes():
    ds = series(np.zeros((1, 4, 4)), "CT", "e" * 32, "m")[0]
    del ds.PixelSpacing
    ds.PatientID = ""  # type 2: may be empty
    problems = missing_attributes(ds)
    assert problems == ["type 1 PixelSpacing missing or empty"]
