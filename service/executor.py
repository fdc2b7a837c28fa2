"""How the gateway hands a queued job to a worker: the enqueue interface.

``EmbeddedExecutor`` runs jobs in a thread pool inside the gateway process (a laptop, the
tests, ``make demo``); the Celery executor (``workers/celery_app.py``) sends only the job id
to the broker. Both call the same runner, :func:`workers.tasks.run_job`.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from service.db import JobStore
from service.results import ResultStore
from service.settings import Settings

log = logging.getLogger(__name__)


class Executor(Protocol):
    def enqueue(self, job_id: str, kind: str) -> None: ...

    def ping(self) -> bool: ...

    def shutdown(self) -> None: ...


class EmbeddedExecutor:
    """Jobs run in worker threads of the gateway process; no broker to install.

    The job table is the queue's durable record: at start, and every ``sweep_every_s``,
    queued jobs that no thread holds and running jobs whose heartbeat went stale (a
    previous process died) are picked up again.
    """

    def __init__(self, settings: Settings, jobs: JobStore, results: ResultStore):
        self.settings, self.jobs, self.results = settings, jobs, results
        self.pool = ThreadPoolExecutor(settings.embedded_workers, thread_name_prefix="job")
        self.futures: dict[str, Future] = {}
        self.stop = threading.Event()
        self.sweeper = threading.Thread(target=self._sweep_loop, daemon=True, name="sweep")
        self.sweeper.start()

    def enqueue(self, job_id: str, kind: str = "reconstruction") -> None:
        held = self.futures.get(job_id)
        if held is not None and not held.done():
            return
        self.futures[job_id] = self.pool.submit(self._run, job_id, kind)

    def _run(self, job_id: str, kind: str) -> str:
        """Run the job; a transient failure is retried after an exponential back-off."""
        from workers.tasks import Transient, run_job

        s = self.settings
        try:
            return run_job(
                job_id, self.jobs, self.results, s.models, s.heartbeat_stale_s, s, self.enqueue
            )
        except Transient as exc:
            job = self.jobs.get(job_id)
            delay = min(60.0, 2.0 ** (job.attempts if job else 1))
            log.warning("job %s: %s; retrying in %.0f s", job_id, exc, delay)
            timer = threading.Timer(delay, self.enqueue, args=(job_id, kind))
            timer.daemon = True
            timer.start()
            return "retrying"

    def _sweep_loop(self) -> None:
        from workers.tasks import sweep

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
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=False)


def make_executor(settings: Settings, jobs: JobStore, results: ResultStore) -> Executor:
    if settings.executor == "embedded":
        return EmbeddedExecutor(settings, jobs, results)
    from workers.celery_app import CeleryExecutor  # the workers issue

    return CeleryExecutor(settings)
