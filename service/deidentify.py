"""De-identification of outgoing DICOM for research destinations (PS3.15 Annex E).

The Basic Application Level Confidentiality Profile, with the Retain Longitudinal Temporal
Information option (dates are kept: reconstructions are compared over time) and Clean
Descriptors left out (descriptions are removed, not cleaned). Actions by attribute:

* ``D`` replace with a dummy value of the same meaning (patient name and ID become a
  pseudonym derived from the original ID and the site's secret salt, so one patient keeps
  one pseudonym across exports and nobody without the salt can reverse it);
* ``Z`` empty (type 2 attributes that must exist);
* ``X`` remove;
* ``U`` replace a UID by a new one derived from it and the salt (consistent across
  instances, so series still file into one study and references still resolve).

Every private tag is removed. ``PatientIdentityRemoved`` and ``DeidentificationMethod`` (with
code 113100, and 113106 for the retained dates) record what was done.
"""

from __future__ import annotations

import copy
import hashlib
import hmac

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

# Attribute keyword → action, from PS3.15 Table E.1-1 (the attributes our series and their
# sources can carry; everything else a source might hold is not copied into them).
ACTIONS: dict[str, str] = {
    "PatientName": "D",
    "PatientID": "D",
    "PatientBirthDate": "Z",
    "PatientBirthTime": "X",
    "PatientSex": "Z",
    "PatientAge": "X",
    "PatientSize": "X",
    "PatientWeight": "X",
    "PatientAddress": "X",
    "PatientTelephoneNumbers": "X",
    "OtherPatientIDs": "X",
    "OtherPatientNames": "X",
    "OtherPatientIDsSequence": "X",
    "PatientMotherBirthName": "X",
    "MilitaryRank": "X",
    "EthnicGroup": "X",
    "Occupation": "X",
    "AdditionalPatientHistory": "X",
    "PatientComments": "X",
    "MedicalRecordLocator": "X",
    "AccessionNumber": "Z",
    "StudyID": "Z",
    "ReferringPhysicianName": "Z",
    "ReferringPhysicianAddress": "X",
    "ReferringPhysicianTelephoneNumbers": "X",
    "PerformingPhysicianName": "X",
    "NameOfPhysiciansReadingStudy": "X",
    "OperatorsName": "X",
    "PhysiciansOfRecord": "X",
    "RequestingPhysician": "X",
    "InstitutionName": "X",
    "InstitutionAddress": "X",
    "InstitutionalDepartmentName": "X",
    "StationName": "X",
    "DeviceSerialNumber": "X",
    "StudyDescription": "X",
    "SeriesDescription": "X",
    "ImageComments": "X",
    "RequestAttributesSequence": "X",
    "StudyInstanceUID": "U",
    "SeriesInstanceUID": "U",
    "SOPInstanceUID": "U",
    "FrameOfReferenceUID": "U",
    "ReferencedSOPInstanceUID": "U",
    "MediaStorageSOPInstanceUID": "U",
}
UID_ROOT = "2.25."  # UUID-derived UIDs (PS3.5 B.2): no registered root needed


def pseudonym(value: str, salt: str, prefix: str = "ANON") -> str:
    """A stable pseudonym of ``value`` under ``salt`` (HMAC-SHA256, 12 hex digits)."""
    digest = hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:12].upper()
    return f"{prefix}-{digest}"


def new_uid(uid: str, salt: str) -> str:
    """A UID derived from ``uid`` under ``salt``: the same input gives the same output."""
    digest = hmac.new(salt.encode(), uid.encode(), hashlib.sha256).digest()[:16]
    return UID_ROOT + str(int.from_bytes(digest, "big"))


def deidentify(ds: Dataset, salt: str, keep: tuple[str, ...] = ()) -> Dataset:
    """A de-identified copy of ``ds``; the original is not modified. ``keep``: attributes the
    writer composed itself and that carry no identity (our research labelling), restored
    after the profile removed them."""
    if not salt:
        raise ValueError("de-identification needs a secret salt (SCORERECON_DEID_SALT)")
    out = copy.deepcopy(ds)
    original_id = str(out.get("PatientID", "") or out.get("PatientName", ""))
    out.remove_private_tags()
    _apply(out, salt, original_id)
    for keyword in keep:
        if keyword in ds:
            setattr(out, keyword, ds.get(keyword))
    if "file_meta" in out.__dict__ and out.file_meta is not None:
        meta = out.file_meta
        if "MediaStorageSOPInstanceUID" in meta:
            meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "PS3.15 Basic Profile; Retain Longitudinal Temporal Information"
    out.DeidentificationMethodCodeSequence = Sequence(
        [
            _code("113100", "Basic Application Confidentiality Profile"),
            _code("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
        ]
    )
    return out


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _apply(ds: Dataset, salt: str, original_id: str) -> None:
    for elem in list(ds):
        keyword = elem.keyword
        if elem.VR == "SQ":
            if ACTIONS.get(keyword) == "X":
                del ds[elem.tag]
                continue
            for item in elem.value:
                _apply(item, salt, original_id)
            continue
        action = ACTIONS.get(keyword)
        if action is None:
            continue
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = ""
        elif action == "U" and elem.value:
            elem.value = new_uid(str(elem.value), salt)
        elif action == "D":
            alias = pseudonym(original_id, salt)
            elem.value = alias if keyword == "PatientID" else pydicom.valuerep.PersonName(alias)
