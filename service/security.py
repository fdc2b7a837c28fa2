"""Security headers on every response, and the one looser policy the API's docs need.

The console (``/ui``) loads only its own script, style sheet and images, so its policy
allows nothing else: no inline script, no other site, no framing, forms only to itself.
API answers are data, never pages to run, so theirs allows nothing at all. ``/docs`` and
``/redoc`` are FastAPI's Swagger UI and ReDoc pages, which load their assets from this
server (service/api_docs.py: no CDN, a hospital network has no internet) and start with an
inline script; they get a policy allowing this origin and the SHA-256 of their own inline
scripts (computed from the page the app generates, which holds no request data), so no
other inline script would run there.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

CONSOLE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
API_CSP = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    # Same-origin requests keep Referer and Origin (the console's origin check needs them);
    # no other site learns a job id from a URL.
    "referrer-policy": "same-origin",
}
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_csp(html: bytes) -> str:
    """The policy for a docs page: this origin, and its own inline scripts by hash."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(body).digest()).decode()}'"
        for body in INLINE_SCRIPT.findall(html)
    )
    return (
        f"default-src 'none'; script-src 'self' {hashes}".rstrip()
        + "; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self'; "
        "connect-src 'self'; worker-src blob:; object-src 'none'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )


class SecurityHeaders:
    """ASGI middleware: adds the headers above (and the path's CSP) to every response
    that does not set them itself."""

    def __init__(self, app: ASGIApp, docs_paths: Iterable[str] = ()) -> None:
        self.app = app
        self.docs_paths = frozenset(p for p in docs_paths if p)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in self.docs_paths:
            await self._docs(scope, receive, send)
            return
        csp = CONSOLE_CSP if path == "/ui" or path.startswith("/ui/") else API_CSP

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                _add(MutableHeaders(scope=message), csp)
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _docs(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A docs page is small: hold it, hash its inline scripts, then send it."""
        start: Message | None = None
        body: list[bytes] = []

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            body.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            html = b"".join(body)
            _add(MutableHeaders(scope=start), docs_csp(html))
            await send(start)
            await send({"type": "http.response.body", "body": html})

        await self.app(scope, receive, hold)


def _add(headers: MutableHeaders, csp: str) -> None:
    for name, value in (*HEADERS.items(), ("content-security-policy", csp)):
        if name not in headers:
            headers[name] = value
