"""The Celery app: Redis broker, late acknowledgement, one job at a time per process.

Messages carry only the job id (no patient data in the broker or in Flower). A worker killed
mid-job leaves its message unacknowledged; Redis redelivers it after ``visibility_timeout``
(longer than the hard time limit) and the new worker reclaims the job because its heartbeat
went stale (see :func:`workers.lifecycle.run_job`). ``sweep`` re-enqueues jobs whose
message was lost. CUDA is first touched inside the task, i.e. in the forked child.

Each job kind is its own task (:data:`TASKS`), on its own queue (training on ``train``,
exports and the sweep on ``cpu``, the rest on ``gpu``) with its own time limits
(``SCORERECON_TIME_LIMITS_S``); the sweep re-sends a job as its kind's task, so a training
job never lands on a GPU reconstruction worker.

Fair use: a reconstruction or sampling job's message is sent only while its owner has fewer
than ``owner_slots`` jobs sent or running; the others wait in the database as ``queued``
and are sent round-robin by owner as slots free (by the worker that finished the owner's
previous job, and by the sweep), so one owner's backlog never stands in the broker in
front of another owner's job.
"""

from __future__ import annotations

import logging
import os

from celery import Celery

from service.db import ADMITTED, JobStore, now
from service.results import ResultStore, open_result_store
from service.settings import Settings

log = logging.getLogger(__name__)
TASK = "scorerecon.reconstruct"  # the reconstruction's task; it runs a job of any kind
TASKS = {
    "reconstruction": TASK,
    "slab": "scorerecon.slab",
    "sampling": "scorerecon.sampling",
    "training": "scorerecon.training",
    "export": "scorerecon.export",
}
QUEUES = {"training": "train", "export": "cpu"}  # every other kind: gpu
SWEEP = "scorerecon.sweep"


def queue_of(kind: str) -> str:
    return QUEUES.get(kind, "gpu")


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or Settings()
    app = Celery("scorerecon", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        worker_max_tasks_per_child=settings.max_tasks_per_child,
        task_default_queue="gpu",
        task_routes={
            **{name: {"queue": queue_of(kind)} for kind, name in TASKS.items()},
            SWEEP: {"queue": "cpu"},
        },
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule_filename=str(settings.home / "celerybeat-schedule"),
    )
    app.conf.beat_schedule = {"sweep": {"task": SWEEP, "schedule": settings.sweep_every_s}}
    _register(app, settings)
    return app


def _register(app: Celery, settings: Settings) -> None:
    state: dict = {}

    def stores() -> tuple[JobStore, ResultStore]:
        # Opened lazily in each (forked) worker process, never shared across a fork.
        if state.get("pid") != os.getpid():
            settings.prepare()
            state.update(
                pid=os.getpid(),
                jobs=JobStore(settings.db_url),
                results=open_result_store(settings),
            )
            if settings.torch_threads:
                import torch

                torch.set_num_threads(settings.torch_threads)
        return state["jobs"], state["results"]

    def run(task, job_id: str) -> str:
        from workers.lifecycle import Transient, run_job

        jobs, results = stores()
        try:
            return run_job(
                job_id,
                jobs,
                results,
                settings.models,
                stale_after_s=settings.heartbeat_stale_s,
                settings=settings,
                enqueue=lambda jid, kind: dispatch(app, jobs, settings, jid, kind),
            )
        except Transient as exc:
            # Database or storage briefly unavailable: retry with exponential backoff.
            raise task.retry(exc=exc, countdown=min(60, 2**task.request.retries)) from None
        finally:
            _next_of_owner(app, jobs, settings, job_id)

    for kind, name in TASKS.items():
        soft = settings.time_limits_s[kind]
        app.task(
            run,
            name=name,
            bind=True,
            shared=False,  # this app's tasks only: another app in the process has its own
            max_retries=settings.max_retries,
            soft_time_limit=soft,
            time_limit=soft + settings.hard_limit_margin_s,
        )

    @app.task(name=SWEEP, shared=False)
    def sweep_task() -> dict:
        from workers.lifecycle import sweep

        jobs, _ = stores()
        return sweep(
            jobs,
            lambda job_id: _resend(app, jobs, job_id),
            settings.requeue_after_s,
            settings.heartbeat_stale_s,
            owner_slots=settings.owner_slots,
        )


def _resend(app: Celery, jobs: JobStore, job_id: str) -> None:
    """Send a job's message to its kind's queue (for the sweep and admission)."""
    job = jobs.get(job_id)
    if job is not None:
        send(app, job_id, job.kind)


def _next_of_owner(app: Celery, jobs: JobStore, settings: Settings, job_id: str) -> None:
    """After a job (whatever came of it), send its owner's next waiting jobs while the
    owner has a free slot, rather than leave them to the next sweep."""
    from workers.lifecycle import admit

    try:
        job = jobs.get(job_id)
        if job is not None and job.kind in ADMITTED:
            admit(jobs, lambda jid: _resend(app, jobs, jid), settings.owner_slots, [job.owner])
    except Exception:  # noqa: BLE001 - database or broker down: the sweep sends them later
        log.warning("job %s: could not send the owner's next job; the sweep will", job_id)


# A gateway request waits at most about a second for the broker before leaving the job to
# the sweep.
BRIEF_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.3, "interval_max": 0.5}


def send(app: Celery, job_id: str, kind: str, retry_policy: dict | None = None) -> None:
    """Queue a job id as its kind's task on its kind's queue: training has its own (and
    GPUs), exports run on `cpu`, the rest on `gpu`."""
    app.send_task(
        TASKS.get(kind, TASK),
        args=[job_id],
        queue=queue_of(kind),
        retry=True,
        retry_policy=retry_policy,
    )


def dispatch(
    app: Celery,
    jobs: JobStore,
    settings: Settings,
    job_id: str,
    kind: str,
    retry_policy: dict | None = None,
) -> bool:
    """Send a new job's message if its owner has a free slot (reconstruction, sampling;
    training and export always go); else it waits in the database for its turn. Marks the
    job sent first (``sent_at``), so a message lost with the broker is sent again by the
    sweep. True if it was sent."""
    if kind in ADMITTED:
        job = jobs.get(job_id)
        if job is None or not jobs.admit(job_id, job.owner, settings.owner_slots):
            log.info("job %s waits for its owner's turn", job_id)
            return False
    else:
        jobs.set_fields(job_id, sent_at=now())
    send(app, job_id, kind, retry_policy=retry_policy)
    return True


class CeleryExecutor:
    """The gateway's enqueue interface over Celery: only the job id goes to the broker."""

    def __init__(self, settings: Settings, jobs: JobStore):
        self.app, self.settings, self.jobs = make_celery(settings), settings, jobs

    def enqueue(self, job_id: str, kind: str) -> None:
        """Queue the job id, or leave it waiting for its owner's turn; with the broker down
        the job stays ``queued`` in the database (already durable) and the sweep sends it
        when the broker is back: a submission is never refused or lost because Redis
        restarts."""
        try:
            dispatch(self.app, self.jobs, self.settings, job_id, kind, BRIEF_RETRY)
        except Exception as exc:  # noqa: BLE001 - kombu/redis raise many connection errors
            log.warning("job %s: broker unavailable (%s); the sweep will queue it", job_id, exc)

    def cancel(self, job_id: str) -> None:
        """Nothing to do: a worker reads the job's cancel flag at every step."""

    def ping(self) -> bool:
        with self.app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
        return True

    def shutdown(self) -> None:
        pass
