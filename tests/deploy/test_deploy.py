"""Deployment files, checked offline: the compose file against the Compose specification,
the Kubernetes manifests against their schemas, and the invariants a hospital operator
relies on (limits, probes, non-root, GPUs, no inline secrets, pinned images, commands the
CLI accepts, settings that exist)."""

import json
import shlex
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from compose_spec import PyCompose

from models.cli import build_parser
from service.cli import add_commands
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
CRDS = {"ScaledObject", "TriggerAuthentication"}
K8S_VERSION = "1.30.0"


def compose() -> dict:
    # YAML merge keys (<<) are resolved the way docker compose resolves them.
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return {k: v for k, v in data.items() if not k.startswith("x-")}


def manifests() -> list[dict]:
    return [d for f in K8S for d in yaml.safe_load_all(f.read_text()) if d]


def _validate_compose(data: dict) -> None:
    PyCompose.from_json(json.dumps(data)).validate()


def test_compose_file_follows_the_compose_specification():
    data = compose()
    _validate_compose(data)
    broken = json.loads(json.dumps(data))
    broken["services"]["gateway"]["restart"] = ["always"]  # must be a string
    with pytest.raises(Exception):  # noqa: B017 - the validator's own error type
        _validate_compose(broken)


def test_compose_services_have_limits_health_checks_and_no_root_or_inline_secrets():
    services = compose()["services"]
    assert {
        "gateway",
        "worker-gpu",
        "worker-train",
        "worker-cpu",
        "redis",
        "postgres",
        "orthanc",
        "flower",
        "prometheus",
    } <= set(services)
    for name, svc in services.items():
        assert svc["deploy"]["resources"]["limits"], name
        assert svc.get("healthcheck", {}).get("test"), f"{name}: no health check"
        assert svc.get("user") and not str(svc["user"]).startswith("0"), f"{name} runs as root"
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
        for key, value in (svc.get("environment") or {}).items():
            if any(w in key for w in ("PASSWORD", "SECRET", "TOKEN")):
                assert str(value).startswith("${"), f"{name}: inline secret {key}"
    gpu = services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1
    assert "appendonly" in " ".join(services["redis"]["command"])


@pytest.mark.parametrize("doc", manifests(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_kubernetes_manifests_validate_against_their_schemas(doc):
    if doc["kind"] in CRDS:
        assert doc["apiVersion"].startswith("keda.sh/") and doc["spec"]
        return
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def _containers():
    for doc in manifests():
        if doc["kind"] == "Deployment":
            pod = doc["spec"]["template"]["spec"]
            for c in pod["containers"]:
                yield doc["metadata"]["name"], pod, c


def test_every_container_has_limits_probes_and_a_non_root_context():
    found = list(_containers())
    assert {n for n, _, _ in found} == {"gateway", "worker-gpu", "worker-train", "worker-cpu"}
    for name, pod, c in found:
        assert c["resources"]["limits"] and c["resources"]["requests"], name
        assert c.get("readinessProbe") and c.get("livenessProbe"), name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        image = c["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned {image}"
        if name in ("worker-gpu", "worker-train"):
            assert c["resources"]["limits"]["nvidia.com/gpu"] == 1, name
            assert pod["nodeSelector"], name


def test_no_secret_values_are_committed():
    assert not [d for d in manifests() if d["kind"] == "Secret"]
    for line in (ROOT / ".env.example").read_text().splitlines():
        if any(w in line for w in ("PASSWORD", "AUTH", "TOKEN=")):
            assert "CHANGE-ME" in line, line


def _commands():
    for _, _, c in _containers():
        yield c["command"]
    for name, svc in compose()["services"].items():
        if name in ("gateway", "worker-gpu", "worker-cpu"):
            yield svc["command"]
    text = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    for line in text.splitlines():
        if line.startswith('CMD ["scorerecon"'):
            yield json.loads(line.removeprefix("CMD "))


def test_container_commands_are_ones_the_cli_accepts():
    parser = build_parser((add_commands,))
    commands = list(_commands())
    assert len(commands) >= 9
    for cmd in commands:
        assert cmd[0] == "scorerecon", shlex.join(cmd)
        args = parser.parse_args(cmd[1:])
        assert callable(args.func)


def test_every_configured_setting_exists():
    fields = set(Settings.model_fields)
    extra = {"redis_address"}  # read by the KEDA scaler, not by scorerecon
    env = dict(
        line.split("=", 1)
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    for doc in manifests():
        if doc["kind"] == "ConfigMap":
            env |= doc["data"]
    for key in env:
        if key.startswith("SCORERECON_"):
            name = key.removeprefix("SCORERECON_").lower()
            assert name in fields | extra, f"{key} is not a setting"


def test_prometheus_scrapes_metrics_with_the_gateways_token():
    """/metrics is closed by default: the compose Prometheus sends the gateway's
    SCORERECON_METRICS_TOKEN, mounted as a secret from the same .env the gateway reads."""
    data = compose()
    prometheus = yaml.safe_load((ROOT / "deploy" / "compose" / "prometheus.yml").read_text())
    jobs = [j for j in prometheus["scrape_configs"] if j.get("metrics_path") == "/metrics"]
    assert jobs, "no job scrapes /metrics"
    mounted = {
        s["source"]: f"/run/secrets/{s.get('target', s['source'])}"
        for s in data["services"]["prometheus"].get("secrets", [])
    }
    for job in jobs:
        assert any("gateway:" in t for c in job["static_configs"] for t in c["targets"])
        auth = job.get("authorization", {})
        assert auth.get("type", "Bearer") == "Bearer", job["job_name"]
        source = next(s for s, path in mounted.items() if path == auth.get("credentials_file"))
        assert data["secrets"][source] == {"environment": "SCORERECON_METRICS_TOKEN"}
    assert data["services"]["gateway"]["env_file"] == ".env"  # the gateway reads it there
    assert "SCORERECON_METRICS_TOKEN=CHANGE-ME" in (ROOT / ".env.example").read_text()


def test_every_queue_the_workers_are_sent_has_a_consumer_in_compose_and_kubernetes():
    """Each job kind's queue (workers.celery_app.queue_of) and the sweep's are read by some
    worker of the compose file and some Deployment of the manifests, and the beat (the
    recovery sweep) runs once in each."""
    from workers.celery_app import TASKS, queue_of

    wanted = {queue_of(kind) for kind in TASKS} | {"cpu"}

    def queues(command: list[str]) -> set[str]:
        return set(command[command.index("--queues") + 1].split(",")) if command else set()

    commands = [s.get("command") or [] for s in compose()["services"].values()]
    workers = [c for c in commands if c[:2] == ["scorerecon", "worker"]]
    assert wanted <= set().union(*map(queues, workers)), workers
    assert sum("--beat" in c for c in workers) == 1
    deployments = [
        c["command"]
        for d in manifests()
        if d["kind"] == "Deployment"
        for c in d["spec"]["template"]["spec"]["containers"]
        if c.get("command", [])[:2] == ["scorerecon", "worker"]
    ]
    assert wanted <= set().union(*map(queues, deployments)), deployments
    assert sum("--beat" in c for c in deployments) == 1


def test_every_setting_is_documented_in_deployment_md():
    """docs/deployment.md's table names every SCORERECON_* setting there is."""
    from service.settings import Settings

    doc = (Path(__file__).resolve().parents[2] / "docs" / "deployment.md").read_text()
    missing = [n for n in Settings.model_fields if f"`SCORERECON_{n.upper()}`" not in doc]
    assert not missing, missing


def _pins() -> dict[str, str]:
    pins = {}
    for lock in ("requirements.lock", "requirements-test.lock"):
        for line in (ROOT / "deploy" / "docker" / lock).read_text().splitlines():
            if line and not line.startswith("#"):
                name, version = line.split("==")
                assert name not in pins, f"{name} pinned twice"
                pins[name] = version
    return pins


def test_one_lock_pins_every_dependency_for_ci_and_the_images():
    """Every dependency pyproject.toml declares (extras included, torch apart) is pinned by
    the locks at a version it allows; the images and `make setup` install those locks; and
    this environment (what `make setup` built) has exactly the pinned versions."""
    import re
    import tomllib
    from importlib import metadata

    from packaging.requirements import Requirement

    def canonical(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = _pins()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        d for extra in project["optional-dependencies"].values() for d in extra
    ]
    for text in declared:
        req = Requirement(text)
        if canonical(req.name) == "torch":
            continue
        assert canonical(req.name) in pins, f"{req.name} is not in the locks (scripts/lock.py)"
        assert req.specifier.contains(pins[canonical(req.name)]), (text, pins[req.name])
    assert "torch" not in pins
    dockerfile = (ROOT / "deploy" / "docker" / "Dockerfile").read_text()
    assert "pip install -r /app/requirements.lock" in dockerfile
    assert "torch==2.13.0" in dockerfile and "cu124" not in dockerfile
    makefile = (ROOT / "Makefile").read_text()
    assert "deploy/docker/requirements.lock deploy/docker/requirements-test.lock" in makefile
    drift = {
        name: (version, metadata.version(name))
        for name, version in pins.items()
        if metadata.version(name) != version
    }
    assert not drift, f"installed versions differ from the locks: {drift}"
