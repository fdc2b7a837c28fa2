"""Export jobs: a succeeded reconstruction's DICOM series pushed to a PACS."""

from __future__ import annotations

import logging
from pathlib import Path

from service.db import (
    JobStore,
    now,
)
from service.results import ResultStore
from workers.kinds import register
from workers.runner import succeed

log = logging.getLogger(__name__)


@register("export")
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
    return succeed(job, jobs, results, report, [])
