"""Queue latency and throughput with real Celery workers on Redis.

Writes docs/benchmarks/queue.md: a trivial reconstruction job (32² ``tiny`` model, fast
sampler, 4 NFE, 8 views) submitted through a real gateway by 4 clients; submit-to-start
latency p50/p95 (``started_at − created_at`` from the job table) and jobs per minute with
1 and 2 workers, measured in one run. Loopback only; processes stopped by their pids.
Run: ``python benchmarks/queue_latency.py`` (about a minute).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import redis
from gateway import BROKER, DOCS, _env, _key, _load, _port, _ready, _start, _stop


def queue(tmp: Path, jobs: int = 24) -> list[dict]:
    from service.db import JobStore

    rows = []
    for n_workers in (1, 2):
        redis.Redis.from_url(BROKER).flushdb()
        env = _env(tmp / f"q{n_workers}")
        key = _key(env)
        port = _port()
        server = _start(["serve", "--port", str(port)], env)
        workers = [_start(["worker", "--queues", "gpu,cpu"], env) for _ in range(n_workers)]
        url = f"http://127.0.0.1:{port}"
        try:
            _ready(url)
            ids: list[str] = []
            # Warm the workers (imports, model load) before timing.
            _load(url, key, 1, 2 * n_workers, "submit", ids)
            _wait_all(url, key, ids)
            ids.clear()
            t0 = time.perf_counter()
            _load(url, key, 4, jobs // 4, "submit", ids)
            _wait_all(url, key, ids)
            wall = time.perf_counter() - t0
            store = JobStore(f"sqlite:///{tmp / f'q{n_workers}' / 'scorerecon.db'}")
            waits = []
            for i in ids:
                j = store.get(i)
                waits.append((j.started_at - j.created_at).total_seconds())
            store.engine.dispose()
            q = statistics.quantiles(waits, n=20)
            rows.append(
                {
                    "workers": n_workers,
                    "jobs": len(ids),
                    "jobs_per_min": 60 * len(ids) / wall,
                    "start_p50_s": statistics.median(waits),
                    "start_p95_s": q[18],
                }
            )
        finally:
            for w in workers:
                _stop(w)
            _stop(server)
            redis.Redis.from_url(BROKER).flushdb()
    return rows


def _wait_all(url: str, key: str, ids: list[str], timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        for i in ids:
            while c.get(f"/v1/jobs/{i}").json()["state"] not in (
                "succeeded",
                "failed",
                "cancelled",
            ):
                if time.monotonic() > end:
                    raise RuntimeError(f"job {i} did not finish")
                time.sleep(0.1)


def main() -> None:
    DOCS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        qu = queue(Path(d))
    lines = [
        "# Queue latency and throughput",
        "",
        "Measured by `python benchmarks/queue_latency.py`: real Celery workers (prefork, "
        "one process each, 1 torch thread) on Redis; a trivial reconstruction job (32² "
        "`tiny` model, fast sampler, 4 NFE, 8 views) submitted by 4 clients through the "
        "gateway; workers warmed "
        "up first. Submit-to-start is `started_at − created_at` from the job table.",
        "",
        "| workers | jobs | jobs / min | submit-to-start p50 (s) | p95 (s) |",
        "|---|---|---|---|---|",
        *[
            f"| {r['workers']} | {r['jobs']} | {r['jobs_per_min']:.0f} "
            f"| {r['start_p50_s']:.2f} | {r['start_p95_s']:.2f} |"
            for r in qu
        ],
        "",
        "On this 2-core machine the two workers share the cores with the gateway, so the "
        "second worker adds less than a second machine would.",
        "",
    ]
    (DOCS / "queue.md").write_text("\n".join(lines))
    (DOCS / "queue.json").write_text(json.dumps(qu, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
