"""De-identification (PS3.15 basic profile) of the series we export to research destinations."""

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from service.deidentify import deidentify, new_uid, pseudonym
from service.dicom_export import (
    RESEARCH_LABELS,
    missing_attributes,
    series,
    source_attributes,
    to_bytes,
)

SALT = "site-secret"


def _series():
    source = source_attributes(open(get_testdata_file("CT_small.dcm"), "rb").read())
    hu = np.random.default_rng(0).uniform(-1000, 1000, (3, 32, 32))
    slices = [  # three source slices, each referenced by its reconstruction
        {
            **source,
            "SOPInstanceUID": f"{source['SOPInstanceUID']}.{z}",
            "ImagePositionPatient": f"0\\0\\{z}",
        }
        for z in range(3)
    ]
    return source, series(hu, "CT", "0" * 32, "ct-default", source, slices=slices)


def test_source_attributes_come_from_an_uploaded_instance():
    source, _ = _series()
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert source["PatientID"] == ct.PatientID and source["StudyInstanceUID"] == ct.StudyInstanceUID
    with pytest.raises(ValueError, match="not a readable DICOM"):
        source_attributes(b"not dicom at all")


def test_identity_is_replaced_consistently_and_nothing_identifying_remains():
    source, series = _series()
    series[0].add_new((0x0011, 0x0010), "LO", "ACME private")  # private creator
    series[0].add_new((0x0011, 0x1001), "LO", source["PatientID"])  # a private copy of the ID
    before = [ds.PatientID for ds in series]
    out = [deidentify(ds, SALT, RESEARCH_LABELS) for ds in series]
    assert [ds.PatientID for ds in series] == before  # originals untouched
    alias = pseudonym(source["PatientID"], SALT)
    for ds in out:
        assert ds.PatientID == alias and str(ds.PatientName) == alias
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert ds.StudyInstanceUID == new_uid(source["StudyInstanceUID"], SALT)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        ref = ds.ReferencedSeriesSequence[0].SeriesInstanceUID
        assert ref == new_uid(source["SeriesInstanceUID"], SALT)
        instance = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert instance == new_uid(f"{source['SOPInstanceUID']}.{ds.InstanceNumber - 1}", SALT)
        assert ds.FrameOfReferenceUID == new_uid(source["FrameOfReferenceUID"], SALT)
        raw = to_bytes(ds)
        for value in (source["PatientID"], str(source["PatientName"]).split("^")[0]):
            assert value.encode() not in raw
        assert missing_attributes(pydicom.dcmread(io.BytesIO(raw))) == []
    assert len({ds.SeriesInstanceUID for ds in out}) == 1  # still one series
    assert len({ds.SOPInstanceUID for ds in out}) == len(out)
    assert deidentify(series[1], SALT).SOPInstanceUID == out[1].SOPInstanceUID  # repeatable
    assert deidentify(series[1], "other").PatientID != alias


def test_no_salt_no_deidentification():
    _, series = _series()
    with pytest.raises(ValueError, match="SCORERECON_DEID_SALT"):
        deidentify(series[0], "")
