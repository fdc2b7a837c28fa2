"""What a route depends on: the gateway's :class:`Context` (settings, stores, executor,
limiters), and who is calling (:func:`principal`, :func:`scope`, :func:`own_job`).

Credentials are bearer tokens (an API key ``sr_…`` or an OIDC JWT), declared as the
OpenAPI security scheme ``bearer``. An address with too many failed credentials in the last
minute is refused before any credential is checked (429), and each failure is audited.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import Principal, authenticate
from service.db import Job, JobStore
from service.oidc import OIDCVerifier
from service.problems import Problem
from service.ratelimit import RateLimited, RateLimiter
from service.results import ResultStore
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Context:
    """The gateway's parts, made once by :func:`service.app.create_app`."""

    settings: Settings
    jobs: JobStore
    results: ResultStore
    executor: Any  # workers.executor.Executor
    limiter: RateLimiter  # requests per key
    failures: RateLimiter  # failed credentials per client address
    oidc: OIDCVerifier | None


def context(request: Request) -> Context:
    return request.app.state.ctx


Ctx = Annotated[Context, Depends(context)]
bearer = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description="an API key (`sr_…`, from `scorerecon keys create`) or an OIDC access token",
)


def client_address(request: Request) -> str:
    """The client's address (a trusted proxy's X-Forwarded-For, as uvicorn resolves it)."""
    return request.client.host if request.client else ""


def principal(
    request: Request,
    ctx: Ctx,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """The caller of a request with ``Authorization: Bearer <credential>``."""
    if credentials is None or not credentials.credentials.strip():
        raise Problem(
            401, "Unauthorized", "send 'Authorization: Bearer <API key>'", "Authorization"
        )
    return credential_principal(ctx, credentials.credentials.strip(), client_address(request))


def credential_principal(ctx: Context, credential: str, peer: str) -> Principal:
    """The principal of an API key or OIDC token sent from ``peer`` (also the console's
    login): 429 while ``peer`` is over its failed credentials, 401 for a wrong one, 429
    past the key's request rate."""
    wait = ctx.failures.peek(peer)
    if wait is not None:
        log.warning("refused credentials from %s: too many failures", peer)
        raise Problem(
            429,
            "Too many failed credentials",
            f"more than {ctx.settings.failed_auth_per_minute} failed credentials per minute "
            "from this address (SCORERECON_FAILED_AUTH_PER_MINUTE); check the key and "
            f"retry after {wait} s",
            "Authorization",
            retry_after=wait,
        )
    if credential.startswith("sr_") or ctx.oidc is None:
        found = authenticate(ctx.jobs, credential)
    else:
        found = ctx.oidc.verify(credential)
    if found is None:
        try:
            ctx.failures.check(peer)
        except RateLimited:
            pass  # the next attempt from this address is refused above
        ctx.jobs.audit("auth-failed", f"unknown, revoked or expired credential from {peer}")
        detail = "the API key or token is unknown, revoked or expired"
        raise Problem(401, "Unauthorized", detail, "Authorization")
    try:
        ctx.limiter.check(found.key_id)
    except RateLimited as exc:
        raise Problem(
            429,
            "Too many requests",
            f"{exc} with this key (SCORERECON_RATE_LIMIT_PER_MINUTE)",
            retry_after=exc.retry_after,
        ) from None
    return found


Caller = Annotated[Principal, Depends(principal)]


def check_scope(ctx: Context, p: Principal, name: str) -> Principal:
    """``p`` if it holds the scope ``name`` (admins hold all); else 403, audited."""
    if name not in p.scopes and not p.is_admin:
        ctx.jobs.audit("denied", f"missing scope {name}", p.key_id, p.owner)
        raise Problem(403, "Forbidden", f"this key lacks the scope '{name}'")
    return p


def scope(name: str):
    """A dependency: the caller, who must hold the scope ``name``."""

    def check(ctx: Ctx, p: Caller) -> Principal:
        return check_scope(ctx, p, name)

    return Depends(check)


Submitter = Annotated[Principal, scope("recon:submit")]
Reader = Annotated[Principal, scope("recon:read")]
Admin = Annotated[Principal, scope("admin")]


def own_job(ctx: Context, job_id: str, p: Principal) -> Job:
    """The job ``job_id`` if the caller owns it (or is an admin); a volume's slabs are
    internal. Else 404, whether or not it exists."""
    job = ctx.jobs.get(job_id) if _is_hex_id(job_id) else None
    if job is None or job.kind == "slab" or (job.owner != p.owner and not p.is_admin):
        raise Problem(404, "Not found", f"no job {job_id!r} for this key", "job_id")
    return job


def _is_hex_id(text: str) -> bool:
    return len(text) == 32 and all(c in "0123456789abcdef" for c in text)
