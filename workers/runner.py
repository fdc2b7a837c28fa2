"""What every job kind's runner uses: the prior cache, progress and heartbeat writes, the
cancel check (the executor's checkpoint and the job's cancel flag), and success.

Progress is written to the job row about once a second; the cancel flag is read at every
step, from the database at most every ``CANCEL_POLL_S``, so a cancel takes effect within a
step (or 50 ms, for steps shorter than that).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path

import numpy as np

from models.inverse import (
    Prior,
)
from models.registry import ModelError
from service.db import (
    JobStore,
    now,
)
from service.results import ResultStore

log = logging.getLogger(__name__)


CANCEL_POLL_S = 0.05  # the cancel flag is read from the database at most this often
# The executor's checkpoint, run at every step of the job running in this thread (the
# embedded executor's fair share: the job may wait there for another owner's turn); it
# answers True when the job has been cancelled. Unset in Celery workers.


# The executor's checkpoint, run at every step of the job running in this thread (the
# embedded executor's fair share: the job may wait there for another owner's turn); it
# answers True when the job has been cancelled. Unset in Celery workers.
AT_STEP: ContextVar[Callable[[], bool] | None] = ContextVar("at_step", default=None)


def load_prior(model: str, bf16: bool | None = None) -> Prior:
    """Priors are cached per process: loading and checking a model costs more than a step.
    A card rewritten since (a new tuning or OOD calibration) is read again. ``bf16``: the
    site's setting (``None``: where the hardware runs it fast)."""
    from models.registry import CARD, resolve

    try:
        stamp = (resolve(model) / CARD).stat().st_mtime_ns
    except (OSError, ValueError):
        stamp = 0  # Prior.load says what is wrong with it
    return _load_prior(model, bf16, stamp)


@lru_cache(maxsize=4)
def _load_prior(model: str, bf16: bool | None, card_stamp: int) -> Prior:
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


class Throttle:
    """Calls ``fn`` at most once per ``period`` seconds (and always on the last step)."""

    def __init__(self, period: float = 1.0):
        self.period, self.last = period, 0.0

    def due(self, final: bool = False) -> bool:
        t = time.monotonic()
        if final or t - self.last >= self.period:
            self.last = t
            return True
        return False


def put_npy(results: ResultStore, job_id: str, name: str, arr: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    results.put(job_id, name, buf.getvalue())


def succeed(
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


def progress_writer(job, jobs: JobStore, phase: str):
    tick = Throttle()

    def progress(step: int, total: int, *_: object) -> None:
        if tick.due(step == total):
            jobs.set_fields(
                job.id, progress_step=step, progress_total=total, phase=phase, heartbeat_at=now()
            )

    return progress


def cancel_check(job, jobs: JobStore):
    """The cancel check a runner passes to the core, called at every step: the executor's
    checkpoint (``AT_STEP``: fair share, immediate cancel), then the job's cancel flag, read
    from the database at most every ``CANCEL_POLL_S`` (a cancel sent to another process)."""
    check = Throttle(CANCEL_POLL_S)
    at_step = AT_STEP.get()

    def cancel() -> bool:
        if at_step is not None and at_step():
            return True
        if not check.due():
            return False
        current = jobs.get(job.id)
        return current is not None and current.cancel_requested

    return cancel
