"""A real site on loopback for end-to-end tests: a `scorerecon serve` gateway process and
Celery worker processes on a dedicated Redis database, sharing one SCORERECON_HOME.

Every process runs in its own process group and is stopped by the pid it was started with
(never by name). Used by the console test, the reliability suite and
``benchmarks/reliability.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from tests import servers

SCORERECON = str(Path(sys.executable).parent / "scorerecon")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 20) -> None:
    """Stop the process group started with ``proc`` (SIGKILL after ``grace`` seconds)."""
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Site:
    """Gateway + workers as real processes. ``env`` extra variables override the defaults."""

    def __init__(self, home: Path, redis_db: int, env: dict[str, str] | None = None):
        self.home = Path(home)
        self.broker = f"{servers.redis_url()}/{redis_db}"
        self.env = {
            **os.environ,
            "SCORERECON_HOME": str(self.home),
            "SCORERECON_EXECUTOR": "celery",
            "SCORERECON_BROKER_URL": self.broker,
            "SCORERECON_TORCH_THREADS": "1",
            **(env or {}),
        }
        self.env.pop("REDIS_URL", None)
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.gateway: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.logs = self.home / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.home / "models").mkdir(parents=True, exist_ok=True)

    # processes -------------------------------------------------------------------------
    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.logs / log, "ab")  # noqa: SIM115 - the child owns it
        return subprocess.Popen(
            args, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )

    def start_gateway(self, timeout: float = 60) -> None:
        self.gateway = self._start([SCORERECON, "serve", "--port", str(self.port)], "gateway.log")
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(self.base + "/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.gateway is not None and self.gateway.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log('gateway.log')[-2000:]}")
            if time.monotonic() > end:
                raise TimeoutError("gateway not ready")
            time.sleep(0.2)

    def start_worker(self, queues: str = "gpu,cpu", beat: bool = False) -> subprocess.Popen:
        """A Celery worker process (concurrency 1); ``beat`` also runs the recovery sweep."""
        n = len(self.workers)
        args = [sys.executable, "-m", "service.cli", "worker", "--queues", queues]
        proc = self._start(args + (["--beat"] if beat else []), f"worker-{n}.log")
        self.workers.append(proc)
        return proc

    def log(self, name: str) -> str:
        path = self.logs / name
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def stop_all(self) -> None:
        for proc in self.workers:
            stop(proc)
        if self.gateway is not None:
            stop(self.gateway)

    def flush(self) -> None:
        redis.Redis.from_url(self.broker).flushdb()

    def __enter__(self) -> Site:
        self.flush()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_all()
        self.flush()

    # keys and requests -----------------------------------------------------------------
    def key(self, scopes: str, owner: str) -> str:
        out = subprocess.run(
            [SCORERECON, "keys", "create", "--scopes", scopes, "--owner", owner],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        return json.loads(out)["key"]

    def client(self, key: str | None = None, timeout: float = 30) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=timeout)
