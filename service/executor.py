"""How the gateway hands a queued job to a worker: the enqueue interface.

``EmbeddedExecutor`` runs jobs in a thread pool inside the gateway process (a laptop, the
tests, ``make demo``); the Celery executor (``workers/celery_app.py``) sends only the job id
to the broker. Both call the same runner, :func:`workers.tasks.run_reconstruction`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

from service.db import JobStore
from service.results import LocalResultStore
from service.settings import Settings


class Executor(Protocol):
    def enqueue(self, job_id: str, kind: str) -> None: ...

    def ping(self) -> bool: ...

    def shutdown(self) -> None: ...


class EmbeddedExecutor:
    def __init__(self, settings: Settings, jobs: JobStore, results: LocalResultStore):
        self.settings, self.jobs, self.results = settings, jobs, results
        self.pool = ThreadPoolExecutor(settings.embedded_workers, thread_name_prefix="job")
        self.futures: dict[str, Future] = {}

    def enqueue(self, job_id: str, kind: str) -> None:
        from workers.tasks import run_reconstruction

        if kind != "reconstruction":
            raise ValueError(f"the embedded executor runs reconstruction jobs, not {kind!r}")
        self.futures[job_id] = self.pool.submit(
            run_reconstruction, job_id, self.jobs, self.results, self.settings.models
        )

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)


def make_executor(settings: Settings, jobs: JobStore, results: LocalResultStore) -> Executor:
    if settings.executor == "embedded":
        return EmbeddedExecutor(settings, jobs, results)
    from workers.celery_app import CeleryExecutor  # the workers issue

    return CeleryExecutor(settings)
