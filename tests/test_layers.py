"""The layers import one way, as data flows: gateway → job store → queue → worker → core →
result store. The numerical core (``models``) knows nothing of HTTP or queues; the workers
use the shared stores and PACS code of ``service`` but never the gateway; the gateway
reaches the workers only through the executor (the queue) and the CLI's worker command."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GATEWAY = {
    "app", "routers", "deps", "submission", "ui", "catalogue", "limits", "problems",
    "schemas", "api_docs", "security", "demo",
}  # fmt: skip
GATEWAY_TO_WORKERS = {
    ("service/app.py", "workers.executor"),
    ("service/cli.py", "workers.celery_app"),
}


def imports(package: str):
    """(file, imported module) of every import in a package, nested ones too."""
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                yield path.relative_to(ROOT).as_posix(), node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    yield path.relative_to(ROOT).as_posix(), alias.name


def test_the_core_knows_nothing_of_the_service_or_the_workers():
    wrong = [(f, m) for f, m in imports("models") if m.split(".")[0] in ("service", "workers")]
    assert not wrong, wrong


def test_the_workers_never_import_the_gateway():
    wrong = [
        (f, m)
        for f, m in imports("workers")
        if m.startswith("service.") and m.split(".")[1] in GATEWAY
    ]
    assert not wrong, wrong


def test_the_gateway_reaches_the_workers_only_through_the_queue():
    found = {(f, m) for f, m in imports("service") if m.split(".")[0] == "workers"}
    assert found <= GATEWAY_TO_WORKERS, found - GATEWAY_TO_WORKERS
