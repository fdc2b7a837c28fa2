"""Reconstructions and the jobs they become: submit, poll, list, cancel, export, results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Header, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from sqlalchemy import func, select

from models.inverse import DEFAULT_SAMPLER, RECON_SAMPLERS
from service.db import FINAL, STATES, Job
from service.deps import Ctx, Reader, Submitter, own_job
from service.dicom_export import job_series, zip_series
from service.problems import AUTH_ERRORS, Problem, problem_responses
from service.schemas import MAX_SEED, ExportRequest, JobList, JobOut, is_mri, job_json
from service.submission import Submission, check_destination, submit

router = APIRouter(responses=AUTH_ERRORS)
QUEUED = {
    202: {"model": JobOut, "description": "queued; poll the job at Location"},
}

# What each result format is, for the schema and the answer.
RESULTS = {
    "npy": ("recon.npy", "application/octet-stream", "the images (NumPy .npy, float32)"),
    "std": ("std.npy", "application/octet-stream", "the posterior standard deviation (.npy)"),
    "baseline": ("baseline.npy", "application/octet-stream", "the classical baseline (.npy)"),
    "phase": ("phase.npy", "application/octet-stream", "MRI: the phase of the mean (.npy)"),
    "png": ("preview.png", "image/png", "a preview"),
    "json": ("report.json", "application/json", "the report: settings, metrics, provenance"),
    "dicom": ("", "application/zip", "the DICOM series (and its uncertainty series), zipped"),
}


def submission(
    measurement: Annotated[
        UploadFile,
        File(
            description=".npy or .npz array (complex or real/imag for k-space), or HDF5 "
            "k-space (fastMRI 'kspace', ISMRMRD raw data)"
        ),
    ],
    spec: Annotated[
        str,
        Form(
            description="measurement spec JSON, e.g. "
            '{"modality": "ct", "image_size": 128, "n_views": 23}'
        ),
    ],
    model: Annotated[str, Form()] = "ct-default",
    sampler: Annotated[
        str, Form(json_schema_extra={"enum": list(RECON_SAMPLERS)}, description="the solver")
    ] = DEFAULT_SAMPLER,
    nfe: Annotated[
        int | None,
        Form(
            ge=2,
            le=5000,
            description="network evaluations per posterior sample; omitted: the model "
            "card's default (with its warm start, docs/benchmarks/warm_start.md)",
        ),
    ] = None,
    samples: Annotated[
        int | None,
        Form(
            ge=1,
            le=64,
            description="posterior samples K, averaged into the result (their std is the "
            "uncertainty map); omitted: the model card's default",
        ),
    ] = None,
    seed: Annotated[int, Form(ge=0, le=MAX_SEED)] = 0,
    source: Annotated[
        str | None,
        Form(
            description="JSON of the source study's DICOM attributes (PatientID, "
            "StudyInstanceUID, ...) so format=dicom files the series into that study"
        ),
    ] = None,
    source_dicom: Annotated[
        list[UploadFile] | None,
        File(
            description="the DICOM instances of the source slices, one per measured "
            "slice, in any order: their patient and study attributes are used as "
            "`source` (fields given in `source` take precedence), and each reconstructed "
            "slice takes its source slice's geometry (matched by position)"
        ),
    ] = None,
    export_to: Annotated[
        str | None,
        Form(description="PACS destination to push the series to when the job succeeds"),
    ] = None,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> Submission:
    """The reconstruction request's form fields and Idempotency-Key header."""
    return Submission(
        measurement, spec, model, sampler, nfe, samples, seed, source, source_dicom,
        export_to, idempotency_key,
    )  # fmt: skip


@router.post(
    "/v1/reconstructions",
    status_code=202,
    tags=["reconstructions"],
    response_model=JobOut,
    responses={200: {"model": JobOut, "description": "replayed (same Idempotency-Key)"}}
    | problem_responses(409, 413, 503, 507),
)
def create_reconstruction(
    ctx: Ctx, p: Submitter, form: Annotated[Submission, Depends(submission)]
) -> JSONResponse:
    """Queue a reconstruction of an uploaded measurement (service/submission.py)."""
    return submit(ctx, p, form)


@router.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut)
def get_job(ctx: Ctx, job_id: str, p: Reader) -> dict:
    return job_json(own_job(ctx, job_id, p))


@router.get("/v1/jobs", tags=["jobs"], response_model=JobList)
def list_jobs(
    ctx: Ctx,
    p: Reader,
    state: Annotated[str | None, Query(json_schema_extra={"enum": list(STATES)})] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,  # a database integer
) -> dict:
    """The caller's jobs (an admin's: all), newest first."""
    if state is not None and state not in STATES:
        raise Problem(422, "Invalid state", f"state must be one of {', '.join(STATES)}", "state")
    q = select(Job).where(Job.kind != "slab")  # a volume's parts are internal
    if not p.is_admin:
        q = q.where(Job.owner == p.owner)
    if state:
        q = q.where(Job.state == state)
    with ctx.jobs.sessions() as s:
        total = s.scalar(select(func.count()).select_from(q.subquery()))
        rows = s.scalars(q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset))
        items = [job_json(j) for j in rows.all()]
    nxt = offset + limit if offset + limit < total else None
    return {"items": items, "total": total, "next_offset": nxt}


@router.delete(
    "/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=problem_responses(409)
)
def cancel_job(ctx: Ctx, job_id: str, p: Submitter) -> dict:
    """Cancel a queued job at once, a running one at its next step."""
    job = own_job(ctx, job_id, p)
    if job.state in FINAL:
        raise Problem(409, "Already finished", f"job {job_id} is {job.state}")
    ctx.jobs.set_fields(job_id, cancel_requested=True)
    ctx.jobs.transition(job_id, ["queued"], "cancelled", phase="cancelled")
    ctx.executor.cancel(job_id)
    ctx.jobs.audit("cancel", "requested", p.key_id, p.owner, job_id)
    return job_json(ctx.jobs.get(job_id))


@router.post(
    "/v1/jobs/{job_id}/export",
    status_code=202,
    tags=["jobs"],
    response_model=JobOut,
    responses=problem_responses(409),
)
def export(ctx: Ctx, job_id: str, p: Submitter, body: ExportRequest) -> JSONResponse:
    """Push a succeeded reconstruction's series to a PACS, as an export job."""
    job = own_job(ctx, job_id, p)
    if job.kind != "reconstruction" or job.state != "succeeded":
        raise Problem(
            409,
            "Nothing to export",
            f"job {job_id} is a {job.state} {job.kind} job; "
            "export needs a succeeded reconstruction",
        )
    check_destination(ctx, body.destination, "destination")
    export_id = ctx.jobs.add_export(job, body.destination)
    ctx.jobs.audit("export", f"to {body.destination}", p.key_id, p.owner, job_id)
    out = job_json(ctx.jobs.get(export_id))
    ctx.executor.enqueue(export_id, "export")
    return JSONResponse(out, 202, headers={"Location": f"/v1/jobs/{export_id}"})


@router.get(
    "/v1/jobs/{job_id}/result",
    tags=["jobs"],
    response_class=Response,
    responses={
        200: {
            "description": "; ".join(f"{f}: {m}, {what}" for f, (_, m, what) in RESULTS.items()),
            "content": {media: {} for _, media, _ in RESULTS.values()},
        },
        **problem_responses(404, 409),
    },
)
def result(
    ctx: Ctx,
    job_id: str,
    p: Reader,
    format: Annotated[str, Query(pattern="^(npy|std|baseline|phase|png|json|dicom)$")] = "npy",
) -> Response:
    """One result of a succeeded job, in the format asked."""
    job = own_job(ctx, job_id, p)
    _check_result(job, format)
    if format == "dicom":
        return Response(
            zip_series(job_series(job, ctx.results)),
            media_type="application/zip",
            headers={"Content-Disposition": f'attachment; filename="{job_id}-dicom.zip"'},
        )
    name, media, _ = RESULTS[format]
    if format == "npy" and job.kind == "sampling":
        name = "samples.npy"
    return Response(
        ctx.results.get(job_id, name),
        media_type=media,
        headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}"'},
    )


def _check_result(job: Job, format: str) -> None:
    """409 before success; 404 for a format this job has not."""
    if job.state != "succeeded":
        raise Problem(409, "No result", f"job {job.id} is {job.state}; poll until 'succeeded'")
    if format in ("dicom", "std", "baseline", "phase") and job.kind != "reconstruction":
        raise Problem(404, "No such result", f"a {job.kind} job has no {format} result", "format")
    if format == "phase" and not is_mri(job):
        raise Problem(404, "No such result", "only MRI reconstructions have a phase", "format")
    if job.kind == "training" and format != "json":
        raise Problem(
            404,
            "No such result",
            "a training job's result is its report (format=json); the model is in GET /v1/models",
            "format",
        )
