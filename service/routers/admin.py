"""Administration: sampling and training jobs, training datasets, API keys, the audit log."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, File, Query, UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import select

from models.registry import ModelError, load_card
from service.archives import ArchiveError, extract
from service.auth import Principal, create_key, list_keys, revoke_key
from service.catalogue import catalogue, model_path, names
from service.db import AuditEntry, Job, new_id
from service.deps import Admin, Context, Ctx
from service.fairness import Factor, job_cost, sampling_nfe
from service.limits import admission, check_cost, read_limited
from service.problems import AUTH_ERRORS, Problem, problem_responses
from service.schemas import (
    AuditList,
    Dataset,
    JobOut,
    KeyCreated,
    KeyList,
    KeyRequest,
    KeyRevoked,
    SamplingRequest,
    TrainingRequest,
)
from service.settings import Settings
from service.submission import queue

router = APIRouter(tags=["admin"], responses=AUTH_ERRORS)


@router.post("/v1/admin/sampling", status_code=202, response_model=JobOut)
def admin_sampling(ctx: Ctx, p: Admin, body: SamplingRequest) -> JSONResponse:
    """Draw samples from a prior (unconditional generation), as a job."""
    if body.model not in names(ctx.settings):
        detail = f"model '{body.model}' not found; see GET /v1/models"
        raise Problem(422, "Unknown model", detail, "model")
    try:
        size = int(load_card(model_path(body.model, ctx.settings))["image_size"])
    except (ModelError, KeyError, TypeError, ValueError):
        detail = f"model '{body.model}' has no usable image_size"
        raise Problem(422, "Unusable model", detail, "model") from None
    per_step = sampling_nfe(body.sampler, 1)
    factors = [Factor("steps", body.steps, 2, per_step), Factor("n", body.n)]
    check_cost(ctx.settings, size * size, factors)
    cost = job_cost(sampling_nfe(body.sampler, body.steps), body.n, 1, size * size)
    return _admin_job(ctx, p, "sampling", body.model, body.model_dump(), cost)


@router.post(
    "/v1/admin/training", status_code=202, response_model=JobOut, responses=problem_responses(409)
)
def admin_training(ctx: Ctx, p: Admin, body: TrainingRequest) -> JSONResponse:
    """Train a prior on a registered folder, an uploaded dataset or a PACS query, as a job."""
    source = body.model_dump(exclude_none=True)
    if body.data_dir is not None:
        source["data_dir"] = str(_registered_dir(body.data_dir, ctx.settings))
    elif body.dataset is not None:
        if not _dataset_dir(ctx.settings, body.dataset).is_dir():
            detail = f"no dataset {body.dataset}; upload one with POST /v1/admin/datasets"
            raise Problem(422, "Unknown dataset", detail, "dataset")
    else:
        _check_pacs_source(ctx.settings, body.pacs.destination)
    usable, unusable = catalogue(ctx.settings)
    if body.model_id in usable or body.model_id in dict(unusable):
        detail = f"model '{body.model_id}' exists; choose another model_id"
        raise Problem(409, "Model exists", detail, "model_id")
    return _admin_job(ctx, p, "training", body.model_id, source)


@router.post(
    "/v1/admin/datasets", status_code=201, response_model=Dataset, responses=problem_responses(413)
)
def upload_dataset(
    ctx: Ctx,
    p: Admin,
    archive: Annotated[
        UploadFile,
        File(description=".zip, .tar or .tar.gz of DICOM series, NIfTI volumes, NPY or PNG"),
    ],
) -> dict:
    """An uploaded training archive, unpacked safely into a dataset for POST
    /v1/admin/training (``dataset``); returns what was found in it."""
    raw = read_limited(archive, ctx.settings.max_upload_mb, "archive")
    dataset_id = new_id()
    folder = _dataset_dir(ctx.settings, dataset_id)
    try:
        counts = extract(raw, folder, int(ctx.settings.max_upload_mb * 4 * 2**20))
    except ArchiveError as exc:
        raise Problem(422, "Invalid archive", str(exc), "archive") from None
    found, skipped = _scan_dataset(folder)
    ctx.jobs.audit("upload-dataset", f"{counts['files']} files", p.key_id, p.owner)
    return {
        "id": dataset_id,
        **counts,
        "volumes": [v.describe(folder) for v in found.volumes],
        "skipped": skipped[:50],
    }


@router.post("/v1/admin/api-keys", status_code=201, response_model=KeyCreated)
def new_key(ctx: Ctx, p: Admin, body: KeyRequest) -> dict:
    """A new API key for an owner with these scopes; its secret is shown once."""
    scopes, owner = body.scopes, body.owner
    if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
        raise Problem(
            422,
            "Invalid key request",
            'scopes must be a list of scope names, e.g. ["recon:submit", "recon:read"]',
            "scopes",
        )
    if not isinstance(owner, str) or not 0 < len(owner) <= 128 or not owner.isprintable():
        detail = "owner must be 1-128 printable characters"
        raise Problem(422, "Invalid key request", detail, "owner")
    try:
        key_id, key = create_key(ctx.jobs, scopes, owner)
    except ValueError as exc:
        raise Problem(422, "Invalid key request", str(exc), "scopes") from None
    ctx.jobs.audit("create-key", key_id, p.key_id, p.owner)
    return {"id": key_id, "key": key, "note": "shown once; store it now"}


@router.delete(
    "/v1/admin/api-keys/{key_id}", response_model=KeyRevoked, responses=problem_responses(404)
)
def delete_key(ctx: Ctx, key_id: str, p: Admin) -> dict:
    if not revoke_key(ctx.jobs, key_id):
        raise Problem(404, "Not found", f"no active key {key_id!r}", "key_id")
    ctx.jobs.audit("revoke-key", key_id, p.key_id, p.owner)
    return {"id": key_id, "revoked": True}


@router.get("/v1/admin/api-keys", response_model=KeyList)
def keys(ctx: Ctx, _: Admin) -> dict:
    """Every key's id, owner, scopes and state (never the secret)."""
    return {"items": list_keys(ctx.jobs)}


@router.get("/v1/admin/audit", response_model=AuditList)
def audit(ctx: Ctx, _: Admin, limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> dict:
    """The newest entries of the audit log."""
    with ctx.jobs.sessions() as s:
        rows = s.scalars(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)).all()
    return {
        "items": [
            {
                "at": r.at.isoformat(),
                "key_id": r.key_id,
                "owner": r.owner,
                "action": r.action,
                "job_id": r.job_id,
                "outcome": r.outcome,
            }
            for r in rows
        ]
    }


def _admin_job(
    ctx: Context, p: Principal, kind: str, model: str, params: dict, cost: int = 0
) -> JSONResponse:
    admission(ctx.settings, ctx.jobs, p.owner, cost)
    job_id = new_id()
    with ctx.jobs.session() as s:
        s.add(
            Job(
                id=job_id,
                kind=kind,
                owner=p.owner,
                spec={},
                params=params,
                model=model,
                result_keys=[],
                cost=cost,
            )
        )
    ctx.jobs.audit(f"submit-{kind}", "queued", p.key_id, p.owner, job_id)
    return queue(ctx, job_id, kind)


def _check_pacs_source(settings: Settings, destination: str) -> None:
    dest = settings.pacs.get(destination)
    if dest is None or dest.get("kind") != "stowrs":
        web = sorted(n for n, d in settings.pacs.items() if d.get("kind") == "stowrs")
        raise Problem(
            422,
            "Unknown PACS",
            "pacs.destination must be a DICOMweb destination: "
            + (", ".join(web) or "none configured (SCORERECON_PACS)"),
            "pacs.destination",
        )


def _scan_dataset(folder: Path):
    """The volumes found in an unpacked archive and the files skipped (with why); 422 and
    the folder removed if a file breaks the scan or nothing is readable."""
    from models.data import scan

    try:
        found = scan(folder)
    except Exception as exc:  # noqa: BLE001 - a malformed file is the uploader's to fix
        shutil.rmtree(folder, ignore_errors=True)
        raise Problem(
            422,
            "Invalid archive",
            f"a file in the archive could not be read ({type(exc).__name__}: "
            f"{str(exc)[:200]}); fix or remove it and upload again",
            "archive",
        ) from None
    skipped = [f"{Path(f).relative_to(folder)}: {why}" for f, why in found.skipped]
    if not found.volumes:
        shutil.rmtree(folder, ignore_errors=True)
        why = "; ".join(skipped[:5]) + (f"; and {len(skipped) - 5} more" if skipped[5:] else "")
        raise Problem(
            422,
            "Invalid archive",
            "no readable volume in the archive"
            + (f" ({why}); fix or remove the files named" if skipped else "")
            + "; it should hold DICOM series, NIfTI volumes, NPY or PNG images",
            "archive",
        )
    return found, skipped


def _registered_dir(path: str, settings: Settings) -> Path:
    data = Path(path).resolve()
    roots = [Path(r).resolve() for r in settings.data_dirs]
    if not any(data == r or r in data.parents for r in roots):
        listed = ", ".join(map(str, roots)) or "none (set SCORERECON_DATA_DIRS)"
        raise Problem(
            422,
            "Unregistered data directory",
            f"data_dir must lie under a registered directory: {listed}",
            "data_dir",
        )
    if not data.is_dir():
        raise Problem(422, "Missing data directory", f"{data} is not a directory", "data_dir")
    return data


def _dataset_dir(settings: Settings, dataset_id: str) -> Path:
    if len(dataset_id) != 32 or any(c not in "0123456789abcdef" for c in dataset_id):
        raise Problem(422, "Unknown dataset", "dataset ids are 32 hex digits", "dataset")
    return settings.home / "datasets" / dataset_id
