"""Fault injection on a real site (gateway and Celery worker processes, PostgreSQL, Redis) on
loopback: workers killed mid-job, Redis restarted with jobs queued, the gateway restarted under
uploads and polls, database connections dropped, the result store full, a poison job. After
each: every job reaches a final state, none runs twice to completion, no result is
half-written, and the service answers its health checks again."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psycopg
import pytest

from tests import servers
from tests.reliability.conftest import count
from tests.reliability.jobs import (
    completions,
    get,
    make_site,
    results_whole,
    submit,
    summary,
    wait_all,
    wait_running,
)
from tests.service.conftest import CT_SPEC, ct_measurement
from tests.site import Site, free_port, stop


def _healthy(site: Site) -> bool:
    return httpx.get(site.base + "/readyz", timeout=10).status_code == 200


def _check(client: httpx.Client, jobs: dict[str, dict]) -> int:
    """Succeeded jobs whose results read back whole."""
    return sum(results_whole(client, j) for j in jobs.values() if j["state"] == "succeeded")


def test_worker_killed_mid_job_at_random_points(tmp_path, database, record):
    rounds, rng = count(3, 20), random.Random(20261124)
    with make_site(tmp_path, database, redis_db=9) as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.start_worker(queues="cpu", beat=True)  # the recovery sweep, never killed
        gpu = site.start_worker(queues="gpu")
        ids, mid_job = [], 0
        with site.client(key) as c:
            for _ in range(rounds):
                victim = submit(c, sampler="fast", nfe="600")
                ids += [victim, submit(c)]  # and one queued behind it
                wait_running(c, victim)
                time.sleep(rng.uniform(0.0, 3.0))  # loading, sampling, storing or done
                mid_job += get(c, victim)["state"] == "running"
                stop(gpu, signal.SIGKILL)
                gpu = site.start_worker(queues="gpu")
            jobs = wait_all(c, ids, timeout=60 + 30 * rounds)
            counts = summary(jobs, completions(site.all_logs()))
            whole = _check(c, jobs)
        healthy = _healthy(site)
    record(
        "faults",
        "worker SIGKILL at a random point of a job",
        rounds,
        **counts,
        outcome=f"{mid_job} kills landed mid-job; {len(ids)} jobs, {whole} with whole results; "
        f"healthy after: {healthy}",
    )
    assert counts == {"lost": 0, "failed": 0, "duplicated": 0}, jobs
    assert whole == len(ids) and healthy
    assert mid_job >= 1  # the random points did hit running jobs


def test_worker_killed_mid_slab_of_a_split_volume(tmp_path, database, record):
    """A volume split into slabs (``SCORERECON_SLAB_SLICES=4``) whose worker is killed in the
    middle of a slab: the sweep gives the orphaned slab to a new worker, and the volume
    succeeds once, whole, with all its slices."""
    from tests.service.test_gateway import _stack

    with make_site(tmp_path, database, redis_db=9, SCORERECON_SLAB_SLICES="4") as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.start_worker(queues="cpu", beat=True)  # the recovery sweep, never killed
        gpu = site.start_worker(queues="gpu")
        with site.client(key) as c:
            volume = submit(c, data=_stack(8), nfe="600")
            end = time.monotonic() + 120
            while get(c, volume)["progress"]["step"] == 0:
                assert time.monotonic() < end, "the volume never showed progress"
                time.sleep(0.1)
            stop(gpu, signal.SIGKILL)
            site.start_worker(queues="gpu")
            jobs = wait_all(c, [volume], timeout=180)
            counts = summary(jobs, completions(site.all_logs()))
            whole = jobs[volume]["state"] == "succeeded" and results_whole(c, jobs[volume])
            shape = np.load(io.BytesIO(c.get(f"/v1/jobs/{volume}/result?format=npy").content)).shape
    record(
        "faults",
        "worker SIGKILL mid-slab of a volume split into 2 slabs",
        1,
        **counts,
        outcome=f"volume {jobs[volume]['state']}, {shape[0]} slices, whole results: {whole}",
    )
    assert counts == {"lost": 0, "failed": 0, "duplicated": 0}, jobs
    assert whole and shape == (8, 1, 32, 32)


def _redis_server(port: int, workdir: Path) -> subprocess.Popen:
    """A private Redis without persistence: killing it loses every queued message."""
    return servers.start_redis(workdir, port)


def test_redis_restarted_with_jobs_queued(tmp_path, database, record):
    restarts, port = count(1, 5), free_port()
    redis_proc = _redis_server(port, tmp_path)
    broker = {"SCORERECON_BROKER_URL": f"redis://127.0.0.1:{port}/0"}
    try:
        with make_site(tmp_path, database, redis_db=0, **broker) as site:
            key = site.key("recon:submit,recon:read", "alice")
            site.start_gateway()
            site.start_worker(queues="cpu", beat=True)
            site.start_worker(queues="gpu")
            ids, refused, unready = [], 0, 0
            with site.client(key) as c:
                for _ in range(restarts):
                    ids += [submit(c, sampler="fast", nfe="300") for _ in range(4)]  # queued
                    stop(redis_proc, signal.SIGKILL)  # their messages are gone
                    for _ in range(2):  # submissions while the broker is down still land
                        try:
                            ids.append(submit(c))
                        except AssertionError:
                            refused += 1
                    unready += httpx.get(site.base + "/readyz", timeout=30).status_code == 503
                    time.sleep(1)
                    redis_proc = _redis_server(port, tmp_path)
                jobs = wait_all(c, ids, timeout=120 + 30 * restarts)
                counts = summary(jobs, completions(site.all_logs()))
                whole = _check(c, jobs)
            healthy = _healthy(site)
    finally:
        stop(redis_proc)
    record(
        "faults",
        "Redis killed (no persistence) with jobs queued, restarted",
        restarts,
        **counts,
        outcome=f"{len(ids)} jobs ({2 * restarts} submitted while Redis was down, {refused} "
        f"refused); readiness reported the outage {unready}/{restarts} times; {whole} with "
        f"whole results; healthy after: {healthy}",
    )
    assert refused == 0 and unready == restarts
    assert counts == {"lost": 0, "failed": 0, "duplicated": 0}, jobs
    assert whole == len(ids) and healthy


def test_gateway_killed_during_uploads_and_polls(tmp_path, database, record):
    restarts, clients, per_client = count(1, 5), 4, count(6, 15)
    with make_site(tmp_path, database, redis_db=9) as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.start_worker(queues="cpu", beat=True)
        site.start_worker(queues="gpu")
        ids: dict[str, str] = {}  # idempotency key -> job id
        errors = {"transport": 0, "5xx": 0}
        stop_polling = threading.Event()

        def upload(n: int) -> None:
            with site.client(key) as c:
                for i in range(per_client):
                    k = f"client{n}-upload{i}"
                    ids[k] = submit(c, key=k, retry_for=120)
                    time.sleep(0.2)

        def poll() -> None:
            with site.client(key) as c:
                while not stop_polling.is_set():
                    try:
                        r = c.get("/v1/jobs", params={"limit": 20})
                        errors["5xx"] += r.status_code >= 500
                    except httpx.TransportError:
                        errors["transport"] += 1
                        time.sleep(0.2)

        threads = [threading.Thread(target=upload, args=(n,)) for n in range(clients)]
        poller = threading.Thread(target=poll)
        for t in [*threads, poller]:
            t.start()
        for _ in range(restarts):
            time.sleep(1.5)
            stop(site.gateway, signal.SIGKILL)
            time.sleep(0.5)
            site.start_gateway()
        for t in threads:
            t.join(300)
        stop_polling.set()
        poller.join(30)
        with site.client(key) as c:
            jobs = wait_all(c, list(ids.values()), timeout=180)
            counts = summary(jobs, completions(site.all_logs()))
            whole = _check(c, jobs)
        with psycopg.connect(servers.conninfo(database)) as db:
            per_key = db.execute(
                "SELECT idempotency_key, count(*) FROM jobs GROUP BY idempotency_key"
            ).fetchall()
        healthy = _healthy(site)
    twice = sum(1 for _, n in per_key if n > 1)
    record(
        "faults",
        "gateway SIGKILL during uploads and polls, restarted",
        restarts,
        lost=counts["lost"] + clients * per_client - len(ids),
        duplicated=counts["duplicated"] + twice,
        five_xx=errors["5xx"],
        outcome=f"{len(ids)} uploads from {clients} clients retried with their Idempotency-Key; "
        f"{errors['transport']} connection errors while it was down; {whole} jobs with whole "
        f"results; healthy after: {healthy}",
    )
    assert len(ids) == clients * per_client and twice == 0 and errors["5xx"] == 0
    assert counts == {"lost": 0, "failed": 0, "duplicated": 0}, jobs
    assert whole == len(ids) and healthy


def test_database_connections_dropped(tmp_path, database, record):
    drops = count(3, 10)
    with make_site(tmp_path, database, redis_db=9) as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.start_worker(queues="cpu", beat=True)
        site.start_worker(queues="gpu")
        five_xx, statuses = 0, []
        with site.client(key) as c:
            ids = [submit(c, sampler="fast", nfe="600") for _ in range(3)]
            wait_running(c, ids[0])
            for _ in range(drops):
                with psycopg.connect(servers.conninfo("postgres")) as admin:
                    admin.execute(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = %s AND pid <> pg_backend_pid()",
                        (database,),
                    )
                for _ in range(5):  # the gateway's next requests meet dead connections
                    r = c.get("/v1/jobs", params={"limit": 5})
                    statuses.append(r.status_code)
                    five_xx += r.status_code >= 500
                ids.append(submit(c))
                time.sleep(0.5)
            jobs = wait_all(c, ids, timeout=180)
            counts = summary(jobs, completions(site.all_logs()))
            whole = _check(c, jobs)
        healthy = _healthy(site)
    record(
        "faults",
        "PostgreSQL connections of gateway and workers terminated",
        drops,
        **counts,
        five_xx=five_xx,
        outcome=f"{len(ids)} jobs; {len(statuses)} requests right after the drops; {whole} "
        f"with whole results; healthy after: {healthy}",
    )
    assert five_xx == 0, statuses
    assert counts == {"lost": 0, "failed": 0, "duplicated": 0}, jobs
    assert whole == len(ids) and healthy


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs for the result store (needs mount privileges, as root in CI)."""
    mount = tmp_path / "results"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount: Path, leave_bytes: int) -> Path:
    """Fill the file system but ``leave_bytes``."""
    filler = mount / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(mount)
    size = st.f_bavail * st.f_frsize - leave_bytes
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, size))
    return filler


def test_result_store_full(tmp_path, database, tiny_disk, record):
    with make_site(tmp_path, database, redis_db=9, SCORERECON_STORAGE_DIR=str(tiny_disk)) as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.start_worker(queues="cpu", beat=True)
        site.start_worker(queues="gpu")
        with site.client(key) as c:
            before = c.get("/v1/jobs").json()["items"]
            _fill(tiny_disk, 0)
            full = c.post(
                "/v1/reconstructions",
                files={"measurement": ("y.npy", ct_measurement())},
                data={"spec": CT_SPEC, "model": "tiny32", "sampler": "fast", "nfe": "4"},
            )
            after_refusal = c.get("/v1/jobs").json()["items"]
            _fill(tiny_disk, 4096)  # room for the measurement, not for the results
            starved = submit(c)
            jobs = wait_all(c, [starved], timeout=120)
            leftovers = sorted(p.name for p in (tiny_disk / starved).iterdir())
            (tiny_disk / "filler").unlink()
            fine = submit(c)
            jobs |= wait_all(c, [fine], timeout=60)
            whole = _check(c, jobs)
        healthy = _healthy(site)
    record(
        "faults",
        "result store full (2 MiB tmpfs)",
        2,
        lost=sum(j["state"] not in ("succeeded", "failed") for j in jobs.values()),
        five_xx=int(full.status_code >= 500 and full.status_code != 507),
        outcome=f"upload while full: {full.status_code} ({full.json().get('title')}); job "
        f"starved of space: {jobs[starved]['state']} ({jobs[starved]['error']}); files it "
        f"left: {leftovers}; after space returned: {jobs[fine]['state']}; healthy: {healthy}",
    )
    assert full.status_code == 507 and full.json()["field"] == "measurement"
    assert after_refusal == before  # nothing stored for a refused upload
    assert jobs[starved]["state"] == "failed" and "space" in jobs[starved]["error"]
    assert leftovers == ["measurement.npy"]  # nothing half-written beside it
    assert jobs[fine]["state"] == "succeeded" and whole == 1 and healthy


def test_poison_job_that_kills_its_worker(tmp_path, database, record):
    with make_site(tmp_path, database, redis_db=9) as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.start_worker(queues="cpu", beat=True)
        gpu = site.start_worker(queues="gpu")
        with site.client(key) as c:
            poison = submit(c, sampler="fast", nfe="3000")
            kills = 0
            for attempt in range(1, 5):  # 1 + SCORERECON_MAX_RETRIES
                wait_running(c, poison, attempt=attempt)
                stop(gpu, signal.SIGKILL)  # what an out-of-memory kill does
                kills += 1
                gpu = site.start_worker(queues="gpu")
            healthy_job = submit(c)
            jobs = wait_all(c, [poison, healthy_job], timeout=120)
        healthy = _healthy(site)
    record(
        "faults",
        "poison job (its worker dies on every attempt)",
        kills,
        lost=sum(j["state"] not in ("succeeded", "failed") for j in jobs.values()),
        outcome=f"poison job: {jobs[poison]['state']} after {jobs[poison]['attempts']} "
        f"attempts; the job behind it: {jobs[healthy_job]['state']}; healthy: {healthy}",
    )
    assert jobs[poison]["state"] == "failed" and "died 4 times" in jobs[poison]["error"]
    assert jobs[healthy_job]["state"] == "succeeded" and healthy


def test_worker_killed_between_a_success_and_its_export(tmp_path, database, record):
    """The worker dies after marking a reconstruction with ``export_to`` succeeded and before
    it queues the export (a failpoint there): the recovery sweep creates the export, which
    runs to a final state, and the reconstruction's result is untouched."""
    down = f"http://127.0.0.1:{free_port()}/dicom-web"  # nobody listens: the export fails
    pacs = json.dumps({"down": {"kind": "stowrs", "url": down}})
    with make_site(tmp_path, database, redis_db=9, SCORERECON_PACS=pacs) as site:
        key = site.key("recon:submit,recon:read", "alice")
        site.start_gateway()
        site.env["SCORERECON_FAILPOINT"] = "before-export"
        gpu = site.start_worker(queues="gpu")
        del site.env["SCORERECON_FAILPOINT"]
        with site.client(key) as c:
            job = submit(c, export_to="down")
            end = time.monotonic() + 120
            while "failpoint before-export" not in site.all_logs():
                assert time.monotonic() < end, "the worker never reached the failpoint"
                time.sleep(0.2)
            stop(gpu, signal.SIGKILL)  # its pool process died there; the rest goes too
            assert get(c, job)["state"] == "succeeded"
            export = c.get(f"/v1/jobs/{job}").json()["links"]["export"]
            assert c.get(export).status_code == 404  # lost with the worker
            site.start_worker(queues="cpu", beat=True)  # the sweep
            end = time.monotonic() + 120
            while (r := c.get(export)).status_code == 404 or r.json()["state"] not in (
                "succeeded",
                "failed",
            ):
                assert time.monotonic() < end, "the sweep did not recreate the export"
                time.sleep(0.5)
            result = c.get(f"/v1/jobs/{job}/result?format=npy")
    record(
        "faults",
        "worker killed between a success and its export",
        1,
        lost=0,
        outcome=f"export recreated by the sweep: {r.json()['state']} ({r.json().get('error')})",
    )
    assert r.json()["state"] == "failed" and "unreachable" in r.json()["error"]
    assert result.status_code == 200
