"""Reconstructions as a conformant derived DICOM series that files into the original study.

One instance per slice, CT Image Storage or MR Image Storage (not Secondary Capture),
Explicit VR Little Endian, checked by ``dciodvfy`` (dicom3tools) in the tests:

* **Derived, and labelled as research output.** ImageType ``DERIVED\\SECONDARY\\AXIAL``;
  DerivationDescription and DerivationCodeSequence name the generative prior (its name and
  weights hash) and, for the second series, the posterior standard deviation; the
  SeriesDescription starts with ``RESEARCH``, ImageComments says it is not for diagnosis,
  and ContributingEquipmentSequence names scorerecon (its package version) as processing
  equipment.
* **References.** When the request came with a source instance, SourceImageSequence and the
  Common Instance Reference module (ReferencedSeriesSequence → ReferencedInstanceSequence)
  reference it, and patient and study attributes are copied from it, so the series lands in
  that study under its own SeriesInstanceUID.
* **Geometry.** A source instance's ImagePositionPatient, ImageOrientationPatient,
  PixelSpacing and FrameOfReferenceUID are used only for a single-slice reconstruction of
  it (PixelSpacing scaled so the field of view is kept at another matrix size); otherwise the
  series gets its own FrameOfReferenceUID, never a borrowed one with positions made up here.
* **Values.** CT in signed 16-bit HU (slope 1); MR magnitudes, which come in the
  measurement's own units, as unsigned 12-bit values with the series' largest value at 4095;
  the CT uncertainty series is scaled so its largest value fits, never clipped. A Real World
  Value Mapping gives the value in its unit (the posterior standard deviation in HU, or the
  MR magnitude or its standard deviation in the measurement's units), which viewers show.
* **Identity.** SeriesNumber 1 for the reconstruction and 2 for the uncertainty, or the
  source series' number × 100 + 1 / + 2; every UID is derived from the job id, the series
  kind and the slice index, so a retried job writes identical identifiers; dates and times
  carry the UTC offset.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import uuid
import zipfile
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
IMPLEMENTATION_UID = "2.25." + str(uuid.uuid5(uuid.NAMESPACE_URL, "scorerecon/implementation").int)
RESEARCH_NOTICE = (
    "RESEARCH OUTPUT of a score-based generative prior; not for diagnostic use. Image content "
    "in regions the measurement does not determine comes from the prior."
)

NOMINAL_GEOMETRY = (
    "No source geometry was given: positions are nominal, in a frame of reference of this "
    "series alone, and do not register to other series."
)

# Attributes that label our series as research output: ours, identifying nobody, so a
# de-identified export keeps them.
RESEARCH_LABELS = ("SeriesDescription", "ImageComments")

# Source attributes kept from a source instance: Patient and General Study modules, the
# instance and series referenced, and the geometry of its slice.
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
    "SeriesNumber",
    "SOPClassUID",
    "SOPInstanceUID",
    "Modality",
    "PatientPosition",
    "Laterality",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "Rows",
    "Columns",
    "SliceThickness",
)
GEOMETRY = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns")
# What each slice of a multi-slice source contributes: its reference and its geometry.
SLICE_KEYWORDS = ("SOPClassUID", "SOPInstanceUID", "SliceThickness", *GEOMETRY)
# The longest text kept per attribute: 64 characters, or 6 decimal strings of 16 for geometry.
LIMIT = {kw: 6 * 17 if kw in GEOMETRY else 64 for kw in SOURCE_KEYWORDS}


def _text(value) -> str:
    """A source value as text: multi-valued ones joined by backslashes, as DICOM writes them."""
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value)


def source_attributes(raw: bytes) -> dict[str, str]:
    """The :data:`SOURCE_KEYWORDS` of an uploaded DICOM instance (pixel data not read), so the
    reconstructed series files into that instance's study; ValueError names what is wrong."""
    try:
        ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
        # Elements are decoded lazily: a corrupt one (an unknown VR) fails here, not above.
        values = {kw: ds.get(kw) for kw in SOURCE_KEYWORDS}
        out = {kw: _text(v)[: LIMIT[kw]] for kw, v in values.items() if v not in (None, "")}
    except Exception as exc:  # noqa: BLE001 - any unreadable upload is the client's to fix
        raise ValueError(
            f"not a readable DICOM file ({type(exc).__name__}); send one instance (.dcm) "
            "of the source study with its preamble"
        ) from None
    if "StudyInstanceUID" not in out:
        raise ValueError("the DICOM file has no StudyInstanceUID: send an instance of the study")
    return out


def source_geometry(source: dict) -> dict | None:
    """The slice geometry a source holds (position, orientation, spacing, matrix), checked;
    ``None`` when it has none. ValueError names a malformed value."""
    if not any(source.get(k) for k in GEOMETRY[:3]):  # no position, orientation or spacing
        return None
    missing = sorted(k for k in GEOMETRY if not source.get(k))
    if missing:
        raise ValueError(f"the source's geometry is incomplete: {', '.join(missing)} missing")
    sizes = {"ImagePositionPatient": 3, "ImageOrientationPatient": 6, "PixelSpacing": 2}
    geometry = {}
    for key, n in sizes.items():
        try:
            values = [float(v) for v in str(source[key]).split("\\")]
        except ValueError:
            values = []
        if len(values) != n or not all(np.isfinite(values)):
            raise ValueError(f"{key} must be {n} numbers separated by backslashes")
        geometry[key] = values
    if min(geometry["PixelSpacing"]) <= 0:
        raise ValueError("PixelSpacing must be positive")
    try:
        geometry["Rows"], geometry["Columns"] = int(source["Rows"]), int(source["Columns"])
    except ValueError:
        raise ValueError("Rows and Columns must be whole numbers") from None
    return geometry


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
            "DerivationCodeSequence",
            "DerivationDescription",
            "ImageComments",
            "TimezoneOffsetFromUTC",
            "SoftwareVersions",
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
            "PatientPosition",
            "Laterality",
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


@lru_cache(maxsize=1)
def software_version() -> str:
    """The installed scorerecon package's version (SoftwareVersions)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scorerecon")
    except PackageNotFoundError:
        return "unknown"


def _code(value: str, meaning: str, scheme: str = "DCM") -> pydicom.Dataset:
    item = pydicom.Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def fit(text: str, limit: int = 64) -> str:
    """``text`` within a LO element's ``limit``: cut at the last word boundary, with an
    ellipsis, never mid-word."""
    if len(text) <= limit:
        return text
    cut = text[: limit - 1].rsplit(" ", 1)[0].rstrip(" ,;(")
    return cut + "…"


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit)."""
    return format_number_as_ds(float(value))


def _value_mapping(modality: str, scale: float, kind: str) -> pydicom.Dataset:
    """Real World Value Mapping: stored value → the posterior standard deviation (the
    uncertainty series) or the magnitude (an MR reconstruction) in its unit (HU for CT, the
    measurement's own units for MR), which viewers show beside the value."""
    item = pydicom.Dataset()
    std = kind == "uncertainty"
    item.LUTExplanation = "Posterior standard deviation" if std else "Magnitude"
    item.LUTLabel = "POSTERIOR_STD" if std else "MAGNITUDE"
    item.RealWorldValueFirstValueMapped = -32768 if modality == "CT" else 0
    item.RealWorldValueLastValueMapped = 32767 if modality == "CT" else 4095
    item.RealWorldValueIntercept = 0.0
    item.RealWorldValueSlope = scale if modality == "CT" else scale / 4095
    unit = (
        _code("[hnsf'U]", "Hounsfield unit", "UCUM")
        if modality == "CT"
        else _code("1", "no units", "UCUM")
    )
    item.MeasurementUnitsCodeSequence = DicomSequence([unit])
    if not std:
        return item
    quantity = pydicom.Dataset()
    quantity.ValueType = "CODE"
    quantity.ConceptNameCodeSequence = DicomSequence([_code("246205007", "Quantity", "SCT")])
    quantity.ConceptCodeSequence = DicomSequence([_code("113061", "Standard Deviation")])
    item.QuantityDefinitionSequence = DicomSequence([quantity])
    return item


def slice_position(geometry: dict) -> float:
    """A slice's position along its normal (row × column direction cosines), the order in
    which a volume's slices stack."""
    iop = geometry["ImageOrientationPatient"]
    normal = np.cross(iop[:3], iop[3:])
    return float(np.dot(normal, geometry["ImagePositionPatient"]))


def series_number(kind: str, source: dict) -> int:
    """1 for the reconstruction, 2 for its uncertainty; with a source series numbered N,
    N × 100 + 1 and + 2, so viewers list them beside it."""
    offset = 2 if kind == "uncertainty" else 1
    try:
        base = int(str(source.get("SeriesNumber", "")).strip())
    except ValueError:
        base = 0
    return base * 100 + offset if 0 < base < 20_000_000 else offset


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
    model_hash: str = "",
    slices: Sequence[dict] | None = None,
    comments: Sequence[str] | None = None,
) -> list[FileDataset]:
    """One dataset per slice of ``images`` (Z, H, W): HU for CT, [0, 1] magnitude for MR.

    ``kind`` names the series: ``reconstruction`` or ``uncertainty`` (the posterior std as a
    second series, in HU for CT, rescaled so it never clips). ``model_hash``: the prior's
    weights hash, named in the derivation. ``slices``: each slice's source instance
    (:data:`SLICE_KEYWORDS`), in slice order; a single slice may take ``source``'s own.
    ``comments``: a line per slice added to its ImageComments (the out-of-distribution
    verdict, :func:`models.ood.slice_comment`).
    """
    if modality not in ("CT", "MR"):
        raise ValueError("modality must be 'CT' or 'MR'")
    images = np.asarray(images, dtype=np.float64)
    if images.ndim == 2:
        images = images[None]
    source = {k: v for k, v in (source or {}).items() if k in SOURCE_KEYWORDS}
    when = (when or dt.datetime.now(dt.UTC).astimezone()).replace(microsecond=0)
    study_uid = source.get("StudyInstanceUID") or uid(job_id, "study")
    series_uid = uid(job_id, kind, "series")
    rows, cols = images.shape[1:]
    # A borrowed frame of reference only with the borrowed slices' own positions: one
    # source instance per reconstructed slice.
    if slices is None and len(images) == 1 and source_geometry(source) is not None:
        slices = [source]
    per_slice = None
    if slices is not None and len(slices) == len(images):
        per_slice = [source_geometry(sl) for sl in slices]
        if any(g is None for g in per_slice):
            per_slice = None
    frame_uid = uid(job_id, "frame")
    if per_slice is not None:
        frame_uid = source.get("FrameOfReferenceUID") or frame_uid
    number = series_number(kind, source)
    what = "posterior standard deviation" if kind == "uncertainty" else "posterior mean"
    weights = f", weights sha256 {model_hash[:12]}" if model_hash else ""
    derivation = (
        f"RESEARCH: {what} of a score-based reconstruction from raw measurements "
        f"(Song et al., proximal data-consistency sampler) with the generative prior "
        f"{model}{weights}, scorerecon {software_version()}"
    )
    scale = 1.0
    peak = float(np.max(images)) if images.size else 0.0
    if modality != "CT":  # MR magnitudes come in the measurement's units: the peak fills 12 bits
        scale = peak if peak > 0 else 1.0
    elif kind == "uncertainty":
        scale = max(1.0, peak / 32767)
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
            "PatientPosition",
            "Laterality",
        ):
            setattr(ds, kw, source.get(kw, ""))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SeriesNumber = number
        ds.InstanceNumber = k + 1
        ds.SeriesDescription = fit(f"RESEARCH {kind} ({model})")
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.ImageComments = (
            (comments[k] + " " if comments else "")
            + RESEARCH_NOTICE
            + ("" if per_slice is not None else " " + NOMINAL_GEOMETRY)
        )
        ds.SeriesDate = ds.ContentDate = when.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = when.strftime("%H%M%S")
        ds.TimezoneOffsetFromUTC = when.strftime("%z")
        ds.Manufacturer = "scorerecon"
        ds.Rows, ds.Columns = rows, cols
        own = slices[k] if per_slice is not None else {}
        ds.SliceThickness = _ds(own.get("SliceThickness") or slice_thickness)
        if per_slice is not None:
            geometry = per_slice[k]
            sy, sx = geometry["PixelSpacing"]  # the source's field of view, at our matrix
            ds.PixelSpacing = [
                _ds(sy * geometry["Rows"] / rows),
                _ds(sx * geometry["Columns"] / cols),
            ]
            ds.ImageOrientationPatient = [_ds(v) for v in geometry["ImageOrientationPatient"]]
            position = geometry["ImagePositionPatient"]
        else:
            ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            x0, y0 = -(cols - 1) / 2 * pixel_spacing[1], -(rows - 1) / 2 * pixel_spacing[0]
            position = [x0, y0, k * float(slice_thickness)]
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.SliceLocation = _ds(position[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = (
            16,
            16 if modality == "CT" else 12,
            15 if modality == "CT" else 11,
        )
        if modality == "CT":
            ds.PixelRepresentation = 1
            ds.RescaleIntercept, ds.RescaleSlope = 0, _ds(scale)
            ds.RescaleType = "HU"
            center, width = (40, 400) if kind == "reconstruction" else (50, 100)
            ds.WindowCenter, ds.WindowWidth = center, width
            ds.KVP = ""
            ds.AcquisitionNumber = ""
            pixels = np.clip(np.round(img / scale), -32768, 32767).astype(np.int16)
        else:
            ds.PixelRepresentation = 0
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "RM", "NONE", "2D"
            ds.ScanOptions, ds.EchoTime, ds.EchoTrainLength = "", "", ""
            ds.RepetitionTime = ""
            ds.WindowCenter, ds.WindowWidth = 2048, 4096
            pixels = np.clip(np.round(img * 4095 / scale), 0, 4095).astype(np.uint16)
        ds.PixelData = pixels.tobytes()
        if kind == "uncertainty" or modality != "CT":
            ds.RealWorldValueMappingSequence = DicomSequence(
                [_value_mapping(modality, scale, kind)]
            )
        ds.DerivationDescription = derivation
        code = (
            _code("113061", "Standard Deviation")
            if kind == "uncertainty"
            else _code("113963", "Iterative Reconstruction")
        )
        ds.DerivationCodeSequence = DicomSequence([code])
        ref = own if own.get("SOPInstanceUID") else source if len(images) == 1 else {}
        if ref.get("SOPInstanceUID") and ref.get("SOPClassUID"):
            image = pydicom.Dataset()
            image.ReferencedSOPClassUID = ref["SOPClassUID"]
            image.ReferencedSOPInstanceUID = ref["SOPInstanceUID"]
            purpose = _code("121322", "Source image for image processing operation")
            image.PurposeOfReferenceCodeSequence = DicomSequence([purpose])
            ds.SourceImageSequence = DicomSequence([image])
            if source.get("SeriesInstanceUID"):
                instance = pydicom.Dataset()
                instance.ReferencedSOPClassUID = ref["SOPClassUID"]
                instance.ReferencedSOPInstanceUID = ref["SOPInstanceUID"]
                item = pydicom.Dataset()
                item.SeriesInstanceUID = source["SeriesInstanceUID"]
                item.ReferencedInstanceSequence = DicomSequence([instance])
                ds.ReferencedSeriesSequence = DicomSequence([item])
        equipment = pydicom.Dataset()
        equipment.Manufacturer = "scorerecon"
        equipment.ManufacturerModelName = fit(model)
        equipment.SoftwareVersions = software_version()
        equipment.ContributionDescription = "Score-based reconstruction"
        equipment.ContributionDateTime = when.strftime("%Y%m%d%H%M%S%z")
        equipment.PurposeOfReferenceCodeSequence = DicomSequence(
            [_code("109102", "Processing Equipment")]
        )
        ds.ContributingEquipmentSequence = DicomSequence([equipment])
        ds.SoftwareVersions = software_version()
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
    """What is missing of the attributes above and of our labelling policy (empty if none):
    a quick check where ``dciodvfy`` is not installed, not a substitute for it (the tests
    run both)."""
    problems = []
    modality = str(ds.get("Modality", ""))
    for group in ("common", modality):
        for kw in REQUIRED.get(group, {}).get(1, []):
            if kw not in ds or ds.get(kw) in (None, ""):
                problems.append(f"type 1 {kw} missing or empty")
        for kw in REQUIRED.get(group, {}).get(2, []):
            if kw not in ds:
                problems.append(f"type 2 {kw} missing")
    # Sequence items the Common Instance Reference and SOP Common modules require.
    for item in ds.get("ReferencedSeriesSequence", []):
        if not item.get("ReferencedInstanceSequence"):
            problems.append("ReferencedSeriesSequence item without ReferencedInstanceSequence")
    for item in ds.get("ContributingEquipmentSequence", []):
        if not item.get("PurposeOfReferenceCodeSequence"):
            problems.append("ContributingEquipmentSequence item without its purpose code")
    if "DERIVED" not in list(ds.get("ImageType", [])):
        problems.append("ImageType is not DERIVED (the images are computed)")
    if not str(ds.get("SeriesDescription", "")).startswith("RESEARCH"):
        problems.append("SeriesDescription does not say RESEARCH")
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
    from models.ood import slice_comment

    mean = np.load(io.BytesIO(results.get(job.id, "recon.npy")), allow_pickle=False)[:, 0]
    std = np.load(io.BytesIO(results.get(job.id, "std.npy")), allow_pickle=False)[:, 0]
    modality = "CT" if job.spec.get("modality") == "ct" else "MR"
    spacing = float(job.spec.get("pixel_size", 1.0))
    if modality == "CT":
        hu = HUMapping()
        mean, std = hu.to_hu(mean), std * (hu.hu_max - hu.hu_air)
    source = job.params.get("dicom_source", {})
    kw = {"pixel_spacing": (spacing, spacing), "slice_thickness": spacing}
    kw["slices"] = job.params.get("dicom_slices")
    if results.exists(job.id, "report.json"):  # the weights hash the worker recorded
        report = json.loads(results.get(job.id, "report.json"))
        kw["model_hash"] = str(report.get("provenance", {}).get("model_sha256") or "")
        if report.get("ood"):
            kw["comments"] = [slice_comment(report["ood"], i) for i in range(len(mean))]
    model = job.model or ""
    datasets = series(mean, modality, job.id, model, source, **kw)
    if float(np.max(std)) > 0:
        datasets += series(std, modality, job.id, model, source, kind="uncertainty", **kw)
    return datasets
