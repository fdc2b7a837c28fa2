"""Client-side helpers of the fault and load tests: submit over HTTP, wait for final states,
and check what a fault may not do (lose, duplicate or half-write a job)."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

from tests import servers
from tests.service.conftest import CT_SPEC, ct_measurement, tiny_model
from tests.site import Site

FINAL = {"succeeded", "failed", "cancelled"}
# Recovery within seconds, not minutes, so that faults resolve inside a test.
FAST_RECOVERY = {
    "SCORERECON_HEARTBEAT_STALE_S": "3",
    "SCORERECON_REQUEUE_AFTER_S": "4",
    "SCORERECON_SWEEP_EVERY_S": "2",
    "SCORERECON_MAX_RETRIES": "3",
    "SCORERECON_RATE_LIMIT_PER_MINUTE": "1000000",
}
_DONE = re.compile(r"job ([0-9a-f]{32}) succeeded")


def make_site(tmp_path: Path, database: str, redis_db: int, **env: str) -> Site:
    """A site on the PostgreSQL database ``database`` with the tiny 32² model."""
    site = Site(
        tmp_path / "home",
        redis_db=redis_db,
        env={**FAST_RECOVERY, "SCORERECON_DATABASE_URL": servers.database_url() + database, **env},
    )
    tiny_model(site.home / "models")
    return site


def submit(
    client: httpx.Client,
    key: str | None = None,
    retry_for: float = 0,
    data: bytes | None = None,
    **form,
) -> str:
    """POST a 32² CT job (one slice, or the stack ``data``) for the tiny model and return
    its id. With ``retry_for``, transport
    errors are retried with the same Idempotency-Key for that many seconds (what a PACS
    integration does when the gateway restarts under it)."""
    fields = {"spec": CT_SPEC, "model": "tiny32", "sampler": "fast", "nfe": "4", **form}
    headers = {"Idempotency-Key": key or uuid.uuid4().hex}
    end = time.monotonic() + retry_for
    while True:
        try:
            r = client.post(
                "/v1/reconstructions",
                files={"measurement": ("y.npy", ct_measurement() if data is None else data)},
                data=fields,
                headers=headers,
            )
        except httpx.TransportError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)
            continue
        assert r.status_code in (200, 202), r.text
        return r.json()["id"]


def get(client: httpx.Client, job_id: str, retry_for: float = 30) -> dict:
    end = time.monotonic() + retry_for
    while True:
        try:
            r = client.get(f"/v1/jobs/{job_id}")
        except httpx.TransportError:
            if time.monotonic() > end:
                raise
            time.sleep(0.3)
            continue
        assert r.status_code == 200, r.text
        return r.json()


def wait_running(client: httpx.Client, job_id: str, timeout: float = 120, attempt: int = 1) -> dict:
    """Until the job runs its ``attempt``-th attempt and has started sampling."""
    end = time.monotonic() + timeout
    while True:
        job = get(client, job_id)
        if job["state"] == "running" and job["attempts"] >= attempt:
            return job
        assert job["state"] not in FINAL, job
        assert time.monotonic() < end, f"job never ran attempt {attempt}: {job}"
        time.sleep(0.1)


def wait_all(client: httpx.Client, ids: list[str], timeout: float) -> dict[str, dict]:
    """Each job's JSON once all are final, or once ``timeout`` seconds passed without any of
    them becoming final (the caller counts those not final as lost). A queue that drains
    slowly on a busy machine is waited for; one that stopped moving is not."""
    end, latest, done = time.monotonic() + timeout, {}, 0
    while True:
        for job_id in ids:
            if latest.get(job_id, {}).get("state") not in FINAL:
                latest[job_id] = get(client, job_id)
        final = sum(j["state"] in FINAL for j in latest.values())
        if final > done:
            done, end = final, time.monotonic() + timeout
        if final == len(ids) or time.monotonic() > end:
            return latest
        time.sleep(0.3)


def completions(logs: str) -> Counter:
    """How many times each job ran to success (the runner logs ``job <id> succeeded`` only
    when its compare-and-set to succeeded won)."""
    return Counter(_DONE.findall(logs))


def results_whole(client: httpx.Client, job: dict) -> bool:
    """Every result of a succeeded job reads back whole: the arrays load, the report parses."""
    for fmt in ("npy", "std", "baseline"):
        r = client.get(job["links"][f"result_{fmt}"])
        assert r.status_code == 200, r.text
        np.load(io.BytesIO(r.content), allow_pickle=False)
    report = client.get(job["links"]["result_json"])
    return "nfe" in json.loads(report.content)


def summary(jobs: dict[str, dict], runs: Counter) -> dict:
    """Lost (never reached a final state), failed, and duplicated (ran to success more than
    once) counts."""
    return {
        "lost": sum(1 for j in jobs.values() if j["state"] not in FINAL),
        "failed": sum(1 for j in jobs.values() if j["state"] == "failed"),
        "duplicated": sum(1 for job_id in jobs if runs[job_id] > 1),
    }
