"""The limits a request must pass before anything is stored: the upload's size, the job's
cost (service/fairness.py) and the queue's admission of a new job (429 with Retry-After)."""

from __future__ import annotations

from fastapi import UploadFile

from service.db import JobStore
from service.fairness import Factor, over_cost
from service.problems import Problem
from service.settings import Settings


def read_limited(upload: UploadFile, max_mb: float, field: str = "measurement") -> bytes:
    """The upload's bytes; 413 naming the field past ``max_mb``."""
    limit = int(max_mb * 1024 * 1024)
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise Problem(
            413,
            "Upload too large",
            f"the {field} upload exceeds {max_mb:g} MB (SCORERECON_MAX_UPLOAD_MB); "
            "send a smaller file",
            field,
        )
    return data


def check_cost(settings: Settings, pixels: int, factors: list[Factor]) -> None:
    """422 naming the field to lower, and how far, if the job costs more than one job may."""
    refused = over_cost(settings.max_job_cost, pixels, factors)
    if refused is not None:
        raise Problem(422, "Job too large", refused[1], refused[0])


def admission(settings: Settings, jobs: JobStore, owner: str, cost: int) -> None:
    """The queue limits a new job must pass (429 with Retry-After): its owner's queued
    jobs, its owner's queued and running cost (an owner with none may always submit one
    job the per-request cap admits), the site's queued jobs."""
    queued, load = jobs.owner_load(owner)
    if queued >= settings.max_queued_per_owner:
        raise Problem(
            429,
            "Too many queued jobs",
            f"you have {queued} jobs queued, the most one owner may have "
            f"(SCORERECON_MAX_QUEUED_PER_OWNER = {settings.max_queued_per_owner}); "
            "retry when some have started, or cancel some (DELETE /v1/jobs/{id})",
            retry_after=30,
        )
    if cost and load and load + cost > settings.max_owner_cost:
        raise Problem(
            429,
            "Owner's work limit reached",
            f"your queued and running jobs cost {load:,} and this one {cost:,} "
            "(NFE × samples × slices × pixels); one owner may have at most "
            f"{settings.max_owner_cost:,} queued or running (SCORERECON_MAX_OWNER_COST); "
            "retry when some have finished, or cancel some (DELETE /v1/jobs/{id})",
            retry_after=60,
        )
    site = jobs.count_by_state()["queued"]
    if site >= settings.max_queue:
        raise Problem(
            429,
            "Queue full",
            f"{site} jobs are queued, the site's limit (SCORERECON_MAX_QUEUE); try again later",
            retry_after=30,
        )
