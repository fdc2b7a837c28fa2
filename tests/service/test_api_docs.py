"""The API's documentation pages work on a network with no internet: every script, style
sheet and image they load comes from this server (service/api_docs.py)."""

import re

from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def test_docs_pages_load_only_from_this_server(tmp_path):
    s = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    with TestClient(create_app(s)) as client:
        for page in ("/docs", "/redoc"):
            r = client.get(page)
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
            html = r.text
            assert "cdn." not in html and "fonts.googleapis" not in html, page
            refs = [a or b for a, b in REFERENCE.findall(html)]
            assert refs, page
            assert all(ref.startswith("/") for ref in refs), (page, refs)
            csp = r.headers["content-security-policy"]
            assert "http" not in csp and "script-src 'self'" in csp, csp
            for ref in refs:
                asset = client.get(ref)
                assert asset.status_code == 200 and len(asset.content) > 100, ref
                assert asset.headers["x-content-type-options"] == "nosniff"
        kinds = {
            "/docs-assets/swagger-ui-bundle.js": "javascript",
            "/docs-assets/swagger-ui.css": "text/css",
            "/docs-assets/redoc.standalone.js": "javascript",
        }
        for path, kind in kinds.items():
            assert kind in client.get(path).headers["content-type"], path
        assert client.get("/openapi.json").json()["info"]["title"] == "scorerecon"


def test_the_app_is_built_from_routers_of_short_routes(tmp_path):
    """Every API route lives in a module of service/routers/ and reads top-down in about
    40 lines (the work is in the modules they call); the schema has a bearer scheme and
    typed answers, and documents errors as problem+json."""
    import inspect

    s = Settings(home=tmp_path / "home", database_url=f"sqlite:///{tmp_path / 'jobs.db'}")
    app = create_app(s)
    schema = app.openapi()
    endpoints = [
        op
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if path.startswith("/v1/") or path in ("/healthz", "/readyz", "/metrics")
    ]
    assert len(endpoints) >= 17
    assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    from service.routers import admin, health, jobs, models

    for module in (admin, health, jobs, models):
        for route in module.router.routes:
            lines, _ = inspect.getsourcelines(route.endpoint)
            body = [ln for ln in lines if not ln.lstrip().startswith("@")]
            assert len(body) <= 45, f"{route.path}: {len(body)} lines"
    for op in endpoints:
        for status, answer in op["responses"].items():
            if status.startswith(("4", "5")) and status != "503":
                assert list(answer["content"]) == ["application/problem+json"], (op, status)
    job = schema["paths"]["/v1/jobs/{job_id}"]["get"]
    assert job["security"] == [{"bearer": []}]
    assert job["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/JobOut"
    )
    sampler = next(
        prop
        for name, c in schema["components"]["schemas"].items()
        if name.startswith("Body_create_reconstruction")
        for key, prop in c["properties"].items()
        if key == "sampler"
    )
    assert "fast" in sampler["enum"]
    result = schema["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    assert {"application/octet-stream", "image/png", "application/zip"} <= set(result)
