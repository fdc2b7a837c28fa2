"""Security (issue 9, part 4): who may call what, secrets, pickles, paths, logs, static checks.

* the auth matrix: every route of the app (enumerated, so a new one must be classified here)
  against anonymous, invalid, expired, wrong-audience, revoked, under-scoped, other-owner and
  admin callers, through the API's bearer header and the console's cookie;
* API keys: never in a log (DEBUG, SQL logging on, a real site's files) nor in any response
  after the one that created them; compared as hashes with ``hmac.compare_digest``;
* no pickle: checkpoints that are pickles are refused unread, uploads with object arrays are
  refused, and the code base never unpickles;
* paths: hostile archive members, dataset, model and job names, result formats, console
  image and figure names and training folders are refused and write nothing outside;
* patient data: a real site (gateway and Celery worker processes) runs, fails and refuses
  jobs that carry a DICOM's patient attributes; none of them reaches a log;
* bandit finds nothing of medium or high severity that is not explained (docs/security.md);
* containers (issue 17, part 1): HDF5 external storage, virtual datasets, soft and external
  links, filter plugins and NPZ links are refused with a 4xx naming the measurement, and no
  byte of the targeted server file reaches a response or anything stored;
* forgery and headers (issue 17, part 3): a console POST (login and logout included) without
  the page's CSRF token, with a wrong one or from a foreign Origin is refused with 403 and
  sets no cookie; every form of every console page carries the token; API, console and docs
  answers carry Content-Security-Policy, X-Frame-Options, Referrer-Policy and
  X-Content-Type-Options; /metrics is closed by default and opens only with its token or
  from an allowed network.
* fair use (issue 17): a job's cost is capped per request and per owner, an owner's queued
  jobs are capped, another owner's small job waits at most one step of a large one
  (embedded worker) or runs before the first owner's backlog (Celery), and a cancel takes
  effect within one step.
"""

from __future__ import annotations

import ast
import base64
import hashlib
import hmac
import inspect
import io
import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
import uuid
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path

import h5py
import httpx
import jwt
import numpy as np
import pydicom
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors import SafetensorError
from safetensors.torch import load_file
from sqlalchemy import select
from starlette.routing import Mount, Route

import service.auth
from models.measurements import MeasurementError, read_array
from models.registry import ModelError, load_model, sha256_file
from service.app import create_app
from service.auth import authenticate, create_key, revoke_key
from service.db import ApiKey, Job
from service.oidc import OIDCVerifier
from service.security import API_CSP, CONSOLE_CSP, docs_csp
from service.settings import Settings
from service.ui import COOKIE, CSRF_COOKIE
from tests.service.conftest import CT_SPEC, ct_measurement, signing_key, tiny_model
from tests.site import SCORERECON, Site

ROOT = Path(__file__).resolve().parents[2]
ISS, AUD = "https://idp.hospital.example", "scorerecon"
ALL_SCOPES = "recon:submit recon:read admin"
FINAL = ("succeeded", "failed", "cancelled")
ORIGIN = "http://testserver"  # the TestClient's own origin
CSRF = "T" * 43  # a well-formed console token (what a console page would have set)


# --- an in-process gateway: SQLite, embedded worker, OIDC, a registered data root ---------
@dataclass
class Gateway:
    client: TestClient
    app: FastAPI
    settings: Settings
    keys: dict[str, str]  # name → API key
    ids: dict[str, str]  # name → key id
    token: Callable[..., str]  # an OIDC token signed by the test's identity provider
    job: str = ""  # alice's succeeded reconstruction
    seen: list[httpx.Response] = field(default_factory=list)  # every response

    def call(
        self, method: str, url: str, key=None, cookie=None, csrf: bool = True, **kw
    ) -> httpx.Response:
        """One request with a bearer credential and/or a console cookie (none by default).
        A console POST is sent as the console's own page sends it (its origin, its token in
        the form and the cookie) unless ``csrf`` is False."""
        headers = dict(kw.pop("headers", None) or {})
        cookies = []
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if cookie is not None:
            cookies.append(f"{COOKIE}={cookie}")
        if csrf and method == "POST" and url.startswith("/ui/"):
            headers.setdefault("Origin", ORIGIN)
            cookies.append(f"{CSRF_COOKIE}={CSRF}")
            kw["data"] = {**(kw.get("data") or {}), "csrf_token": CSRF}
        if cookies:
            headers["Cookie"] = "; ".join(cookies)
        self.client.cookies.clear()  # no cookie carried over from an earlier login
        return self.client.request(method, url, headers=headers, follow_redirects=False, **kw)

    def victim(self) -> str:
        """The id of a fresh key, for a request that revokes one."""
        return create_key(self.app.state.jobs, ["recon:read"], "victim")[0]

    def wait(self, job_id: str, timeout: float = 180) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            job = self.call("GET", f"/v1/jobs/{job_id}", self.keys["admin"]).json()
            if job["state"] in FINAL:
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} did not finish")

    @property
    def five_xx(self) -> int:
        return sum(r.status_code >= 500 for r in self.seen)


def submit_form(model: str = "tiny32", **fields) -> dict:
    data = {"spec": CT_SPEC, "model": model, "nfe": "4", "sampler": "fast", **fields}
    return {"files": {"measurement": ("y.npy", ct_measurement())}, "data": data}


@pytest.fixture
def gw(tmp_path):
    jwks = tmp_path / "jwks.json"
    signer = signing_key(jwks)
    (tmp_path / "data").mkdir()
    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        rate_limit_per_minute=10**6,
        failed_auth_per_minute=10**6,  # the matrix sends wrong credentials on purpose
        oidc_issuer=ISS,
        oidc_audience=AUD,
        oidc_jwks=str(jwks),
        data_dirs=[tmp_path / "data"],
    ).prepare()
    Image.new("L", (8, 8)).save(tiny_model(settings.models) / "samples.png")
    app = create_app(settings)
    store = app.state.jobs
    keys, ids = {}, {}
    for name, scopes, owner in [
        ("alice", ["recon:submit", "recon:read"], "alice"),
        ("writer", ["recon:submit"], "alice"),
        ("reader", ["recon:read"], "alice"),
        ("bob", ["recon:submit", "recon:read"], "bob"),
        ("admin", ["admin"], "ops"),
        ("revoked", ["admin"], "ops"),
    ]:
        ids[name], keys[name] = create_key(store, scopes, owner)
    revoke_key(store, ids["revoked"])

    def token(scope: str = ALL_SCOPES, sub: str = "alice", **claims) -> str:
        body = {"iss": ISS, "aud": AUD, "sub": sub, "exp": int(time.time()) + 600, **claims}
        return jwt.encode({**body, "scope": scope}, signer, "RS256", headers={"kid": "k1"})

    with TestClient(app, raise_server_exceptions=False) as client:
        g = Gateway(client, app, settings, keys, ids, token)
        client.event_hooks = {"response": [lambda r: (r.read(), g.seen.append(r))]}
        r = g.call("POST", "/v1/reconstructions", keys["alice"], **submit_form())
        assert r.status_code == 202, r.text
        g.job = r.json()["id"]
        assert g.wait(g.job)["state"] == "succeeded"
        yield g
    store.engine.dispose()


# --- 1. the auth matrix ---------------------------------------------------------------------
@dataclass(frozen=True)
class Caller:
    name: str
    credential: str | None
    scopes: frozenset[str] | None = None  # None: must be refused as unauthenticated
    owner: str | None = None


@dataclass(frozen=True)
class Rule:
    """How a route is protected. kind: public, login (POST /ui/login), api (bearer header),
    ui-page (cookie; refusals redirect to the login page), ui-json (cookie; 401) or metrics
    (its own token or network, never an API credential)."""

    kind: str
    ok: int  # the status for a caller who may call it
    scope: str | None = None  # None: any authenticated caller
    owned: bool = False  # acts on alice's job: another owner gets 404
    request: Callable[[Gateway], dict] | None = None  # url, body, params


def _npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


GOOD_NPY = _npy(np.random.default_rng(0).random((16, 16)).astype(np.float32))

ROUTES: dict[tuple[str, str], Rule] = {
    # Public by design: liveness and readiness probes, the API's own documentation, the
    # console's login page and static files. Login and logout need the console's CSRF token
    # (section 7); the matrix sends it, as the console's page does.
    ("GET", "/healthz"): Rule("public", 200),
    ("GET", "/readyz"): Rule("public", 200),
    # The Prometheus scrape: closed by default, whatever the caller (section 7 opens it).
    ("GET", "/metrics"): Rule("metrics", 403),
    ("GET", "/openapi.json"): Rule("public", 200),
    ("GET", "/docs"): Rule("public", 200),
    ("GET", "/docs/oauth2-redirect"): Rule("public", 200),
    ("GET", "/redoc"): Rule("public", 200),
    ("MOUNT", "/docs-assets"): Rule(
        "public", 200, request=lambda g: {"url": "/docs-assets/swagger-ui-bundle.js"}
    ),
    ("MOUNT", "/ui/static"): Rule(
        "public", 200, request=lambda g: {"url": "/ui/static/console.js"}
    ),
    ("GET", "/ui/login"): Rule("public", 200),
    ("POST", "/ui/login"): Rule("login", 303),
    ("POST", "/ui/logout"): Rule("public", 303),
    # The API.
    ("POST", "/v1/reconstructions"): Rule(
        "api", 202, "recon:submit", request=lambda g: submit_form()
    ),
    ("GET", "/v1/jobs"): Rule("api", 200, "recon:read"),
    ("GET", "/v1/jobs/{job_id}"): Rule("api", 200, "recon:read", owned=True),
    ("DELETE", "/v1/jobs/{job_id}"): Rule("api", 409, "recon:submit", owned=True),  # finished
    ("POST", "/v1/jobs/{job_id}/export"): Rule(
        "api", 422, "recon:submit", True, lambda g: {"json": {"destination": "nowhere"}}
    ),
    ("GET", "/v1/jobs/{job_id}/result"): Rule(
        "api", 200, "recon:read", True, lambda g: {"params": {"format": "json"}}
    ),
    ("GET", "/v1/models"): Rule("api", 200),
    ("GET", "/v1/models/{name}"): Rule("api", 200),
    ("POST", "/v1/admin/sampling"): Rule(
        "api", 422, "admin", request=lambda g: {"json": {"model": "no-such-model"}}
    ),
    ("POST", "/v1/admin/training"): Rule(
        "api", 422, "admin", request=lambda g: {"json": {"data_dir": "/etc", "model_id": "x-1"}}
    ),
    ("POST", "/v1/admin/datasets"): Rule(
        "api",
        201,
        "admin",
        request=lambda g: {"files": {"archive": ("a.zip", _zip({"s.npy": GOOD_NPY}))}},
    ),
    ("POST", "/v1/admin/api-keys"): Rule(
        "api",
        201,
        "admin",
        request=lambda g: {"json": {"scopes": ["recon:read"], "owner": "carol"}},
    ),
    ("DELETE", "/v1/admin/api-keys/{key_id}"): Rule(
        "api", 200, "admin", request=lambda g: {"url": f"/v1/admin/api-keys/{g.victim()}"}
    ),
    ("GET", "/v1/admin/api-keys"): Rule("api", 200, "admin"),
    ("GET", "/v1/admin/audit"): Rule("api", 200, "admin"),
    # The console.
    ("GET", "/ui"): Rule("ui-page", 200, "recon:read"),
    ("GET", "/ui/"): Rule("ui-page", 200, "recon:read"),
    ("GET", "/ui/jobs.json"): Rule("ui-json", 200, "recon:read"),
    ("GET", "/ui/jobs/{job_id}"): Rule("ui-page", 200, "recon:read", owned=True),
    ("GET", "/ui/jobs/{job_id}/state"): Rule("ui-json", 200, "recon:read", owned=True),
    ("GET", "/ui/jobs/{job_id}/image/{name}"): Rule(
        "ui-json",
        200,
        "recon:read",
        True,
        lambda g: {"url": f"/ui/jobs/{g.job}/image/reconstruction"},
    ),
    ("GET", "/ui/new"): Rule("ui-page", 200),
    ("POST", "/ui/new"): Rule("ui-page", 303, "recon:submit", request=lambda g: submit_form()),
    ("GET", "/ui/models"): Rule("ui-page", 200),
    ("GET", "/ui/models/{name}"): Rule("ui-page", 200),
    ("GET", "/ui/models/{name}/{figure}.png"): Rule(
        "ui-json", 200, request=lambda g: {"url": "/ui/models/tiny32/samples.png"}
    ),
    ("GET", "/ui/admin"): Rule("ui-page", 200, "admin"),
    ("POST", "/ui/admin/sampling"): Rule(
        "ui-page",
        303,
        "admin",
        request=lambda g: {"data": {"model": "tiny32", "n": "1", "steps": "2", "sampler": "em"}},
    ),
    ("POST", "/ui/admin/training"): Rule(
        "ui-page",
        422,
        "admin",
        request=lambda g: {"data": {"model_id": "x-1", "source": "data_dir", "location": "/etc"}},
    ),
    ("POST", "/ui/admin/keys"): Rule(
        "ui-page",
        200,
        "admin",
        request=lambda g: {"data": {"owner": "dave", "scopes": ["recon:read"]}},
    ),
    ("POST", "/ui/admin/keys/{key_id}/revoke"): Rule(
        "ui-page", 303, "admin", request=lambda g: {"url": f"/ui/admin/keys/{g.victim()}/revoke"}
    ),
}


def _flat(routes, prefix: str = ""):
    """(prefix, route) of each route, those of included routers (service/routers/) too."""
    for r in routes:
        inner = getattr(r, "original_router", None)
        if inner is not None:
            yield from _flat(inner.routes, prefix + r.include_context.prefix)
        else:
            yield prefix, r


def app_routes(app: FastAPI) -> set[tuple[str, str]]:
    """(method, path) of every route the app serves; a mount is ('MOUNT', path)."""
    found = set()
    for prefix, r in _flat(app.routes):
        if isinstance(r, Mount):
            found.add(("MOUNT", prefix + r.path))
        elif isinstance(r, Route):
            found |= {(m, prefix + r.path) for m in r.methods if m != "HEAD"}
        else:
            found.add((type(r).__name__, getattr(r, "path", repr(r))[:200]))
    return found


def callers(g: Gateway) -> list[Caller]:
    both = frozenset({"recon:submit", "recon:read"})
    return [
        Caller("anonymous", None),
        Caller("unknown key", "sr_0123456789ab_" + "A" * 43),
        Caller("forged secret", f"sr_{g.ids['alice']}_" + "A" * 43),
        Caller("malformed token", "not.a.jwt"),
        Caller("expired OIDC", g.token(exp=int(time.time()) - 60)),
        Caller("wrong-audience OIDC", g.token(aud="another-app")),
        Caller("revoked key", g.keys["revoked"]),
        Caller("read-only key", g.keys["reader"], frozenset({"recon:read"}), "alice"),
        Caller("submit-only key", g.keys["writer"], frozenset({"recon:submit"}), "alice"),
        Caller("OIDC without scopes", g.token(scope="openid"), frozenset(), "alice"),
        Caller(
            "OIDC reader", g.token(scope="openid recon:read"), frozenset({"recon:read"}), "alice"
        ),
        Caller("another owner", g.keys["bob"], both, "bob"),
        Caller("owner", g.keys["alice"], both, "alice"),
        Caller("admin", g.keys["admin"], frozenset({"admin"}), "ops"),
    ]


def expected(rule: Rule, c: Caller) -> int:
    if rule.kind in ("public", "metrics"):
        return rule.ok
    if rule.kind == "login":
        return 422 if c.credential is None else rule.ok if c.scopes is not None else 401
    if c.scopes is None:
        return 303 if rule.kind == "ui-page" else 401
    admin = "admin" in c.scopes
    if rule.scope and rule.scope not in c.scopes and not admin:
        return 403
    if rule.owned and c.owner != "alice" and not admin:
        return 404
    return rule.ok


def send(g: Gateway, method: str, path: str, rule: Rule, c: Caller, bare: bool = False):
    kw = {} if rule.request is None else rule.request(g)
    url = kw.pop("url", None) or path.format(job_id=g.job, name="tiny32")
    kw = {} if bare else kw  # no body, no parameters
    if rule.kind == "login":
        return g.call(method, url, data={"key": c.credential} if c.credential else {})
    key = c.credential if rule.kind in ("api", "public", "metrics") else None
    cookie = c.credential if rule.kind != "api" else None
    return g.call(method if method != "MOUNT" else "GET", url, key, cookie, **kw)


def test_auth_matrix_every_route_by_every_caller(gw, record):
    found = app_routes(gw.app)
    unclassified, stale = sorted(found - set(ROUTES)), sorted(set(ROUTES) - found)
    wrong, cells = [], 0
    for (method, path), rule in ROUTES.items():
        if (method, path) not in found:
            continue
        for c in callers(gw):
            r = send(gw, method, path, rule, c)
            cells += 1
            want = expected(rule, c)
            ok = r.status_code == want
            if want == 303 and rule.kind == "ui-page" and c.scopes is None:
                ok = ok and r.headers["location"] == "/ui/login"
            if rule.kind == "api" and r.status_code in (401, 403, 404):
                ok = ok and r.headers["content-type"] == "application/problem+json"
            if not ok:
                wrong.append(f"{method} {path} as {c.name}: {r.status_code}, expected {want}")
        if rule.kind == "api":  # refused before the body is even validated
            r = send(gw, method, path, rule, Caller("anonymous, no body", None), bare=True)
            cells += 1
            if r.status_code != 401:
                wrong.append(f"{method} {path} anonymous without a body: {r.status_code}")

    # Another owner's job is indistinguishable from a job that does not exist.
    bob = gw.call("GET", f"/v1/jobs/{gw.job}", gw.keys["bob"]).json()
    none = gw.call("GET", f"/v1/jobs/{uuid.uuid4().hex}", gw.keys["bob"]).json()
    hidden = {k: v for k, v in bob.items() if k != "detail"} == {
        k: v for k, v in none.items() if k != "detail"
    }
    # The console's cookies (the key and the CSRF token): HttpOnly, SameSite=Strict, /ui.
    login = gw.call("POST", "/ui/login", data={"key": gw.keys["alice"]})
    set_cookies = [c.lower() for c in login.headers.get_list("set-cookie")]
    cookie_ok = {c.split("=", 1)[0] for c in set_cookies} == {COOKIE, CSRF_COOKIE} and all(
        a in c for c in set_cookies for a in ("httponly", "samesite=strict", "path=/ui")
    )
    # The public probe says nothing about owners or jobs (/metrics: section 7).
    public = gw.call("GET", "/readyz").text
    quiet = not any(s in public for s in ("alice", "bob", "ops", gw.job))
    record(
        "security",
        "auth matrix (endpoints × callers)",
        tried=cells,
        five_xx=gw.five_xx,
        outcome=f"{len(found)} routes × {len(callers(gw))} callers: "
        + ("all as expected" if not wrong else f"{len(wrong)} unexpected")
        + f"; unclassified routes: {len(unclassified)}",
    )
    assert not unclassified, f"classify these routes in ROUTES: {unclassified}"
    assert not stale, f"ROUTES names routes the app does not serve: {stale}"
    assert not wrong, "\n".join(wrong)
    assert hidden, (bob, none)
    assert cookie_ok, set_cookies
    assert quiet
    assert gw.five_xx == 0


def test_oidc_key_set_must_come_over_https():
    """A JWKS fetched over plain HTTP could be swapped in transit: refused at start."""
    for url in ("http://idp.hospital.example/jwks", "ftp://idp/jwks", "file:///etc/jwks.json"):
        with pytest.raises(ValueError, match="https"):
            OIDCVerifier(ISS, AUD, url)
    for ok in ("https://idp.hospital.example/jwks", "http://127.0.0.1:8080/jwks", "/etc/j.json"):
        assert OIDCVerifier(ISS, AUD, ok).jwks == ok


# --- 2. API keys ----------------------------------------------------------------------------
def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _cli(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SCORERECON, "keys", *args], env=env, capture_output=True, text=True, check=True
    )


def test_api_keys_are_never_logged_or_returned(gw, caplog, record):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # an operator debugging SQL
    admin = gw.keys["admin"]
    created: dict[int, str] = {}  # id(response) → the key it created (and may show)
    r = gw.call(
        "POST",
        "/v1/admin/api-keys",
        admin,
        json={"scopes": ["recon:submit", "recon:read"], "owner": "carol"},
    )
    api_key, api_id = r.json()["key"], r.json()["id"]
    created[id(r)] = api_key
    r = gw.call(
        "POST", "/ui/admin/keys", cookie=admin, data={"owner": "dave", "scopes": ["recon:read"]}
    )
    ui_key = re.search(r"sr_[0-9a-f]{12}_[\w-]{43}", r.text).group()
    created[id(r)] = ui_key
    env = {
        **os.environ,
        "SCORERECON_HOME": str(gw.settings.home),
        "SCORERECON_DATABASE_URL": gw.settings.db_url,
    }
    made = _cli(env, "create", "--scopes", "recon:read", "--owner", "erin")
    cli_key, cli_id = json.loads(made.stdout)["key"], json.loads(made.stdout)["id"]
    outputs = [made.stderr]

    used = []
    for key in (api_key, ui_key, cli_key):
        used.append(gw.call("GET", "/v1/jobs", key).status_code)
        used.append(gw.call("POST", "/ui/login", data={"key": key}).status_code)
        used.append(gw.call("GET", "/ui/", cookie=key).status_code)
    job = gw.call("POST", "/v1/reconstructions", api_key, **submit_form())
    gw.wait(job.json()["id"])
    used.append(gw.call("GET", f"/v1/jobs/{job.json()['id']}", api_key).status_code)
    gw.call("GET", "/v1/admin/api-keys", admin)
    gw.call("GET", "/ui/admin", cookie=admin)
    gw.call("GET", "/v1/admin/audit", admin)
    listed = _cli(env, "list")
    outputs += [listed.stdout, listed.stderr, _cli(env, "revoke", cli_id).stderr]
    revoked = gw.call("DELETE", f"/v1/admin/api-keys/{api_id}", admin).status_code
    refused = [gw.call("GET", "/v1/jobs", k).status_code for k in (api_key, cli_key)]

    everything = {**gw.keys, "api": api_key, "console": ui_key, "cli": cli_key}
    secrets = {k: (k, k.split("_", 2)[2], _sha(k)) for k in everything.values()}
    leaks = []
    for resp in gw.seen:
        shown = created.get(id(resp))
        headers = {
            k: v
            for k, v in resp.headers.items()
            if not (k == "set-cookie" and resp.request.url.path == "/ui/login")
        }  # the login's cookie holds the key the browser just sent: that is what it is for
        text = resp.text + json.dumps(headers)
        for key, forms in secrets.items():
            if key != shown and any(f in text for f in forms):
                leaks.append(f"{resp.request.method} {resp.request.url.path}")
    logs = caplog.text + "".join(outputs)
    logged = [k for k, forms in secrets.items() if any(f in logs for f in forms)]
    db = Path(gw.settings.db_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db.parent.glob(db.name + "*"))  # and its WAL
    in_db = [k for k in secrets if k.encode() in stored or k.split("_", 2)[2].encode() in stored]
    hashed = all(_sha(k).encode() in stored for k in secrets)
    record(
        "security",
        "API keys in logs and responses",
        tried=len(secrets),
        five_xx=gw.five_xx,
        outcome=f"{len(secrets)} keys (API, console, CLI, fixtures) created, used, listed and "
        f"revoked; scanned {len(gw.seen)} responses, {len(caplog.records)} DEBUG log records "
        f"(SQL logging on) and the CLI's output for the key, its secret and its SHA-256: "
        f"{len(leaks)} responses and {len(logged)} logs showed one; {len(in_db)} stored in clear",
    )
    assert used == [200, 303, 200] * 3 + [200] and revoked == 200 and refused == [401, 401]
    assert "INSERT INTO api_keys" in caplog.text  # SQL was logged: only its values are hidden
    assert not leaks, leaks
    assert not logged, logged
    assert not in_db and hashed
    assert gw.five_xx == 0


def test_key_verification_compares_hashes_in_constant_time(gw, monkeypatch):
    """authenticate() hashes the whole presented key and compares it with the stored (or a
    dummy) hash through hmac.compare_digest, exactly once, whatever the key."""
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store, alice = gw.app.state.jobs, gw.keys["alice"]
    with store.sessions() as s:
        stored = {row.id: row.hash for row in s.scalars(select(ApiKey))}
    cases = [  # (key, accepted, the hash it must be compared with)
        (alice, True, stored[gw.ids["alice"]]),
        (f"sr_{gw.ids['alice']}_" + "A" * 43, False, stored[gw.ids["alice"]]),  # wrong secret
        (alice[:-1] + ("B" if alice.endswith("A") else "A"), False, stored[gw.ids["alice"]]),
        ("sr_0123456789ab_" + "A" * 43, False, _sha("dummy")),  # unknown id: same work
        (gw.keys["revoked"], False, stored[gw.ids["revoked"]]),
    ]
    for key, accepted, against in cases:
        calls.clear()
        assert (authenticate(store, key) is not None) is accepted, key
        assert calls == [(against, _sha(key))], calls
    # Nothing in the verification path compares hashes with == or !=.
    tree = ast.parse(inspect.getsource(service.auth.authenticate))
    plain = [
        ast.unparse(n)
        for n in ast.walk(tree)
        if isinstance(n, ast.Compare)
        and any(isinstance(op, ast.Eq | ast.NotEq) for op in n.ops)
        and ("hash" in ast.unparse(n))
    ]
    assert not plain, plain


# --- 3. no pickle ---------------------------------------------------------------------------
class Payload:
    """Unpickling this creates ``marker``: the proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


BANNED_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "marshal"}
BANNED_CALLS = {"torch.load", "torch.jit.load", "yaml.load", "yaml.unsafe_load", "eval", "exec"}


def unpickling_in_code() -> tuple[list[str], int]:
    """Uses of pickle in models/, service/, workers/, and the number of np.load calls (each
    must say allow_pickle=False)."""
    found, loads = [], 0
    for path in sorted(
        p for d in ("models", "service", "workers") for p in (ROOT / d).rglob("*.py")
    ):
        where = path.relative_to(ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                found += [
                    f"{where}:{node.lineno} imports {n}"
                    for n in names
                    if n.split(".")[0] in BANNED_MODULES
                ]
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kw = {k.arg: k.value for k in node.keywords}
            if name in BANNED_CALLS or name.endswith(
                ("pickle.load", "pickle.loads", "read_pickle")
            ):
                found.append(f"{where}:{node.lineno} calls {name}")
            if name in ("np.load", "numpy.load"):
                loads += 1
                flag = kw.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where}:{node.lineno} np.load without allow_pickle=False")
            flag = kw.get("allow_pickle")
            if isinstance(flag, ast.Constant) and flag.value is True:
                found.append(f"{where}:{node.lineno} allow_pickle=True")
    return found, loads


def _model_with_weights(src: Path, dest: Path, name: str, data: bytes) -> Path:
    """A copy of model ``src`` whose card matches ``data`` stored as ``name``."""
    shutil.copytree(src, dest)
    (dest / "weights.safetensors").unlink()
    (dest / name).write_bytes(data)
    card = json.loads((dest / "card.json").read_text())
    card["weights_sha256"] = sha256_file(dest / name)
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def test_no_pickle_is_ever_loaded(gw, tmp_path, record):
    markers = tmp_path / "markers"
    markers.mkdir()
    pickled = {n: pickle.dumps(Payload(markers / n)) for n in ("pt", "st", "npy", "raw")}
    control = markers / "control"
    pickle.loads(pickle.dumps(Payload(control))).close()  # the payload works when unpickled
    assert control.exists()
    control.unlink()
    buf = io.BytesIO()
    torch.save({"w": Payload(markers / "zip")}, buf)

    tiny, models = gw.settings.models / "tiny32", tmp_path / "checkpoints"
    refused = {}
    for name, weights, data in [
        ("pt-only", "weights.pt", pickled["pt"]),
        ("pickle-as-safetensors", "weights.safetensors", pickled["st"]),
        ("torch-zip-as-safetensors", "weights.safetensors", buf.getvalue()),
    ]:
        folder = _model_with_weights(tiny, models / name, weights, data)
        with pytest.raises(ModelError) as err:
            load_model(folder)
        refused[name] = str(err.value)
    with pytest.raises(SafetensorError):  # what training resumes and the priors use
        load_file(str(models / "pickle-as-safetensors" / "weights.safetensors"))

    # Through the service: a model whose weights are a pickle fails its job, unread.
    _model_with_weights(tiny, gw.settings.models / "evil32", "weights.safetensors", pickled["st"])
    r = gw.call("POST", "/v1/reconstructions", gw.keys["alice"], **submit_form("evil32"))
    evil = gw.wait(r.json()["id"])
    # Uploads holding pickles: object arrays in .npy and .npz, a bare pickle, an archive.
    obj = np.array([Payload(markers / "npy")], dtype=object)
    npz = io.BytesIO()
    np.savez(npz, y=np.array([Payload(markers / "npz")], dtype=object))
    uploads = {"npy": _npy(obj, allow_pickle=True), "npz": npz.getvalue(), "raw": pickled["raw"]}
    statuses = []
    for data in uploads.values():
        form = submit_form()
        form["files"]["measurement"] = ("y.npy", data)
        statuses.append(
            gw.call("POST", "/v1/reconstructions", gw.keys["alice"], **form).status_code
        )
        statuses.append(gw.call("POST", "/ui/new", cookie=gw.keys["alice"], **form).status_code)
    archive = _zip(
        {
            "ok/s.npy": GOOD_NPY,
            "bad/s.npy": _npy(np.array([Payload(markers / "ds")], dtype=object), True),
        }
    )
    ds = gw.call(
        "POST", "/v1/admin/datasets", gw.keys["admin"], files={"archive": ("a.zip", archive)}
    )
    skipped = ds.json().get("skipped", [])

    in_code, n_loads = unpickling_in_code()
    from workers.celery_app import make_celery

    conf = make_celery(Settings(home=tmp_path / "celery")).conf
    broker_json = conf.accept_content == ["json"] and conf.task_serializer == "json"
    ran = sorted(p.name for p in markers.iterdir())
    record(
        "security",
        "pickles (checkpoints, uploads, code)",
        tried=len(refused) + 1 + len(statuses) + 1 + n_loads,
        five_xx=gw.five_xx,
        outcome=f"{len(refused)} pickled checkpoints refused by the registry and 1 by a job "
        f"({evil['state']}); {len(statuses)} uploads holding pickles (object .npy and .npz, a "
        f"bare pickle; API and console) refused "
        f"({sorted(set(statuses))}); the pickled dataset file skipped; payloads run: {len(ran)}; "
        f"{n_loads} np.load calls, all allow_pickle=False; pickle in code: {len(in_code)}; "
        f"broker JSON only: {broker_json}",
    )
    assert not ran, f"a pickle was executed: {ran}"
    assert "weights.pt" in refused["pt-only"] and "pickles are refused" in refused["pt-only"]
    assert "a pickle" in refused["pickle-as-safetensors"]
    assert "torch.save zip" in refused["torch-zip-as-safetensors"]
    assert all("never unpickled" in m for k, m in refused.items() if k != "pt-only")
    assert evil["state"] == "failed" and "never unpickled" in evil["error"], evil
    assert statuses == [422] * len(statuses), statuses
    assert ds.status_code == 201 and [s for s in skipped if s.startswith("bad/s.npy")], ds.text
    assert not in_code, in_code
    assert broker_json
    assert gw.five_xx == 0


# --- 4. paths -------------------------------------------------------------------------------
def _tar(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w:gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as t:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                t.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                t.addfile(info, io.BytesIO(m[1]))
    return buf.getvalue()


def _special(name: str, kind: bytes, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


def _zip_mode(name: str, mode: int, data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok.npy", GOOD_NPY)
        info = zipfile.ZipInfo(name)
        info.create_system, info.external_attr = 3, mode << 16
        z.writestr(info, data)
    return buf.getvalue()


def hostile_archives(tmp_path: Path, tag: str) -> dict[str, bytes]:
    """Archives whose members would land outside their folder, or are not regular files."""
    ok = ("ok.npy", GOOD_NPY)
    outside = str(tmp_path / f"abs-{tag}.npy")
    arch = {}
    for kind, name in [
        ("dot-dot", f"../escape-{tag}.npy"),
        ("deep dot-dot", f"a/../../../escape-{tag}.npy"),
        ("absolute", outside),
        ("backslash", f"..\\escape-{tag}.npy"),
        ("drive letter", f"C:/escape-{tag}.npy"),
    ]:
        arch[f"tar {kind}"] = _tar([ok, (name, GOOD_NPY)])
        arch[f"zip {kind}"] = _zip({"ok.npy": GOOD_NPY, name: GOOD_NPY})
    arch["tar symlink then a file through it"] = _tar(
        [ok, _special("link", tarfile.SYMTYPE, str(tmp_path)), (f"link/escape-{tag}.npy", GOOD_NPY)]
    )
    arch["tar symlink to /etc/passwd"] = _tar(
        [ok, _special("passwd", tarfile.SYMTYPE, "/etc/passwd")]
    )
    arch["tar hard link to /etc/passwd"] = _tar(
        [ok, _special("hard", tarfile.LNKTYPE, "/etc/passwd")]
    )
    arch["tar character device"] = _tar([ok, _special("tty", tarfile.CHRTYPE)], "w")
    arch["tar block device"] = _tar([ok, _special("sda", tarfile.BLKTYPE)], "w")
    arch["tar fifo"] = _tar([ok, _special("fifo", tarfile.FIFOTYPE)], "w")
    arch["zip symlink"] = _zip_mode("passwd", 0o120777, b"/etc/passwd")
    arch["zip character device"] = _zip_mode("tty", 0o020644, b"")
    arch["zip fifo"] = _zip_mode("fifo", 0o010644, b"")
    return arch


def _tree(root: Path) -> dict[str, int]:
    """Every path under ``root`` with its size (-1 for folders), the job database aside."""
    return {
        str(p.relative_to(root)): p.lstat().st_size if p.is_file() else -1
        for p in root.rglob("*")
        if not p.name.startswith("jobs.db")
    }


def test_paths_from_clients_are_never_joined_unsafely(gw, tmp_path, record):
    tag = uuid.uuid4().hex[:8]
    root = tmp_path / "data"  # the registered training root
    (tmp_path / "data-evil").mkdir()  # a sibling whose name extends the root's
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")  # a link out of the root
    (gw.settings.home / "datasets").mkdir(exist_ok=True)  # where uploads are unpacked
    before = _tree(tmp_path)
    admin, alice, job = gw.keys["admin"], gw.keys["alice"], gw.job
    cases: list[tuple[str, int, httpx.Response]] = []

    def check(what: str, want: int, r: httpx.Response) -> None:
        cases.append((what, want, r))

    for kind, raw in hostile_archives(tmp_path, tag).items():
        files = {"archive": ("a.tar.gz", raw)}
        check(f"archive: {kind}", 422, gw.call("POST", "/v1/admin/datasets", admin, files=files))
    train = {"model_id": "escape-1", "image_size": 16, "steps": 1}
    for name in ("../../etc", "/etc/passwd", "..%2F..%2Fetc", "0" * 31 + "/", "f" * 32):
        r = gw.call("POST", "/v1/admin/training", admin, json={**train, "dataset": name})
        check(f"dataset {name!r}", 422, r)
    for data_dir in (
        "/etc",
        str(root / ".."),
        str(root / "ct" / ".." / ".."),
        str(tmp_path / "data-evil"),
        str(root / "escape"),
        "data",
        "~",
    ):
        r = gw.call("POST", "/v1/admin/training", admin, json={**train, "data_dir": data_dir})
        check(f"data_dir {data_dir!r}", 422, r)
        form = {"model_id": "escape-1", "source": "data_dir", "location": data_dir}
        check(
            f"console data_dir {data_dir!r}",
            422,
            gw.call("POST", "/ui/admin/training", cookie=admin, data=form),
        )
    for name in ("..%2F..%2Fetc", "%2e%2e", "tiny32%2F..%2F..%2Fjobs.db", "%00"):
        check(f"model URL {name}", 404, gw.call("GET", f"/v1/models/{name}", alice))
        check(f"console model {name}", 404, gw.call("GET", f"/ui/models/{name}", cookie=alice))
    for name in (
        "../tiny32",
        "/etc/passwd",
        "tiny32/../tiny32",
        str(gw.settings.models / "tiny32"),
    ):
        check(
            f"model field {name!r}",
            422,
            gw.call("POST", "/v1/reconstructions", alice, **submit_form(name)),
        )
        r = gw.call("POST", "/v1/admin/sampling", admin, json={"model": name, "n": 1, "steps": 2})
        check(f"sampling model {name!r}", 422, r)
    for name in ("../escape", "a/b", "..", "/abs"):
        check(
            f"model_id {name!r}",
            422,
            gw.call(
                "POST",
                "/v1/admin/training",
                admin,
                json={**train, "model_id": name, "data_dir": str(root)},
            ),
        )
    for bad in ("..%2F..%2Fetc", "%2e%2e", job[:-2] + "%2F..", job.upper(), job + "%00", "x" * 32):
        check(f"job id {bad}", 404, gw.call("GET", f"/v1/jobs/{bad}", alice))
        check(f"result of job id {bad}", 404, gw.call("GET", f"/v1/jobs/{bad}/result", alice))
        check(f"cancel job id {bad}", 404, gw.call("DELETE", f"/v1/jobs/{bad}", alice))
        check(f"console job id {bad}", 404, gw.call("GET", f"/ui/jobs/{bad}/state", cookie=alice))
    for fmt in ("../../etc/passwd", "npy/../../jobs.db", "json\n", "dicom\x00", "NPY", "recon.npy"):
        r = gw.call("GET", f"/v1/jobs/{job}/result", alice, params={"format": fmt})
        check(f"format {fmt!r}", 422, r)
    for name in ("..%2F..%2F..%2Fjobs.db", "recon.npy", "measurement.npy", "%2e%2e", "std"):
        check(
            f"console image {name}",
            404,
            gw.call("GET", f"/ui/jobs/{job}/image/{name}", cookie=alice),
        )
    for figure in ("..%2Fcard", "..%2F..%2Ftiny32%2Fsamples", "weights", "card.json%00"):
        r = gw.call("GET", f"/ui/models/tiny32/{figure}.png", cookie=alice)
        check(f"console figure {figure}", 404, r)
    for name in ("..%2Fapp.py", "%2e%2e/app.py", "..%2F..%2Fservice%2Fapp.py"):
        check(f"static {name}", 404, gw.call("GET", f"/ui/static/{name}"))
    check("key id ../", 404, gw.call("DELETE", "/v1/admin/api-keys/..%2F..%2Fx", admin))

    after = _tree(tmp_path)
    escaped = [p for p in after if tag in p] + [str(p) for p in Path("/tmp").glob(f"*{tag}*")]
    datasets = gw.settings.home / "datasets"
    left = sorted(p.name for p in datasets.iterdir()) if datasets.exists() else []
    wrong = [
        f"{w}: {r.status_code} (expected {want})" for w, want, r in cases if r.status_code != want
    ]
    leaked = [w for w, _, r in cases if "def create_app" in r.text or "root:x:0:0" in r.text]
    record(
        "security",
        "paths (archives, names, ids, formats, folders)",
        tried=len(cases),
        five_xx=gw.five_xx,
        outcome=f"{len(cases)} hostile paths: {len(cases) - len(wrong)} refused as expected "
        f"({sorted({r.status_code for _, _, r in cases})}); files written outside: "
        f"{len(escaped)}; datasets left behind: {len(left)}; tree unchanged: {after == before}",
    )
    assert not wrong, "\n".join(wrong)
    assert not escaped and not left and after == before, (escaped, left)
    assert not leaked, leaked
    assert gw.five_xx == 0


# --- 5. no patient data in logs -------------------------------------------------------------
def patient_dicom() -> tuple[bytes, dict[str, str]]:
    """pydicom's CT_small.dcm with a birth date and an accession number added."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PatientBirthDate, ds.AccessionNumber = "19610704", "ACC7731XQ"
    buf = io.BytesIO()
    ds.save_as(buf)
    keys = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber")
    return buf.getvalue(), {k: str(ds.get(k)) for k in keys}


SOURCE = {  # patient attributes given as JSON
    "PatientName": "Oakenfold^Janelle^Q",
    "PatientID": "PID5552X",
    "PatientBirthDate": "19480213",
    "AccessionNumber": "ACC990KL",
}


def broken_model(models: Path) -> None:
    """A model the gateway accepts (its card is fine) and the worker fails to load."""
    shutil.copytree(models / "tiny32", models / "broken32")
    (models / "broken32" / "weights.safetensors").write_bytes(b"\0" * 64)


def patient_traffic(post: Callable, get: Callable, wait: Callable, upload: Callable) -> dict:
    """Jobs that succeed, fail and are refused, all carrying patient data; every result
    fetched; training archives in folders named after the patient. ``post``, ``get`` and
    (as admin) ``upload`` take (path, **kw) and return responses; returns what was seen."""
    dcm, _ = patient_dicom()
    seen: dict[str, int] = {}
    folder = SOURCE["PatientName"]  # exports often name folders after the patient
    archive = {f"{folder}/IM0001.dcm": dcm, f"{folder}/IM0002.dcm": dcm[:300], "s.npy": GOOD_NPY}
    r = upload("/v1/admin/datasets", files={"archive": ("a.zip", _zip(archive))})
    seen["dataset with an unreadable file"] = r.status_code
    archive = {**archive, f"../{folder}/IM0003.dcm": dcm}
    r = upload("/v1/admin/datasets", files={"archive": ("a.zip", _zip(archive))})
    seen["refused: dataset"] = r.status_code

    def submit(what: str, model: str = "tiny32", measurement: bytes | None = None, **extra):
        form = submit_form(model)
        if measurement is not None:
            form["files"]["measurement"] = ("y.npy", measurement)
        form["files"].update(extra.pop("files", {}))
        form["data"].update(extra)
        r = post("/v1/reconstructions", **form)
        seen[what] = r.status_code
        return r.json().get("id")

    done = [
        submit("from DICOM", files={"source_dicom": ("s.dcm", dcm)}),
        submit("from JSON", source=json.dumps(SOURCE)),
        submit("failing", "broken32", files={"source_dicom": ("s.dcm", dcm)}),
    ]
    wrong_shape = _npy(np.zeros((1, 3, 3), np.float32))
    submit("refused: shape", measurement=wrong_shape, files={"source_dicom": ("s.dcm", dcm)})
    submit("refused: truncated DICOM", files={"source_dicom": ("s.dcm", dcm[:300])})
    submit(
        "refused: control char",
        source=json.dumps({**SOURCE, "PatientName": "Oakenfold^Janelle^Q\x07"}),
    )
    submit("refused: too long", source=json.dumps({**SOURCE, "PatientID": "PID5552X" * 10}))
    submit("refused: not a source attribute", source=json.dumps({**SOURCE, "PatientAddress": "x"}))
    for job_id in done:
        job = wait(job_id)
        seen[f"job {job['state']}"] = seen.get(f"job {job['state']}", 0) + 1
        if job_id == done[0]:  # the patient's attributes did reach the job
            carried = job["params"]["dicom_source"].items() >= patient_dicom()[1].items()
            seen["attributes carried"] = int(carried)
        if job["state"] == "succeeded":
            for fmt in ("npy", "std", "baseline", "png", "json", "dicom"):
                seen[f"result {fmt}"] = get(
                    f"/v1/jobs/{job_id}/result", params={"format": fmt}
                ).status_code
    seen["list"] = get("/v1/jobs").status_code
    return seen


def scan(text: str, values: dict[str, str]) -> list[str]:
    return [f"{k}={v!r}" for k, v in values.items() if v in text]


def test_no_patient_data_in_logs(gw, tmp_path, caplog, record):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.INFO, logger="sqlalchemy.engine")  # an operator debugging SQL
    _, from_dicom = patient_dicom()
    values = {
        **{f"DICOM {k}": v for k, v in from_dicom.items()},
        **{f"JSON {k}": v for k, v in SOURCE.items()},
        "DICOM family name": from_dicom["PatientName"].split("^")[0],  # however it is written
        "JSON family name": SOURCE["PatientName"].split("^")[0],
    }
    # In process: caplog at DEBUG with SQL logging on.
    broken_model(gw.settings.models)
    alice = gw.keys["alice"]
    here = patient_traffic(
        lambda path, **kw: gw.call("POST", path, alice, **kw),
        lambda path, **kw: gw.call("GET", path, alice, **kw),
        gw.wait,
        lambda path, **kw: gw.call("POST", path, gw.keys["admin"], **kw),
    )
    sql_logged = "INSERT INTO jobs" in caplog.text
    in_caplog = scan(caplog.text, values)
    # A real site: a `scorerecon serve` gateway and a Celery worker process.
    with Site(tmp_path / "site", redis_db=12) as site:
        broken_model(tiny_model(site.home / "models").parent)
        key, admin = site.key("recon:submit,recon:read", "alice"), site.key("admin", "ops")
        site.start_gateway()
        site.start_worker()
        with site.client(key) as c, site.client(admin) as a:

            def wait(job_id: str, timeout: float = 180) -> dict:
                end = time.monotonic() + timeout
                while time.monotonic() < end:
                    job = c.get(f"/v1/jobs/{job_id}").json()
                    if job["state"] in FINAL:
                        return job
                    time.sleep(0.2)
                raise AssertionError(f"job {job_id} did not finish")

            there = patient_traffic(c.post, c.get, wait, a.post)
        site.stop_all()
        logs = site.all_logs()
    in_site_logs = scan(logs, values)
    key_logged = any(k in logs or _sha(k) in logs for k in (key, admin))
    expected = {
        "dataset with an unreadable file": 201,
        "refused: dataset": 422,
        "from DICOM": 202,
        "from JSON": 202,
        "failing": 202,
        "refused: shape": 422,
        "refused: truncated DICOM": 422,
        "refused: control char": 422,
        "refused: too long": 422,
        "refused: not a source attribute": 422,
        "job succeeded": 2,
        "job failed": 1,
        "attributes carried": 1,
        **{f"result {f}": 200 for f in ("npy", "std", "baseline", "png", "json", "dicom")},
        "list": 200,
    }
    record(
        "security",
        "patient data in logs",
        tried=2 * len(expected),
        five_xx=gw.five_xx,
        outcome=f"on an in-process gateway (DEBUG, SQL logging on) and a real site (gateway "
        f"and Celery worker processes): 2 jobs succeeded, 1 failed, 5 uploads refused, all "
        f"results fetched (format=dicom too), a training archive in a folder named after the "
        f"patient uploaded, another refused; {len(values)} patient values searched in "
        f"{len(caplog.records)} log records and {len(logs.splitlines())} log lines: found "
        f"{len(in_caplog) + len(in_site_logs)}; API key in the site's logs: {key_logged}",
    )
    assert here == expected, here
    assert there == expected, there
    assert sql_logged and re.search(r"job [0-9a-f]{32} succeeded", logs)  # the logs are real
    assert not in_caplog, in_caplog
    assert not in_site_logs, in_site_logs
    assert not key_logged
    assert gw.five_xx == 0


def _with_header(raw: bytes, xml: str) -> bytes:
    """An ISMRMRD file with its XML header replaced."""
    buf = io.BytesIO(raw)
    with h5py.File(buf, "r+") as f:
        del f["dataset"]["xml"]
        f["dataset"].create_dataset("xml", data=[xml.encode()], dtype=h5py.string_dtype())
    return buf.getvalue()


def test_ismrmrd_header_with_a_dtd_is_refused(gw):
    """bandit B314: the ISMRMRD XML header of an upload is parsed only without a DTD, so no
    entity (nested, external) is ever expanded."""
    from tests.models import test_measurements as tm

    k, op = tm._kspace(1)
    raw = tm._ismrmrd(op.pad(k).numpy(), np.flatnonzero(op.mask.any(dim=0).numpy()))
    plain = tm.XML.format(nx=tm.SIZE, ny=tm.SIZE)
    body = plain.removeprefix('<?xml version="1.0"?>')
    laughs = '<!ENTITY a "aaaaaaaaaa">' + "".join(
        f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8)
    )
    dtds = {
        "internal entity": ('<!ENTITY n "32">', "<x>32</x>", "<x>&n;</x>"),
        "billion laughs": (laughs, "<z>1</z>", "<z>&i;</z>"),
        "external entity": ('<!ENTITY e SYSTEM "file:///etc/passwd">', "<z>1</z>", "<z>&e;</z>"),
    }
    assert read_array(_with_header(raw, plain)).shape == (1, 1, tm.SIZE, tm.SIZE)
    spec = json.dumps(tm.MRI)
    for what, (dtd, old, new) in dtds.items():
        xml = f'<?xml version="1.0"?><!DOCTYPE ismrmrdHeader [{dtd}]>' + body.replace(old, new)
        with pytest.raises(MeasurementError, match="must not declare a DTD"):
            read_array(_with_header(raw, xml))
        form = submit_form()
        form["files"]["measurement"] = ("k.h5", _with_header(raw, xml))
        form["data"]["spec"] = spec
        r = gw.call("POST", "/v1/reconstructions", gw.keys["alice"], **form)
        assert r.status_code == 422 and "DTD" in r.json()["detail"], (what, r.text)


# --- 6. bandit ------------------------------------------------------------------------------
NOSEC = re.compile(r"#\s*nosec\b(.*)$")


def test_bandit_finds_nothing_unexplained(record):
    """No medium or high finding in models/, service/, workers/ unless its line carries
    ``# nosec BXXX # reason`` (bandit reads a reason only after a second ``#``) and
    docs/security.md explains it."""
    bandit = Path(sys.executable).parent / "bandit"
    assert bandit.exists(), "install the test extra: pip install -e '.[test]' (bandit)"

    def run(*extra: str) -> list[dict]:
        out = subprocess.run(
            [str(bandit), "-r", "models", "service", "workers", "-f", "json", "-q", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        return [
            r
            for r in json.loads(out.stdout)["results"]
            if r["issue_severity"] in ("MEDIUM", "HIGH")
        ]

    def where(f: dict) -> str:
        return f"{f['filename'].removeprefix('./')}:{f['line_number']} {f['test_id']}"

    open_findings = [where(f) for f in run()]
    every = run("--ignore-nosec")  # with the findings the nosec comments silence
    docs = (ROOT / "docs" / "security.md").read_text()
    unexplained = []
    for f in every:
        path = f["filename"].removeprefix("./")
        m = NOSEC.search((ROOT / path).read_text().splitlines()[f["line_number"] - 1])
        reason = m and re.match(rf"\s*{f['test_id']}\s*#\s*\S", m.group(1))
        if where(f) not in open_findings and not (reason and f["test_id"] in docs and path in docs):
            unexplained.append(where(f))
    # Every nosec comment names its test and a reason.
    bare = [
        f"{p.relative_to(ROOT)}:{i}"
        for d in ("models", "service", "workers")
        for p in (ROOT / d).rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if (m := NOSEC.search(line)) and not re.match(r"\s*B\d{3}\s*#\s*\S", m.group(1))
    ]
    record(
        "security",
        "bandit (models, service, workers)",
        tried=len(every),
        outcome=f"{len(every)} medium/high findings: {len(open_findings)} open, "
        f"{len(every) - len(open_findings) - len(unexplained)} explained (nosec and "
        f"docs/security.md), {len(unexplained)} unexplained; nosec without a reason: {len(bare)}",
    )
    assert not open_findings, open_findings
    assert not unexplained, unexplained
    assert not bare, bare


# --- 7. containers that point outside the upload (issue 17, part 1) -------------------------
def _stored_bytes(root: Path) -> bytes:
    """Every byte stored under ``root``."""
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


def test_hostile_containers_never_read_server_files(gw, tmp_path, record):
    """HDF5 external storage, virtual datasets, soft and external links, filter plugins and
    NPZ links are refused with a 4xx naming the measurement and not the server path; no
    job is created; no byte of the targeted file reaches anything the site stores."""
    from tests.models import test_measurements as tm

    k, _ = tm._kspace(1)
    arr = k.numpy()
    marker = f"SECRET-{uuid.uuid4().hex}".encode()
    secret = tmp_path / "environ"
    secret.write_bytes((marker * (arr.nbytes // len(marker) + 2))[: arr.nbytes * 2])
    spec = json.dumps(tm.MRI)
    before = gw.call("GET", "/v1/jobs", gw.keys["alice"]).json()
    refused = []
    for name, raw in tm.hostile_containers(secret, arr).items():
        form = submit_form()
        form["files"]["measurement"] = ("k.h5", raw)
        form["data"]["spec"] = spec
        r = gw.call("POST", "/v1/reconstructions", gw.keys["alice"], **form)
        body = r.json()
        assert r.status_code == 422 and body["field"] == "measurement", (name, r.text)
        assert str(tmp_path) not in r.text and "environ" not in r.text, (name, r.text)
        refused.append(name)
    after = gw.call("GET", "/v1/jobs", gw.keys["alice"]).json()
    assert after == before  # nothing queued
    # An ordinary HDF5 upload reaches the worker as exactly its own bytes.
    plain = tm._h5(lambda f: f.create_dataset("kspace", data=arr))
    form = submit_form()
    form["files"]["measurement"] = ("k.h5", plain)
    form["data"]["spec"] = spec
    r = gw.call("POST", "/v1/reconstructions", gw.keys["alice"], **form)
    assert r.status_code == 202, r.text
    stored = np.load(io.BytesIO(gw.app.state.results.get(r.json()["id"], "measurement.npy")))
    assert np.array_equal(stored.reshape(arr.shape), arr)
    gw.wait(r.json()["id"])
    stored = _stored_bytes(gw.settings.home) + b"".join(
        p.read_bytes() for p in tmp_path.glob("jobs.db*")
    )
    assert marker not in stored
    assert not any(marker in r.content for r in gw.seen)
    assert gw.five_xx == 0
    record(
        "security",
        "hostile HDF5/NPZ containers (external storage, virtual dataset, external/soft links, "
        "filter plugin, NPZ links)",
        len(refused),
        outcome=f"all {len(refused)} refused with 422 naming the measurement; 0 bytes of the "
        "targeted server file in any response or stored file",
    )


# --- 9. console forgery, security headers, /metrics (issue 17, part 3) ----------------------
EVIL = "https://evil.example"
METRICS_TOKEN = "metrics-" + "k" * 32


class PageScan(HTMLParser):
    """A page's forms (method, action, CSRF fields), its CSRF meta tag, and anything the
    console's CSP would block: inline scripts and styles, event-handler attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []
        self.meta: str | None = None
        self.inline: list[str] = []
        self._open: dict | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "form":
            method = (a.get("method") or "get").lower()
            self._open = {"method": method, "action": a.get("action"), "tokens": []}
            self.forms.append(self._open)
        elif tag == "input" and a.get("name") == "csrf_token":
            (self._open or {"tokens": []})["tokens"].append((a.get("type"), a.get("value")))
        elif tag == "meta" and a.get("name") == "csrf-token":
            self.meta = a.get("content")
        elif tag == "script" and not a.get("src") or tag == "style":
            self.inline.append(f"<{tag}>")
        self.inline += [f"<{tag} {k}=...>" for k in a if k.startswith("on") or k == "style"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None


def scan_page(html: str) -> PageScan:
    page = PageScan()
    page.feed(html)
    return page


def _cookie(r: httpx.Response, name: str) -> str | None:
    for line in r.headers.get_list("set-cookie"):
        if line.startswith(f"{name}="):
            return line.split(";", 1)[0].split("=", 1)[1]
    return None


def _forged(g: Gateway, url: str, cookie=None, token=None, csrf_cookie=None, **headers):
    """A console POST as a hostile page (or a stale one) would send it."""
    jar = [f"{k}={v}" for k, v in ((COOKIE, cookie), (CSRF_COOKIE, csrf_cookie)) if v]
    sent = {k.replace("_", "-"): v for k, v in headers.items()}
    if jar:
        sent["Cookie"] = "; ".join(jar)
    data = {"key": g.keys["bob"]} if url == "/ui/login" else {}  # the attacker's key
    if token is not None:
        data["csrf_token"] = token
    return g.call("POST", url, csrf=False, headers=sent, data=data)


def test_console_login_forgery_is_refused_and_sets_no_cookie(gw, record):
    """A hostile page posting bob's key to /ui/login (login CSRF) is refused with 403 and
    no cookie, whatever it tries; the console's own page logs in."""
    other = "W" * 43
    attempts = {
        "cross-site form (no token, foreign Origin)": {"Origin": EVIL},
        "no token field": {"Origin": ORIGIN, "csrf_cookie": CSRF},
        "no token cookie": {"Origin": ORIGIN, "token": CSRF},
        "wrong token": {"Origin": ORIGIN, "csrf_cookie": CSRF, "token": other},
        "malformed token pair": {"Origin": ORIGIN, "csrf_cookie": "x", "token": "x"},
        "valid pair, foreign Origin": {"Origin": EVIL, "csrf_cookie": CSRF, "token": CSRF},
        "valid pair, look-alike Origin": {
            "Origin": "http://testserver.evil.example",
            "csrf_cookie": CSRF,
            "token": CSRF,
        },
        "valid pair, another port": {
            "Origin": "http://testserver:8080",
            "csrf_cookie": CSRF,
            "token": CSRF,
        },
        "valid pair, Origin null": {"Origin": "null", "csrf_cookie": CSRF, "token": CSRF},
        "valid pair, foreign Referer": {
            "Referer": f"{EVIL}/ui/login",
            "csrf_cookie": CSRF,
            "token": CSRF,
        },
        "valid pair, no Origin nor Referer": {"csrf_cookie": CSRF, "token": CSRF},
    }
    wrong = []
    for what, how in attempts.items():
        r = _forged(gw, "/ui/login", **how)
        if r.status_code != 403 or "set-cookie" in r.headers or "Forbidden" not in r.text:
            wrong.append(f"{what}: {r.status_code} {r.headers.get_list('set-cookie')}")
        elif "send the form again" not in r.text:  # says what is wrong and what to do
            wrong.append(f"{what}: no fix in {r.text[:200]}")
    # Another browser's token: each page load of a fresh browser gets its own.
    tokens = []
    for _ in range(2):
        gw.client.cookies.clear()
        page = gw.client.get("/ui/login")
        tokens.append((_cookie(page, CSRF_COOKIE), scan_page(page.text).forms[0]["tokens"][0][1]))
    assert tokens[0][0] != tokens[1][0] and all(c == t for c, t in tokens)
    swapped = _forged(gw, "/ui/login", Origin=ORIGIN, csrf_cookie=tokens[0][0], token=tokens[1][1])
    if swapped.status_code != 403 or "set-cookie" in swapped.headers:
        wrong.append(f"another browser's token: {swapped.status_code}")
    # The console's own page: same origin (Origin, or Referer where a browser sends none).
    own = _forged(gw, "/ui/login", Origin=ORIGIN, csrf_cookie=tokens[0][0], token=tokens[0][1])
    by_referer = _forged(
        gw, "/ui/login", Referer=f"{ORIGIN}/ui/login", csrf_cookie=CSRF, token=CSRF
    )
    fresh = _cookie(own, CSRF_COOKIE)
    record(
        "security",
        "login CSRF (hostile page logs the browser in)",
        tried=len(attempts) + 1,
        five_xx=gw.five_xx,
        outcome=f"{len(attempts) + 1} forged logins with the attacker's key (no, wrong, "
        f"malformed or another browser's token; foreign, look-alike, null or missing Origin "
        f"and Referer): {len(attempts) + 1 - len(wrong)} refused with 403 and no cookie; "
        "the console's own page logs in",
    )
    assert not wrong, "\n".join(wrong)
    assert own.status_code == 303 and _cookie(own, COOKIE) == gw.keys["bob"]
    assert fresh and fresh != tokens[0][0]  # a new token for the new session
    assert by_referer.status_code == 303
    assert gw.five_xx == 0


def test_every_console_post_needs_the_token_and_its_origin(gw, record):
    """Each POST route under /ui (enumerated from the app, so a new one is covered) refuses
    a request without the token, with a wrong one, or from a foreign origin, as the admin
    whose cookie the browser sends; nothing changes and no cookie is set."""
    posts = sorted(p for m, p in app_routes(gw.app) if m == "POST" and p.startswith("/ui/"))
    assert {"/ui/login", "/ui/logout", "/ui/new", "/ui/admin/keys"} <= set(posts)
    admin = gw.keys["admin"]
    before = (_active_keys(gw), _job_count(gw))
    wrong, tried = [], 0
    for path in posts:
        kw = ROUTES[("POST", path)].request
        body = kw(gw) if kw else {}
        url = body.pop("url", path)
        for what, headers, cookie_token, token in (
            ("no token", {"Origin": ORIGIN}, CSRF, None),
            ("wrong token", {"Origin": ORIGIN}, CSRF, "W" * 43),
            ("foreign Origin", {"Origin": EVIL}, CSRF, CSRF),
        ):
            data = dict(body.get("data") or {})
            if token:
                data["csrf_token"] = token
            r = gw.call(
                "POST",
                url,
                cookie=None,
                csrf=False,
                headers={**headers, "Cookie": f"{COOKIE}={admin}; {CSRF_COOKIE}={cookie_token}"},
                files=body.get("files"),
                data=data,
            )
            tried += 1
            if r.status_code != 403 or "set-cookie" in r.headers:
                wrong.append(f"POST {url} ({what}): {r.status_code}")
    after = (_active_keys(gw), _job_count(gw))
    record(
        "security",
        "console CSRF (every POST route)",
        tried=tried,
        five_xx=gw.five_xx,
        outcome=f"{len(posts)} POST routes × no/wrong token and foreign Origin, as an admin: "
        f"{tried - len(wrong)} of {tried} refused with 403 and no cookie; keys and jobs "
        + ("unchanged" if after == (before[0] + 1, before[1]) else "changed"),
    )
    assert not wrong, "\n".join(wrong)
    assert after == (before[0] + 1, before[1])  # + the revoke route's victim, not revoked


def _active_keys(g: Gateway) -> int:
    items = g.call("GET", "/v1/admin/api-keys", g.keys["admin"]).json()["items"]
    return sum(not k["revoked"] for k in items)


def _job_count(g: Gateway) -> int:
    return len(g.call("GET", "/v1/jobs", g.keys["admin"]).json()["items"])


def test_every_form_of_every_console_page_carries_the_token(gw, record):
    """Every console page (as the admin sees them, the login page, refusals and re-rendered
    forms) sets the browser's token if it has none, and every form on it carries that
    token; no page has inline script, style or handlers (the CSP would block them)."""
    admin = gw.keys["admin"]
    pages = {
        f"GET {p}": ("GET", p.format(job_id=gw.job, name="tiny32"), admin, {})
        for (m, p), rule in ROUTES.items()
        if m == "GET" and rule.kind == "ui-page"
    }
    pages |= {
        "GET /ui/login": ("GET", "/ui/login", None, {}),
        "GET /ui/?state=succeeded": ("GET", "/ui/?state=succeeded", admin, {}),
        "job not found": ("GET", f"/ui/jobs/{uuid.uuid4().hex}", admin, {}),
        "admin page refused": ("GET", "/ui/admin", gw.keys["alice"], {}),
        "login refused (wrong key)": ("POST", "/ui/login", None, {"data": {"key": "sr_x"}}),
        "submit refused (bad spec)": (
            "POST",
            "/ui/new",
            gw.keys["alice"],
            submit_form(spec="{"),
        ),
        "new key shown": (
            "POST",
            "/ui/admin/keys",
            admin,
            {"data": {"owner": "frank", "scopes": ["recon:read"]}},
        ),
    }
    wrong, forms, methods = [], 0, set()
    for name, (method, url, key, kw) in pages.items():
        r = gw.call(method, url, cookie=key, **kw)
        assert r.headers["content-type"].startswith("text/html"), (name, r.status_code)
        page = scan_page(r.text)
        # A GET page without a token cookie sets one; a re-rendered POST page keeps the
        # token the form was sent with.
        token = _cookie(r, CSRF_COOKIE) if method == "GET" else CSRF
        if not token:
            wrong.append(f"{name}: sets no token cookie")
            continue
        if page.meta != token:
            wrong.append(f"{name}: meta csrf-token {page.meta!r}")
        for f in page.forms:
            forms += 1
            methods.add(f["method"])
            if f["method"] != "post" or f["tokens"] != [("hidden", token)]:
                wrong.append(f"{name}: form {f['action']} ({f['method']}) tokens {f['tokens']}")
        if page.inline:
            wrong.append(f"{name}: {page.inline}")
    # A page of a browser that has a token keeps it (no new cookie, the same token).
    gw.client.cookies.clear()
    kept = gw.client.get("/ui/admin", headers={"Cookie": f"{COOKIE}={admin}; {CSRF_COOKIE}={CSRF}"})
    inline = sum(bool(x) for x in wrong if "<" in x)
    record(
        "security",
        "console forms carry the CSRF token",
        tried=len(pages),
        five_xx=gw.five_xx,
        outcome=f"{len(pages)} console pages (every page route, login, refusals, re-rendered "
        f"forms): {forms} forms, all POST; {len(wrong)} problems (a form without the "
        f"browser's token, a page without its token); pages with inline script, style or "
        f"handlers: {inline}",
    )
    assert not wrong, "\n".join(wrong)
    assert forms >= 20 and methods == {"post"}
    assert "set-cookie" not in kept.headers and scan_page(kept.text).meta == CSRF
    assert gw.five_xx == 0


def _expected_csp(path: str, html: bytes) -> str:
    if path in ("/docs", "/docs/oauth2-redirect", "/redoc"):
        return docs_csp(html)
    return CONSOLE_CSP if path == "/ui" or path.startswith("/ui/") else API_CSP


def test_security_headers_on_api_console_and_docs(gw, record):
    """Every route (the matrix's requests, as the owner and as the admin), refusals,
    unknown paths and a refused forgery carry the four headers; the console's policy runs
    only its own files, the API's nothing, the docs' only this origin and their own inline
    scripts by hash."""
    wrong, seen = [], 0
    responses = []
    for (method, path), rule in ROUTES.items():
        for c in callers(gw)[-2:] + callers(gw)[:1]:  # the owner, the admin, anonymous
            responses.append(send(gw, method, path, rule, c))
    responses += [
        gw.call("GET", "/no/such/path"),
        gw.call("GET", "/v1/jobs"),  # 401 problem
        _forged(gw, "/ui/login", Origin=EVIL),  # 403 page
        gw.call("GET", "/ui/static/console.css"),
    ]
    for r in responses:
        seen += 1
        path = r.request.url.path
        want = {
            "x-content-type-options": "nosniff",
            "x-frame-options": "DENY",
            "referrer-policy": "same-origin",
            "content-security-policy": _expected_csp(path, r.content),
        }
        got = {k: r.headers.get(k) for k in want}
        if got != want:
            wrong.append(f"{r.request.method} {path} {r.status_code}: {got}")
    docs = gw.call("GET", "/docs")
    inline = re.findall(rb"<script>(.*?)</script>", docs.content, re.DOTALL)
    script_src = docs.headers["content-security-policy"].split("script-src ")[1].split(";")[0]
    hashes = {
        "'sha256-" + base64.b64encode(hashlib.sha256(s).digest()).decode() + "'" for s in inline
    }
    record(
        "security",
        "security headers",
        tried=seen,
        five_xx=gw.five_xx,
        outcome=f"{seen} responses (every route as owner, admin and anonymous; 401, 403, 404, "
        f"a refused forgery, static files): {seen - len(wrong)} with CSP, X-Frame-Options, "
        "Referrer-Policy and X-Content-Type-Options",
    )
    assert not wrong, "\n".join(wrong)
    assert "'unsafe-inline'" not in CONSOLE_CSP and "script-src 'self';" in CONSOLE_CSP
    assert "frame-ancestors 'none'" in CONSOLE_CSP and "frame-ancestors 'none'" in API_CSP
    assert inline and set(script_src.split()) == {"'self'"} | hashes
    assert gw.five_xx == 0


@contextmanager
def _gateway(tmp_path: Path, **settings):
    """A bare gateway with extra settings, and an admin key."""
    s = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        rate_limit_per_minute=10**6,
        failed_auth_per_minute=10**6,  # the matrix sends wrong credentials on purpose
        **settings,
    ).prepare()
    app = create_app(s)
    key = create_key(app.state.jobs, ["admin"], "ops")[1]
    try:
        with TestClient(app, raise_server_exceptions=False):  # its lifespan, once
            yield app, key
    finally:
        app.state.jobs.engine.dispose()


def _scrape(app: FastAPI, peer: str = "testclient", auth: str | None = None) -> httpx.Response:
    client = TestClient(app, raise_server_exceptions=False, client=(peer, 50000))
    return client.get("/metrics", headers={"Authorization": auth} if auth else {})


def test_metrics_closed_by_default_open_by_token_or_network(gw, tmp_path, record):
    """/metrics answers no one by default (no API key opens it); with
    SCORERECON_METRICS_TOKEN it answers that bearer token only (401 otherwise); with
    SCORERECON_METRICS_ALLOW the peers in those networks (403 for others)."""
    checks: list[tuple[str, int, int]] = []  # what, status, expected

    for c in callers(gw):
        r = gw.call("GET", "/metrics", c.credential)
        checks.append((f"default, {c.name}", r.status_code, 403))
    closed = gw.call("GET", "/metrics")
    assert "SCORERECON_METRICS_TOKEN" in closed.json()["detail"]
    assert "SCORERECON_METRICS_ALLOW" in closed.json()["detail"]

    with _gateway(tmp_path / "token", metrics_token=METRICS_TOKEN) as (app, admin):
        for what, auth, want in (
            ("token set, none sent", None, 401),
            ("token set, wrong token", "Bearer " + "x" * 40, 401),
            ("token set, token as Basic", f"Basic {METRICS_TOKEN}", 401),
            ("token set, an admin API key", f"Bearer {admin}", 401),
            ("token set, the token", f"Bearer {METRICS_TOKEN}", 200),
        ):
            r = _scrape(app, auth=auth)
            checks.append((what, r.status_code, want))
            if want == 401:
                assert r.headers["www-authenticate"].startswith("Bearer")
                assert METRICS_TOKEN not in r.text
        scraped = _scrape(app, auth=f"Bearer {METRICS_TOKEN}").text
        assert 'scorerecon_jobs{state="queued"}' in scraped
        assert not any(s in scraped for s in ("ops", "alice", admin))

    networks = ["10.0.0.0/8", "::1"]
    with _gateway(tmp_path / "net", metrics_allow=networks) as (app, admin):
        for what, peer, want in (
            ("allowed network, IPv4", "10.1.2.3", 200),
            ("allowed network, IPv4-mapped", "::ffff:10.9.9.9", 200),
            ("allowed network, IPv6 loopback", "::1", 200),
            ("outside the networks", "192.168.7.7", 403),
            ("outside, with an admin key", "172.16.0.1", 403),
            ("no address (test client)", "testclient", 403),
        ):
            r = _scrape(app, peer, f"Bearer {admin}" if "admin" in what else None)
            checks.append((what, r.status_code, want))
        assert "192.168.7.7" in _scrape(app, "192.168.7.7").json()["detail"]

    both = {"metrics_token": METRICS_TOKEN, "metrics_allow": ["10.0.0.0/8"]}
    with _gateway(tmp_path / "both", **both) as (app, _):
        for what, peer, auth, want in (
            ("token and network: inside", "10.0.0.1", None, 200),
            ("token and network: outside, the token", "8.8.8.8", f"Bearer {METRICS_TOKEN}", 200),
            ("token and network: outside, no token", "8.8.8.8", None, 401),
        ):
            checks.append((what, _scrape(app, peer, auth).status_code, want))

    # Settings that would open it by mistake are refused when the gateway starts.
    for bad, message in (
        ({"metrics_token": "short"}, "at least 16 characters"),
        ({"metrics_allow": ["10.0.0.0/33"]}, "not an address or network"),
        ({"metrics_allow": ["everyone"]}, "not an address or network"),
    ):
        with pytest.raises(ValueError, match=message):
            Settings(**bad)
    assert Settings(metrics_token="").metrics_token is None  # an empty .env line: unset

    wrong = [f"{w}: {got}, expected {want}" for w, got, want in checks if got != want]
    record(
        "security",
        "/metrics access",
        tried=len(checks),
        five_xx=gw.five_xx,
        outcome=f"{len(checks)} scrapes (default, token, networks, both; every matrix caller "
        f"by default): {len(checks) - len(wrong)} as expected; closed by default",
    )
    assert not wrong, "\n".join(wrong)
    assert gw.five_xx == 0


def test_trusted_origins_extend_the_console_origin(tmp_path):
    """SCORERECON_TRUSTED_ORIGINS adds origins (a proxy that rewrites Host); others stay
    refused, and a malformed entry is refused when the gateway starts."""
    proxy = "https://scorerecon.hospital.example"
    with _gateway(tmp_path, trusted_origins=[proxy + "/"]) as (app, key):
        client = TestClient(app, raise_server_exceptions=False)
        statuses = []
        for origin in (proxy, ORIGIN, EVIL, "http://scorerecon.hospital.example"):
            client.cookies.clear()
            r = client.post(
                "/ui/login",
                data={"key": key, "csrf_token": CSRF},
                headers={"Origin": origin, "Cookie": f"{CSRF_COOKIE}={CSRF}"},
                follow_redirects=False,
            )
            statuses.append(r.status_code)
    assert statuses == [303, 303, 403, 403]
    for bad in ("scorerecon.hospital.example", "https://x.example/ui", "ftp://x.example"):
        with pytest.raises(ValueError, match="is not an origin"):
            Settings(trusted_origins=[bad])


# --- 8. fair use: one key starves everyone (issue 17, part 2) ------------------------------
class Metronome:
    """The tiny model with every score evaluation taking at least ``step_s``, recording
    (batch size, start time) of each: jobs of different ``samples`` tell apart whose step
    ran when. Installed as the embedded worker's prior loader."""

    def __init__(self, step_s: float):
        import workers.runner

        self.step_s, self.calls, self.lock = step_s, [], threading.Lock()
        self.real = workers.runner.load_prior

    def load(self, model: str, bf16: bool | None = None):
        import dataclasses

        prior = self.real(model, bf16)

        def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with self.lock:
                self.calls.append((x.shape[0], time.monotonic()))
            time.sleep(self.step_s)
            return prior.score_fn(x, t)

        return dataclasses.replace(prior, score_fn=score)

    def count(self, batch: int, after: float = 0.0, before: float = float("inf")) -> int:
        with self.lock:
            return sum(1 for b, t in self.calls if b == batch and after < t < before)

    def times(self, batch: int) -> list[float]:
        with self.lock:
            return [t for b, t in self.calls if b == batch]

    def until(self, cond: Callable[[], bool], timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < end, "timed out"
            time.sleep(0.01)


@pytest.fixture
def fair(tmp_path, monkeypatch):
    """An in-process gateway (embedded worker, SQLite) with small per-owner limits, keys for
    alice, bob, carol and an admin, and the metronome prior (``fair.metronome(step_s)``)."""
    import workers.kinds.reconstruct

    settings = Settings(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'jobs.db'}",
        rate_limit_per_minute=10**6,
        failed_auth_per_minute=10**6,  # the matrix sends wrong credentials on purpose
        max_queued_per_owner=3,
        max_owner_cost=10_000_000,
        max_queue=20,
    ).prepare()
    tiny_model(settings.models)
    app = create_app(settings)
    keys = {
        name: create_key(app.state.jobs, scopes, owner)[1]
        for name, scopes, owner in [
            ("alice", ["recon:submit", "recon:read"], "alice"),
            ("bob", ["recon:submit", "recon:read"], "bob"),
            ("carol", ["recon:submit", "recon:read"], "carol"),
            ("admin", ["admin"], "ops"),
        ]
    }

    def metronome(step_s: float) -> Metronome:
        m = Metronome(step_s)
        monkeypatch.setattr(workers.kinds.reconstruct, "load_prior", m.load)
        return m

    with TestClient(app, raise_server_exceptions=False) as client:
        g = Gateway(client, app, settings, keys, {}, lambda **_: "")
        g.metronome = metronome
        client.event_hooks = {"response": [lambda r: (r.read(), g.seen.append(r))]}
        yield g
        with app.state.jobs.sessions() as s:
            left = s.scalars(select(Job.id).where(Job.state.not_in(FINAL))).all()
        for job_id in left:  # the client waits for every job when it closes
            g.call("DELETE", f"/v1/jobs/{job_id}", keys["admin"])
    app.state.jobs.engine.dispose()


def _post(g: Gateway, who: str, **fields) -> httpx.Response:
    return g.call("POST", "/v1/reconstructions", g.keys[who], **submit_form(**fields))


def _state(g: Gateway, job_id: str) -> str:
    return g.call("GET", f"/v1/jobs/{job_id}", g.keys["admin"]).json()["state"]


def test_a_large_job_delays_another_owners_small_job_by_one_step_at_most(fair, record):
    """Alice's long job (3 samples per evaluation, 3 000 fast-sampler steps of ≥ 20 ms:
    a minute alone) holds the only embedded worker. Bob's small job (1 sample, 20 steps)
    starts at alice's next step and runs to its end before alice takes another step."""
    m = fair.metronome(0.02)
    big = _post(fair, "alice", sampler="fast", nfe="3000", samples="3")
    assert big.status_code == 202, big.text
    m.until(lambda: m.count(3) >= 100)  # alice has used the worker for 2 s
    t0 = time.monotonic()
    small = _post(fair, "bob", sampler="fast", nfe="20", samples="1")
    assert small.status_code == 202, small.text
    done = fair.wait(small.json()["id"], timeout=60)
    turnaround = time.monotonic() - t0
    b = m.times(1)
    alice_meanwhile = m.count(3, t0, b[-1])
    alice_state = _state(fair, big.json()["id"])
    record(
        "security",
        "fair use: a large job against another owner's small one (embedded worker)",
        tried=1,
        outcome=f"bob's 20-step job started {b[0] - t0:.2f} s after submission and finished "
        f"{turnaround:.1f} s after it; alice's job (3 000 steps of ≥ 20 ms) took "
        f"{alice_meanwhile} step(s) meanwhile and was still {alice_state}",
    )
    assert done["state"] == "succeeded" and len(b) == 20, done
    assert alice_meanwhile <= 1  # one fast-sampler step: one evaluation
    assert alice_state == "running" and turnaround < 20
    assert fair.five_xx == 0


def test_a_cancel_takes_effect_within_one_step_running_or_waiting(fair, record):
    """A running job stops before its next step; a job waiting for its turn (paused for
    another owner's) stops at once, without another step."""
    m = fair.metronome(0.05)
    a = _post(fair, "alice", sampler="fast", nfe="2000", samples="3").json()["id"]
    m.until(lambda: m.count(3) >= 40)
    b = _post(fair, "bob", sampler="fast", nfe="2000", samples="1").json()["id"]
    m.until(lambda: m.count(1) >= 3)  # bob runs, alice waits for her turn
    t_a, wall_a = time.monotonic(), datetime.now(UTC)
    assert fair.call("DELETE", f"/v1/jobs/{a}", fair.keys["alice"]).status_code == 200
    waiting = fair.wait(a, timeout=10)
    bob_state = _state(fair, b)
    t_b, wall_b = time.monotonic(), datetime.now(UTC)
    assert fair.call("DELETE", f"/v1/jobs/{b}", fair.keys["bob"]).status_code == 200
    running = fair.wait(b, timeout=10)

    def after(job: dict, wall: datetime) -> float:
        """Seconds from the DELETE to the job's final state, on the server's clock."""
        end = datetime.fromisoformat(job["finished_at"])
        return ((end if end.tzinfo else end.replace(tzinfo=UTC)) - wall).total_seconds()

    record(
        "security",
        "fair use: cancel within one step (embedded worker)",
        tried=2,
        outcome=f"a job waiting for its turn was cancelled {after(waiting, wall_a):.3f} s "
        f"after the DELETE, with {m.count(3, t_a)} more steps; a running one (steps of "
        f"≥ 50 ms) {after(running, wall_b):.3f} s after, with {m.count(1, t_b)} more",
    )
    assert waiting["state"] == "cancelled" and m.count(3, t_a) == 0
    assert bob_state == "running"
    assert running["state"] == "cancelled" and m.count(1, t_b) <= 1
    assert fair.five_xx == 0


def _ct128() -> dict:
    """A valid 128² CT submission for the bundled ct-default model."""
    from models.physics import from_spec

    spec = {"modality": "ct", "image_size": 128, "n_views": 23}
    shape = (1, *from_spec(spec).measurement_shape())
    data = {"spec": json.dumps(spec), "model": "ct-default", "sampler": "pc"}
    return {"files": {"measurement": ("y.npy", _npy(np.zeros(shape, np.float32)))}, "data": data}


def test_one_owner_cannot_fill_the_queue_or_take_every_worker(fair, record):
    """Per request: nfe=5000 × samples=64 is refused naming the field and its maximum, the
    project's defaults are not. Per owner: a fourth queued job and work over the owner's
    cost are refused (429, Retry-After, the limit named); other owners still get in and run
    while the first owner's long job and backlog wait."""
    m = fair.metronome(0.02)
    outcomes: dict[str, int] = {}
    # Per request, with the default cap, on the bundled 128² model (the owners' cost cap is
    # lifted for this part: it is about one request).
    fair.settings.max_owner_cost = 10**12
    form = _ct128()
    huge = fair.call(
        "POST",
        "/v1/reconstructions",
        fair.keys["alice"],
        files=form["files"],
        data={**form["data"], "nfe": "5000", "samples": "64"},
    )
    outcomes["nfe=5000 × samples=64 at 128²"] = huge.status_code
    body = huge.json()
    assert huge.status_code == 422 and body["field"] == "nfe", body
    assert "SCORERECON_MAX_JOB_COST" in body["detail"] and "at most 286" in body["detail"]
    assert huge.headers["content-type"] == "application/problem+json"
    sampling = fair.call(
        "POST",
        "/v1/admin/sampling",
        fair.keys["admin"],
        json={"model": "tiny32", "steps": 5000, "n": 64},
    )
    outcomes["admin sampling 5000 steps × 64"] = sampling.status_code
    assert sampling.status_code == 422 and sampling.json()["field"] == "steps", sampling.text
    ok = fair.call(
        "POST",
        "/v1/reconstructions",
        fair.keys["carol"],
        files=form["files"],
        data={**form["data"], "nfe": "1000", "samples": "8"},
    )
    outcomes["nfe=1000 × samples=8 at 128²"] = ok.status_code
    assert ok.status_code == 202, ok.text  # admitted; cancelled at once below
    fair.call("DELETE", f"/v1/jobs/{ok.json()['id']}", fair.keys["carol"])
    assert fair.wait(ok.json()["id"], timeout=60)["state"] == "cancelled"
    fair.settings.max_owner_cost = 10_000_000
    # Per owner: alice's long job runs, three more wait; the next one is refused.
    big = _post(fair, "alice", sampler="fast", nfe="3000", samples="3")
    m.until(lambda: m.count(3) >= 20)
    backlog = [_post(fair, "alice") for _ in range(3)]
    assert [r.status_code for r in backlog] == [202] * 3
    over = _post(fair, "alice")
    outcomes["alice's 4th queued job"] = over.status_code
    assert over.status_code == 429 and int(over.headers["Retry-After"]) >= 1, over.text
    assert "SCORERECON_MAX_QUEUED_PER_OWNER" in over.json()["detail"]
    # Carol's work: 2 000 × 3 × 1 024 = 6.1·10⁶ fits her 10⁷, 4·10⁶ more does not.
    carol = _post(fair, "carol", sampler="fast", nfe="2000", samples="3")
    more = _post(fair, "carol", sampler="fast", nfe="1000", samples="4")
    outcomes["carol over her cost"] = more.status_code
    assert carol.status_code == 202 and more.status_code == 429, more.text
    assert "SCORERECON_MAX_OWNER_COST" in more.json()["detail"] and more.headers["Retry-After"]
    # Bob is not held up by either backlog.
    t0 = time.monotonic()
    bob = _post(fair, "bob")
    outcomes["bob"] = bob.status_code
    assert fair.wait(bob.json()["id"], timeout=60)["state"] == "succeeded"
    bob_s = time.monotonic() - t0
    waiting = [_state(fair, r.json()["id"]) for r in backlog]
    record(
        "security",
        "fair use: job cost and per-owner queue limits",
        tried=len(outcomes),
        five_xx=fair.five_xx,
        outcome=f"{outcomes}; bob's job finished in {bob_s:.1f} s while alice's long job "
        f"was {_state(fair, big.json()['id'])} and her backlog {waiting}",
    )
    assert _state(fair, big.json()["id"]) == "running" and waiting == ["queued"] * 3
    assert fair.five_xx == 0


def test_celery_admits_each_owners_jobs_in_turn(tmp_path, record):
    """A real site (gateway and one Celery worker process, no sweep): with
    SCORERECON_OWNER_SLOTS=1 alice's second and third jobs wait in the database while her
    first runs, so bob's job, submitted after all three, runs second; the worker that
    finishes alice's job sends her next one."""
    env = {"SCORERECON_OWNER_SLOTS": "1", "SCORERECON_RATE_LIMIT_PER_MINUTE": "1000000"}
    with Site(tmp_path / "site", redis_db=13, env=env) as site:
        tiny_model(site.home / "models")
        alice, bob = (
            site.key("recon:submit,recon:read", "alice"),
            site.key("recon:submit,recon:read", "bob"),
        )
        site.start_gateway()
        site.start_worker()
        from service.db import JobStore

        store = JobStore(f"sqlite:///{site.home / 'scorerecon.db'}")
        with site.client(alice) as a, site.client(bob) as b:
            form = submit_form(sampler="fast", nfe="1500")
            ids = [a.post("/v1/reconstructions", **form).json()["id"] for _ in range(3)]
            small = b.post("/v1/reconstructions", **submit_form()).json()["id"]
            held = [store.get(i).sent_at is None for i in [*ids, small]]
            end = time.monotonic() + 300
            while any(store.get(i).state not in FINAL for i in [*ids, small]):
                assert time.monotonic() < end, "jobs did not finish"
                time.sleep(0.2)
        rows = {i: store.get(i) for i in [*ids, small]}
        store.engine.dispose()
        site.stop_all()
    order = sorted(rows, key=lambda i: rows[i].started_at)
    names = {ids[0]: "alice 1", ids[1]: "alice 2", ids[2]: "alice 3", small: "bob"}
    record(
        "security",
        "fair use: per-owner admission to the Celery broker",
        tried=4,
        outcome=f"held in the database at submission: {held}; ran in the order "
        f"{[names[i] for i in order]}; states {[rows[i].state for i in order]}",
    )
    assert held == [False, True, True, False]
    assert [names[i] for i in order] == ["alice 1", "bob", "alice 2", "alice 3"]
    assert all(r.state == "succeeded" for r in rows.values())
