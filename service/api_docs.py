"""The API's own documentation pages, served with no internet.

FastAPI's ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) load their scripts from a public
CDN, which a hospital network cannot reach. Here the same pages load the assets that the
``fastapi-offline`` package ships, from this server under :data:`ASSETS`, and ReDoc goes
without Google Fonts; service/security.py gives them a policy that allows only this origin
and their own inline scripts by hash.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"
STATIC = Path(fastapi_offline.__file__).parent / "static"
DOCS, REDIRECT, REDOC = "/docs", "/docs/oauth2-redirect", "/redoc"
PAGES = (DOCS, REDIRECT, REDOC)  # the paths that get the docs' security policy


def add_docs(app: FastAPI) -> None:
    """Mount the assets and the three pages on an app created with ``docs_url=None`` and
    ``redoc_url=None``."""
    app.mount(ASSETS, StaticFiles(directory=STATIC), name="docs-assets")
    title = f"{app.title} API"

    @app.get(DOCS, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=title,
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=root + REDIRECT,
        )

    @app.get(REDIRECT, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=root + app.openapi_url,
            title=title,
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
