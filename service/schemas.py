"""The API's request and response bodies as pydantic models, so that the OpenAPI document
says what the gateway accepts and answers; and :func:`job_json`, a job as the API shows it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.db import Job, auto_export_id

MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds

# --- requests ------------------------------------------------------------------------------


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., examples=["ct-default"])
    n: int = Field(16, ge=1, le=64)
    sampler: Literal["pc", "em", "ancestral", "ode", "ald", "fast"] = "pc"
    steps: int = Field(500, ge=2, le=5000)
    seed: int = Field(0, ge=0, le=MAX_SEED)


class PacsSource(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destination: str = Field(..., description="a DICOMweb PACS named in SCORERECON_PACS")
    query: dict[str, str] = Field(
        ..., description="QIDO-RS filters by DICOM keyword", examples=[{"Modality": "CT"}]
    )
    limit: int = Field(100, ge=1, le=10_000, description="at most this many series")


class TrainingRequest(BaseModel):
    """Exactly one data source: a registered server-side folder, an uploaded dataset, or a
    PACS query."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    data_dir: str | None = Field(None, description="a folder under one of SCORERECON_DATA_DIRS")
    dataset: str | None = Field(None, description="an id from POST /v1/admin/datasets")
    pacs: PacsSource | None = None
    model_id: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]{1,63}$", examples=["ct-site-2026"])
    preset: Literal["tiny", "small", "paper"] = "small"
    image_size: int = Field(128, ge=16, le=1024)
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: int = Field(8, ge=1, le=1024)
    objective: Literal["dsm", "ssm", "ssm-vr", "likelihood"] = "dsm"
    augment: bool = False
    axes: list[int] = Field([0], min_length=1, max_length=3)
    val_fraction: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(200, ge=1)
    preview: int = Field(4, ge=0, le=64)

    @model_validator(mode="after")
    def _one_source(self) -> TrainingRequest:
        given = [k for k in ("data_dir", "dataset", "pacs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one data source: data_dir, dataset or pacs")
        return self


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destination: str = Field(..., description="a PACS named in SCORERECON_PACS")


class KeyRequest(BaseModel):
    """An API key to create (its secret is shown once)."""

    scopes: Any = Field(
        default_factory=list,
        description="scope names: recon:submit, recon:read, admin",
        examples=[["recon:submit", "recon:read"]],
    )
    owner: Any = Field("", description="1-128 printable characters", examples=["ward-7"])


# --- responses -----------------------------------------------------------------------------


class Progress(BaseModel):
    step: int
    total: int
    phase: str | None
    fraction: float


class OODVerdict(BaseModel):
    """Whether the input was unlike the prior's training data (issue 24): the worst slice's
    score against the threshold calibrated on the prior's validation slices."""

    score: float
    threshold: float
    flag: bool
    method: str
    flagged_slices: list[int]
    scores: list[float]


class JobOut(BaseModel):
    """A job: its state, progress, parameters and links (to its results once succeeded)."""

    id: str
    kind: Literal["reconstruction", "sampling", "training", "export"]
    state: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    progress: Progress
    attempts: int
    error: str | None
    model: str | None
    params: dict[str, Any]
    spec: dict[str, Any]
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    ood: OODVerdict | None = Field(
        None, description="out-of-distribution verdict of a reconstruction (None: not checked)"
    )
    links: dict[str, str] = Field(
        ..., examples=[{"self": "/v1/jobs/…", "result_npy": "/v1/jobs/…/result?format=npy"}]
    )


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    next_offset: int | None


class ModelSummary(BaseModel):
    id: str
    image_size: int | None
    steps: int | None
    sde: str | None
    links: dict[str, str]


class Unusable(BaseModel):
    id: str
    error: str


class ModelList(BaseModel):
    items: list[ModelSummary]
    unusable: list[Unusable]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool | str]


class Dataset(BaseModel):
    id: str
    files: int
    bytes: int
    volumes: list[str]  # one line per volume: format, modality, shape, spacing, range, file
    skipped: list[str]


class KeyCreated(BaseModel):
    id: str
    key: str
    note: str


class KeyRevoked(BaseModel):
    id: str
    revoked: bool


class KeyInfo(BaseModel):
    id: str
    owner: str
    scopes: list[str]
    created_at: str
    revoked: bool


class KeyList(BaseModel):
    items: list[KeyInfo]


class AuditRow(BaseModel):
    at: str
    key_id: str | None
    owner: str | None
    action: str
    job_id: str | None
    outcome: str


class AuditList(BaseModel):
    items: list[AuditRow]


# --- a job as the API shows it -------------------------------------------------------------

RESULT_FORMATS = {
    "reconstruction": ("npy", "std", "baseline", "png", "json", "dicom"),
    "sampling": ("npy", "png", "json"),
}


def is_mri(job: Job) -> bool:
    """Whether a job's spec is MRI (whose images are complex: it has a phase result)."""
    return isinstance(job.spec, dict) and job.spec.get("modality") == "mri"


def job_json(job: Job) -> dict:
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "cancel": base}
    if job.state == "succeeded":
        formats = RESULT_FORMATS.get(job.kind, ("json",))
        if job.kind == "reconstruction" and is_mri(job):
            formats = (*formats, "phase")
        links |= {f"result_{f}": f"{base}/result?format={f}" for f in formats}
        if job.params.get("export_to"):
            links["export"] = f"/v1/jobs/{auto_export_id(job.id, job.params['export_to'])}"
    return {
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "progress": {
            "step": job.progress_step,
            "total": job.progress_total,
            "phase": job.phase,
            "fraction": job.progress_step / job.progress_total if job.progress_total else 0.0,
        },
        "attempts": job.attempts,
        "error": job.error,
        "model": job.model,
        "params": job.params,
        "spec": job.spec,
        "created_at": job.created_at.isoformat() if job.created_at else None,
        "started_at": job.started_at.isoformat() if job.started_at else None,
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "ood": job.ood,
        "links": links,
    }
