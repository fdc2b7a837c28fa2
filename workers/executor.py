"""How the gateway hands a queued job to a worker: the enqueue interface.

``EmbeddedExecutor`` runs jobs in threads of the gateway process (a laptop, the tests,
``make demo``), shared fairly among owners; the Celery executor (``workers/celery_app.py``)
sends only the job id to the broker. Both call the same runner, :func:`workers.lifecycle.run_job`.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from service.db import FINAL, JobStore, now
from service.fairness import FairShare
from service.results import ResultStore
from service.settings import Settings
from workers.lifecycle import Transient, run_job, sweep
from workers.runner import AT_STEP

log = logging.getLogger(__name__)


class Executor(Protocol):
    def enqueue(self, job_id: str, kind: str) -> None: ...

    def cancel(self, job_id: str) -> None: ...

    def ping(self) -> bool: ...

    def shutdown(self) -> None: ...


class EmbeddedExecutor:
    """Jobs run in worker threads of the gateway process; no broker to install.

    ``embedded_workers`` jobs run at a time, shared fairly among owners step by step
    (:class:`service.fairness.FairShare`): each running job passes a checkpoint at every
    step (its cancel check, through ``workers.runner.AT_STEP``), where it gives way to a
    lighter owner's job and sees a cancel at once. The job table is the queue's durable
    record: at start, and every ``sweep_every_s``, queued jobs that no thread holds and
    running jobs whose heartbeat went stale (a previous process died) are picked up again.
    """

    def __init__(self, settings: Settings, jobs: JobStore, results: ResultStore):
        self.settings, self.jobs, self.results = settings, jobs, results
        self.fair = FairShare(settings.embedded_workers, self._start)
        self.stop = threading.Event()
        self.sweeper = threading.Thread(target=self._sweep_loop, daemon=True, name="sweep")
        self.sweeper.start()

    def enqueue(self, job_id: str, kind: str = "reconstruction") -> None:
        """Queue the job under its owner (read from the job table); a job already queued or
        running here, or final, is left alone."""
        if self.stop.is_set():
            log.info("job %s: shutting down; the next start picks it up", job_id)
            return
        try:
            job = self.jobs.get(job_id)
        except Exception:  # noqa: BLE001 - the database may be down; the sweep retries
            log.warning("job %s: database unavailable; the sweep will queue it", job_id)
            return
        if job is not None and job.state not in FINAL:
            self.fair.add(job_id, job.owner, kind)

    def cancel(self, job_id: str) -> None:
        """Drop a job not started; a running or waiting one stops at its next step."""
        self.fair.cancel(job_id)

    def _start(self, job_id: str, kind: str) -> None:
        thread = threading.Thread(
            target=self._run, args=(job_id, kind), name=f"job-{job_id[:8]}", daemon=True
        )
        thread.start()

    def _waiting(self, job_id: str) -> bool:
        """While a job waits for its turn: beat its heartbeat (so it is not taken for
        orphaned) and answer whether it was cancelled."""
        self.jobs.set_fields(job_id, heartbeat_at=now(), phase="waiting")
        job = self.jobs.get(job_id)
        return job is None or job.cancel_requested

    def _run(self, job_id: str, kind: str) -> str:
        """Run the job; a transient failure is retried after an exponential back-off."""

        AT_STEP.set(lambda: self.fair.checkpoint(job_id, lambda: self._waiting(job_id)))
        s = self.settings
        try:
            return run_job(
                job_id, self.jobs, self.results, s.models, s.heartbeat_stale_s, s, self.enqueue
            )
        except Transient as exc:
            try:
                job = self.jobs.get(job_id)
            except Exception:  # noqa: BLE001 - still down: back off as after one attempt
                job = None
            delay = min(60.0, 2.0 ** (job.attempts if job else 1))
            log.warning("job %s: %s; retrying in %.0f s", job_id, exc, delay)
            timer = threading.Timer(delay, self.enqueue, args=(job_id, kind))
            timer.daemon = True
            timer.start()
            return "retrying"
        except Exception:  # noqa: BLE001 - e.g. the database down right after a transient
            log.exception("job %s: runner failed; the sweep will pick it up", job_id)
            return "error"
        finally:
            self.fair.done(job_id)

    def _sweep_loop(self) -> None:

        requeue_after = 0.0  # at start every queued job is ours: no broker holds a message
        while not self.stop.is_set():
            try:
                sweep(self.jobs, self.enqueue, requeue_after, self.settings.heartbeat_stale_s)
            except Exception:  # noqa: BLE001 - the database may be down; try again later
                log.exception("sweep failed")
            requeue_after = self.settings.requeue_after_s
            self.stop.wait(self.settings.sweep_every_s)

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        """Stop the sweep and wait for the jobs queued and running here to finish."""
        self.stop.set()
        self.fair.wait_idle()


def make_executor(settings: Settings, jobs: JobStore, results: ResultStore) -> Executor:
    if settings.executor == "embedded":
        return EmbeddedExecutor(settings, jobs, results)
    from workers.celery_app import CeleryExecutor  # the workers issue

    return CeleryExecutor(settings, jobs)
