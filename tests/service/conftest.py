"""Gateway fixtures: a fresh database (SQLite file or a throwaway PostgreSQL database on the
session's own server, tests/servers.py), a tiny 32² model, keys for two owners and an admin."""

import io
import json
import uuid

import jwt
import numpy as np
import psycopg
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi.testclient import TestClient

from models.nets.ncsnpp import build
from models.registry import save_model
from models.sde import VESDE
from service.app import create_app
from service.auth import create_key
from service.settings import Settings
from tests import servers

METRICS_TOKEN = "scrape-" + "m" * 24  # /metrics is closed without it (SCORERECON_METRICS_TOKEN)


def _postgres_db():
    """A new database on the session's PostgreSQL; the tests skip, saying why, where
    PostgreSQL cannot be started."""
    admin = servers.conninfo("postgres")  # skips, saying why, without PostgreSQL
    name = f"scorerecon_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return name


def _drop_postgres_db(name):
    with psycopg.connect(servers.conninfo("postgres"), autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    name = _postgres_db()
    yield servers.database_url() + name
    _drop_postgres_db(name)


def tiny_model(models_dir, name: str = "tiny32", recon: dict | None = None):
    """An untrained 32² prior; ``recon``: its card's solver values."""
    sde = VESDE(0.01, 20.0)
    torch.manual_seed(0)
    card = {"image_size": 32} | ({"recon": recon} if recon else {})
    return save_model(models_dir / name, build("tiny", sde.sigma), sde, card)


@pytest.fixture
def settings(tmp_path, db_url):
    s = Settings(
        home=tmp_path / "home",
        database_url=db_url,
        rate_limit_per_minute=10_000,
        failed_auth_per_minute=10_000,
        metrics_token=METRICS_TOKEN,
    )
    s.prepare()
    tiny_model(s.models)
    return s


@pytest.fixture
def gateway(settings):
    app = create_app(settings)
    jobs = app.state.jobs
    keys = {
        "alice": create_key(jobs, ["recon:submit", "recon:read"], "alice")[1],
        "bob": create_key(jobs, ["recon:submit", "recon:read"], "bob")[1],
        "reader": create_key(jobs, ["recon:read"], "alice")[1],
        "admin": create_key(jobs, ["admin"], "ops")[1],
    }
    with TestClient(app) as client:
        yield client, keys, app
    jobs.engine.dispose()


def signing_key(jwks_path, kid: str = "k1"):
    """A new RSA key of an identity provider, its public half written to ``jwks_path`` as
    the provider's key set (RS256, ``kid``)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwks_path.write_text(json.dumps({"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "RS256"}]}))
    return key


def auth(key):
    return {"Authorization": f"Bearer {key}"}


CT_SPEC = '{"modality": "ct", "image_size": 32, "n_views": 8}'


def ct_measurement(shape=(1, 8, 48), value=None) -> bytes:
    g = np.random.default_rng(0)
    arr = g.random(shape).astype(np.float32) if value is None else np.full(shape, value, np.float32)
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()
