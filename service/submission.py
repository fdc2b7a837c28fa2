"""A reconstruction request turned into a queued job, for the API and the console alike.

The spec and the measurement are checked by the core's own parser and operator
(``models.physics``, ``models.measurements``), the model by the catalogue, the cost and the
queue by service/limits.py; only then is the measurement stored and the job recorded. The
source DICOM (or source attributes) lend the result series its study and each slice its
geometry. Nothing stored changes on a refused request.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass

import numpy as np
import torch
from fastapi import UploadFile
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from models.inverse import RECON_SAMPLERS, ReconConfig, network_pixels
from models.measurements import (
    MeasurementError,
    MeasurementTooLarge,
    display_columns,
    read_measurement,
    read_noise_scan,
)
from models.physics import SpecError, needs_data, parse_spec
from service.auth import Principal
from service.catalogue import check_model
from service.db import BATCH_SLICES, Job, new_id, slab_ranges
from service.deps import Context
from service.dicom_export import LIMIT as SOURCE_LIMIT
from service.dicom_export import (
    SLICE_KEYWORDS,
    SOURCE_KEYWORDS,
    slice_position,
    source_attributes,
    source_geometry,
)
from service.fairness import Factor, job_cost
from service.limits import admission, check_cost, read_limited
from service.problems import Problem
from service.schemas import job_json

log = logging.getLogger(__name__)
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


@dataclass
class Submission:
    """The fields of a reconstruction request (the API's form, or the console's)."""

    measurement: UploadFile
    spec: str
    model: str = "ct-default"
    sampler: str = RECON_SAMPLERS[0]
    nfe: int | None = None
    samples: int | None = None
    seed: int = 0
    source: str | None = None
    source_dicom: list[UploadFile] | None = None
    export_to: str | None = None
    idempotency_key: str | None = None


def submit(ctx: Context, p: Principal, form: Submission) -> JSONResponse:
    """Check, store and queue the request: 202 with the job, or 200 with the job an
    Idempotency-Key already made for the same request."""
    settings = ctx.settings
    parsed = _spec(form.spec)
    _check_sampler_and_key(form)
    card = check_model(form.model, parsed.image_size, settings, parsed.modality)  # before the op
    raw = read_limited(form.measurement, settings.max_upload_mb)
    y = _measurement(raw, parsed)
    noise = _noise_scan(raw, parsed, y)
    params, cost = _params(ctx, card, parsed, y, form)
    if columns := display_columns(raw, parsed):  # the header's reconSpace, after solving
        params["display_columns"] = columns
    params |= _dicom_params(ctx, form, parsed.modality, len(y))
    if form.export_to is not None:
        params["export_to"] = check_destination(ctx, form.export_to, "export_to")
    digest = hashlib.sha256(
        raw + json.dumps([parsed.model_dump(), form.model, params], sort_keys=True).encode()
    ).hexdigest()
    if form.idempotency_key and (done := _replay(ctx, p, form.idempotency_key, digest)):
        return done
    admission(settings, ctx.jobs, p.owner, cost)
    job_id = _store(ctx, y, noise)
    job = Job(
        id=job_id,
        kind="reconstruction",
        owner=p.owner,
        spec=parsed.model_dump(exclude_none=True),
        params=params,
        model=form.model,
        idempotency_key=form.idempotency_key,
        request_hash=digest,
        result_keys=[],
        cost=cost,
    )
    _record(ctx, job)
    ctx.jobs.audit("submit", "queued", p.key_id, p.owner, job_id)
    return queue(ctx, job_id, "reconstruction")


def queue(ctx: Context, job_id: str, kind: str) -> JSONResponse:
    """Hand a recorded job to the executor: 202 with the job as queued (a worker may claim
    it at once) and its Location."""
    body = job_json(ctx.jobs.get(job_id))
    ctx.executor.enqueue(job_id, kind)
    return JSONResponse(body, 202, headers={"Location": f"/v1/jobs/{job_id}"})


def check_destination(ctx: Context, name: str, field: str) -> str:
    """A PACS destination named in SCORERECON_PACS; else 422 listing them."""
    if name not in ctx.settings.pacs:
        known = ", ".join(sorted(ctx.settings.pacs)) or "none configured (SCORERECON_PACS)"
        raise Problem(422, "Unknown destination", f"{field} must be one of: {known}", field)
    return name


def _spec(text: str):
    try:
        return parse_spec(text)
    except SpecError as exc:
        raise Problem(422, "Invalid spec", str(exc), "spec") from None


def _check_sampler_and_key(form: Submission) -> None:
    if form.sampler not in RECON_SAMPLERS:
        raise Problem(
            422,
            "Invalid sampler",
            f"sampler must be one of {', '.join(RECON_SAMPLERS)}",
            "sampler",
        )
    if form.idempotency_key is not None and not form.idempotency_key.isprintable():
        raise Problem(
            422,
            "Invalid Idempotency-Key",
            "Idempotency-Key must be printable text (no control characters)",
            "Idempotency-Key",
        )


def _params(ctx: Context, card: dict, parsed, y: torch.Tensor, form: Submission):
    """The job's parameters (the card's defaults for NFE and samples where the request
    names none) and its cost, checked against the per-job limit. One worker's share is what
    that limit bounds: a volume split into slabs (SCORERECON_SLAB_SLICES) costs each worker
    one slab; the owner's cap counts all."""
    multicoil = parsed.sensitivities == "espirit" or (parsed.coils or 1) > 1
    defaults = ReconConfig.from_card(
        card,
        parsed.modality,
        form.sampler,
        form.nfe,
        "multicoil" if multicoil else None,
        parsed.shape,
    )
    samples = defaults.samples if form.samples is None else form.samples
    nfe = defaults.n_steps * defaults.nfe_per_step() if form.nfe is None else form.nfe
    batch = 1 if needs_data(parsed) else BATCH_SLICES
    start, stop = slab_ranges(len(y), batch, ctx.settings.slab_slices)[0]
    label = "slices" if stop - start == len(y) else "slices per slab (SCORERECON_SLAB_SLICES)"
    pixels = network_pixels(card, parsed.shape, defaults)
    # A TV weight chosen by hold-out costs one single-sample solve per candidate beside the
    # K samples (models/holdout.py); the client cannot lower them, only K.
    holdout = len(defaults.holdout_candidates())
    factors = [
        Factor("nfe", nfe, 2),
        Factor("samples", samples, extra=holdout),
        Factor("measurement", stop - start, label=label),
    ]
    check_cost(ctx.settings, pixels, factors)
    params = {"sampler": form.sampler, "nfe": nfe, "samples": samples, "seed": form.seed}
    return params, job_cost(nfe, samples + holdout, len(y), pixels)


def _dicom_params(ctx: Context, form: Submission, modality: str, count: int) -> dict:
    """``dicom_source`` (the study's attributes) and ``dicom_slices`` (each slice's
    geometry) from the source instances and the source JSON (which takes precedence)."""
    params, attributes = {}, {}
    if form.source_dicom:
        max_mb = ctx.settings.max_upload_mb
        slices = [
            _check_source(_dicom_source(read_limited(f, max_mb, "source_dicom")), "source_dicom")
            for f in form.source_dicom
        ]
        slices = _check_source_fits(slices, modality, count)
        attributes = dict(slices[0])
        if len(slices) > 1:
            params["dicom_slices"] = [
                {k: v for k, v in sl.items() if k in SLICE_KEYWORDS} for sl in slices
            ]
    if form.source is not None:
        attributes.update(_parse_source(form.source))
    if attributes:
        params["dicom_source"] = attributes
    return params


def _replay(ctx: Context, p: Principal, key: str, digest: str) -> JSONResponse | None:
    """The job this owner's Idempotency-Key made (200), or None; 409 if it was made by a
    different request."""
    with ctx.jobs.sessions() as s:
        prior = s.scalars(
            select(Job).where(Job.owner == p.owner, Job.idempotency_key == key)
        ).first()
    if prior is None:
        return None
    if prior.request_hash != digest:
        raise Problem(
            409,
            "Idempotency key reused",
            "this Idempotency-Key was used with a different request",
            "Idempotency-Key",
        )
    return JSONResponse(job_json(prior), 200, headers={"Location": f"/v1/jobs/{prior.id}"})


def _store(ctx: Context, y: torch.Tensor, noise: np.ndarray | None) -> str:
    """A new job id with its measurement (and noise scan) in the result store; 507/503 if
    the store refuses, with nothing queued."""
    job_id = new_id()
    try:
        for name, array in (("measurement.npy", y.numpy()), ("noise.npy", noise)):
            if array is not None:  # the ISMRMRD noise scan: the worker whitens with it
                buf = io.BytesIO()
                np.save(buf, array, allow_pickle=False)
                ctx.results.put(job_id, name, buf.getvalue())
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
    return job_id


def _record(ctx: Context, job: Job) -> None:
    """Insert the job; a concurrent request with the same Idempotency-Key is a 409 and its
    stored measurement is removed."""
    try:
        with ctx.jobs.session() as s:
            s.add(job)
    except IntegrityError:
        ctx.results.delete(job.id)
        raise Problem(
            409,
            "Idempotency key reused",
            "a concurrent request used this Idempotency-Key",
            "Idempotency-Key",
        ) from None


def _measurement(raw: bytes, spec) -> torch.Tensor:
    """The upload read and checked by the core (:mod:`models.measurements`): format, shape,
    dtype, finiteness; an archive bomb is refused before it is inflated."""
    try:
        return read_measurement(raw, spec)  # coil maps from the data: the worker's job
    except MeasurementTooLarge as exc:
        raise Problem(413, "Archive too large", str(exc), "measurement") from None
    except MeasurementError as exc:
        raise Problem(422, "Invalid measurement", str(exc), "measurement") from None


def _noise_scan(raw: bytes, spec, y: torch.Tensor) -> np.ndarray | None:
    """An ISMRMRD file's noise scan, read and checked, when the worker whitens the coils."""
    if not needs_data(spec):
        return None
    try:
        return read_noise_scan(raw, int(y.shape[-3]))
    except MeasurementError as exc:
        raise Problem(422, "Invalid measurement", str(exc), "measurement") from None


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
