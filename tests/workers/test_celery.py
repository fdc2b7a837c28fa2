"""Real Celery workers on a real Redis (the session's own, database 15, flushed): a job from
submit to result, a spec error that fails without retry, and a worker killed mid-job whose
job completes on another worker exactly once."""

import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.settings import Settings
from tests import servers
from tests.service.conftest import auth, tiny_model
from tests.service.test_gateway import submit, wait


def broker_url() -> str:
    """Database 15 of the session's own Redis (tests/servers.py)."""
    return f"{servers.redis_url()}/15"


@pytest.fixture
def env(tmp_path):
    redis.Redis.from_url(broker_url()).flushdb()
    home = tmp_path / "home"
    values = {
        "SCORERECON_HOME": str(home),
        "SCORERECON_BROKER_URL": broker_url(),
        "SCORERECON_EXECUTOR": "celery",
        "SCORERECON_HEARTBEAT_STALE_S": "3",
        "SCORERECON_TORCH_THREADS": "1",
        "SCORERECON_RATE_LIMIT_PER_MINUTE": "100000",
    }
    settings = Settings(**{k.removeprefix("SCORERECON_").lower(): v for k, v in values.items()})
    settings.prepare()
    tiny_model(settings.models)
    yield {**os.environ, **values}, settings
    redis.Redis.from_url(broker_url()).flushdb()


def _npy() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((1, 1, 8, 48)).astype(np.float32))
    return buf.getvalue()


def start_worker(environ, queues: str = "gpu,cpu"):
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--queues", queues],
        env=environ,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: we stop exactly what we started
    )


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def test_jobs_run_on_real_workers_and_survive_a_killed_worker(env):
    environ, settings = env
    app = create_app(settings)
    key = create_key(app.state.jobs, ["recon:submit", "recon:read"], "alice")[1]
    worker = start_worker(environ)
    try:
        with TestClient(app) as client:
            assert client.get("/readyz").json()["ready"] is True
            job = submit(client, key).json()
            assert wait(client, key, job["id"], timeout=90)["state"] == "succeeded"
            # A spec error fails with its message and is not retried (a row written behind
            # the gateway's validation, as an older gateway version might have).
            from service.db import Job, new_id
            from workers.celery_app import TASK, make_celery

            celery = make_celery(settings)
            bad_id = new_id()
            with app.state.jobs.session() as s:
                s.add(
                    Job(
                        id=bad_id,
                        kind="reconstruction",
                        owner="alice",
                        model="tiny32",
                        spec={"modality": "ct"},
                        params={},
                        result_keys=[],
                    )
                )
            celery.send_task(TASK, args=[bad_id])
            failed = wait(client, key, bad_id, timeout=60)
            assert failed["state"] == "failed" and "image_size" in failed["error"]
            assert failed["attempts"] == 1
            # Kill the worker mid-job; a new worker and the sweep finish it, once.
            slow = submit(client, key, sampler="fast", nfe="3000").json()
            end = time.monotonic() + 60
            while (
                client.get(f"/v1/jobs/{slow['id']}", headers=auth(key)).json()["progress"]["step"]
                == 0
            ):
                assert time.monotonic() < end, "the job never showed progress"
                time.sleep(0.2)
            stop(worker, signal.SIGKILL)
            time.sleep(4)  # the heartbeat goes stale
            worker = start_worker(environ)
            from workers.lifecycle import sweep

            swept = sweep(app.state.jobs, lambda j: celery.send_task(TASK, args=[j]), 300, 3)
            assert swept["orphaned"] == 1
            done = wait(client, key, slow["id"], timeout=120)
            assert done["state"] == "succeeded" and done["attempts"] == 2
            # Cancel a running job (it stops at its next step) and a queued one behind it.
            running = submit(client, key, sampler="fast", nfe="3000").json()
            queued = submit(client, key).json()
            end = time.monotonic() + 60
            while (
                client.get(f"/v1/jobs/{running['id']}", headers=auth(key)).json()["state"]
                != "running"
            ):
                assert time.monotonic() < end
                time.sleep(0.2)
            assert (
                client.delete(f"/v1/jobs/{queued['id']}", headers=auth(key)).json()["state"]
                == "cancelled"
            )
            client.delete(f"/v1/jobs/{running['id']}", headers=auth(key))
            assert wait(client, key, running["id"], timeout=60)["state"] == "cancelled"
            assert wait(client, key, queued["id"], timeout=60)["state"] == "cancelled"
            # A lost message: a queued job whose message never reached the broker is
            # re-enqueued by the sweep and runs.
            lost = new_id()
            app.state.results.put(lost, "measurement.npy", _npy())
            with app.state.jobs.session() as s:
                s.add(
                    Job(
                        id=lost,
                        kind="reconstruction",
                        owner="alice",
                        model="tiny32",
                        spec={"modality": "ct", "image_size": 32, "n_views": 8},
                        params={"sampler": "fast", "nfe": 4},
                        result_keys=[],
                    )
                )
            time.sleep(1.5)
            swept = sweep(app.state.jobs, lambda j: celery.send_task(TASK, args=[j]), 1, 3)
            assert swept["requeued"] == 1
            found = wait(client, key, lost, timeout=60)
            assert found["state"] == "succeeded", found["error"]
    finally:
        stop(worker)


def test_a_volume_split_across_two_workers_equals_one_worker(env):
    """An 8-slice volume with ``SCORERECON_SLAB_SLICES=4`` runs as two slab jobs on two
    worker processes and gives the images of the same volume on one worker, unsplit; the
    client sees one job."""
    import io
    import json

    import numpy as np

    from service.db import slab_id
    from tests.service.test_gateway import _stack

    environ, settings = env
    app = create_app(settings)
    key = create_key(app.state.jobs, ["recon:submit", "recon:read"], "alice")[1]
    images = []
    with TestClient(app) as client:
        for slabs, n_workers in ((0, 1), (4, 2)):
            workers = [
                start_worker({**environ, "SCORERECON_SLAB_SLICES": str(slabs)})
                for _ in range(n_workers)
            ]
            try:
                job = submit(client, key, data=_stack(8), samples="2", seed="3", nfe="150")
                done = wait(client, key, job.json()["id"], timeout=240)
                assert done["state"] == "succeeded", done["error"]
                link = done["links"]["result_npy"]
                images.append(np.load(io.BytesIO(client.get(link, headers=auth(key)).content)))
            finally:
                for w in workers:
                    stop(w)
        ran_on = {
            json.loads(app.state.results.get(slab_id(done["id"], s), "report.json"))["worker"]
            for s in (0, 4)
        }
    assert len(ran_on) == 2, f"both slabs ran on {ran_on}"
    assert images[0].shape == images[1].shape == (8, 1, 32, 32)
    np.testing.assert_allclose(images[1], images[0], atol=1e-4 * float(np.ptp(images[0])))


def _queued(jobs, kind: str, owner: str, sent_minutes_ago: float | None) -> str:
    import datetime as dt

    from service.db import Job, new_id, now

    job_id = new_id()
    sent = None if sent_minutes_ago is None else now() - dt.timedelta(minutes=sent_minutes_ago)
    with jobs.session() as s:
        s.add(
            Job(
                id=job_id,
                kind=kind,
                owner=owner,
                model="tiny32",
                spec={},
                params={},
                result_keys=[],
                sent_at=sent,
            )
        )
    return job_id


def _messages(queue: str) -> list[tuple[str, str]]:
    """(task name, job id) of each message waiting in a queue on the broker."""
    import json

    raw = redis.Redis.from_url(broker_url()).lrange(queue, 0, -1)
    return [
        (m["headers"]["task"], m["headers"]["argsrepr"].strip("[]()',"))
        for m in map(json.loads, raw)
    ]


def test_the_sweep_resends_each_job_to_its_own_queue_once_per_window(env):
    """Jobs whose messages were lost (sent long ago, still queued) and a job never sent:
    the sweep sends each as its kind's task to its kind's queue (training to train, export
    to cpu, the rest to gpu), and a sweep right after sends nothing more, so the queue's
    length (what an autoscaler reads) stays the number of jobs waiting."""
    from workers.celery_app import SWEEP, TASKS, make_celery

    _, settings = env
    app = create_app(settings)
    jobs = app.state.jobs
    lost = {
        kind: _queued(jobs, kind, f"owner-{kind}", 10)
        for kind in ("training", "export", "reconstruction")
    }
    held = _queued(jobs, "sampling", "owner-sampling", None)  # waits for its owner's turn
    celery = make_celery(settings)
    for _ in range(3):
        report = celery.tasks[SWEEP]()
        assert _messages("train") == [(TASKS["training"], lost["training"])]
        assert _messages("cpu") == [(TASKS["export"], lost["export"])]
        assert sorted(_messages("gpu")) == sorted(
            [(TASKS["reconstruction"], lost["reconstruction"]), (TASKS["sampling"], held)]
        )
    assert report["requeued"] == 0 and report["admitted"] == 0  # the last sweep: nothing new
    jobs.engine.dispose()


def test_training_runs_through_celery_and_each_kind_has_its_own_time_limit(env, tmp_path):
    """A worker on the train queue runs a training job to a usable model; with
    SCORERECON_TIME_LIMITS_S giving sampling 1 s, a long sampling job stops there and fails
    naming its limit, while a reconstruction (its own limit) succeeds on the same worker."""
    import io
    import zipfile

    import numpy as np

    environ, settings = env
    app = create_app(settings)
    admin = create_key(app.state.jobs, ["admin"], "ops")[1]
    key = create_key(app.state.jobs, ["recon:submit", "recon:read"], "alice")[1]
    worker = start_worker(
        {**environ, "SCORERECON_TIME_LIMITS_S": '{"sampling": 1}'}, queues="gpu,cpu,train"
    )
    try:
        with TestClient(app) as client:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as z:
                for i in range(4):
                    arr = io.BytesIO()
                    np.save(arr, np.random.default_rng(i).random((16, 16)).astype(np.float32))
                    z.writestr(f"ct/s{i}.npy", arr.getvalue())
            r = client.post(
                "/v1/admin/datasets",
                files={"archive": ("ct.zip", buf.getvalue())},
                headers=auth(admin),
            )
            assert r.status_code == 201, r.text
            train = {
                "dataset": r.json()["id"],
                "model_id": "celery-ct",
                "preset": "tiny",
                "image_size": 16,
                "steps": 2,
                "batch_size": 2,
                "checkpoint_every": 2,
                "preview": 1,
                "val_fraction": 0,
            }
            r = client.post("/v1/admin/training", json=train, headers=auth(admin))
            assert r.status_code == 202, r.text
            trained = wait(client, admin, r.json()["id"], timeout=180)
            assert trained["state"] == "succeeded", trained["error"]
            assert client.get("/v1/models/celery-ct", headers=auth(admin)).status_code == 200
            body = {"model": "tiny32", "n": 16, "steps": 3000, "sampler": "pc"}
            r = client.post("/v1/admin/sampling", json=body, headers=auth(admin))
            assert r.status_code == 202, r.text
            stopped = wait(client, admin, r.json()["id"], timeout=120)
            assert stopped["state"] == "failed", stopped
            assert (
                "time limit of a sampling job (1 s, SCORERECON_TIME_LIMITS_S)" in stopped["error"]
            )
            done = wait(client, key, submit(client, key).json()["id"], timeout=90)
            assert done["state"] == "succeeded", done["error"]
    finally:
        stop(worker)
    app.state.jobs.engine.dispose()
