"""The FastAPI gateway: ``create_app(settings)``.

A thin layer: it authenticates, validates a request with the core's own spec and operator
(``models.physics``) and registry, stores the measurement, records the job, and hands the
job id to the executor. Every refusal is an RFC 7807 ``application/problem+json`` body
naming the field and the fix; nothing stored changes on a refused request.
"""

import errno
import hashlib
import hmac
import http
import io
import ipaddress
import json
import logging
import re
import shutil
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.inverse import DEFAULT_SAMPLER, RECON_SAMPLERS, ReconConfig
from models.measurements import (
    MeasurementError,
    MeasurementTooLarge,
    display_columns,
    read_measurement,
    read_noise_scan,
)
from models.physics import SpecError, needs_data, parse_spec
from models.registry import ModelError, bundled_models, card_modality, load_card, resolve
from service.api_docs import PAGES as DOC_PAGES
from service.api_docs import add_docs
from service.archives import ArchiveError, extract
from service.auth import Principal, authenticate, create_key, list_keys, revoke_key
from service.db import (
    BATCH_SLICES,
    FINAL,
    STATES,
    AuditEntry,
    Job,
    JobStore,
    auto_export_id,
    new_id,
    slab_ranges,
)
from service.dicom_export import LIMIT as SOURCE_LIMIT
from service.dicom_export import (
    SLICE_KEYWORDS,
    SOURCE_KEYWORDS,
    job_series,
    slice_position,
    source_attributes,
    source_geometry,
    zip_series,
)
from service.executor import make_executor
from service.fairness import Factor, job_cost, over_cost, sampling_nfe
from service.migrate import upgrade
from service.oidc import OIDCVerifier
from service.ratelimit import RateLimited, make_rate_limiter
from service.results import open_result_store
from service.security import SecurityHeaders
from service.settings import Settings
from service.ui import Handlers, add_ui

log = logging.getLogger(__name__)

SAMPLERS = RECON_SAMPLERS  # the first is the default: the best at the default budget
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


class Problem(Exception):
    """An HTTP error rendered as problem+json."""

    def __init__(self, status: int, title: str, detail: str, field: str | None = None, **extra):
        self.status, self.title, self.detail, self.field, self.extra = (
            status,
            title,
            detail,
            field,
            extra,
        )

    def response(self) -> JSONResponse:
        body = {"type": "about:blank", "title": self.title, "status": self.status}
        body["detail"] = self.detail
        if self.field:
            body["field"] = self.field
        headers = {}
        if "retry_after" in self.extra:
            headers["Retry-After"] = str(self.extra["retry_after"])
        if "www_authenticate" in self.extra:
            headers["WWW-Authenticate"] = self.extra["www_authenticate"]
        return JSONResponse(
            body, self.status, headers=headers, media_type="application/problem+json"
        )


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
    def _one_source(self) -> "TrainingRequest":
        given = [k for k in ("data_dir", "dataset", "pacs") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one data source: data_dir, dataset or pacs")
        return self


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    destination: str = Field(..., description="a PACS named in SCORERECON_PACS")


def _is_mri(job: Job) -> bool:
    """Whether a job's spec is MRI (whose images are complex: it has a phase result)."""
    return isinstance(job.spec, dict) and job.spec.get("modality") == "mri"


def job_json(job: Job) -> dict:
    base = f"/v1/jobs/{job.id}"
    links = {"self": base, "cancel": base}
    if job.state == "succeeded":
        formats = {
            "reconstruction": ("npy", "std", "baseline", "png", "json", "dicom"),
            "sampling": ("npy", "png", "json"),
        }.get(job.kind, ("json",))
        if job.kind == "reconstruction" and _is_mri(job):
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
        "links": links,
    }


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = (settings or Settings()).prepare()
    upgrade(settings.db_url)
    jobs = JobStore(settings.db_url)
    results = open_result_store(settings)
    executor = make_executor(settings, jobs, results)
    limiter = make_rate_limiter(
        settings.executor, settings.broker_url, settings.rate_limit_per_minute
    )
    failures = make_rate_limiter(
        settings.executor,
        settings.broker_url,
        settings.failed_auth_per_minute,
        "scorerecon:auth-failed:",
    )
    oidc = None
    if settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks:
        oidc = OIDCVerifier(settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        executor.shutdown()

    app = FastAPI(
        title="scorerecon",
        version="0.1.0",
        description="Score-based reconstruction of sparse-view CT and undersampled MRI.",
        lifespan=lifespan,
        docs_url=None,  # served from the package, not a CDN (service/api_docs.py)
        redoc_url=None,
    )
    add_docs(app)
    app.state.settings, app.state.jobs, app.state.results = settings, jobs, results
    app.state.executor = executor
    app.add_middleware(SecurityHeaders, docs_paths=DOC_PAGES)

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            why = err.get("ctx", {}).get("error", "invalid")
            detail = f"the body is not valid JSON ({why}); send a JSON object"
            return Problem(422, "Invalid request", detail, "body").response()
        field = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "header"))
        field = field or "body"
        return Problem(422, "Invalid request", f"{field}: {err['msg']}", field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unparsable body, no such route) as problem+json."""
        title = http.HTTPStatus(exc.status_code).phrase
        if exc.status_code != 400:
            response = Problem(exc.status_code, title, str(exc.detail)).response()
        else:
            if request.headers.get("content-type", "").startswith("multipart/"):
                hint = "send multipart/form-data with a boundary and well-formed parts"
            else:
                hint = "send UTF-8 JSON (an object, not nested thousands of levels deep)"
            detail = f"{str(exc.detail).rstrip('.')}; {hint}"
            response = Problem(400, title, detail, "body").response()
        response.headers.update(exc.headers or {})
        return response

    def principal(
        request: Request, authorization: Annotated[str | None, Header()] = None
    ) -> Principal:
        if not authorization or not authorization.startswith("Bearer "):
            raise Problem(
                401, "Unauthorized", "send 'Authorization: Bearer <API key>'", "Authorization"
            )
        peer = request.client.host if request.client else ""
        return credential_principal(authorization.removeprefix("Bearer ").strip(), peer)

    def credential_principal(credential: str, peer: str) -> Principal:
        """The principal of an API key or OIDC token, sent from ``peer``. An address with
        too many failed credentials in the last minute is refused before the credential
        is even checked (429), so keys cannot be guessed at speed; each failure is audited."""
        wait = failures.peek(peer)
        if wait is not None:
            log.warning("refused credentials from %s: too many failures", peer)
            raise Problem(
                429,
                "Too many failed credentials",
                f"more than {settings.failed_auth_per_minute} failed credentials per minute "
                "from this address (SCORERECON_FAILED_AUTH_PER_MINUTE); check the key and "
                f"retry after {wait} s",
                "Authorization",
                retry_after=wait,
            )
        if credential.startswith("sr_") or oidc is None:
            found = authenticate(jobs, credential)
        else:
            found = oidc.verify(credential)
        if found is None:
            try:
                failures.check(peer)
            except RateLimited:
                pass  # the next attempt from this address is refused above
            jobs.audit("auth-failed", f"unknown, revoked or expired credential from {peer}")
            raise Problem(
                401,
                "Unauthorized",
                "the API key or token is unknown, revoked or expired",
                "Authorization",
            )
        try:
            limiter.check(found.key_id)
        except RateLimited as exc:
            raise Problem(
                429,
                "Too many requests",
                f"{exc} with this key (SCORERECON_RATE_LIMIT_PER_MINUTE)",
                retry_after=exc.retry_after,
            ) from None
        return found

    def scope(name: str):
        def check(p: Annotated[Principal, Depends(principal)]) -> Principal:
            if name not in p.scopes and not p.is_admin:
                jobs.audit("denied", f"missing scope {name}", p.key_id, p.owner)
                raise Problem(403, "Forbidden", f"this key lacks the scope '{name}'")
            return p

        return check

    def own_job(job_id: str, p: Principal) -> Job:
        job = jobs.get(job_id) if _is_hex_id(job_id) else None
        if job is None or job.kind == "slab" or (job.owner != p.owner and not p.is_admin):
            raise Problem(404, "Not found", f"no job {job_id!r} for this key", "job_id")
        return job

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz() -> JSONResponse:
        checks = {}
        for name, fn in (("database", jobs.ping), ("executor", executor.ping)):
            try:
                checks[name] = bool(fn())
            except Exception as exc:  # noqa: BLE001 - report, never crash the probe
                checks[name] = f"unreachable ({type(exc).__name__})"
        ok = all(v is True for v in checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, 200 if ok else 503)

    def scraper(request: Request) -> None:
        """/metrics is closed unless opened: by ``SCORERECON_METRICS_TOKEN`` (sent as a
        bearer token) or for peers in ``SCORERECON_METRICS_ALLOW``. API keys do not open
        it: a scraper needs no job scopes, and a job key should not reach the metrics."""
        peer = request.client.host if request.client else ""
        if _in_networks(peer, settings.metrics_networks):
            return
        token = settings.metrics_token
        if token is not None:
            sent = request.headers.get("authorization", "")
            expected = f"Bearer {token.get_secret_value()}"
            if hmac.compare_digest(sent.encode(), expected.encode()):
                return
            what = "a wrong token" if sent else "no token"
            raise Problem(
                401,
                "Unauthorized",
                f"/metrics needs 'Authorization: Bearer <SCORERECON_METRICS_TOKEN>'; "
                f"this request sent {what}",
                "Authorization",
                www_authenticate='Bearer realm="metrics"',
            )
        if settings.metrics_allow:
            detail = (
                f"/metrics answers only peers in SCORERECON_METRICS_ALLOW; {peer or 'this peer'} "
                "is not in it (add its network, or set SCORERECON_METRICS_TOKEN)"
            )
        else:
            detail = (
                "/metrics is closed: set SCORERECON_METRICS_TOKEN (sent by the scraper as a "
                "bearer token) or SCORERECON_METRICS_ALLOW (the scraper's networks)"
            )
        raise Problem(403, "Forbidden", detail)

    @app.get("/metrics", tags=["health"], dependencies=[Depends(scraper)])
    def metrics() -> Response:
        """Prometheus text format: jobs by state, queue depth, run time of finished jobs by
        kind and state (sum and count, so rate() gives mean durations). Closed by default:
        see ``SCORERECON_METRICS_TOKEN`` and ``SCORERECON_METRICS_ALLOW``."""
        counts = jobs.count_by_state()
        lines = ["# HELP scorerecon_jobs Jobs by state.", "# TYPE scorerecon_jobs gauge"]
        lines += [f'scorerecon_jobs{{state="{s}"}} {n}' for s, n in counts.items()]
        lines += [
            "# HELP scorerecon_queue_depth Jobs waiting for a worker.",
            "# TYPE scorerecon_queue_depth gauge",
            f"scorerecon_queue_depth {counts['queued']}",
            "# HELP scorerecon_job_seconds Run time of finished jobs (started to finished).",
            "# TYPE scorerecon_job_seconds summary",
        ]
        for (kind, state), (total, n) in jobs.durations().items():
            label = f'kind="{kind}",state="{state}"'
            lines += [
                f"scorerecon_job_seconds_sum{{{label}}} {total:.3f}",
                f"scorerecon_job_seconds_count{{{label}}} {n}",
            ]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.post("/v1/reconstructions", status_code=202, tags=["reconstructions"])
    def submit(
        p: Annotated[Principal, Depends(scope("recon:submit"))],
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
        sampler: Annotated[str, Form()] = DEFAULT_SAMPLER,
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
    ) -> JSONResponse:
        try:
            parsed = parse_spec(spec)
        except SpecError as exc:
            raise Problem(422, "Invalid spec", str(exc), "spec") from None
        if sampler not in SAMPLERS:
            raise Problem(
                422, "Invalid sampler", f"sampler must be one of {', '.join(SAMPLERS)}", "sampler"
            )
        if idempotency_key is not None and not idempotency_key.isprintable():
            raise Problem(
                422,
                "Invalid Idempotency-Key",
                "Idempotency-Key must be printable text (no control characters)",
                "Idempotency-Key",
            )
        card = _check_model(model, parsed.image_size, settings, parsed.modality)  # before the op
        raw = _read_limited(measurement, settings.max_upload_mb)
        y = _parse_measurement(raw, parsed)
        noise = _parse_noise_scan(raw, parsed, y)
        pixels = parsed.shape[0] * parsed.shape[1]
        multicoil = parsed.sensitivities == "espirit" or (parsed.coils or 1) > 1
        defaults = ReconConfig.from_card(
            card, parsed.modality, sampler, nfe, "multicoil" if multicoil else None
        )
        samples = defaults.samples if samples is None else samples
        nfe = defaults.n_steps * defaults.nfe_per_step() if nfe is None else nfe
        # One worker's share is what the per-job limit bounds: a volume split into slabs
        # (SCORERECON_SLAB_SLICES) costs each worker one slab; the owner's cap counts all.
        batch = 1 if needs_data(parsed) else BATCH_SLICES
        start, stop = slab_ranges(len(y), batch, settings.slab_slices)[0]
        label = "slices" if stop - start == len(y) else "slices per slab (SCORERECON_SLAB_SLICES)"
        factors = [
            Factor("nfe", nfe, 2),
            Factor("samples", samples),
            Factor("measurement", stop - start, label=label),
        ]
        _check_cost(settings, pixels, factors)
        cost = job_cost(nfe, samples, len(y), pixels)
        params = {"sampler": sampler, "nfe": nfe, "samples": samples, "seed": seed}
        if columns := display_columns(raw, parsed):  # the header's reconSpace, after solving
            params["display_columns"] = columns
        attributes = {}
        if source_dicom:
            slices = [
                _check_source(
                    _dicom_source(_read_limited(f, settings.max_upload_mb, "source_dicom")),
                    "source_dicom",
                )
                for f in source_dicom
            ]
            slices = _check_source_fits(slices, parsed.modality, len(y))
            attributes = dict(slices[0])
            if len(slices) > 1:
                params["dicom_slices"] = [
                    {k: v for k, v in sl.items() if k in SLICE_KEYWORDS} for sl in slices
                ]
        if source is not None:
            attributes.update(_parse_source(source))
        if attributes:
            params["dicom_source"] = attributes
        if export_to is not None:
            if export_to not in settings.pacs:
                known = ", ".join(sorted(settings.pacs)) or "none configured (SCORERECON_PACS)"
                raise Problem(
                    422, "Unknown destination", f"export_to must be one of: {known}", "export_to"
                )
            params["export_to"] = export_to
        digest = hashlib.sha256(
            raw + json.dumps([parsed.model_dump(), model, params], sort_keys=True).encode()
        ).hexdigest()
        if idempotency_key:
            with jobs.sessions() as s:
                prior = s.scalars(
                    select(Job).where(Job.owner == p.owner, Job.idempotency_key == idempotency_key)
                ).first()
            if prior is not None:
                if prior.request_hash != digest:
                    raise Problem(
                        409,
                        "Idempotency key reused",
                        "this Idempotency-Key was used with a different request",
                        "Idempotency-Key",
                    )
                return JSONResponse(
                    job_json(prior), 200, headers={"Location": f"/v1/jobs/{prior.id}"}
                )
        admission(p.owner, cost)
        job_id = new_id()
        buf = io.BytesIO()
        np.save(buf, y.numpy(), allow_pickle=False)
        try:
            results.put(job_id, "measurement.npy", buf.getvalue())
            if noise is not None:  # the ISMRMRD noise scan: the worker whitens with it
                buf = io.BytesIO()
                np.save(buf, noise, allow_pickle=False)
                results.put(job_id, "noise.npy", buf.getvalue())
        except OSError as exc:
            full = exc.errno == errno.ENOSPC
            log.error("result store refused a measurement: %s", exc.strerror or exc)
            raise Problem(
                507 if full else 503,
                "Result store full" if full else "Result store unavailable",
                "the measurement could not be stored, so nothing was queued; retry later "
                "(the operator has been told through the logs)",
                "measurement",
                retry_after=60,
            ) from None
        job = Job(
            id=job_id,
            kind="reconstruction",
            owner=p.owner,
            spec=parsed.model_dump(exclude_none=True),
            params=params,
            model=model,
            idempotency_key=idempotency_key,
            request_hash=digest,
            result_keys=[],
            cost=cost,
        )
        try:
            with jobs.session() as s:
                s.add(job)
        except IntegrityError:
            results.delete(job_id)
            raise Problem(
                409,
                "Idempotency key reused",
                "a concurrent request used this Idempotency-Key",
                "Idempotency-Key",
            ) from None
        jobs.audit("submit", "queued", p.key_id, p.owner, job_id)
        body = job_json(jobs.get(job_id))  # as queued: the worker may claim it at once
        executor.enqueue(job_id, "reconstruction")
        return JSONResponse(body, 202, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.get("/v1/jobs/{job_id}", tags=["jobs"])
    def get_job(job_id: str, p: Annotated[Principal, Depends(scope("recon:read"))]) -> dict:
        return job_json(own_job(job_id, p))

    @app.get("/v1/jobs", tags=["jobs"])
    def list_jobs(
        p: Annotated[Principal, Depends(scope("recon:read"))],
        state: Annotated[str | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,  # a database integer
    ) -> dict:
        if state is not None and state not in STATES:
            raise Problem(
                422, "Invalid state", f"state must be one of {', '.join(STATES)}", "state"
            )
        q = select(Job).where(Job.kind != "slab")  # a volume's parts are internal
        if not p.is_admin:
            q = q.where(Job.owner == p.owner)
        if state:
            q = q.where(Job.state == state)
        with jobs.sessions() as s:
            total = s.scalar(select(func.count()).select_from(q.subquery()))
            rows = s.scalars(
                q.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)
            ).all()
        nxt = offset + limit if offset + limit < total else None
        return {"items": [job_json(j) for j in rows], "total": total, "next_offset": nxt}

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"])
    def cancel_job(job_id: str, p: Annotated[Principal, Depends(scope("recon:submit"))]) -> dict:
        job = own_job(job_id, p)
        if job.state in FINAL:
            raise Problem(409, "Already finished", f"job {job_id} is {job.state}")
        jobs.set_fields(job_id, cancel_requested=True)
        jobs.transition(job_id, ["queued"], "cancelled", phase="cancelled")
        executor.cancel(job_id)  # a running job stops at its next step
        jobs.audit("cancel", "requested", p.key_id, p.owner, job_id)
        return job_json(jobs.get(job_id))

    @app.post("/v1/jobs/{job_id}/export", status_code=202, tags=["jobs"])
    def export(
        job_id: str, p: Annotated[Principal, Depends(scope("recon:submit"))], body: ExportRequest
    ) -> JSONResponse:
        job = own_job(job_id, p)
        if job.kind != "reconstruction" or job.state != "succeeded":
            raise Problem(
                409,
                "Nothing to export",
                f"job {job_id} is a {job.state} {job.kind} job; "
                "export needs a succeeded reconstruction",
            )
        if body.destination not in settings.pacs:
            known = ", ".join(sorted(settings.pacs)) or "none configured (SCORERECON_PACS)"
            raise Problem(
                422, "Unknown destination", f"destination must be one of: {known}", "destination"
            )
        export_id = jobs.add_export(job, body.destination)
        jobs.audit("export", f"to {body.destination}", p.key_id, p.owner, job_id)
        out = job_json(jobs.get(export_id))
        executor.enqueue(export_id, "export")
        return JSONResponse(out, 202, headers={"Location": f"/v1/jobs/{export_id}"})

    @app.get("/v1/jobs/{job_id}/result", tags=["jobs"])
    def result(
        job_id: str,
        p: Annotated[Principal, Depends(scope("recon:read"))],
        format: Annotated[str, Query(pattern="^(npy|std|baseline|phase|png|json|dicom)$")] = "npy",
    ) -> Response:
        job = own_job(job_id, p)
        if job.state != "succeeded":
            raise Problem(409, "No result", f"job {job_id} is {job.state}; poll until 'succeeded'")
        if format in ("dicom", "std", "baseline", "phase") and job.kind != "reconstruction":
            raise Problem(
                404, "No such result", f"a {job.kind} job has no {format} result", "format"
            )
        if format == "phase" and not _is_mri(job):
            raise Problem(404, "No such result", "only MRI reconstructions have a phase", "format")
        if job.kind == "training" and format != "json":
            raise Problem(
                404,
                "No such result",
                "a training job's result is its report (format=json); "
                "the model is in GET /v1/models",
                "format",
            )
        if format == "dicom":
            return Response(
                zip_series(job_series(job, results)),
                media_type="application/zip",
                headers={"Content-Disposition": f'attachment; filename="{job_id}-dicom.zip"'},
            )
        name, media = {
            "npy": (
                "samples.npy" if job.kind == "sampling" else "recon.npy",
                "application/octet-stream",
            ),
            "std": ("std.npy", "application/octet-stream"),
            "baseline": ("baseline.npy", "application/octet-stream"),
            "phase": ("phase.npy", "application/octet-stream"),
            "png": ("preview.png", "image/png"),
            "json": ("report.json", "application/json"),
        }[format]
        return Response(
            results.get(job_id, name),
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{job_id}-{name}"'},
        )

    @app.get("/v1/models", tags=["models"])
    def models(_: Annotated[Principal, Depends(principal)]) -> dict:
        """The usable models; a model folder whose card cannot be read is listed under
        ``unusable`` with the reason, so one broken folder never hides the others."""
        names, unusable = _model_catalogue(settings)
        return {
            "items": [_model_summary(n, settings) for n in names],
            "unusable": [{"id": n, "error": why} for n, why in unusable],
        }

    @app.get("/v1/models/{name}", tags=["models"])
    def model_card(name: str, _: Annotated[Principal, Depends(principal)]) -> dict:
        if name not in _model_names(settings):
            raise Problem(404, "Not found", f"no model '{name}'; see GET /v1/models")
        card = load_card(_model_path(name, settings))
        return _public(card)

    def admission(owner: str, cost: int) -> None:
        """The queue limits a new job must pass (429 with Retry-After): its owner's queued
        jobs, its owner's queued and running cost (an owner with none may always submit one
        job the per-request cap admits), the site's queued jobs."""
        queued, load = jobs.owner_load(owner)
        if queued >= settings.max_queued_per_owner:
            raise Problem(
                429,
                "Too many queued jobs",
                f"you have {queued} jobs queued, the most one owner may have "
                f"(SCORERECON_MAX_QUEUED_PER_OWNER = {settings.max_queued_per_owner}); "
                "retry when some have started, or cancel some (DELETE /v1/jobs/{id})",
                retry_after=30,
            )
        if cost and load and load + cost > settings.max_owner_cost:
            raise Problem(
                429,
                "Owner's work limit reached",
                f"your queued and running jobs cost {load:,} and this one {cost:,} "
                "(NFE × samples × slices × pixels); one owner may have at most "
                f"{settings.max_owner_cost:,} queued or running (SCORERECON_MAX_OWNER_COST); "
                "retry when some have finished, or cancel some (DELETE /v1/jobs/{id})",
                retry_after=60,
            )
        site = jobs.count_by_state()["queued"]
        if site >= settings.max_queue:
            raise Problem(
                429,
                "Queue full",
                f"{site} jobs are queued, the site's limit (SCORERECON_MAX_QUEUE); try again later",
                retry_after=30,
            )

    def _admin_job(
        p: Principal, kind: str, model: str, params: dict, cost: int = 0
    ) -> JSONResponse:
        admission(p.owner, cost)
        job_id = new_id()
        with jobs.session() as s:
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
        jobs.audit(f"submit-{kind}", "queued", p.key_id, p.owner, job_id)
        body = job_json(jobs.get(job_id))
        executor.enqueue(job_id, kind)
        return JSONResponse(body, 202, headers={"Location": f"/v1/jobs/{job_id}"})

    @app.post("/v1/admin/sampling", status_code=202, tags=["admin"])
    def admin_sampling(
        p: Annotated[Principal, Depends(scope("admin"))], body: SamplingRequest
    ) -> JSONResponse:
        if body.model not in _model_names(settings):
            raise Problem(
                422, "Unknown model", f"model '{body.model}' not found; see GET /v1/models", "model"
            )
        try:
            size = int(load_card(_model_path(body.model, settings))["image_size"])
        except (ModelError, KeyError, TypeError, ValueError):
            raise Problem(
                422, "Unusable model", f"model '{body.model}' has no usable image_size", "model"
            ) from None
        per_step = sampling_nfe(body.sampler, 1)
        factors = [Factor("steps", body.steps, 2, per_step), Factor("n", body.n)]
        _check_cost(settings, size * size, factors)
        cost = job_cost(sampling_nfe(body.sampler, body.steps), body.n, 1, size * size)
        return _admin_job(p, "sampling", body.model, body.model_dump(), cost)

    @app.post("/v1/admin/training", status_code=202, tags=["admin"])
    def admin_training(
        p: Annotated[Principal, Depends(scope("admin"))], body: TrainingRequest
    ) -> JSONResponse:
        source = body.model_dump(exclude_none=True)
        if body.data_dir is not None:
            source["data_dir"] = str(_registered_dir(body.data_dir, settings))
        elif body.dataset is not None:
            if not _dataset_dir(settings, body.dataset).is_dir():
                detail = f"no dataset {body.dataset}; upload one with POST /v1/admin/datasets"
                raise Problem(422, "Unknown dataset", detail, "dataset")
        else:
            dest = settings.pacs.get(body.pacs.destination)
            if dest is None or dest.get("kind") != "stowrs":
                web = sorted(n for n, d in settings.pacs.items() if d.get("kind") == "stowrs")
                raise Problem(
                    422,
                    "Unknown PACS",
                    "pacs.destination must be a DICOMweb destination: "
                    + (", ".join(web) or "none configured (SCORERECON_PACS)"),
                    "pacs.destination",
                )
        names, unusable = _model_catalogue(settings)
        if body.model_id in names or body.model_id in dict(unusable):
            raise Problem(
                409,
                "Model exists",
                f"model '{body.model_id}' exists; choose another model_id",
                "model_id",
            )
        return _admin_job(p, "training", body.model_id, source)

    @app.post("/v1/admin/datasets", status_code=201, tags=["admin"])
    def upload_dataset(
        p: Annotated[Principal, Depends(scope("admin"))],
        archive: Annotated[
            UploadFile,
            File(description=".zip, .tar or .tar.gz of DICOM series, NIfTI volumes, NPY or PNG"),
        ],
    ) -> dict:
        """An uploaded training archive, unpacked safely into a dataset for POST
        /v1/admin/training (``dataset``); returns what was found in it."""
        from models.data import scan

        raw = _read_limited(archive, settings.max_upload_mb, "archive")
        dataset_id = new_id()
        folder = _dataset_dir(settings, dataset_id)
        try:
            counts = extract(raw, folder, int(settings.max_upload_mb * 4 * 2**20))
        except ArchiveError as exc:
            raise Problem(422, "Invalid archive", str(exc), "archive") from None
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
        jobs.audit("upload-dataset", f"{counts['files']} files", p.key_id, p.owner)
        return {
            "id": dataset_id,
            **counts,
            "volumes": [v.describe() for v in found.volumes],
            "skipped": skipped[:50],
        }

    @app.post("/v1/admin/api-keys", status_code=201, tags=["admin"])
    def new_key(
        p: Annotated[Principal, Depends(scope("admin"))],
        body: dict,
    ) -> dict:
        scopes, owner = body.get("scopes", []), body.get("owner", "")
        if not isinstance(scopes, list) or not all(isinstance(x, str) for x in scopes):
            raise Problem(
                422,
                "Invalid key request",
                'scopes must be a list of scope names, e.g. ["recon:submit", "recon:read"]',
                "scopes",
            )
        if not isinstance(owner, str) or not 0 < len(owner) <= 128 or not owner.isprintable():
            raise Problem(
                422, "Invalid key request", "owner must be 1-128 printable characters", "owner"
            )
        try:
            key_id, key = create_key(jobs, scopes, owner)
        except ValueError as exc:
            raise Problem(422, "Invalid key request", str(exc), "scopes") from None
        jobs.audit("create-key", key_id, p.key_id, p.owner)
        return {"id": key_id, "key": key, "note": "shown once; store it now"}

    @app.delete("/v1/admin/api-keys/{key_id}", tags=["admin"])
    def delete_key(key_id: str, p: Annotated[Principal, Depends(scope("admin"))]) -> dict:
        if not revoke_key(jobs, key_id):
            raise Problem(404, "Not found", f"no active key {key_id!r}", "key_id")
        jobs.audit("revoke-key", key_id, p.key_id, p.owner)
        return {"id": key_id, "revoked": True}

    @app.get("/v1/admin/api-keys", tags=["admin"])
    def keys(_: Annotated[Principal, Depends(scope("admin"))]) -> dict:
        return {"items": list_keys(jobs)}

    @app.get("/v1/admin/audit", tags=["admin"])
    def audit(
        _: Annotated[Principal, Depends(scope("admin"))],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict:
        with jobs.sessions() as s:
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

    add_ui(
        app,
        Handlers(
            principal=credential_principal,
            submit=submit,
            admin_sampling=admin_sampling,
            admin_training=admin_training,
            new_key=new_key,
            delete_key=delete_key,
            list_keys=lambda: list_keys(jobs),
            own_job=own_job,
            list_jobs=list_jobs,
            models=lambda: _model_names(settings),
            model_card=lambda name: load_card(_model_path(name, settings)),
            model_dir=lambda name: resolve(_model_path(name, settings)),
            samplers=tuple(SAMPLERS),
            problem=Problem,
            scoped=lambda p, name: scope(name)(p),
            sampling_request=SamplingRequest,
            training_request=TrainingRequest,
            trusted_origins=tuple(settings.trusted_origins),
        ),
        results,
        job_json,
    )
    return app


def _check_cost(settings: Settings, pixels: int, factors: list[Factor]) -> None:
    """422 naming the field to lower, and how far, if the job costs more than one job may."""
    refused = over_cost(settings.max_job_cost, pixels, factors)
    if refused is not None:
        raise Problem(422, "Job too large", refused[1], refused[0])


def _read_limited(upload: UploadFile, max_mb: float, field: str = "measurement") -> bytes:
    limit = int(max_mb * 1024 * 1024)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise Problem(
            413,
            "Upload too large",
            f"the {field} upload exceeds {max_mb:g} MB (SCORERECON_MAX_UPLOAD_MB); "
            "send a smaller file",
            field,
        )
    return data


def _in_networks(peer: str, networks) -> bool:
    """Whether the peer's address (IPv4-mapped IPv6 as IPv4) lies in one of ``networks``."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:  # no address (a test client, a Unix socket)
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in n for n in networks)


def _is_hex_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)


def _parse_measurement(raw: bytes, spec) -> torch.Tensor:
    """The upload read and checked by the core (:mod:`models.measurements`): format, shape,
    dtype, finiteness; an archive bomb is refused before it is inflated."""
    try:
        return read_measurement(raw, spec)  # coil maps from the data: the worker's job
    except MeasurementTooLarge as exc:
        raise Problem(413, "Archive too large", str(exc), "measurement") from None
    except MeasurementError as exc:
        raise Problem(422, "Invalid measurement", str(exc), "measurement") from None


def _parse_noise_scan(raw: bytes, spec, y: torch.Tensor) -> np.ndarray | None:
    """An ISMRMRD file's noise scan, read and checked, when the worker whitens the coils."""
    if not needs_data(spec):
        return None
    try:
        return read_noise_scan(raw, int(y.shape[-3]))
    except MeasurementError as exc:
        raise Problem(422, "Invalid measurement", str(exc), "measurement") from None


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


def _dicom_source(raw: bytes) -> dict:
    try:
        return source_attributes(raw)
    except ValueError as exc:
        raise Problem(422, "Invalid source DICOM", str(exc), "source_dicom") from None


def _check_source_fits(
    slices: list[dict[str, str]], modality: str, count: int
) -> list[dict[str, str]]:
    """The source instances lend the series their study and each slice its geometry: images
    of the measurement's modality, with geometry, of one study, series and frame of
    reference, one per measured slice. Returned in slice order: by position along the
    slices' normal, as a volume's slices are stacked."""
    expected = "CT" if modality == "ct" else "MR"

    def refuse(detail: str) -> Problem:
        return Problem(422, "Invalid source DICOM", detail, "source_dicom")

    placed = []
    for sl in slices:
        found = sl.get("Modality", "")
        if found != expected:
            raise refuse(
                f"the source instance is {found or 'of no modality'} but the measurement is "
                f"{expected}; send instances of the {expected} series it was acquired with"
            )
        try:
            geometry = source_geometry(sl)
        except ValueError as exc:
            raise refuse(str(exc)) from None
        if geometry is None:
            raise refuse(
                "the source instance has no image geometry (ImagePositionPatient, "
                "ImageOrientationPatient, PixelSpacing): send images of the source series"
            )
        placed.append((slice_position(geometry), sl))
    if len(slices) != count:
        raise refuse(
            f"{len(slices)} source instance(s) for {count} measured slice(s); send one "
            "instance per slice (in any order), or the patient and study attributes alone "
            "as source (JSON)"
        )
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        if len({sl.get(key) for sl in slices}) > 1:
            raise refuse(f"the source instances differ in {key}: send the slices of one series")
    return [sl for _, sl in sorted(placed, key=lambda p: p[0])]


def _parse_source(text: str) -> dict:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise Problem(422, "Invalid source", "source must be a JSON object", "source") from None
    if not isinstance(data, dict):
        raise Problem(422, "Invalid source", "source must be a JSON object", "source")
    unknown = sorted(set(data) - set(SOURCE_KEYWORDS))
    if unknown:
        raise Problem(
            422,
            "Invalid source",
            f"unknown attributes {unknown}; use {', '.join(SOURCE_KEYWORDS)}",
            "source",
        )
    for k, v in data.items():
        if not isinstance(v, str) or len(v) > SOURCE_LIMIT[k]:
            raise Problem(
                422,
                "Invalid source",
                f"{k} must be a string of at most {SOURCE_LIMIT[k]} characters",
                f"source.{k}",
            )
    try:
        source_geometry(data)
    except ValueError as exc:
        raise Problem(422, "Invalid source", str(exc), "source") from None
    return _check_source(data, "source")


def _check_source(attributes: dict[str, str], field: str) -> dict[str, str]:
    """Source attributes that can be written into DICOM: printable text, and UIDs as UIDs."""
    for k, v in attributes.items():
        if k.endswith("UID") and not UID.fullmatch(v):
            detail = f"{k} must be a DICOM UID (digits and dots, e.g. 1.2.840.1234)"
            raise Problem(422, "Invalid source", detail, f"{field}.{k}")
        if not v.isprintable():
            detail = f"{k} must be printable text (no control characters)"
            raise Problem(422, "Invalid source", detail, f"{field}.{k}")
    return attributes


def _model_catalogue(settings: Settings) -> tuple[list[str], list[tuple[str, str]]]:
    """Usable model names (bundled, and model folders whose card reads as a JSON object),
    and (name, reason) for each model folder whose card cannot be read."""
    own, unusable = [], []
    for path in sorted(settings.models.glob("*/card.json")):
        try:
            load_card(path.parent)
        except ModelError as exc:
            reason = str(exc).replace(str(settings.models), "<models>")
            unusable.append((path.parent.name, reason))
        else:
            own.append(path.parent.name)
    return sorted(set(bundled_models()) | set(own)), unusable


def _model_names(settings: Settings) -> list[str]:
    return _model_catalogue(settings)[0]


def _public(card: dict) -> dict:
    """A model card as the API serves it: without the long loss curve, and with any absolute
    path (a card trained elsewhere may hold one) cut to its file name."""

    def clean(value):
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        if isinstance(value, str) and (value.startswith(("/", "~")) or value[1:3] == ":\\"):
            return Path(value).name
        return value

    return clean({k: v for k, v in card.items() if k != "loss_curve"})


def _model_path(name: str, settings: Settings):
    return name if name in bundled_models() else settings.models / name


def _model_summary(name: str, settings: Settings) -> dict:
    card = load_card(_model_path(name, settings))
    return {
        "id": name,
        "image_size": card.get("image_size"),
        "steps": card.get("total_steps", card.get("steps")),
        "sde": card.get("sde", {}).get("kind"),
        "links": {"self": f"/v1/models/{name}"},
    }


PATCH_WISE_MAX = 4  # a CT image's side may be up to this many times its prior's (512 for 128)


def _check_model(
    name: str, image_size: int | tuple[int, int], settings: Settings, modality: str
) -> dict:
    """The model's card, once the model exists, is usable and fits the modality; a CT image
    of another size than the prior's is reconstructed with the prior applied patch-wise, up
    to PATCH_WISE_MAX times its side (docs/benchmarks/speed.md measures 256² with a 128²
    prior; MR images of any size are, as their matrices are rectangular)."""
    if name not in _model_names(settings):
        raise Problem(
            422, "Unknown model", f"model '{name}' not found; see GET /v1/models", "model"
        )
    try:
        card = load_card(_model_path(name, settings))
    except ModelError as exc:
        raise Problem(422, "Unusable model", str(exc), "model") from None
    trained_on = card_modality(card, name)
    if trained_on is not None and trained_on != modality:
        raise Problem(
            422,
            "Model modality mismatch",
            f"model '{name}' is a {trained_on.upper()} prior but the spec's modality is "
            f"'{modality}'; choose a {modality.upper()} model (see GET /v1/models)",
            "model",
        )
    trained = int(card.get("image_size") or 0)
    if modality == "ct" and not (image_size == trained or image_size <= PATCH_WISE_MAX * trained):
        limit = PATCH_WISE_MAX * trained
        raise Problem(
            422,
            "Image size too large",
            f"model '{name}' reconstructs CT images up to {limit}² (its {trained}² prior "
            f"applied patch-wise); set the spec's image_size to {limit} or less",
            "spec.image_size",
        )
    return card
