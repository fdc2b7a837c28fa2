"""The reliability and security report: docs/reliability.md and docs/reliability_latency.png.

Runs the suite in ``tests/reliability`` at its full counts (20 worker kills, a 500-job burst,
2 000+ generated requests, ...): every test records what it tried and what came of it, and
this script turns the records into one table. The test suite runs the same tests with
smaller counts on every CI run.

Run: ``python benchmarks/reliability.py [-k EXPR]`` (about half an hour on 2 cores); with
``-k`` only the selected tests run and the other rows of the earlier report are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def run_suite(report: Path, select: str | None) -> int:
    env = {
        **os.environ,
        "SCORERECON_RELIABILITY_FULL": "1",
        "SCORERECON_RELIABILITY_REPORT": str(report),
    }
    args = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "tests/reliability"]
    if select:
        args += ["-k", select]
    return subprocess.run(args, cwd=ROOT, env=env).returncode


def latency_plot(rows: list[dict], path: Path) -> bool:
    load = [r for r in rows if r.get("latency")]
    if not load:
        return False
    lat = load[-1]["latency"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, (name, unit) in zip(
        axes, (("submit_ms", "ms"), ("poll_ms", "ms"), ("end_to_end_s", "s")), strict=True
    ):
        values = np.sort(np.asarray(lat[name]))
        if len(values):
            ax.plot(values, np.linspace(0, 100, len(values)))
            for q in (50, 95, 99):
                ax.axvline(np.percentile(values, q), color="grey", lw=0.6, ls="--")
        ax.set_xlabel(f"{name.rsplit('_', 1)[0].replace('_', ' ')} latency ({unit})")
        ax.set_ylabel("% of requests" if unit == "ms" else "% of jobs")
        ax.grid(alpha=0.3)
    fig.suptitle(load[-1]["attack"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _merge(rows: list[dict], previous: Path) -> list[dict]:
    """This run's rows, plus the earlier report's rows (with their dates) for tests not run
    now (``-k``)."""
    if not previous.exists():
        return rows
    ran = {(r["area"], r["attack"]) for r in rows}
    kept = [r for r in json.loads(previous.read_text()) if (r["area"], r["attack"]) not in ran]
    return kept + rows


def render(rows: list[dict], rc: int, minutes: float, select: str | None) -> str:
    which = f"the tests matching `-k {select}`" if select else "the whole suite"
    lines = [
        "# Reliability and security",
        "",
        f"Measured by `python benchmarks/reliability.py` on {platform.machine()}, "
        f"{os.cpu_count()} cores: the suite in `tests/reliability` at its full counts, against "
        "real processes on loopback (a `scorerecon serve` gateway, Celery workers, Redis, "
        "PostgreSQL). Each row says when it was measured. The last run "
        f"({time.strftime('%Y-%m-%d')}, {which}) took {minutes:.0f} minutes; its exit status: "
        f"{rc} ({'all passed' if rc == 0 else 'FAILURES: see below'}).",
        "",
        "*lost*: jobs that never reached a final state (or accepted uploads without a job); "
        "*duplicated*: jobs that ran to success more than once, or one upload that made two "
        "jobs; *5xx*: server errors other than the deliberate ones (507 for a full result "
        "store). CI runs the same tests with smaller counts.",
        "",
        "| area | fault or attack | tried | lost | duplicated | 5xx | outcome | measured |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        outcome = str(r.get("outcome", "")).replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {r['area']} | {r['attack']} | {r['tried']} | {r['lost']} | {r['duplicated']} "
            f"| {r['five_xx']} | {outcome} | {r.get('measured', '')} |"
        )
    lines += ["", "![latency under load](reliability_latency.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", dest="select", help="only the tests matching this expression")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "records.jsonl"
        t0 = time.perf_counter()
        rc = run_suite(report, args.select)
        minutes = (time.perf_counter() - t0) / 60
        rows = (
            [json.loads(line) for line in report.read_text().splitlines()]
            if report.exists()
            else []
        )
    for r in rows:
        r["measured"] = time.strftime("%Y-%m-%d")
    rows = _merge(rows, DOCS / "reliability.json")
    order = {"faults": 0, "load": 1, "bad input": 2, "security": 3}
    rows.sort(key=lambda r: order.get(r["area"], 9))
    DOCS.mkdir(exist_ok=True)
    (DOCS / "reliability.json").write_text(json.dumps(rows, indent=1))
    latency_plot(rows, DOCS / "reliability_latency.png")
    text = render(rows, rc, minutes, args.select)
    (DOCS / "reliability.md").write_text(text)
    print(text)
    sys.exit(rc)


if __name__ == "__main__":
    main()
