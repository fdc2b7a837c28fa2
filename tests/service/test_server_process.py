"""The start commands the containers use, as real processes: ``scorerecon keys create``, then
``scorerecon serve`` (uvicorn, embedded mode, migrations at start), a job submitted over
HTTP, and the server stopped by the pid we started."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from tests.service.conftest import CT_SPEC, ct_measurement, tiny_model

SCORERECON = str(Path(sys.executable).parent / "scorerecon")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def _serve(env: dict):
    """``scorerecon serve`` on a free loopback port until ready; stopped by its pid."""
    port = _port()
    server = subprocess.Popen(
        [SCORERECON, "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end and server.poll() is None, "server did not start"
            time.sleep(0.2)
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def test_keys_create_then_serve_work_together(tmp_path):
    env = {**os.environ, "SCORERECON_HOME": str(tmp_path / "home")}
    env.pop("SCORERECON_EXECUTOR", None)
    created = subprocess.run(
        [SCORERECON, "keys", "create", "--owner", "ward"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    key = json.loads(created.stdout)["key"]
    listed = subprocess.run(
        [SCORERECON, "keys", "list"], env=env, check=True, capture_output=True, text=True
    ).stdout
    assert key not in listed and "ward" in listed
    tiny_model(tmp_path / "home" / "models")
    with _serve(env) as base:
        h = {"Authorization": f"Bearer {key}"}
        r = httpx.post(
            base + "/v1/reconstructions",
            headers=h,
            files={"measurement": ("y.npy", ct_measurement())},
            data={"spec": CT_SPEC, "model": "tiny32", "sampler": "fast", "nfe": "4"},
        )
        assert r.status_code == 202, r.text
        job = r.json()
        end = time.monotonic() + 60
        while job["state"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < end
            time.sleep(0.2)
            job = httpx.get(base + job["links"]["self"], headers=h).json()
        assert job["state"] == "succeeded", job
        recon = np.load(io.BytesIO(httpx.get(base + job["links"]["result_npy"], headers=h).content))
        assert recon.shape == (1, 1, 32, 32)
        assert httpx.get(base + "/openapi.json").json()["info"]["title"] == "scorerecon"


def test_console_cookies_are_secure_behind_a_trusted_tls_proxy(tmp_path):
    """``serve`` believes X-Forwarded-Proto from SCORERECON_FORWARDED_ALLOW_IPS only: from
    a trusted proxy (here loopback) the console's cookie is Secure; from any other peer the
    header changes nothing."""
    env = {**os.environ, "SCORERECON_HOME": str(tmp_path / "home")}
    env.pop("SCORERECON_EXECUTOR", None)
    proxied = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "10.1.2.3"}
    for allowed, secure in (("127.0.0.1", True), ("10.9.9.9", False)):
        with _serve({**env, "SCORERECON_FORWARDED_ALLOW_IPS": allowed}) as base:
            plain = httpx.get(base + "/ui/login").headers["set-cookie"]
            behind = httpx.get(base + "/ui/login", headers=proxied).headers["set-cookie"]
        assert "secure" not in plain.lower()
        assert ("secure" in behind.lower()) is secure, (allowed, behind)


def test_serve_help_documents_the_site_settings():
    """A site's engineer finds the settings in ``serve --help``: home, database, broker,
    PACS destinations, with their defaults and where the rest are."""
    out = subprocess.run(
        [SCORERECON, "serve", "--help"], check=True, capture_output=True, text=True
    ).stdout
    for name in ("HOME", "DATABASE_URL", "EXECUTOR", "BROKER_URL", "PACS", "OIDC_ISSUER"):
        assert f"SCORERECON_{name} " in out, name
    assert "[default: redis://127.0.0.1:6379/0]" in out and "docs/deployment.md" in out
