"""Thin job runners: claim the job, call the core, store the results, set the final state.

The same functions run inside a Celery task (``workers/celery_app.py``, next issue) or in
the gateway's embedded executor. A job is claimed by compare-and-set (``queued`` →
``running``), so a re-delivered message never runs a finished or running job again.
Progress is written to the job row about once a second; the cancel flag is read at every
step, from the database at most every ``CANCEL_POLL_S``, so a cancel takes effect within a
step (or 50 ms, for steps shorter than that).
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models.baselines import baseline_name, reconstruct_baseline
from models.figures import preview
from models.inverse import (
    Cancelled,
    Prior,
    ReconConfig,
    Reconstruction,
    centre_columns,
    merge,
    reconstruct,
)
from models.io import save_png
from models.physics import SpecError, needs_data, parse_spec, slice_problems
from models.physics.ct import remove_metal_trace
from models.registry import ModelError
from service.db import (
    ADMITTED,
    BATCH_SLICES,
    FINAL,
    Job,
    JobStore,
    auto_export_id,
    now,
    slab_id,
    slab_ranges,
)
from service.results import ResultStore

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.05  # the cancel flag is read from the database at most this often
# The executor's checkpoint, run at every step of the job running in this thread (the
# embedded executor's fair share: the job may wait there for another owner's turn); it
# answers True when the job has been cancelled. Unset in Celery workers.
AT_STEP: ContextVar[Callable[[], bool] | None] = ContextVar("at_step", default=None)


@lru_cache(maxsize=4)
def load_prior(model: str, bf16: bool | None = None) -> Prior:
    """Priors are cached per process: loading and checking a model costs more than a step.
    ``bf16``: the site's setting (``None``: where the hardware runs it fast)."""
    return Prior.load(model, bf16=bf16)


def resolve_model(name: str, models_dir: Path) -> str:
    """An admin-trained model under ``models_dir`` shadows nothing: bundled names win."""
    from models.registry import bundled_models

    if name in bundled_models():
        return name
    candidate = models_dir / name
    if (candidate / "card.json").exists():
        return str(candidate)
    raise ModelError(f"model '{name}' not found; see GET /v1/models")


class _Throttle:
    """Calls ``fn`` at most once per ``period`` seconds (and always on the last step)."""

    def __init__(self, period: float = 1.0):
        self.period, self.last = period, 0.0

    def due(self, final: bool = False) -> bool:
        t = time.monotonic()
        if final or t - self.last >= self.period:
            self.last = t
            return True
        return False


class Transient(RuntimeError):
    """A failure worth retrying (database or storage briefly unavailable)."""


def _stale(job, stale_after_s: float) -> bool:
    """A running job whose worker has not beaten for ``stale_after_s`` (it died)."""
    beat = job.heartbeat_at
    if job.state != "running" or beat is None:
        return False
    if beat.tzinfo is None:
        beat = beat.replace(tzinfo=dt.UTC)  # SQLite returns naive UTC datetimes
    return (now() - beat).total_seconds() > stale_after_s


def _claim(job, jobs: JobStore, stale_after_s: float) -> bool:
    """queued → running, or reclaim a running job whose worker stopped beating."""
    fields = {
        "started_at": now(),
        "heartbeat_at": now(),
        "attempts": job.attempts + 1,
        "phase": "loading",
    }
    if job.state == "queued":
        return jobs.transition(job.id, ["queued"], "running", **fields)
    if _stale(job, stale_after_s):
        log.warning("job %s: reclaiming from a worker silent for %.0f s", job.id, stale_after_s)
        return jobs.transition(
            job.id, ["running"], "running", expect={"heartbeat_at": job.heartbeat_at}, **fields
        )
    return False


def run_job(
    job_id: str,
    jobs: JobStore,
    results: ResultStore,
    models_dir: Path,
    stale_after_s: float = 120.0,
    settings=None,
    enqueue: Callable[[str, str], None] | None = None,
) -> str:
    """Run one job (reconstruction, sampling, training, export, or a slab of a volume) to a
    final state; returns that state (or 'skipped'; 'waiting' for a volume whose slabs
    run). A reconstruction that asked for ``export_to`` queues its export job when it
    succeeds, through ``enqueue(job_id, kind)`` (else the sweep finds it); the slab that
    ends last settles its volume."""
    state = _run_one(job_id, jobs, results, models_dir, stale_after_s, settings, enqueue)
    job = jobs.get(job_id)
    if job is not None and job.kind == "slab" and job.state in FINAL:
        volume_id = job.params["volume"]
        if _settle(volume_id, jobs, results) == "succeeded":
            volume = jobs.get(volume_id)
            log.info("job %s succeeded (from %d slabs)", volume_id, len(volume.params["slabs"]))
            if volume.params.get("export_to"):
                failpoint("before-export")
                _chain_export(volume_id, volume.params["export_to"], jobs, enqueue)
    return state


def _run_one(
    job_id: str,
    jobs: JobStore,
    results: ResultStore,
    models_dir: Path,
    stale_after_s: float,
    settings,
    enqueue: Callable[[str, str], None] | None,
) -> str:
    try:
        job = jobs.get(job_id)
    except OperationalError as exc:
        raise Transient(f"database unavailable: {exc.__class__.__name__}") from exc
    if job is None or job.state in FINAL:
        return "skipped"
    if job.cancel_requested:
        jobs.transition(job_id, ["queued"], "cancelled", finished_at=now(), phase="cancelled")
        return "cancelled"
    max_attempts = 1 + (settings.max_retries if settings is not None else 3)
    if job.state == "queued" and job.attempts >= max_attempts:
        # Transient failures (an unreachable PACS, a storage hiccup) are retried, not forever.
        reason = job.error or "transient failures"
        jobs.transition(
            job_id,
            ["queued"],
            "failed",
            finished_at=now(),
            phase="failed",
            error=f"gave up after {job.attempts} attempts: {reason}",
        )
        return "failed"
    if job.state == "running" and job.attempts >= max_attempts and _stale(job, stale_after_s):
        # A poison job: every worker that ran it died (out of memory, a crash in native code).
        jobs.transition(
            job_id,
            ["running"],
            "failed",
            expect={"heartbeat_at": job.heartbeat_at},
            finished_at=now(),
            phase="failed",
            error=f"the worker running this job died {job.attempts} times; not retried again "
            "(too large for the worker's memory? the operator's logs have the details)",
        )
        log.error("job %s failed: its worker died %d times", job_id, job.attempts)
        return "failed"
    if not _claim(job, jobs, stale_after_s):
        return "skipped"
    log.info("job %s started (attempt %d)", job_id, job.attempts + 1)
    try:
        state = RUNNERS[job.kind](job, jobs, results, models_dir, settings, enqueue)
    except Cancelled:
        jobs.transition(job_id, ["running"], "cancelled", finished_at=now(), phase="cancelled")
        state = "cancelled"
    except (SpecError, ModelError, ValueError) as exc:
        jobs.transition(
            job_id, ["running"], "failed", finished_at=now(), phase="failed", error=str(exc)
        )
        state = "failed"
    except (OperationalError, OSError) as exc:
        # Back to the queue (if the database lets us) and retried by the caller.
        try:
            jobs.transition(job_id, ["running"], "queued", phase="retrying", error=str(exc))
        except OperationalError:
            pass  # the sweep will find the stale running job
        raise Transient(f"{type(exc).__name__}: {exc}") from exc
    except SoftTimeLimitExceeded:
        limit = settings.time_limits_s.get(job.kind) if settings is not None else None
        jobs.transition(
            job_id,
            ["running"],
            "failed",
            finished_at=now(),
            phase="failed",
            error=f"stopped at the time limit of a {job.kind} job ({limit} s, "
            "SCORERECON_TIME_LIMITS_S); ask for less work (fewer NFE, samples or slices), or "
            "have the operator raise the limit",
        )
        log.error("job %s stopped at its time limit (%s s)", job_id, limit)
        state = "failed"
    except Exception as exc:  # noqa: BLE001 - the job must reach a final state
        log.exception("job %s crashed", job_id)
        jobs.transition(
            job_id,
            ["running"],
            "failed",
            finished_at=now(),
            phase="failed",
            error=f"internal error ({type(exc).__name__}); the operator's logs have the details",
        )
        state = "failed"
    log.info("job %s %s", job_id, state)
    if state == "succeeded" and job.params.get("export_to"):
        failpoint("before-export")
        _chain_export(job_id, job.params["export_to"], jobs, enqueue)
    return state


def failpoint(name: str) -> None:
    """Fault injection for the reliability suite: with ``SCORERECON_FAILPOINT=name`` in its
    environment the process dies here at once, as a crash or an out-of-memory kill would
    (no cleanup, no final database write)."""
    if os.environ.get("SCORERECON_FAILPOINT") == name:
        log.error("failpoint %s: exiting as a crash would", name)
        os._exit(137)


def _chain_export(job_id: str, destination: str, jobs: JobStore, enqueue) -> None:
    """The automatic export of a reconstruction, under an id derived from the job's, so a
    re-run of this step queues it once."""
    export_id = auto_export_id(job_id, destination)
    jobs.add_export(jobs.get(job_id), destination, export_id)
    jobs.audit("export", f"to {destination} (automatic)", None, None, job_id)
    if enqueue is not None:
        enqueue(export_id, "export")


def sweep(
    jobs: JobStore,
    enqueue: Callable[[str], None],
    requeue_after_s: float,
    stale_after_s: float,
    owner_slots: int | None = None,
) -> dict:
    """Recovery, safe to run any number of times: re-enqueue queued jobs whose message may
    be lost and running jobs whose heartbeat is older than ``stale_after_s`` (their worker
    died); the claim's compare-and-set makes a duplicate message harmless.

    Without ``owner_slots`` (the embedded executor, whose queue is in memory) a queued job is
    re-enqueued once it is older than ``requeue_after_s``. With it (Celery), a queued job
    whose message was sent more than ``requeue_after_s`` ago is sent again, and jobs never
    sent wait for their owner's turn: :func:`admit` sends them round-robin by owner.
    """
    cutoff_q = now() - dt.timedelta(seconds=requeue_after_s)
    cutoff_r = now() - dt.timedelta(seconds=stale_after_s)
    lost = Job.created_at < cutoff_q if owner_slots is None else Job.sent_at < cutoff_q
    with jobs.sessions() as s:
        queued = s.scalars(select(Job.id).where(Job.state == "queued", lost)).all()
        silent = s.scalars(
            select(Job).where(Job.state == "running", Job.heartbeat_at < cutoff_r)
        ).all()
    # A volume split into slabs has no worker of its own: its parts are the jobs that may be
    # orphaned. It is run again only once all its parts have ended (the worker that ended
    # the last one died before assembling it) or some were never created.
    stale = [j.id for j in silent if not j.params.get("slabs") or _parts_ended(jobs, j)]
    for job_id in queued:
        if owner_slots is not None:
            jobs.set_fields(job_id, sent_at=now())  # resent now: not again for a while
        enqueue(job_id)
    for job_id in stale:
        enqueue(job_id)
    exports = recreate_exports(jobs)
    if owner_slots is None:  # with Celery, admit() below sends them
        for export_id in exports:
            enqueue(export_id)
    report = {"requeued": len(queued), "orphaned": len(stale), "exports": len(exports)}
    if owner_slots is not None:
        report["admitted"] = admit(jobs, enqueue, owner_slots)
    return report


def _parts_ended(jobs: JobStore, volume) -> bool:
    return all(p is None or p.state in FINAL for p in _parts(jobs, volume))


# How far back the sweep looks for succeeded reconstructions whose export is missing.
EXPORT_RECOVERY_WINDOW = dt.timedelta(days=7)


def recreate_exports(jobs: JobStore, window: dt.timedelta = EXPORT_RECOVERY_WINDOW) -> list[str]:
    """The automatic exports that succeeded reconstructions with ``export_to`` lack (a worker
    that died between the success and the export's creation), created now; their ids. The
    export's id is derived from the job's, so this never makes a second one."""
    since = now() - window
    with jobs.sessions() as s:
        rows = s.execute(
            select(Job.id, Job.params).where(
                Job.kind == "reconstruction", Job.state == "succeeded", Job.finished_at >= since
            )
        ).all()
        wanted = {
            auto_export_id(job_id, params["export_to"]): (job_id, params["export_to"])
            for job_id, params in rows
            if (params or {}).get("export_to")
        }
        present = set(s.scalars(select(Job.id).where(Job.id.in_(list(wanted)))).all())
    created = []
    for export_id, (job_id, destination) in wanted.items():
        if export_id in present:
            continue
        jobs.add_export(jobs.get(job_id), destination, export_id)
        jobs.audit(
            "export", f"to {destination} (automatic, recreated by the sweep)", None, None, job_id
        )
        log.warning("job %s: its automatic export to %s was missing; created", job_id, destination)
        created.append(export_id)
    return created


def admit(
    jobs: JobStore,
    enqueue: Callable[[str], None],
    owner_slots: int,
    owners: Iterable[str] | None = None,
) -> int:
    """Send the jobs waiting in the database (queued, never sent): one per owner in turn,
    each owner's oldest first, while the owner has fewer than ``owner_slots`` jobs sent or
    running (:meth:`JobStore.admit`; training and export are not limited). Run by the
    sweep, and by a worker when it finishes a job (for that job's owner), so a freed slot
    is filled at once. Returns how many were sent."""
    q = select(Job.id, Job.owner, Job.kind).where(Job.state == "queued", Job.sent_at.is_(None))
    if owners is not None:
        q = q.where(Job.owner.in_(list(owners)))
    with jobs.sessions() as s:
        rows = s.execute(q.order_by(Job.created_at, Job.id)).all()
    waiting: dict[str, deque] = {}
    for row in rows:
        waiting.setdefault(row.owner, deque()).append(row)
    sent = 0
    while waiting:
        for owner in list(waiting):
            rest = waiting[owner]
            job_id, _, kind = rest.popleft()
            if kind not in ADMITTED:
                jobs.set_fields(job_id, sent_at=now())
            elif not jobs.admit(job_id, owner, owner_slots):
                # No free slot (or the job went meanwhile): only unlimited kinds remain.
                rest = waiting[owner] = deque(r for r in rest if r.kind not in ADMITTED)
                job_id = None
            if job_id is not None:
                enqueue(job_id)
                sent += 1
            if not rest:
                del waiting[owner]
    return sent


def _reconstruct(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """A reconstruction job: the whole stack here, or, for a volume of more than the site's
    ``slab_slices``, its slabs as ``slab`` jobs that any workers run (:func:`_split`)."""
    spec = parse_spec(job.spec)
    y = _measurement(job, results)
    slabs = job.params.get("slabs") or slab_ranges(
        len(y), _batch(job, spec), getattr(settings, "slab_slices", 0)
    )
    if len(slabs) > 1:
        return _split(job, jobs, results, [tuple(r) for r in slabs], enqueue)
    progress = _stack_progress(job, jobs, len(y))
    solved = _solve(
        job, jobs, results, models_dir, settings, y, 0, _cancel_check(job, jobs), progress
    )
    return _store_reconstruction(job, jobs, results, *solved)


def _measurement(job, results: ResultStore) -> torch.Tensor:
    return torch.from_numpy(
        np.load(io.BytesIO(results.get(job.id, "measurement.npy")), allow_pickle=False)
    )


def _batch(job, spec) -> int:
    """Slices per batch: 1 for per-slice problems (coil maps from each slice's data)."""
    return 1 if needs_data(spec) else max(1, int(job.params.get("batch_slices", BATCH_SLICES)))


def _solve(
    job,
    jobs: JobStore,
    results: ResultStore,
    models_dir: Path,
    settings,
    y: torch.Tensor,
    first: int,
    cancel: Callable[[], bool],
    progress: Callable[[int, int], None],
) -> tuple[Reconstruction, torch.Tensor, dict]:
    """Reconstruct ``y``, slices ``first``… of ``job``'s measurement (the index fixes each
    slice's random stream): the core's result, the classical baseline, and how it was done
    (for the report)."""
    spec, params = parse_spec(job.spec), job.params
    # One operator for the stack, or one per slice (maps and whitening from its own data).
    noise, coil_noise = None, None
    if needs_data(spec):
        coil_noise = "oversampled readout" if y.shape[-2] == 2 * spec.shape[0] else "readout ends"
        if results.exists(job.id, "noise.npy"):
            noise = torch.from_numpy(
                np.load(io.BytesIO(results.get(job.id, "noise.npy")), allow_pickle=False)
            )
            coil_noise = f"noise scan ({noise.shape[-1]} samples per coil)"
    ops, y = slice_problems(spec, y, noise)
    op = ops[0]
    expected = tuple(op.measurement_shape())
    if y.ndim != len(expected) + 1 or tuple(y.shape[1:]) != expected:
        raise ValueError(f"stored measurement {tuple(y.shape)} does not match the spec {expected}")
    base = torch.cat(
        [reconstruct_baseline(o, y[i : i + 1], baseline_name(o)) for i, o in enumerate(ops)]
    )
    if spec.metal_threshold_hu is not None:
        op, y, _ = remove_metal_trace(op, y, threshold_hu=spec.metal_threshold_hu)
        ops = [op] * len(y)
    prior = load_prior(resolve_model(job.model, models_dir), getattr(settings, "bf16", None))
    config = ReconConfig.for_prior(
        prior, spec.modality, params.get("sampler"), params.get("nfe"), ops[0]
    )
    # The stack runs in batches of ``batch_slices`` (× K samples each), in slice order;
    # progress counts steps over all batches.
    k = int(params.get("samples") or config.samples)  # none named: the card's default
    per = _batch(job, spec)
    chunks = list(range(0, y.shape[0], per))
    parts = []
    for c, start in enumerate(chunks):

        def chunk_progress(step: int, total: int, c: int = c) -> None:
            progress(c * total + step, len(chunks) * total)

        part = reconstruct(
            ops[start],
            y[start : start + per],
            prior,
            config,
            k,
            int(params.get("seed", 0)) + first + start,
            spec.noise_std,
            chunk_progress,
            cancel,
        )
        if part.diverged is not None:
            # Never a success: a diverged result would be exported and read as an image.
            raise ValueError(f"the reconstruction diverged ({part.diverged})")
        parts.append(part)
    info = {
        "baseline": baseline_name(op),
        "batch_slices": per,
        "steps": config.n_steps * config.nfe_per_step() * len(chunks),
    }
    if coil_noise is not None:  # where the coil noise covariance for pre-whitening came from
        info["coil_noise_source"] = coil_noise
    return merge(parts), base, info


def _store_reconstruction(
    job, jobs: JobStore, results: ResultStore, rec: Reconstruction, base: torch.Tensor, info: dict
) -> str:
    """Store a reconstruction's arrays, preview and report.json, and succeed the job; an
    MR image solved on more encoded columns than its header displays is cropped, centred,
    to them (``display_columns``, fastMRI's reconSpace)."""
    # Compare-and-set: a second assembler of a volume must not touch a finished job.
    jobs.transition(job.id, ["running"], "running", phase="storing")
    columns = job.params.get("display_columns")
    if columns and columns < rec.mean.shape[-1]:
        info = {**info, "reconstructed_columns": int(rec.mean.shape[-1])}
        rec, base = rec.centre_columns(columns), centre_columns(base, columns)
    _put_npy(results, job.id, "recon.npy", rec.mean.numpy())
    _put_npy(results, job.id, "std.npy", rec.std.numpy())
    _put_npy(results, job.id, "baseline.npy", base.numpy())
    if rec.phase is not None:  # MR images are complex: their phase, in radians
        _put_npy(results, job.id, "phase.npy", rec.phase.numpy())
    image, scale = preview(rec.mean[0], rec.std[0], base[0])
    buf = io.BytesIO()
    save_png(buf, image)
    results.put(job.id, "preview.png", buf.getvalue())
    report = {
        "nfe": rec.nfe,
        "seconds": round(rec.seconds, 3),
        "residual": rec.residual,
        "slices": int(rec.mean.shape[0]),
        "noise_std_used": rec.noise_std_used,
        "noise_std_source": rec.provenance["noise_std_source"],
        "warnings": rec.warnings,
        "provenance": {**rec.provenance, "spec": job.spec, "batch_slices": info["batch_slices"]},
        "preview": f"reconstruction | posterior std (max {scale:.4g}) | {info['baseline']}",
        "baseline": info["baseline"],
    }
    for key in ("coil_noise_source", "slabs", "reconstructed_columns"):
        if key in info:
            report[key] = info[key]
    fields = {"progress_step": info["steps"], "progress_total": info["steps"]}
    keys = ["recon.npy", "std.npy", "baseline.npy", "preview.png"]
    keys += ["phase.npy"] if rec.phase is not None else []
    return _succeed(job, jobs, results, report, keys, **fields)


def _sampling_phase(done: float, slices: int) -> str:
    """The phase a stack shows while it samples: how many of its slices are done."""
    return f"sampling {int(done + 1e-6)}/{slices} slices" if slices > 1 else "sampling"


def _stack_progress(job, jobs: JobStore, slices: int) -> Callable[[int, int], None]:
    """Progress of a stack solved here: steps over all its batches, slices done (a slice is
    done when its batch's share of the steps is; the batches have equal step counts)."""
    tick = _Throttle()

    def progress(step: int, total: int, *_: object) -> None:
        if tick.due(step == total):
            phase = _sampling_phase(slices * step / max(total, 1), slices)
            jobs.set_fields(
                job.id, progress_step=step, progress_total=total, phase=phase, heartbeat_at=now()
            )

    return progress


# Volumes split into slabs (issue 22): one job to the client, its parts run by any workers.


def _split(job, jobs: JobStore, results: ResultStore, slabs: list[tuple[int, int]], enqueue) -> str:
    """Record the volume's slabs, create a ``slab`` job for each (once: their ids derive
    from the volume's) and queue the new ones; the volume then waits, ``running``, while its
    parts run, and the part that finishes last assembles it (:func:`_settle`). Idempotent,
    so a volume run again after a crash picks up where it was."""
    if job.params.get("slabs") != [list(r) for r in slabs]:
        jobs.set_fields(job.id, params={**job.params, "slabs": [list(r) for r in slabs]})
    jobs.set_fields(job.id, phase=_sampling_phase(0, slabs[-1][1]), heartbeat_at=now())
    volume = jobs.get(job.id)
    for part in jobs.add_slabs(volume, slabs):
        if enqueue is not None:  # else the sweep sends it
            enqueue(part, "slab")
    return _settle(job.id, jobs, results)


def _parts(jobs: JobStore, volume) -> list:
    return jobs.get_many([slab_id(volume.id, start) for start, _ in volume.params["slabs"]])


def _slab(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """One slab of a volume: its slices solved as the unsplit job would solve them (same
    batches, same random streams), stored as ``slab.npz`` + ``slab.json`` for assembly."""
    volume = jobs.get(job.params["volume"])
    if volume is None or volume.state != "running":
        jobs.transition(job.id, ["running"], "cancelled", finished_at=now(), phase="cancelled")
        return "cancelled"
    start, stop = job.params["start"], job.params["stop"]
    y = _measurement(volume, results)[start:stop]
    own, check = _cancel_check(job, jobs), _Throttle(CANCEL_POLL_S)

    def cancel() -> bool:
        if own():
            return True
        if not check.due():
            return False
        current = jobs.get(volume.id)
        return current is None or current.cancel_requested or current.state != "running"

    progress = _slab_progress(job, volume, jobs)
    rec, base, info = _solve(
        volume, jobs, results, models_dir, settings, y, start, cancel, progress
    )
    arrays = {"mean": rec.mean.numpy(), "std": rec.std.numpy(), "baseline": base.numpy()}
    if rec.phase is not None:
        arrays["phase"] = rec.phase.numpy()
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    results.put(job.id, "slab.npz", buf.getvalue())
    meta = {
        "nfe": rec.nfe,
        "seconds": rec.seconds,
        "residual": rec.residual,
        "provenance": rec.provenance,
        "noise_std_used": rec.noise_std_used,
        "warnings": rec.warnings,
        "info": info,
    }
    results.put(job.id, "slab.json", json.dumps(meta).encode())
    steps = info["steps"]
    return _succeed(
        job,
        jobs,
        results,
        {"slices": [start, stop], "worker": f"{socket.gethostname()}:{os.getpid()}"},
        ["slab.npz", "slab.json"],
        progress_step=steps,
        progress_total=steps,
    )


def _slab_progress(job, volume, jobs: JobStore) -> Callable[[int, int], None]:
    """A slab's progress, and its volume's: steps summed over the parts (a part not started
    counted at this one's steps per slice), slices done, and the volume's heartbeat."""
    tick = _Throttle()
    slices = volume.params["slabs"][-1][1]
    mine = job.params["stop"] - job.params["start"]

    def progress(step: int, total: int, *_: object) -> None:
        if not tick.due(step == total):
            return
        jobs.set_fields(job.id, progress_step=step, progress_total=total, heartbeat_at=now())
        done_steps = all_steps = done_slices = 0.0
        for (start, stop), part in zip(volume.params["slabs"], _parts(jobs, volume), strict=True):
            n = stop - start
            if part is None or not part.progress_total:
                all_steps += total * n / mine
                continue
            fraction = part.progress_step / part.progress_total
            done_steps += part.progress_step
            all_steps += part.progress_total
            done_slices += n * fraction
        jobs.set_fields(
            volume.id,
            progress_step=int(done_steps),
            progress_total=int(all_steps),
            phase=_sampling_phase(done_slices, slices),
            heartbeat_at=now(),
        )

    return progress


def _settle(volume_id: str, jobs: JobStore, results: ResultStore) -> str:
    """After a part of a volume ends: the volume fails with the first failed part, is
    cancelled with a cancelled one, or, once every part has succeeded, is assembled from
    them as the unsplit job would have stored it. Returns the volume's state ('waiting'
    while parts run); safe to call from any number of workers at once (the volume's final
    transition is a compare-and-set, and the parts' arrays are the same whoever reads)."""
    volume = jobs.get(volume_id)
    if volume is None or volume.state != "running":
        return "skipped"
    parts = _parts(jobs, volume)
    missing = [
        start for (start, _), p in zip(volume.params["slabs"], parts, strict=True) if p is None
    ]
    if missing:  # the volume's worker died while it created them: the sweep's re-run does
        return "waiting"
    bad = next((p for p in parts if p.state in ("failed", "cancelled")), None)
    if bad is not None or volume.cancel_requested:
        for p in parts:
            if p.state not in FINAL:
                jobs.set_fields(p.id, cancel_requested=True)
        if volume.cancel_requested or (bad is not None and bad.state == "cancelled"):
            jobs.transition(
                volume_id, ["running"], "cancelled", finished_at=now(), phase="cancelled"
            )
            return "cancelled"
        start, stop = bad.params["start"], bad.params["stop"]
        jobs.transition(
            volume_id,
            ["running"],
            "failed",
            finished_at=now(),
            phase="failed",
            error=f"slices {start}-{stop - 1}: {bad.error}",
        )
        return "failed"
    if any(p.state != "succeeded" for p in parts):
        return "waiting"
    recs, bases, steps = [], [], 0
    for p in parts:
        arrays = np.load(io.BytesIO(results.get(p.id, "slab.npz")), allow_pickle=False)
        meta = json.loads(results.get(p.id, "slab.json"))
        steps += meta["info"]["steps"]
        mean = torch.from_numpy(arrays["mean"])
        recs.append(
            Reconstruction(
                mean=mean,
                std=torch.from_numpy(arrays["std"]),
                samples=mean[:, :0],
                nfe=meta["nfe"],
                residual=meta["residual"],
                seconds=meta["seconds"],
                provenance=meta["provenance"],
                noise_std_used=meta["noise_std_used"],
                phase=torch.from_numpy(arrays["phase"]) if "phase" in arrays.files else None,
                warnings=meta["warnings"],
            )
        )
        bases.append(torch.from_numpy(arrays["baseline"]))
    info = {**meta["info"], "steps": steps, "slabs": volume.params["slabs"]}
    return _store_reconstruction(volume, jobs, results, merge(recs), torch.cat(bases), info)


def _put_npy(results: ResultStore, job_id: str, name: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    results.put(job_id, name, buf.getvalue())


def _succeed(
    job, jobs: JobStore, results: ResultStore, report: dict, keys: list[str], **fields
) -> str:
    """Write report.json, then mark the job succeeded with its result keys (CAS: a job
    cancelled meanwhile stays cancelled)."""
    results.put(job.id, "report.json", json.dumps(report, indent=2).encode())
    done = jobs.transition(
        job.id,
        ["running"],
        "succeeded",
        finished_at=now(),
        phase="done",
        result_keys=[*keys, "report.json"],
        **fields,
    )
    return "succeeded" if done else "cancelled"


def _progress_writer(job, jobs: JobStore, phase: str):
    tick = _Throttle()

    def progress(step: int, total: int, *_: object) -> None:
        if tick.due(step == total):
            jobs.set_fields(
                job.id, progress_step=step, progress_total=total, phase=phase, heartbeat_at=now()
            )

    return progress


def _cancel_check(job, jobs: JobStore):
    """The cancel check a runner passes to the core, called at every step: the executor's
    checkpoint (``AT_STEP``: fair share, immediate cancel), then the job's cancel flag, read
    from the database at most every ``CANCEL_POLL_S`` (a cancel sent to another process)."""
    check = _Throttle(CANCEL_POLL_S)
    at_step = AT_STEP.get()

    def cancel() -> bool:
        if at_step is not None and at_step():
            return True
        if not check.due():
            return False
        current = jobs.get(job.id)
        return current is not None and current.cancel_requested

    return cancel


def _sample(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """Admin sampling: n samples from a prior with a named sampler; NPY and a grid PNG."""
    from models.figures import grid
    from models.sampling.registry import sample

    params = job.params
    prior = load_prior(resolve_model(job.model, models_dir), getattr(settings, "bf16", None))
    n, size = int(params.get("n", 16)), prior.image_size
    gen = torch.Generator().manual_seed(int(params.get("seed", 0)))
    res = sample(
        params.get("sampler", "pc"),
        prior.sde,
        prior.score_fn,
        (n, 1, size, size),
        int(params.get("steps", 500)),
        generator=gen,
        progress=_progress_writer(job, jobs, "sampling"),
        cancel=_cancel_check(job, jobs),
    )
    _put_npy(results, job.id, "samples.npy", res.samples.numpy())
    buf = io.BytesIO()
    save_png(buf, grid(res.samples))
    results.put(job.id, "preview.png", buf.getvalue())
    report = {"nfe": res.nfe, "n": n, "sampler": params.get("sampler", "pc"), "model": job.model}
    return _succeed(job, jobs, results, report, ["samples.npy", "preview.png"])


def _training_data(job, jobs: JobStore, settings) -> Path:
    """The folder to train on: registered, uploaded (a dataset), or retrieved from a PACS
    into a folder of the job's own (kept, so a retried job does not fetch twice)."""
    from service.settings import Settings

    p = job.params
    if "data_dir" in p:
        return Path(p["data_dir"])
    settings = settings or Settings()
    if "dataset" in p:
        return settings.home / "datasets" / p["dataset"]
    from service.pacs import Destination, PermanentError, TransientError, retrieve

    out = settings.home / "datasets" / f"pacs-{job.id}"
    done = out / ".retrieved.json"
    if not done.exists():
        src = p["pacs"]
        try:
            dest = Destination.from_settings(src["destination"], settings.pacs)
            report = retrieve(
                dest,
                src["query"],
                int(src.get("limit", 100)),
                out,
                _progress_writer(job, jobs, "retrieving"),
            )
        except PermanentError as exc:
            raise ValueError(str(exc)) from None
        except TransientError as exc:
            raise OSError(str(exc)) from None
        if report["instances"] == 0:
            raise ValueError(f"the PACS query {src['query']} matched no instances")
        done.write_text(json.dumps(report))
    return out


def _train(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """Admin training: a prior trained on a registered server-side folder; the new model
    appears under ``models_dir`` (and in GET /v1/models) when it is written."""
    from models.data import load_dataset
    from models.nets.ncsnpp import build
    from models.sde import VESDE, sigma_max_from_data
    from models.training import Cancelled as TrainCancelled
    from models.training import TrainConfig, fit_prior

    p = job.params
    size = int(p.get("image_size", 128))
    data_dir = _training_data(job, jobs, settings)
    ds = load_dataset(data_dir, size, tuple(p.get("axes", [0])), float(p.get("val_fraction", 0.1)))
    sde = VESDE(0.01, max(1.0, sigma_max_from_data(ds.train)))
    net = build(p.get("preset", "small"), sde.sigma)
    cfg = TrainConfig(
        steps=int(p.get("steps", 1000)),
        batch_size=int(p.get("batch_size", 8)),
        objective=p.get("objective", "dsm"),
        augment=bool(p.get("augment", False)),
        checkpoint_every=int(p.get("checkpoint_every", 200)),
    )
    card = {
        "name": p["model_id"],
        "image_size": size,
        "intensity": "[0, 1]; CT: (HU + 1000) / 4000; MR: magnitude / 99.5th percentile",
        "training_data": {
            "directory": str(data_dir),
            "source": {k: p[k] for k in ("data_dir", "dataset", "pacs") if k in p},
            "train_volumes": ds.train_volumes,
            "validation_volumes": ds.val_volumes,
            "skipped_files": len(ds.report.skipped),
        },
        "n_images": len(ds.train),
        "trained_by_job": job.id,
    }
    out = models_dir / p["model_id"]
    cancel = _cancel_check(job, jobs)
    try:
        fit_prior(
            ds.train,
            out,
            sde,
            net,
            cfg,
            card,
            resume=True,
            preview=int(p.get("preview", 4)),
            progress=_progress_writer(job, jobs, "training"),
            cancel=cancel,
        )
    except TrainCancelled as exc:
        raise Cancelled(str(exc)) from None
    report = {"model": p["model_id"], "steps": cfg.steps, "n_images": len(ds.train)}
    return _succeed(job, jobs, results, report, [])


def _export(
    job, jobs: JobStore, results: ResultStore, models_dir: Path, settings=None, enqueue=None
) -> str:
    """Push a finished reconstruction's series to a configured PACS."""
    from service.dicom_export import RESEARCH_LABELS, job_series
    from service.pacs import Destination, PermanentError, TransientError, push
    from service.settings import Settings

    source = jobs.get(job.params["source_job"])
    if source is None or source.state != "succeeded":
        raise ValueError(f"job {job.params['source_job']} has no result to export")
    settings = settings or Settings()
    try:
        dest = Destination.from_settings(job.params["destination"], settings.pacs)
        series = job_series(source, results)
        if dest.deidentify:
            from service.deidentify import deidentify

            series = [deidentify(ds, settings.deid_salt, RESEARCH_LABELS) for ds in series]
        jobs.set_fields(job.id, phase="sending", heartbeat_at=now())
        report = {**push(dest, series), "deidentified": dest.deidentify}
    except PermanentError as exc:
        raise ValueError(str(exc)) from None  # fails once, with the reason
    except TransientError as exc:
        raise OSError(str(exc)) from None  # retried with backoff
    return _succeed(job, jobs, results, report, [])


RUNNERS = {
    "reconstruction": _reconstruct,
    "sampling": _sample,
    "training": _train,
    "export": _export,
    "slab": _slab,
}
