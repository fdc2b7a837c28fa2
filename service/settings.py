"""Gateway and worker settings, from ``SCORERECON_*`` environment variables.

Everything defaults to one directory, ``SCORERECON_HOME`` (``~/.local/share/scorerecon``):
the SQLite job database, the result store and admin-trained models, so that
``scorerecon keys create`` and ``scorerecon serve`` on a fresh machine share them with no
configuration. Deployments point ``SCORERECON_DATABASE_URL`` at PostgreSQL and
``SCORERECON_EXECUTOR`` at ``celery`` (or set ``REDIS_URL``, which implies Celery on it);
without either, jobs run in the gateway's own worker threads with no broker at all.
"""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_home() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "scorerecon"


# Soft time limits per job kind (s): a reconstruction or sampling job the cost limit admits
# takes at most ~48 min on a 2-core CPU (see max_job_cost), an export minutes, training days.
TIME_LIMITS_S = {
    "reconstruction": 3300,
    "slab": 3300,
    "sampling": 3300,
    "export": 600,
    "training": 86400,
}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCORERECON_", extra="ignore")

    home: Path = Field(default_factory=default_home)
    database_url: str | None = None  # default: sqlite:///<home>/scorerecon.db
    storage_dir: Path | None = None  # default: <home>/results
    result_store: str | None = None  # s3://bucket/prefix for an S3-compatible store
    s3_endpoint_url: str | None = None  # MinIO, Ceph RGW, ...; unset for AWS
    s3_region: str | None = None
    models_dir: Path | None = None  # default: <home>/models (admin-trained models)
    broker_url: str = "redis://127.0.0.1:6379/0"
    executor: Literal["embedded", "celery"] = "embedded"
    embedded_workers: int = Field(1, ge=1, le=16)
    max_upload_mb: float = Field(256, gt=0)
    max_queue: int = Field(1000, ge=1)
    rate_limit_per_minute: int = Field(120, ge=1)
    # Failed credentials per client address per minute; past it the address is refused
    # (429) before any credential is checked, so keys cannot be guessed at speed.
    failed_auth_per_minute: int = Field(20, ge=1)
    # Fair use (issue 17): a job's cost is NFE × samples × slices × pixels (service/fairness).
    # 3·10⁸ admits ct-default's nfe=1000 × 8 samples at 128² (1.3·10⁸) and admin sampling's
    # defaults (500 PC steps × 16 at 128², 2.6·10⁸), and refuses nfe=5000 × 64 (5.2·10⁹). At the
    # 0.09-0.16 s per sample-NFE of a 2-core CPU at 128² the largest admitted job takes
    # 28-48 min, inside the workers' 55-min soft time limit (time_limits_s).
    max_job_cost: int = Field(300_000_000, ge=1)
    max_owner_cost: int = Field(1_200_000_000, ge=1)  # queued + running, per owner: ~4 jobs
    max_queued_per_owner: int = Field(100, ge=1)  # a tenth of max_queue
    # Celery: jobs of one owner sent to the broker or running at once; the rest wait in the
    # database and are sent round-robin by owner as slots free. One GPU worker: 1; a pool of
    # N workers: up to N (N - 1 keeps a worker free for another owner's job).
    owner_slots: int = Field(1, ge=1)
    torch_threads: int | None = None
    # A volume of more slices than this is split into slabs of about this many, run by any
    # free workers as parts of one job (0: every job runs whole on one worker).
    slab_slices: int = Field(0, ge=0)
    # bf16 autocast for the score network in the workers; unset: on where the GPU has bf16
    # units or a probe measures it faster on this CPU (models.registry.bf16_is_fast), else off.
    bf16: bool | None = None
    data_dirs: list[Path] = []  # server-side training data roots the operator registers
    pacs: dict[str, dict] = {}  # export destinations by name (see service/pacs.py)
    deid_salt: str = ""  # secret for pseudonyms and UIDs of de-identifying destinations
    oidc_issuer: str | None = None  # optional OIDC bearer tokens (see service/oidc.py)
    oidc_audience: str | None = None
    oidc_jwks: str | None = None
    # /metrics is closed unless one of these opens it (see docs/security.md).
    metrics_token: SecretStr | None = None  # Prometheus sends 'Authorization: Bearer <it>'
    metrics_allow: list[str] = []  # networks (CIDR) whose direct peers may scrape without it
    # Console forms are accepted from the gateway's own origin (its Host header) and these.
    trusted_origins: list[str] = []  # e.g. ["https://scorerecon.hospital.example"]
    # The TLS proxies whose X-Forwarded-For/-Proto uvicorn believes (comma-separated
    # addresses or networks, or "*"): behind one, the console's cookies are Secure.
    forwarded_allow_ips: str = "127.0.0.1"
    # Workers (Celery): limits, redelivery and recovery. Each job kind has its own soft time
    # limit (the job stops and fails, naming it), given as JSON for the kinds to change,
    # e.g. {"training": 172800}; the hard limit (the process is killed) is a margin later.
    time_limits_s: dict[str, int] = Field(default_factory=lambda: dict(TIME_LIMITS_S))
    hard_limit_margin_s: int = Field(300, ge=1)
    # Unacknowledged messages are redelivered after this (a killed worker's job). A job
    # running longer (training) gets a duplicate message, which its claim drops (its
    # heartbeat is fresh).
    visibility_timeout_s: int = 3900
    max_tasks_per_child: int = 50
    max_retries: int = 3
    heartbeat_stale_s: float = 120.0  # a running job without heartbeat this long is orphaned
    requeue_after_s: float = 300.0  # a queued job older than this lost its message
    sweep_every_s: float = 60.0

    @field_validator("metrics_token", mode="before")
    @classmethod
    def _metrics_token(cls, value: object) -> object:
        """An empty value means unset; a set token must be long enough not to be guessed."""
        text = value.get_secret_value() if isinstance(value, SecretStr) else value
        if text is None or text == "":
            return None
        if not isinstance(text, str) or len(text.strip()) < 16:
            raise ValueError(
                "SCORERECON_METRICS_TOKEN must be at least 16 characters "
                "(for example the output of `openssl rand -hex 32`), or unset"
            )
        return text.strip()

    @field_validator("time_limits_s")
    @classmethod
    def _time_limits(cls, value: dict[str, int]) -> dict[str, int]:
        """The kinds given override the defaults; each a positive number of seconds."""
        unknown = sorted(set(value) - set(TIME_LIMITS_S))
        if unknown:
            raise ValueError(
                f"SCORERECON_TIME_LIMITS_S: unknown job kinds {unknown}; "
                f"the kinds are {', '.join(TIME_LIMITS_S)}"
            )
        bad = [k for k, v in value.items() if not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"SCORERECON_TIME_LIMITS_S: {bad} must be whole seconds >= 1")
        return {**TIME_LIMITS_S, **value}

    @field_validator("pacs")
    @classmethod
    def _pacs(cls, value: dict[str, dict]) -> dict[str, dict]:
        """Each destination usable, and https unless it allows http (service/pacs.py)."""
        from service.pacs import PermanentError, check_destinations

        try:
            return check_destinations(value)
        except PermanentError as exc:
            raise ValueError(f"SCORERECON_PACS: {exc}") from None

    @field_validator("metrics_allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        """Each entry an address or network (``10.0.0.0/8``, ``::1``), checked at start."""
        for entry in value:
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"SCORERECON_METRICS_ALLOW: {entry!r} is not an address or network; "
                    'write CIDR, e.g. ["10.0.0.0/8", "127.0.0.1"]'
                ) from None
        return [entry.strip() for entry in value]

    @field_validator("trusted_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        """Each entry ``scheme://host[:port]`` as a browser sends it in ``Origin``."""
        origins = []
        for entry in value:
            parts = urlsplit(entry.strip().lower().rstrip("/"))
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path:
                raise ValueError(
                    f"SCORERECON_TRUSTED_ORIGINS: {entry!r} is not an origin; write "
                    'scheme://host[:port] with no path, e.g. ["https://scorerecon.example"]'
                )
            origins.append(f"{parts.scheme}://{parts.netloc}")
        return origins

    @model_validator(mode="after")
    def _redis_url(self) -> Settings:
        """``REDIS_URL`` (as most platforms export it) switches to Celery on that Redis,
        unless the executor or broker were set explicitly."""
        url = os.environ.get("REDIS_URL")
        explicit = {"executor", "broker_url"} & self.model_fields_set
        if url and not explicit:
            self.broker_url, self.executor = url, "celery"
        return self

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'scorerecon.db'}"

    @cached_property
    def results(self) -> Path:
        return self.storage_dir or self.home / "results"

    @cached_property
    def models(self) -> Path:
        return self.models_dir or self.home / "models"

    @cached_property
    def metrics_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        return tuple(ipaddress.ip_network(n, strict=False) for n in self.metrics_allow)

    def prepare(self) -> Settings:
        """Create the local directories the settings name."""
        for path in (self.home, self.results, self.models):
            path.mkdir(parents=True, exist_ok=True)
        return self


# What ``scorerecon serve --help`` shows: the settings a site sets first, one line each
# (every other SCORERECON_* setting is a field of Settings above; docs/deployment.md).
SITE_SETTINGS = {
    "home": "one folder for the SQLite database, results and trained models",
    "database_url": "the job database, e.g. postgresql+psycopg://user@db/scorerecon",
    "executor": "embedded (jobs in the gateway's threads) or celery (workers)",
    "broker_url": "Celery's Redis (REDIS_URL also selects celery on it)",
    "result_store": "s3://bucket/prefix for results in object storage (default: home)",
    "pacs": "export destinations, JSON by name (docs/pacs.md); DICOMweb over https",
    "oidc_issuer": "with _AUDIENCE and _JWKS: the identity provider's tokens (OIDC)",
    "trusted_origins": "origins besides the gateway's own whose console forms are accepted",
    "forwarded_allow_ips": "TLS proxies trusted for X-Forwarded-Proto/-For",
    "metrics_token": "bearer token that opens /metrics (or _METRICS_ALLOW: networks)",
    "max_job_cost": "the largest job (NFE x samples x slices x pixels) one request may ask",
}


def settings_help() -> str:
    """The site settings as environment variables, with their defaults, for ``--help``."""
    lines = ["site settings (environment variables; docs/deployment.md lists them all):"]
    for name, what in SITE_SETTINGS.items():
        field = Settings.model_fields[name]
        default = field.default_factory() if field.default_factory else field.default
        shown = "" if default in (None, {}, []) else f" [default: {default}]"
        lines.append(f"  SCORERECON_{name.upper():<22} {what}{shown}")
    return "\n".join(lines)
