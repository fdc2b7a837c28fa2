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
