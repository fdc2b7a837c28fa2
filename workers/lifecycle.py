"""A job's life in a worker: claim, run its kind's runner, reach a final state; retries,
orphans and lost messages (the sweep); and the owners' turns (admission).

The same functions run inside a Celery task (``workers/celery_app.py``) or in the
gateway's embedded executor (``workers/executor.py``). A job is claimed by compare-and-set
(``queued`` → ``running``), so a re-delivered message never runs a finished or running job
again. What a job of each kind does is in ``workers/kinds/``, registered by kind.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from models.inverse import (
    Cancelled,
)
from models.physics import SpecError
from models.registry import ModelError
from service.db import (
    ADMITTED,
    FINAL,
    Job,
    JobStore,
    auto_export_id,
    now,
)
from service.results import ResultStore
from workers.kinds import RUNNERS
from workers.kinds.reconstruct import settle, volume_parts

log = logging.getLogger(__name__)


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
        if settle(volume_id, jobs, results) == "succeeded":
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
        state = _fail(jobs, job_id, str(exc))
    except (OperationalError, OSError) as exc:
        # Back to the queue (if the database lets us) and retried by the caller.
        try:
            jobs.transition(job_id, ["running"], "queued", phase="retrying", error=str(exc))
        except OperationalError:
            pass  # the sweep will find the stale running job
        raise Transient(f"{type(exc).__name__}: {exc}") from exc
    except SoftTimeLimitExceeded:
        limit = settings.time_limits_s.get(job.kind) if settings is not None else None
        log.error("job %s stopped at its time limit (%s s)", job_id, limit)
        state = _fail(
            jobs,
            job_id,
            f"stopped at the time limit of a {job.kind} job ({limit} s, "
            "SCORERECON_TIME_LIMITS_S); ask for less work (fewer NFE, samples or slices), or "
            "have the operator raise the limit",
        )
    except Exception as exc:  # noqa: BLE001 - the job must reach a final state
        log.exception("job %s crashed", job_id)
        state = _fail(
            jobs,
            job_id,
            f"internal error ({type(exc).__name__}); the operator's logs have the details",
        )
    log.info("job %s %s", job_id, state)
    if state == "succeeded" and job.params.get("export_to"):
        failpoint("before-export")
        _chain_export(job_id, job.params["export_to"], jobs, enqueue)
    return state


def _fail(jobs: JobStore, job_id: str, error: str) -> str:
    """A running job failed, with the reason the client reads."""
    jobs.transition(job_id, ["running"], "failed", finished_at=now(), phase="failed", error=error)
    return "failed"


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
    return all(p is None or p.state in FINAL for p in volume_parts(jobs, volume))


# How far back the sweep looks for succeeded reconstructions whose export is missing.


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
