"""The FastAPI gateway: ``create_app(settings)``.

A thin layer. It authenticates (service/deps.py), validates a request with the core's own
spec and operator (``models.physics``) and the model catalogue (service/catalogue.py),
stores the measurement, records the job, and hands the job id to the executor
(service/submission.py). Routes are grouped by resource in service/routers/. Every refusal
is an RFC 7807 ``application/problem+json`` body naming the field and the fix
(service/problems.py); nothing stored changes on a refused request.

A request flows one way: gateway → job store → queue → worker → core → result store.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI

from models.inverse import RECON_SAMPLERS
from models.registry import load_card, resolve
from service.api_docs import PAGES as DOC_PAGES
from service.api_docs import add_docs
from service.auth import list_keys
from service.catalogue import model_path, names
from service.db import JobStore
from service.deps import Context, check_scope, credential_principal, own_job
from service.migrate import upgrade
from service.oidc import OIDCVerifier
from service.problems import Problem, ProblemDetail, install_handlers
from service.ratelimit import make_rate_limiter
from service.results import open_result_store
from service.routers import admin, health, jobs, models
from service.schemas import KeyRequest, SamplingRequest, TrainingRequest, job_json
from service.security import SecurityHeaders
from service.settings import Settings
from service.submission import Submission, submit
from service.ui import Handlers, add_ui
from workers.executor import make_executor


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = (settings or Settings()).prepare()
    upgrade(settings.db_url)
    ctx = _context(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        ctx.executor.shutdown()

    app = FastAPI(
        title="scorerecon",
        version="0.1.0",
        description="Score-based reconstruction of sparse-view CT and undersampled MRI.",
        lifespan=lifespan,
        docs_url=None,  # served from the package, not a CDN (service/api_docs.py)
        redoc_url=None,
    )
    app.state.ctx = ctx
    app.state.settings, app.state.jobs, app.state.results = settings, ctx.jobs, ctx.results
    app.state.executor = ctx.executor
    add_docs(app)
    app.add_middleware(SecurityHeaders, docs_paths=DOC_PAGES)
    install_handlers(app)
    for router in (health.router, jobs.router, models.router, admin.router):
        app.include_router(router)
    add_ui(app, _console_handlers(ctx), ctx.results, job_json)
    app.openapi = partial(_openapi, app)
    return app


def _context(settings: Settings) -> Context:
    jobs_store = JobStore(settings.db_url)
    results = open_result_store(settings)
    oidc = None
    if settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks:
        oidc = OIDCVerifier(settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks)
    return Context(
        settings=settings,
        jobs=jobs_store,
        results=results,
        executor=make_executor(settings, jobs_store, results),
        limiter=make_rate_limiter(
            settings.executor, settings.broker_url, settings.rate_limit_per_minute
        ),
        failures=make_rate_limiter(
            settings.executor,
            settings.broker_url,
            settings.failed_auth_per_minute,
            "scorerecon:auth-failed:",
        ),
        oidc=oidc,
    )


def _console_handlers(ctx: Context) -> Handlers:
    """The console (service/ui.py) calls the API's own functions, bound to this gateway."""
    settings = ctx.settings
    return Handlers(
        principal=partial(credential_principal, ctx),
        submit=lambda p, **form: submit(ctx, p, Submission(**form)),
        admin_sampling=partial(admin.admin_sampling, ctx),
        admin_training=partial(admin.admin_training, ctx),
        new_key=lambda p, body: admin.new_key(ctx, p, KeyRequest(**body)),
        delete_key=partial(admin.delete_key, ctx),
        list_keys=lambda: list_keys(ctx.jobs),
        own_job=partial(own_job, ctx),
        list_jobs=partial(jobs.list_jobs, ctx),
        models=lambda: names(settings),
        model_card=lambda name: load_card(model_path(name, settings)),
        model_dir=lambda name: resolve(model_path(name, settings)),
        samplers=tuple(RECON_SAMPLERS),
        problem=Problem,
        scoped=partial(check_scope, ctx),
        sampling_request=SamplingRequest,
        training_request=TrainingRequest,
        trusted_origins=tuple(settings.trusted_origins),
    )


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with ProblemDetail among its components (the error responses
    refer to it) and no trace of the validation-error shape FastAPI would document."""
    from fastapi.openapi.utils import get_openapi

    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ProblemDetail"] = ProblemDetail.model_json_schema()
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema
