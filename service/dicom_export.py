"""Reconstructions as a proper DICOM series that files into the patient's original study.

One instance per slice, CT Image Storage or MR Image Storage (not Secondary Capture),
Explicit VR Little Endian. Patient and study attributes are copied from the job's source
(given with the request), so the series lands in the same study; it gets its own
SeriesInstanceUID, a SeriesNumber and a SeriesDescription naming the model. ImageType is
ORIGINAL\\SECONDARY\\AXIAL (reconstructed from raw data). CT pixels are stored as signed
16-bit HU (RescaleSlope 1, RescaleIntercept 0, RescaleType HU) with a soft-tissue window;
MR magnitudes as unsigned 12-bit values. Every UID is derived from the job id, the series
kind and the slice index, so a retried job writes byte-identical identifiers.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid
import zipfile
from collections.abc import Sequence

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLEMENTATION_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "scorerecon/implementation").int)

# Source attributes copied into the series (Patient and General Study modules).
SOURCE_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
    "FrameOfReferenceUID",
    "SeriesInstanceUID",  # of the input: referenced, never reused
)


def source_attributes(raw: bytes) -> dict[str, str]:
    """The :data:`SOURCE_KEYWORDS` of an uploaded DICOM instance (pixel data not read), so the
    reconstructed series files into that instance's study; ValueError names what is wrong."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        # Elements are decoded lazily: a corrupt one (an unknown VR) fails here, not above.
        values = {kw: ds.get(kw) for kw in SOURCE_KEYWORDS}
        out = {kw: str(v)[:64] for kw, v in values.items() if v not in (None, "")}
    except Exception as exc:  # noqa: BLE001 - any unreadable upload is the client's to fix
        raise ValueError(
            f"not a readable DICOM file ({type(exc).__name__}); send one instance (.dcm) "
            "of the source study with its preamble"
        ) from None
    if "StudyInstanceUID" not in out:
        raise ValueError("the DICOM file has no StudyInstanceUID: send an instance of the study")
    return out


# Attributes a validator checks per SOP class (type 1 must hold a value; type 2 must exist).
REQUIRED = {
    "common": {
        1: [
            "SOPClassUID",
            "SOPInstanceUID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "Modality",
            "Rows",
            "Columns",
            "SamplesPerPixel",
            "PhotometricInterpretation",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "PixelData",
            "ImageOrientationPatient",
            "ImagePositionPatient",
            "PixelSpacing",
            "FrameOfReferenceUID",
            "ImageType",
        ],
        2: [
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
            "StudyID",
            "AccessionNumber",
            "SeriesNumber",
            "InstanceNumber",
            "SliceThickness",
            "PositionReferenceIndicator",
        ],
    },
    "CT": {1: ["RescaleIntercept", "RescaleSlope"], 2: ["KVP", "AcquisitionNumber"]},
    "MR": {
        1: ["ScanningSequence", "SequenceVariant", "MRAcquisitionType"],
        2: ["ScanOptions", "EchoTime", "EchoTrainLength"],
    },
}


def uid(job_id: str, *parts: object) -> str:
    """A UID derived from the job id and ``parts``: 2.25.<name-based UUID (v5)>, so a retried
    job writes the same identifiers (PS3.5 B.2 allows UUID-derived UIDs under 2.25)."""
    name = "/".join(["scorerecon", job_id, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, name).int}"


def series(
    images: np.ndarray,
    modality: str,
    job_id: str,
    model: str,
    source: dict | None = None,
    pixel_spacing: tuple[float, float] = (1.0, 1.0),
    slice_thickness: float = 1.0,
    kind: str = "reconstruction",
    when: dt.datetime | None = None,
) -> list[FileDataset]:
    """One dataset per slice of ``images`` (Z, H, W): HU for CT, [0, 1] magnitude for MR.

    ``kind`` names the series: ``reconstruction`` or ``uncertainty`` (the posterior std as a
    second series, in HU for CT).
    """
    if modality not in ("CT", "MR"):
        raise ValueError("modality must be 'CT' or 'MR'")
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    source = {k: v for k, v in (source or {}).items() if k in SOURCE_KEYWORDS}
    when = when or dt.datetime.now(dt.UTC)
    study_uid = source.get("StudyInstanceUID") or uid(job_id, "study")
    series_uid = uid(job_id, kind, "series")
    frame_uid = source.get("FrameOfReferenceUID") or uid(job_id, "frame")
    number = 9000 + (int(series_uid.split(".")[-1]) % 900) + (1 if kind == "uncertainty" else 0)
    out = []
    for k, img in enumerate(images):
        ds = _base(modality, uid(job_id, kind, "instance", k))
        for kw in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "StudyID",
            "AccessionNumber",
            "ReferringPhysicianName",
            "StudyDescription",
        ):
            setattr(ds, kw, source.get(kw, ""))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SeriesNumber = number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = f"scorerecon {kind} ({model})"[:64]
        ds.ImageType = ["ORIGINAL", "SECONDARY", "AXIAL"]
        ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.Manufacturer = "scorerecon"
        rows, cols = img.shape
        ds.Rows, ds.Columns = rows, cols
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.SliceThickness = float(slice_thickness)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        x0, y0 = -(cols - 1) / 2 * pixel_spacing[1], -(rows - 1) / 2 * pixel_spacing[0]
        ds.ImagePositionPatient = [x0, y0, k * float(slice_thickness)]
        ds.SliceLocation = k * float(slice_thickness)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
            16,
            16 if modality == "CT" else 12,
            15 if modality == "CT" else 11,
        )
        if modality == "CT":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
            ds.WindowCenter, ds.WindowWidth = (40, 400) if kind == "reconstruction" else (50, 100)
            ds.KVP = ""
            ds.AcquisitionNumber = ""
            pixels = np.clip(np.round(img), -32768, 32767).astype(np.int16)
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"
            ds.ScanOptions, ds.EchoTime, ds.EchoTrainLength = "", "", ""
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            pixels = np.clip(np.round(img * 4095), 0, 4095).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        ref = DicomSequence()
        if source.get("SeriesInstanceUID"):
            item = pydicom.Dataset()
            item.SeriesInstanceUID = source["SeriesInstanceUID"]
            ref.append(item)
        ds.ReferencedSeriesSequence = ref
        equipment = pydicom.Dataset()
        equipment.Manufacturer = "scorerecon"
        equipment.ManufacturerModelName = model[:64]
        equipment.SoftwareVersions = "0.1.0"
        equipment.ContributionDescription = (
            "score-based reconstruction from raw data (Song et al., proximal sampler)"
        )[:64]
        ds.ContributingEquipmentSequence = DicomSequence([equipment])
        ds.DerivationDescription = f"{kind} by score-based generative prior {model}"[:1024]
        out.append(ds)
    return out


def _base(modality: str, instance_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE if modality == "CT" else MR_IMAGE
    meta.MediaStorageSOPInstanceUID = instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.set_original_encoding(False, True, "utf_8")  # explicit VR little endian, as sent
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = instance_uid
    ds.Modality = modality
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def to_bytes(ds: FileDataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def missing_attributes(ds: pydicom.Dataset) -> list[str]:
    """What a ``dciodvfy``-style check of the modules above would report (empty if none)."""
    problems = []
    modality = str(ds.get("Modality", ""))
    for group in ("common", modality):
        for kw in REQUIRED.get(group, {}).get(1, []):
            if kw not in ds or ds.get(kw) in (None, ""):
                problems.append(f"type 1 {kw} missing or empty")
        for kw in REQUIRED.get(group, {}).get(2, []):
            if kw not in ds:
                problems.append(f"type 2 {kw} missing")
    return problems


def zip_series(datasets: Sequence[FileDataset]) -> bytes:
    """A ZIP of the instances as SERIES/INSTANCE.dcm (what ``format=dicom`` returns)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for ds in datasets:
            z.writestr(f"{int(ds.SeriesNumber)}/{int(ds.InstanceNumber):04d}.dcm", to_bytes(ds))
    return buf.getvalue()


def job_series(job, results) -> list[FileDataset]:
    """The series of a finished reconstruction job: the mean, and the posterior std as a
    second series when K > 1 (CT in HU through the model card's mapping)."""
    from models.io import HUMapping

    mean = np.load(io.BytesIO(results.get(job.id, "recon.npy")), allow_pickle=False)[:, 0]
    std = np.load(io.BytesIO(results.get(job.id, "std.npy")), allow_pickle=False)[:, 0]
    modality = "CT" if job.spec.get("modality") == "ct" else "MR"
    spacing = float(job.spec.get("pixel_size", 1.0))
    if modality == "CT":
        hu = HUMapping()
        mean, std = hu.to_hu(mean), std * (hu.hu_max - hu.hu_air)
    source = job.params.get("dicom_source", {})
    kw = {"pixel_spacing": (spacing, spacing), "slice_thickness": spacing}
    model = job.model or ""
    datasets = series(mean, modality, job.id, model, source, **kw)
    if float(np.max(std)) > 0:
        datasets += series(std, modality, job.id, model, source, kind="uncertainty", **kw)
    return datasets
