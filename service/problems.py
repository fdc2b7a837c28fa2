"""Every refusal as RFC 7807 ``application/problem+json``: :class:`Problem`, its schema for
the OpenAPI document, and the handlers that render FastAPI's and Starlette's own refusals
(an invalid field, an unparsable body, no such route) the same way."""

from __future__ import annotations

import http

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

MEDIA_TYPE = "application/problem+json"


class Problem(Exception):
    """An HTTP error rendered as problem+json, naming the field and the fix."""

    def __init__(self, status: int, title: str, detail: str, field: str | None = None, **extra):
        self.status, self.title, self.detail, self.field = status, title, detail, field
        self.extra = extra

    def response(self) -> JSONResponse:
        body = {"type": "about:blank", "title": self.title, "status": self.status}
        body["detail"] = self.detail
        if self.field:
            body["field"] = self.field
        headers = {}
        if "retry_after" in self.extra:
            headers["Retry-After"] = str(self.extra["retry_after"])
        if "www_authenticate" in self.extra:
            headers["WWW-Authenticate"] = self.extra["www_authenticate"]
        return JSONResponse(body, self.status, headers=headers, media_type=MEDIA_TYPE)


class ProblemDetail(BaseModel):
    """The body of every error response (RFC 7807)."""

    type: str = Field("about:blank", examples=["about:blank"])
    title: str = Field(..., examples=["Invalid spec"])
    status: int = Field(..., examples=[422])
    detail: str = Field(..., examples=["n_views must be an integer >= 1; set spec.n_views"])
    field: str | None = Field(None, description="the request field to fix", examples=["spec"])


def problem_responses(*statuses: int) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for these error statuses, as problem+json."""
    return {
        status: {
            "description": http.HTTPStatus(status).phrase,
            "content": {MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetail"}}},
        }
        for status in statuses
    }


# What every authenticated route may answer, and the 422 of every route with parameters.
AUTH_ERRORS = problem_responses(401, 403, 422, 429)


def install_handlers(app: FastAPI) -> None:
    """Render Problem, request validation errors and Starlette's refusals as problem+json."""

    @app.exception_handler(Problem)
    async def _problem(_: Request, exc: Problem) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0]
        if err["type"] == "json_invalid":
            why = err.get("ctx", {}).get("error", "invalid")
            detail = f"the body is not valid JSON ({why}); send a JSON object"
            return Problem(422, "Invalid request", detail, "body").response()
        field = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "header"))
        field = field or "body"
        return Problem(422, "Invalid request", f"{field}: {err['msg']}", field).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unparsable body, no such route) as problem+json."""
        title = http.HTTPStatus(exc.status_code).phrase
        if exc.status_code != 400:
            response = Problem(exc.status_code, title, str(exc.detail)).response()
        else:
            if request.headers.get("content-type", "").startswith("multipart/"):
                hint = "send multipart/form-data with a boundary and well-formed parts"
            else:
                hint = "send UTF-8 JSON (an object, not nested thousands of levels deep)"
            detail = f"{str(exc.detail).rstrip('.')}; {hint}"
            response = Problem(400, title, detail, "body").response()
        response.headers.update(exc.headers or {})
        return response
