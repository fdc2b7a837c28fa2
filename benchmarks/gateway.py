"""Gateway throughput on loopback, measured against a real server process.

Writes docs/benchmarks/gateway.md and gateway.png: a real ``scorerecon serve`` (jobs go to
a Redis queue no worker reads, so only the gateway is measured); N concurrent clients
submit CT measurements, then poll job status; requests per second and p50/p95 latency per N.
The process helpers here are shared with ``benchmarks/queue_latency.py``.

Everything talks to 127.0.0.1 only, with bounded counts; every process started here is
stopped by its pid. Run: ``python benchmarks/gateway.py`` (about a minute).
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402

from models.nets.ncsnpp import build  # noqa: E402
from models.registry import save_model  # noqa: E402
from models.sde import VESDE  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
BROKER = "redis://127.0.0.1:6379/14"
SPEC = json.dumps({"modality": "ct", "image_size": 32, "n_views": 8})


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measurement() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.random.default_rng(0).random((1, 8, 48)).astype(np.float32))
    return buf.getvalue()


def _env(home: Path) -> dict:
    env = {
        **os.environ,
        "SCORERECON_HOME": str(home),
        "SCORERECON_BROKER_URL": BROKER,
        "SCORERECON_EXECUTOR": "celery",
        "SCORERECON_RATE_LIMIT_PER_MINUTE": "1000000",
        "SCORERECON_TORCH_THREADS": "1",
        # One key's load is what these measure: its jobs may fill the queue and every worker.
        "SCORERECON_MAX_QUEUED_PER_OWNER": "100000",
        "SCORERECON_MAX_OWNER_COST": str(10**15),
        "SCORERECON_OWNER_SLOTS": "8",
    }
    sde = VESDE(0.01, 20.0)
    torch.manual_seed(0)
    save_model(home / "models" / "tiny32", build("tiny", sde.sigma), sde, {"image_size": 32})
    return env


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "service.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(5)


def _key(env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "keys", "create", "--owner", "bench"],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)["key"]


def _ready(url: str) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("gateway not ready")


def _load(url: str, key: str, clients: int, per_client: int, kind: str, job_ids: list[str]):
    latencies: list[float] = []
    lock = threading.Lock()
    body = _measurement()

    def worker(i: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
            for j in range(per_client):
                t0 = time.perf_counter()
                if kind == "submit":
                    r = c.post(
                        "/v1/reconstructions",
                        files={"measurement": ("y.npy", body)},
                        data={"spec": SPEC, "model": "tiny32", "nfe": "4", "sampler": "fast"},
                    )
                    assert r.status_code == 202, r.text
                    with lock:
                        job_ids.append(r.json()["id"])
                else:
                    r = c.get(f"/v1/jobs/{job_ids[(i * per_client + j) % len(job_ids)]}")
                    assert r.status_code == 200, r.text
                with lock:
                    latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "kind": kind,
        "clients": clients,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p95_ms": 1000 * q[18],
    }


def gateway(tmp: Path) -> list[dict]:
    redis.Redis.from_url(BROKER).flushdb()
    env = _env(tmp / "gw")
    key = _key(env)
    port = _port()
    server = _start(["serve", "--port", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    rows: list[dict] = []
    try:
        _ready(url)
        ids: list[str] = []
        for n in (1, 4, 16):
            rows.append(_load(url, key, n, 160 // n, "submit", ids))
        for n in (1, 4, 16):
            rows.append(_load(url, key, n, 400 // n, "poll", ids))
    finally:
        _stop(server)
        redis.Redis.from_url(BROKER).flushdb()
    return rows


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        gw = gateway(Path(d))
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for kind in ("submit", "poll"):
        rs = [r for r in gw if r["kind"] == kind]
        ax.plot([r["clients"] for r in rs], [r["rps"] for r in rs], marker="o", label=kind)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "gateway.png", dpi=110)
    plt.close(fig)
    lines = [
        "# Gateway throughput",
        "",
        "Measured by `python benchmarks/gateway.py`: one `scorerecon serve` process (uvicorn, "
        "SQLite job store, jobs queued to Redis with no worker attached), clients on "
        "127.0.0.1, 2-core machine. Submit: an 8-view 32² CT measurement (1.5 kB) as multipart.",
        "",
        "| request | clients | requests | req/s | p50 (ms) | p95 (ms) |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['kind']} | {r['clients']} | {r['requests']} | {r['rps']:.0f} "
            f"| {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |"
            for r in gw
        ],
        "",
        "![gateway](gateway.png)",
        "",
    ]
    (DOCS / "gateway.md").write_text("\n".join(lines))
    (DOCS / "gateway.json").write_text(json.dumps(gw, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
