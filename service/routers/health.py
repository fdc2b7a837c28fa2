"""Liveness, readiness, and the Prometheus scrape (closed unless opened)."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service.deps import Ctx, client_address
from service.problems import Problem, problem_responses
from service.schemas import Health, Readiness

router = APIRouter(tags=["health"])
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@router.get("/healthz", response_model=Health)
def healthz() -> dict:
    """The process answers (liveness)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "a dependency is unreachable"}},
)
def readyz(ctx: Ctx) -> JSONResponse:
    """The database and the executor (the broker, with Celery) answer (readiness)."""
    checks: dict[str, bool | str] = {}
    for name, fn in (("database", ctx.jobs.ping), ("executor", ctx.executor.ping)):
        try:
            checks[name] = bool(fn())
        except Exception as exc:  # noqa: BLE001 - report, never crash the probe
            checks[name] = f"unreachable ({type(exc).__name__})"
    ok = all(v is True for v in checks.values())
    return JSONResponse({"ready": ok, "checks": checks}, 200 if ok else 503)


def scraper(request: Request, ctx: Ctx) -> None:
    """/metrics is closed unless opened: by ``SCORERECON_METRICS_TOKEN`` (sent as a bearer
    token) or for peers in ``SCORERECON_METRICS_ALLOW``. API keys do not open it: a scraper
    needs no job scopes, and a job key should not reach the metrics."""
    settings = ctx.settings
    peer = client_address(request)
    if in_networks(peer, settings.metrics_networks):
        return
    token = settings.metrics_token
    if token is not None:
        sent = request.headers.get("authorization", "")
        expected = f"Bearer {token.get_secret_value()}"
        if hmac.compare_digest(sent.encode(), expected.encode()):
            return
        what = "a wrong token" if sent else "no token"
        raise Problem(
            401,
            "Unauthorized",
            f"/metrics needs 'Authorization: Bearer <SCORERECON_METRICS_TOKEN>'; "
            f"this request sent {what}",
            "Authorization",
            www_authenticate='Bearer realm="metrics"',
        )
    if settings.metrics_allow:
        detail = (
            f"/metrics answers only peers in SCORERECON_METRICS_ALLOW; {peer or 'this peer'} "
            "is not in it (add its network, or set SCORERECON_METRICS_TOKEN)"
        )
    else:
        detail = (
            "/metrics is closed: set SCORERECON_METRICS_TOKEN (sent by the scraper as a "
            "bearer token) or SCORERECON_METRICS_ALLOW (the scraper's networks)"
        )
    raise Problem(403, "Forbidden", detail)


@router.get(
    "/metrics",
    dependencies=[Depends(scraper)],
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format"},
        **problem_responses(401, 403),
    },
)
def metrics(ctx: Ctx) -> Response:
    """Prometheus text format: the clients' jobs by state, the slabs of split volumes by
    state, the queue depth (queued jobs and slabs: the work waiting for a worker), run time
    of finished jobs by kind and state (sum and count, so rate() gives mean durations).
    Closed by default: see ``SCORERECON_METRICS_TOKEN`` and ``SCORERECON_METRICS_ALLOW``."""
    counts, slabs = ctx.jobs.count_by_state(), ctx.jobs.count_by_state(slabs=True)
    lines = [
        "# HELP scorerecon_jobs Jobs clients submitted, by state.",
        "# TYPE scorerecon_jobs gauge",
    ]
    lines += [f'scorerecon_jobs{{state="{s}"}} {n}' for s, n in counts.items()]
    lines += [
        "# HELP scorerecon_slabs Parts of volumes split among workers, by state.",
        "# TYPE scorerecon_slabs gauge",
    ]
    lines += [f'scorerecon_slabs{{state="{s}"}} {n}' for s, n in slabs.items()]
    lines += [
        "# HELP scorerecon_queue_depth Work waiting for a worker: queued jobs and slabs.",
        "# TYPE scorerecon_queue_depth gauge",
        f"scorerecon_queue_depth {counts['queued'] + slabs['queued']}",
        "# HELP scorerecon_job_seconds Run time of finished jobs (started to finished).",
        "# TYPE scorerecon_job_seconds summary",
    ]
    for (kind, state), (total, n) in ctx.jobs.durations().items():
        label = f'kind="{kind}",state="{state}"'
        lines += [
            f"scorerecon_job_seconds_sum{{{label}}} {total:.3f}",
            f"scorerecon_job_seconds_count{{{label}}} {n}",
        ]
    return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def in_networks(peer: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether the peer's address (IPv4-mapped IPv6 as IPv4) lies in one of ``networks``."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:  # no address (a test client, a Unix socket)
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in n for n in networks)
