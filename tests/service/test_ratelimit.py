"""The request limit is shared by every gateway on one Redis, and survives Redis outages."""

import socket
import uuid

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.ratelimit import LocalRateLimiter, RateLimited, RedisRateLimiter, make_rate_limiter
from tests import servers
from tests.service.conftest import auth


def redis_db_url() -> str:
    """Database 11 of the session's own Redis (tests/servers.py)."""
    return f"{servers.redis_url()}/11"


@pytest.fixture
def prefix():
    """A key prefix of this test's own; its keys are deleted afterwards."""
    p = f"scorerecon-test:{uuid.uuid4().hex}:"
    yield p
    r = redis.Redis.from_url(redis_db_url())
    for key in r.scan_iter(p + "*"):
        r.delete(key)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_limiters_on_one_redis_share_the_window(prefix):
    a, b = RedisRateLimiter(redis_db_url(), 5, prefix), RedisRateLimiter(redis_db_url(), 5, prefix)
    for limiter in (a, b, a, b, a):
        limiter.check("key1")
    with pytest.raises(RateLimited) as exc:
        b.check("key1")
    assert 1 <= exc.value.retry_after <= 61
    b.check("key2")  # another key has its own window
    assert redis.Redis.from_url(redis_db_url()).ttl(prefix + "key1") in range(1, 62)


def test_refused_requests_do_not_extend_the_window(prefix):
    limiter = RedisRateLimiter(redis_db_url(), 2, prefix)
    limiter.check("k")
    limiter.check("k")
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.check("k")
    assert redis.Redis.from_url(redis_db_url()).zcard(prefix + "k") == 2


def test_without_redis_each_process_still_counts(caplog, monkeypatch):
    limiter = RedisRateLimiter(f"redis://127.0.0.1:{closed_port()}/0", 3)
    calls = []
    script = limiter.script
    monkeypatch.setattr(limiter, "script", lambda **kw: calls.append(1) or script(**kw))
    for _ in range(3):
        limiter.check("k")
    with pytest.raises(RateLimited):
        limiter.check("k")
    assert "counting per process" in caplog.text
    assert len(calls) == 1  # Redis is not asked again on every request while it is down
    limiter._retry_at = 0.0
    with pytest.raises(RateLimited):
        limiter.check("k")
    assert len(calls) == 2


def test_the_limiter_follows_the_executor():
    assert isinstance(make_rate_limiter("embedded", redis_db_url(), 10), LocalRateLimiter)
    assert isinstance(make_rate_limiter("celery", redis_db_url(), 10), RedisRateLimiter)


def test_two_gateways_enforce_one_limit(settings):
    """Two gateway apps (as two replicas behind a load balancer) on one database and one
    Redis: a key's fourth request is refused whichever gateway it reaches."""
    settings.executor, settings.broker_url = "celery", redis_db_url()
    settings.rate_limit_per_minute = 3
    apps = [create_app(settings), create_app(settings)]
    key_id, key = create_key(apps[0].state.jobs, ["recon:read"], "alice")
    with TestClient(apps[0]) as one, TestClient(apps[1]) as two:
        statuses = [c.get("/v1/jobs", headers=auth(key)).status_code for c in (one, two, one)]
        assert statuses == [200, 200, 200]
        refused = two.get("/v1/jobs", headers=auth(key))
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "per minute" in refused.json()["detail"]
    for app in apps:
        app.state.jobs.engine.dispose()
    redis.Redis.from_url(redis_db_url()).delete("scorerecon:rate:" + key_id)


def test_peek_counts_nothing(prefix):
    for limiter in (RedisRateLimiter(redis_db_url(), 2, prefix), LocalRateLimiter(2)):
        assert limiter.peek("k") is None
        limiter.check("k")
        assert limiter.peek("k") is None
        limiter.check("k")
        assert 1 <= limiter.peek("k") <= 61 and 1 <= limiter.peek("k") <= 61
        with pytest.raises(RateLimited):
            limiter.check("k")
    assert redis.Redis.from_url(redis_db_url()).zcard(prefix + "k") == 2


@pytest.mark.parametrize("executor", ["embedded", "celery"])
def test_failed_credentials_are_limited_per_address_and_audited(settings, executor):
    """Wrong keys from one address: each is a 401 and an audit row, until the address has
    used up SCORERECON_FAILED_AUTH_PER_MINUTE; then every request from it, a valid key's
    too, is a 429 with Retry-After before any key is checked. A missing header is no
    guess and is not counted; other addresses are not affected."""
    from sqlalchemy import select

    from service.db import AuditEntry

    settings.executor, settings.broker_url = executor, redis_db_url()
    settings.failed_auth_per_minute = 3
    app = create_app(settings)
    key = create_key(app.state.jobs, ["recon:read"], "alice")[1]
    with (
        TestClient(app, client=("10.0.0.7", 5000)) as guesser,
        TestClient(app, client=("10.0.0.8", 5000)) as other,
    ):
        for _ in range(3):
            assert guesser.get("/v1/jobs").status_code == 401  # no header: not counted
        for i in range(3):
            r = guesser.get("/v1/jobs", headers=auth(f"sr_guess{i}"))
            assert r.status_code == 401, r.text
        refused = guesser.get("/v1/jobs", headers=auth(key))
        assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 61
        body = refused.json()
        assert (
            body["field"] == "Authorization"
            and "SCORERECON_FAILED_AUTH_PER_MINUTE" in (body["detail"])
        )
        assert guesser.get("/v1/jobs", headers=auth("sr_again")).status_code == 429
        assert other.get("/v1/jobs", headers=auth(key)).status_code == 200
        with app.state.jobs.sessions() as s:
            rows = s.scalars(select(AuditEntry).where(AuditEntry.action == "auth-failed")).all()
        assert len(rows) == 3 and all("10.0.0.7" in r.outcome for r in rows)
    app.state.jobs.engine.dispose()
    redis.Redis.from_url(redis_db_url()).delete("scorerecon:auth-failed:10.0.0.7")
