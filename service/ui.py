"""The web console (``/ui``): jobs, side-by-side comparison, models, and admin forms.

Server-rendered Jinja2 templates with a little JavaScript (``static/console.js``: live job
state, window/level, zoom and synchronised pan); nothing is loaded from outside the gateway.
The console is a client of the same handlers as the API (``Handlers``): it adds no rules of
its own. Authentication: the user pastes an API key once; it is kept in an HttpOnly,
SameSite=Strict cookie scoped to ``/ui``, so pages and their JSON are authorised exactly as
the key is, and no other site can make the browser send it.

Forgery (CSRF): every POST, login and logout included, must come from a page of this
console. It must carry the page's token (a hidden ``csrf_token`` field, or the
``X-CSRF-Token`` header for scripts) equal to the ``scorerecon_csrf`` cookie the page set
(double submit: another site can neither read the cookie nor set it with SameSite=Strict),
and its ``Origin`` (or, without one, ``Referer``) must be this gateway's own origin or one of
``SCORERECON_TRUSTED_ORIGINS``. Otherwise it is refused with 403 before anything happens:
a hostile page cannot log a clinician's browser in with the attacker's key.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.deps import client_address

HERE = Path(__file__).parent
COOKIE = "scorerecon_key"
CSRF_COOKIE = "scorerecon_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"
CSRF_SHAPE = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)
log = logging.getLogger(__name__)
# Window (centre, width) in HU for CT, in [0, 1] units for MR.
CT_WINDOWS = {"soft tissue": (40, 400), "lung": (-600, 1500), "bone": (400, 1800)}
MR_WINDOWS = {"full": (0.5, 1.0), "contrast": (0.35, 0.5)}


@dataclass
class Handlers:
    """What the console needs from the gateway (the API's own functions)."""

    principal: Callable[[str, str], Any]  # (key, client address) → Principal, raises Problem
    submit: Callable[..., Any]
    admin_sampling: Callable[..., Any]
    admin_training: Callable[..., Any]
    new_key: Callable[..., Any]
    delete_key: Callable[..., Any]
    list_keys: Callable[[], list[dict]]
    own_job: Callable[[str, Any], Any]
    list_jobs: Callable[..., dict]
    models: Callable[[], list[str]]
    model_card: Callable[[str], dict]
    model_dir: Callable[[str], Path]
    samplers: tuple[str, ...]
    problem: type
    scoped: Callable[[Any, str], Any]  # (principal, scope) → principal, raises Problem 403
    sampling_request: type
    training_request: type
    trusted_origins: tuple[str, ...] = ()  # besides the gateway's own (SCORERECON_TRUSTED_ORIGINS)


class CsrfRefused(Exception):
    """A console POST that did not come from a console page; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def csrf_cookie_token(request: Request) -> str | None:
    """The browser's console token, if it has a well-formed one."""
    token = request.cookies.get(CSRF_COOKIE, "")
    return token if CSRF_SHAPE.fullmatch(token) else None


def set_csrf_cookie(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        CSRF_COOKIE,
        token,
        httponly=True,  # pages carry it in their forms; no script needs the cookie
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/ui",
    )


def origin_refusal(request: Request, trusted: tuple[str, ...]) -> str | None:
    """Why the request's Origin (or Referer) is not this gateway's, or None if it is.

    This gateway's origin is its Host header (what the browser addressed) with the request's
    scheme, or https (TLS ended at a proxy in front of the gateway)."""
    host = request.headers.get("host", "").lower()
    own = {f"{request.url.scheme}://{host}", f"https://{host}"}
    allowed = own | set(trusted)
    origin = request.headers.get("origin")
    if origin is not None:
        if origin == "null":
            return "the browser hid the sending page's origin (Origin: null)"
        if origin.lower().rstrip("/") not in allowed:
            return f"the form was sent from {origin}, not from this console"
        return None
    referer = request.headers.get("referer")
    if referer is None:
        return "the request carries neither Origin nor Referer, so its page cannot be told"
    parts = urlsplit(referer.lower())
    if f"{parts.scheme}://{parts.netloc}" not in allowed:
        return f"the form was sent from a page of {parts.scheme}://{parts.netloc}, not this console"
    return None


async def sent_token(request: Request) -> str:
    """The token the request carries: the header, else the form field."""
    if header := request.headers.get(CSRF_HEADER):
        return header
    # Routes with form fields have parsed the body already (the same, cached form); for the
    # others (logout, revoke) only small url-encoded bodies are read: no file parts.
    form = await request.form(max_files=0)
    value = form.get(CSRF_FIELD)
    return value if isinstance(value, str) else ""


def add_ui(app: FastAPI, h: Handlers, results, job_json: Callable) -> None:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.mount("/ui/static", StaticFiles(directory=str(HERE / "static")), name="ui-static")

    async def csrf_guard(request: Request) -> None:
        """Refuse a console POST that a page of this console did not send (see above)."""
        if reason := origin_refusal(request, h.trusted_origins):
            raise CsrfRefused(reason)
        expected = csrf_cookie_token(request)
        if expected is None:
            raise CsrfRefused("the browser sent no console token cookie (scorerecon_csrf)")
        sent = await sent_token(request)
        if not sent:
            raise CsrfRefused(f"the form carries no {CSRF_FIELD} field")
        if not hmac.compare_digest(sent.encode(), expected.encode()):
            raise CsrfRefused(f"the form's {CSRF_FIELD} does not match this browser's token")

    @app.exception_handler(CsrfRefused)
    async def _refused(request: Request, exc: CsrfRefused) -> HTMLResponse:
        """403, a page saying why and what to do, and no cookie set or changed."""
        log.warning("console %s %s refused: %s", request.method, request.url.path, exc.reason)
        again = "/ui/login" if request.url.path == "/ui/login" else "/ui/"
        error = (
            f"Forbidden: {exc.reason}. The console accepts forms only from its own pages: "
            f"open {again} in this browser (not a link or page from another site) and send "
            "the form again."
        )
        context = {"user": None, "is_admin": False, "csrf_token": "", "error": error}
        return templates.TemplateResponse(request, "error.html", context, status_code=403)

    csrf = [Depends(csrf_guard)]

    def user(request: Request):
        key = request.cookies.get(COOKIE)
        if not key:
            return None
        try:
            return h.principal(key, client_address(request))
        except h.problem:
            return None

    def page(request: Request, name: str, p, status: int = 200, **context) -> HTMLResponse:
        """A console page; its forms carry the browser's token, set here if it has none."""
        token = csrf_cookie_token(request)
        fresh = token is None
        token = token or secrets.token_urlsafe(32)
        context |= {"user": p, "is_admin": bool(p and p.is_admin), "csrf_token": token}
        response = templates.TemplateResponse(request, name, context, status_code=status)
        if fresh:
            set_csrf_cookie(response, request, token)
        return response

    def login_first() -> RedirectResponse:
        return RedirectResponse("/ui/login", 303)

    def lacks(p, name: str):
        """The 403 Problem if ``p`` lacks the scope ``name`` (audited, as in the API)."""
        try:
            h.scoped(p, name)
        except h.problem as exc:
            return exc
        return None

    def error_text(exc) -> str:
        body = json.loads(exc.response().body)
        field = f" ({body['field']})" if body.get("field") else ""
        return f"{body.get('title', 'Error')}: {body.get('detail', '')}{field}"

    @app.get("/ui/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request) -> HTMLResponse:
        return page(request, "login.html", None)

    @app.post("/ui/login", include_in_schema=False, dependencies=csrf)
    def login(request: Request, key: Annotated[str, Form()]) -> Response:
        try:
            h.principal(key.strip(), client_address(request))
        except h.problem as exc:
            return page(request, "login.html", None, 401, error=error_text(exc))
        response = RedirectResponse("/ui/", 303)
        response.set_cookie(
            COOKIE,
            key.strip(),
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
            path="/ui",
        )
        set_csrf_cookie(response, request, secrets.token_urlsafe(32))  # a new one per login
        return response

    @app.post("/ui/logout", include_in_schema=False, dependencies=csrf)
    def logout() -> Response:
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/ui")
        response.delete_cookie(CSRF_COOKIE, path="/ui")  # the login page sets a new one
        return response

    @app.get("/ui", include_in_schema=False)
    @app.get("/ui/", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(request: Request, state: str | None = None) -> Response:
        p = user(request)
        if p is None:
            return login_first()
        if denied := lacks(p, "recon:read"):
            return page(request, "error.html", p, 403, error=error_text(denied))
        try:
            listing = h.list_jobs(p, state=state, limit=100, offset=0)
        except h.problem as exc:
            return page(request, "jobs.html", p, 422, jobs=[], state=None, error=error_text(exc))
        return page(request, "jobs.html", p, jobs=listing["items"], state=state)

    @app.get("/ui/jobs.json", include_in_schema=False)
    def jobs_json(request: Request, state: str | None = None) -> Response:
        p = user(request)
        if p is None:
            return JSONResponse({"error": "log in"}, 401)
        if denied := lacks(p, "recon:read"):
            return denied.response()
        return JSONResponse(h.list_jobs(p, state=state, limit=100, offset=0))

    @app.get("/ui/jobs/{job_id}", response_class=HTMLResponse, include_in_schema=False)
    def job_page(request: Request, job_id: str) -> Response:
        p = user(request)
        if p is None:
            return login_first()
        if denied := lacks(p, "recon:read"):
            return page(request, "error.html", p, 403, error=error_text(denied))
        try:
            job = h.own_job(job_id, p)
        except h.problem as exc:
            return page(request, "error.html", p, 404, error=error_text(exc))
        report = _report(results, job)
        modality = _modality(job, h)
        windows = CT_WINDOWS if modality == "ct" else MR_WINDOWS
        panels = _panels(job, modality)
        return page(
            request,
            "job.html",
            p,
            job=job_json(job),
            report=report,
            panels=panels,
            windows=windows,
            modality=modality,
            provenance=json.dumps(report.get("provenance", {}), indent=2) if report else "",
        )

    @app.get("/ui/jobs/{job_id}/state", include_in_schema=False)
    def job_state(request: Request, job_id: str) -> Response:
        p = user(request)
        if p is None:
            return JSONResponse({"error": "log in"}, 401)
        if denied := lacks(p, "recon:read"):
            return denied.response()
        try:
            return JSONResponse(job_json(h.own_job(job_id, p)))
        except h.problem as exc:
            return exc.response()

    @app.get("/ui/jobs/{job_id}/image/{name}", include_in_schema=False)
    def job_image(request: Request, job_id: str, name: str) -> Response:
        """One panel as float32 (little-endian) with its shape and unit in headers; the
        page draws it with the chosen window. CT images come in HU."""
        p = user(request)
        if p is None:
            return JSONResponse({"error": "log in"}, 401)
        if denied := lacks(p, "recon:read"):
            return denied.response()
        try:
            job = h.own_job(job_id, p)
        except h.problem as exc:
            return exc.response()
        files = {
            "measurement": "measurement.npy",
            "reconstruction": "recon.npy",
            "baseline": "baseline.npy",
            "uncertainty": "std.npy",
            "samples": "samples.npy",
        }
        if name not in files or not results.exists(job.id, files[name]):
            return JSONResponse({"error": f"no {name} image for this job"}, 404)
        arr = np.load(io.BytesIO(results.get(job.id, files[name])), allow_pickle=False)
        image, unit = _display(arr, name, _modality(job, h))
        return Response(
            image.astype("<f4").tobytes(),
            media_type="application/octet-stream",
            headers={"X-Shape": f"{image.shape[0]},{image.shape[1]}", "X-Unit": unit},
        )

    @app.get("/ui/new", response_class=HTMLResponse, include_in_schema=False)
    def new_form(request: Request) -> Response:
        p = user(request)
        if p is None:
            return login_first()
        return page(request, "new.html", p, models=h.models(), samplers=h.samplers)

    @app.post("/ui/new", include_in_schema=False, dependencies=csrf)
    def new_submit(
        request: Request,
        measurement: Annotated[UploadFile, File()],
        spec: Annotated[str, Form()],
        model: Annotated[str, Form()],
        sampler: Annotated[str, Form()] = "fast",
        nfe: Annotated[int | None, Form()] = None,  # empty: the model card's default
        samples: Annotated[int | None, Form()] = None,
    ) -> Response:
        p = user(request)
        if p is None:
            return login_first()
        try:
            r = h.submit(
                p=h.scoped(p, "recon:submit"),
                measurement=measurement,
                spec=spec,
                model=model,
                sampler=sampler,
                nfe=nfe,
                samples=samples,
                seed=0,
                source=None,
                source_dicom=None,
                export_to=None,
                idempotency_key=None,
            )
        except h.problem as exc:
            return page(
                request,
                "new.html",
                p,
                exc.status,  # 403 for a key without recon:submit, 422 for a bad field
                models=h.models(),
                samplers=h.samplers,
                error=error_text(exc),
                spec=spec,
            )
        job_id = json.loads(r.body)["id"]
        return RedirectResponse(f"/ui/jobs/{job_id}", 303)

    @app.get("/ui/models", response_class=HTMLResponse, include_in_schema=False)
    def models_page(request: Request) -> Response:
        p = user(request)
        if p is None:
            return login_first()
        cards = [h.model_card(n) for n in h.models()]
        return page(request, "models.html", p, cards=cards)

    @app.get("/ui/models/{name}", response_class=HTMLResponse, include_in_schema=False)
    def model_page(request: Request, name: str) -> Response:
        p = user(request)
        if p is None:
            return login_first()
        if name not in h.models():
            return page(request, "error.html", p, 404, error=f"no model '{name}'")
        card = h.model_card(name)
        folder = h.model_dir(name)
        return page(
            request,
            "model.html",
            p,
            card=card,
            rows=_card_rows(card),
            has_samples=(folder / "samples.png").exists(),
            has_loss=bool(card.get("loss_curve")) or (folder / "loss.png").exists(),
        )

    @app.get("/ui/models/{name}/{figure}.png", include_in_schema=False)
    def model_figure(request: Request, name: str, figure: str) -> Response:
        p = user(request)
        if p is None:
            return JSONResponse({"error": "log in"}, 401)
        if name not in h.models() or figure not in ("samples", "loss"):
            return JSONResponse({"error": "not found"}, 404)
        path = h.model_dir(name) / f"{figure}.png"
        if path.exists():
            return Response(path.read_bytes(), media_type="image/png")
        card = h.model_card(name)
        if figure == "loss" and card.get("loss_curve"):
            import tempfile

            from models.figures import loss_curve

            with tempfile.TemporaryDirectory() as tmp:
                drawn = loss_curve(
                    {card.get("objective", "loss"): card["loss_curve"]},
                    Path(tmp) / "loss.png",
                    title=f"{name}: training loss",
                )
                return Response(drawn.read_bytes(), media_type="image/png")
        return JSONResponse({"error": "not found"}, 404)

    def admin_only(request: Request):
        p = user(request)
        if p is None:
            return None, login_first()
        if not p.is_admin:
            return p, page(
                request,
                "error.html",
                p,
                403,
                error="Forbidden: the admin pages need a key with the 'admin' scope",
            )
        return p, None

    def admin_page(request: Request, p, status: int = 200, **extra) -> HTMLResponse:
        return page(
            request,
            "admin.html",
            p,
            status,
            models=h.models(),
            samplers=h.samplers,
            keys=h.list_keys(),
            **extra,
        )

    @app.get("/ui/admin", response_class=HTMLResponse, include_in_schema=False)
    def admin(request: Request) -> Response:
        p, refused = admin_only(request)
        return refused or admin_page(request, p)

    @app.post("/ui/admin/sampling", include_in_schema=False, dependencies=csrf)
    def admin_sampling(
        request: Request,
        model: Annotated[str, Form()],
        n: Annotated[int, Form()] = 16,
        sampler: Annotated[str, Form()] = "pc",
        steps: Annotated[int, Form()] = 500,
    ) -> Response:
        p, refused = admin_only(request)
        if refused:
            return refused
        body = {"model": model, "n": n, "sampler": sampler, "steps": steps}
        return _admin_call(request, p, lambda: h.admin_sampling(p, h.sampling_request(**body)))

    @app.post("/ui/admin/training", include_in_schema=False, dependencies=csrf)
    def admin_training(
        request: Request,
        model_id: Annotated[str, Form()],
        source: Annotated[str, Form()],
        location: Annotated[str, Form()],
        image_size: Annotated[int, Form()] = 128,
        steps: Annotated[int, Form()] = 1000,
        preset: Annotated[str, Form()] = "small",
    ) -> Response:
        p, refused = admin_only(request)
        if refused:
            return refused
        if source not in ("data_dir", "dataset"):
            return admin_page(request, p, 422, error="source must be data_dir or dataset")
        body = {
            source: location,
            "model_id": model_id,
            "image_size": image_size,
            "steps": steps,
            "preset": preset,
        }
        return _admin_call(request, p, lambda: h.admin_training(p, h.training_request(**body)))

    def _admin_call(request: Request, p, call) -> Response:
        try:
            r = call()
        except h.problem as exc:
            return admin_page(request, p, 422, error=error_text(exc))
        except ValueError as exc:  # pydantic validation of the form
            return admin_page(request, p, 422, error=str(exc).splitlines()[-1])
        return RedirectResponse(f"/ui/jobs/{json.loads(r.body)['id']}", 303)

    @app.post("/ui/admin/keys", include_in_schema=False, dependencies=csrf)
    def admin_new_key(
        request: Request,
        owner: Annotated[str, Form()],
        scopes: Annotated[list[str], Form()],
    ) -> Response:
        p, refused = admin_only(request)
        if refused:
            return refused
        try:
            created = h.new_key(p, {"owner": owner, "scopes": scopes})
        except h.problem as exc:
            return admin_page(request, p, 422, error=error_text(exc))
        return admin_page(request, p, created=created)

    @app.post("/ui/admin/keys/{key_id}/revoke", include_in_schema=False, dependencies=csrf)
    def admin_revoke(request: Request, key_id: str) -> Response:
        p, refused = admin_only(request)
        if refused:
            return refused
        try:
            h.delete_key(key_id, p)
        except h.problem as exc:
            return admin_page(request, p, 404, error=error_text(exc))
        return RedirectResponse("/ui/admin", 303)


def _modality(job, h: Handlers) -> str:
    """'ct' or 'mri': from the spec, or for sampling jobs from the model's card (its
    intensity mapping names HU for CT priors)."""
    spec_modality = (job.spec or {}).get("modality")
    if spec_modality:
        return spec_modality
    try:
        card = h.model_card(job.model)
    except Exception:  # noqa: BLE001 - a deleted model: show the samples as they are
        return ""
    return card.get("modality") or ("ct" if "HU" in str(card.get("intensity", "")) else "mri")


def _report(results, job) -> dict:
    if job.state != "succeeded" or not results.exists(job.id, "report.json"):
        return {}
    return json.loads(results.get(job.id, "report.json"))


def _panels(job, modality: str) -> list[dict]:
    if job.kind == "sampling":
        return [{"name": "samples", "title": "samples"}]
    if job.kind != "reconstruction":
        return []
    base = "FBP" if modality == "ct" else "zero-filled"
    return [
        {"name": "measurement", "title": "measurement", "raw": True},
        {"name": "reconstruction", "title": "score-based reconstruction"},
        {"name": "baseline", "title": f"classical ({base})"},
        {"name": "uncertainty", "title": "uncertainty (posterior std)", "raw": True},
    ]


def _display(arr: np.ndarray, name: str, modality: str) -> tuple[np.ndarray, str]:
    """A 2-D picture of the first slice: HU for CT images, log-magnitude k-space and the
    sinogram as they are (normalised), the std in image units (HU for CT)."""
    from models.io import HUMapping

    a = np.asarray(arr)
    if name == "samples":
        imgs = a[:, 0] if a.ndim == 4 else a
        n = len(imgs)
        cols = int(np.ceil(np.sqrt(n)))
        rows = int(np.ceil(n / cols))
        h, w = imgs.shape[-2:]
        canvas = np.zeros((rows * h, cols * w), np.float32)
        for i, im in enumerate(imgs):
            canvas[(i // cols) * h : (i // cols + 1) * h, (i % cols) * w : (i % cols + 1) * w] = im
        return (HUMapping().to_hu(canvas) if modality == "ct" else canvas), _unit(modality)
    while a.ndim > 2:
        a = a[0]
    if name == "measurement":
        if np.iscomplexobj(a):
            a = np.log1p(np.abs(a))
        a = a.astype(np.float32)
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a), "normalised"
    if np.iscomplexobj(a):
        a = np.abs(a)
    if name == "uncertainty":
        return (a * 4000.0 if modality == "ct" else a), ("HU" if modality == "ct" else "unit")
    return (HUMapping().to_hu(a) if modality == "ct" else a), _unit(modality)


def _unit(modality: str) -> str:
    return "HU" if modality == "ct" else "unit"


def _card_rows(card: dict) -> list[tuple[str, str]]:
    skip = {"loss_curve", "train_config", "training_data"}
    rows = []
    for k, v in card.items():
        if k in skip:
            continue
        rows.append((k, v if isinstance(v, str) else json.dumps(v)))
    for k in ("training_data", "train_config"):
        if k in card:
            rows.append((k, json.dumps(card[k], indent=1)))
    return rows
