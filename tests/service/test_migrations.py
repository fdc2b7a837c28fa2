"""Alembic migrations up and down, on an empty and on a populated database."""

from sqlalchemy import inspect

from service.auth import create_key
from service.db import Job, JobStore
from service.migrate import downgrade, upgrade


def test_migrations_up_and_down(db_url):
    upgrade(db_url)
    store = JobStore(db_url)
    assert {"jobs", "api_keys", "audit"} <= set(inspect(store.engine).get_table_names())
    with store.session() as s:
        s.add(
            Job(id="a" * 32, kind="reconstruction", owner="o", spec={}, params={}, result_keys=[])
        )
    create_key(store, ["admin"], "ops")
    upgrade(db_url)  # idempotent at head, data kept
    assert store.get("a" * 32).state == "queued"
    downgrade(db_url)
    assert not {"jobs", "api_keys", "audit"} & set(inspect(store.engine).get_table_names())
    upgrade(db_url)
    assert store.get("a" * 32) is None
    store.engine.dispose()


def test_redis_url_selects_celery_unless_settings_say_otherwise(monkeypatch):
    from service.settings import Settings

    monkeypatch.delenv("SCORERECON_EXECUTOR", raising=False)
    monkeypatch.delenv("REDIS_URL", raising=False)
    assert Settings().executor == "embedded"
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:6379/9")
    s = Settings()
    assert s.executor == "celery" and s.broker_url == "redis://127.0.0.1:6379/9"
    monkeypatch.setenv("SCORERECON_EXECUTOR", "embedded")
    assert Settings().executor == "embedded"
