"""The result stores: the local directory and an S3-compatible bucket (moto's S3 server on
loopback, spoken to over HTTP by boto3), with the same contract, and a whole job through the
gateway on the S3 store."""

import io
import socket

import numpy as np
import pytest

from service.results import LocalResultStore, S3ResultStore, open_result_store
from service.settings import Settings

JOB = "0123456789abcdef0123456789abcdef"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "scorerecon-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "scorerecon-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def _bucket(endpoint: str, name: str) -> str:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path, s3_env):
    if request.param == "local":
        return LocalResultStore(tmp_path / "results")
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = _bucket(
        endpoint, f"contract-{request.node.name.split('[')[0][-20:]}".lower().replace("_", "-")
    )
    return S3ResultStore(f"s3://{bucket}/site-a", endpoint_url=endpoint, region="us-east-1")


def test_put_get_exists_delete(store):
    assert not store.exists(JOB, "recon.npy")
    with pytest.raises(FileNotFoundError):
        store.get(JOB, "recon.npy")
    store.put(JOB, "recon.npy", b"first")
    store.put(JOB, "recon.npy", b"second")  # overwrite replaces the whole object
    store.put(JOB, "report.json", b"{}")
    assert store.get(JOB, "recon.npy") == b"second" and store.exists(JOB, "report.json")
    other = "f" * 32
    store.put(other, "recon.npy", b"keep")
    store.delete(JOB, names=("recon.npy", "std.npy"))  # only these; a missing one is fine
    assert not store.exists(JOB, "recon.npy") and store.get(JOB, "report.json") == b"{}"
    store.put(JOB, "recon.npy", b"again")
    store.delete(JOB)
    assert not store.exists(JOB, "recon.npy") and not store.exists(JOB, "report.json")
    assert store.get(other, "recon.npy") == b"keep"  # deleting one job leaves the others


@pytest.mark.parametrize(
    "job_id,name",
    [("../../etc", "recon.npy"), (JOB, "../passwd"), (JOB, "evil.sh"), ("A" * 32, "recon.npy")],
)
def test_keys_outside_the_fixed_set_are_refused(store, job_id, name):
    with pytest.raises(ValueError, match="invalid result key"):
        store.put(job_id, name, b"x")


def test_s3_objects_live_under_the_prefix(s3_endpoint, s3_env):
    import boto3

    bucket = _bucket(s3_endpoint, "prefix-check")
    S3ResultStore(f"s3://{bucket}/a/b", endpoint_url=s3_endpoint).put(JOB, "std.npy", b"1")
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert keys == [f"a/b/{JOB}/std.npy"]


def test_settings_choose_the_store(tmp_path, s3_endpoint, s3_env):
    local = open_result_store(Settings(home=tmp_path))
    assert isinstance(local, LocalResultStore) and local.root == tmp_path / "results"
    s3 = open_result_store(
        Settings(home=tmp_path, result_store="s3://b/p", s3_endpoint_url=s3_endpoint)
    )
    assert isinstance(s3, S3ResultStore) and (s3.bucket, s3.prefix) == ("b", "p")
    with pytest.raises(ValueError, match="SCORERECON_STORAGE_DIR"):
        open_result_store(Settings(home=tmp_path, result_store="/srv/results"))


def test_a_job_through_the_gateway_on_s3(tmp_path, s3_endpoint, s3_env):
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth import create_key
    from tests.service.conftest import auth, ct_measurement, tiny_model
    from tests.service.test_gateway import submit, wait

    bucket = _bucket(s3_endpoint, "gateway-results")
    settings = Settings(
        home=tmp_path / "home",
        result_store=f"s3://{bucket}/jobs",
        s3_endpoint_url=s3_endpoint,
        rate_limit_per_minute=10_000,
    ).prepare()
    tiny_model(settings.models)
    app = create_app(settings)
    key = create_key(app.state.jobs, ["recon:submit", "recon:read"], "alice")[1]
    with TestClient(app) as client:
        job = submit(client, key, data=ct_measurement()).json()
        done = wait(client, key, job["id"])
        assert done["state"] == "succeeded", done
        recon = client.get(done["links"]["result_npy"], headers=auth(key))
        assert np.load(io.BytesIO(recon.content)).shape == (1, 1, 32, 32)
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    names = {o["Key"].split("/")[-1] for o in client.list_objects_v2(Bucket=bucket)["Contents"]}
    assert {"measurement.npy", "recon.npy", "std.npy", "report.json"} <= names
    assert not any((settings.results).iterdir())  # nothing went to the local directory
    app.state.jobs.engine.dispose()
