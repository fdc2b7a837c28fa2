"""The job kinds, each in its own module, registered by name: what a worker runs for a job
of that kind. A runner takes ``(job, jobs, results, models_dir, settings, enqueue)`` and
returns the job's final state (or ``waiting``, for a volume whose slabs run)."""

from __future__ import annotations

from collections.abc import Callable

RUNNERS: dict[str, Callable[..., str]] = {}


def register(kind: str):
    """Register the decorated function as the runner of jobs of ``kind``."""

    def add(fn: Callable[..., str]) -> Callable[..., str]:
        if kind in RUNNERS:
            raise ValueError(f"two runners for job kind {kind!r}")
        RUNNERS[kind] = fn
        return fn

    return add


from workers.kinds import export, reconstruct, sample, train  # noqa: E402, F401 - registration
