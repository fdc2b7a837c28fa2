"""Real Celery workers on the real Redis (database 15, flushed): a job from submit to result,
a spec error that fails without retry, and a worker killed mid-job whose job completes on
another worker exactly once."""

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
from tests.service.conftest import auth, tiny_model
from tests.service.test_gateway import submit, wait

BROKER = "redis://127.0.0.1:6379/15"


@pytest.fixture
def env(tmp_path):
    redis.Redis.from_url(BROKER).flushdb()
    home = tmp_path / "home"
    values = {
        "SCORERECON_HOME": str(home),
        "SCORERECON_BROKER_URL": BROKER,
        "SCORERECON_EXECUTOR": "celery",
        "SCORERECON_HEARTBEAT_STALE_S": "3",
        "SCORERECON_TORCH_THREADS": "1",
        "SCORERECON_RATE_LIMIT_PER_MINUTE": "100000",
    }
    settings = Settings(**{k.removeprefix("SCORERECON_").lower(): v for k, v in values.items()})
    settings.prepare()
    tiny_model(settings.models)
    yield {**os.environ, **values}, settings
    redis.Redis.from_url(BROKER).flushdb()


def _npy() -> bytes:
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((1, 1, 8, 48)).astype(np.float32))
    return buf.getvalue()


def start_worker(environ):
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", "worker", "--queues", "gpu,cpu"],
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
            from workers.tasks import sweep

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
