"""A 64-slice CT volume through the real gateway and two Celery workers, as one job.

The volume: the real head CT's test slab (models/realdata.py; no prior saw it), 24 slices
1.5 mm apart, resampled along z to 64 slices (0.56 mm, a thin-slice series) on the
protocol's grid twice as fine, each slice simulated at 23 views with Gaussian noise of
0.5 % (models/protocol.py). It is sent as one ``(64, views, detectors)`` measurement to a
real ``scorerecon serve`` with two ``scorerecon worker`` processes on Redis, split into
slabs of ``--slab`` slices (SCORERECON_SLAB_SLICES), with ``ct-default``'s card defaults.
Measured: wall seconds from submission to result and per slice, the job's progress
(slices done) over time, the DICOM result (one series of 64 instances), and, against the
truth, PSNR per slice and the error of the slice-to-slice differences (z-consistency),
beside FISTA-TV slice by slice (weight tuned on validation slices); with a sagittal
picture.

Loopback only, bounded; every process started here is stopped by its pid.
Run: ``python benchmarks/volume_gateway.py [--slices 64] [--slab 16]``.
Writes docs/benchmarks/volume_gateway.{md,json,png}.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from gateway import BROKER, _env, _key, _port, _ready, _start, _stop  # noqa: E402
from volume import z_error  # noqa: E402

from models.inverse import ReconConfig  # noqa: E402
from models.metrics import psnr  # noqa: E402
from models.protocol import classical, simulate, task_spec, tune_classical  # noqa: E402
from models.realdata import real_slices  # noqa: E402
from models.registry import BUNDLED, load_card  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
MODEL, TASK, VIEWS, NOISE, SIZE = "ct-default", "ct-sparse", 23, "gaussian:0.005", 128
SLAB_MM, PIXEL_MM = 1.5, 245.0 / SIZE  # Cranium.inv3: 1.5 mm slices, a 245 mm field of view


def thin_slices(split: str, n: int) -> tuple[torch.Tensor, float]:
    """The split's slab resampled along z to ``n`` slices on the fine grid, and their
    spacing in mm."""
    slab = torch.from_numpy(real_slices("ct", split, 2 * SIZE))[None, None]  # (1, 1, Z, H, W)
    z = slab.shape[2]
    thin = torch.nn.functional.interpolate(
        slab, size=(n, 2 * SIZE, 2 * SIZE), mode="trilinear", align_corners=True
    )
    return thin[0, 0][:, None].clamp(0, 1), SLAB_MM * (z - 1) / (n - 1)


def through_gateway(sim, slab: int, workers: int) -> dict:
    """Submit the stack to a fresh site; poll until final; results and timings."""
    redis.Redis.from_url(BROKER).flushdb()
    home = Path(tempfile.mkdtemp(prefix="scorerecon-volume-"))
    env = {**_env(home), "SCORERECON_SLAB_SLICES": str(slab)}
    key, port = _key(env), _port()
    procs = [_start(["serve", "--port", str(port)], env)]
    procs += [_start(["worker", "--queues", "gpu,cpu"], env) for _ in range(workers)]
    url = f"http://127.0.0.1:{port}"
    buf = io.BytesIO()
    np.save(buf, sim.y.numpy().astype(np.float32))
    try:
        _ready(url)
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
            t0 = time.monotonic()
            r = c.post(
                "/v1/reconstructions",
                files={"measurement": ("volume.npy", buf.getvalue())},
                data={"spec": json.dumps(task_spec(TASK, VIEWS, SIZE)), "model": MODEL},
                timeout=120,
            )
            assert r.status_code == 202, r.text
            job_id, timeline = r.json()["id"], []
            while (job := c.get(f"/v1/jobs/{job_id}").json())["state"] in ("queued", "running"):
                timeline.append((time.monotonic() - t0, job["progress"]["phase"]))
                time.sleep(2.0)
            seconds = time.monotonic() - t0
            assert job["state"] == "succeeded", job["error"]
            images = np.load(io.BytesIO(c.get(job["links"]["result_npy"]).content))
            report = c.get(job["links"]["result_json"]).json()
            series = zipfile.ZipFile(io.BytesIO(c.get(job["links"]["result_dicom"]).content))
            datasets = [pydicom.dcmread(io.BytesIO(series.read(n))) for n in series.namelist()]
    finally:
        for p in procs:
            _stop(p)
    per_series: dict[str, int] = {}
    for d in datasets:
        name = str(d.SeriesDescription)
        per_series[name] = per_series.get(name, 0) + 1
    return {
        "images": torch.from_numpy(images).clamp(0, 1),
        "seconds": seconds,
        "timeline": timeline,
        "report": report,
        "series": per_series,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--slab", type=int, default=16, help="SCORERECON_SLAB_SLICES")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    val = simulate(
        torch.from_numpy(real_slices("ct", "val", 2 * SIZE))[:4, None], TASK, VIEWS, NOISE, seed=1
    )
    weight, _ = tune_classical(val, "ct")
    fine, spacing = thin_slices("test", args.slices)
    sim = simulate(fine, TASK, VIEWS, NOISE, seed=2)
    ref = sim.reference
    t = time.perf_counter()
    fista = classical(sim, "ct", weight)
    fista_s = (time.perf_counter() - t) / len(ref)
    print(f"FISTA-TV: {fista_s:.1f} s per slice", flush=True)
    run = through_gateway(sim, args.slab, args.workers)
    score = run["images"]
    config = ReconConfig.from_card(load_card(BUNDLED / MODEL), "ct")
    rows = []
    for name, vol, sec in (
        ("FISTA-TV, slice by slice (this process, 2 threads)", fista, fista_s),
        (f"score via gateway, {args.workers} workers × 1 thread", score, run["seconds"] / len(ref)),
    ):
        per = [psnr(vol[i], ref[i]) for i in range(len(ref))]
        rows.append(
            {
                "method": name,
                "psnr": statistics.fmean(per),
                "psnr_min": min(per),
                "z_error": z_error(vol, ref),
                "seconds_per_slice": sec,
            }
        )
        print(rows[-1], flush=True)
    machine = f"{platform.machine()}, torch {torch.__version__}"
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "slices": len(ref),
        "spacing_mm": spacing,
        "slab_slices": args.slab,
        "workers": args.workers,
        "settings": {
            "nfe": config.n_steps * config.nfe_per_step(),
            "samples": config.samples,
            "start": config.start,
        },
        "wall_seconds": run["seconds"],
        "fista_weight": weight,
        "dicom": run["series"],
        "slabs": run["report"].get("slabs"),
        "rows": rows,
        "timeline": run["timeline"],
    }
    (DOCS / "volume_gateway.json").write_text(json.dumps(result, indent=2))
    figure(ref, fista, score, spacing, run["timeline"])
    (DOCS / "volume_gateway.md").write_text(render(result))


def figure(ref, fista, score, spacing: float, timeline) -> None:
    """Sagittal sections (z up) through the middle column, cut to the central half of the
    in-plane axis so that the thin slab's detail shows, one method per row; and the job's
    progress as the client polled it."""
    col, lo, hi = SIZE // 2, SIZE // 4, 3 * SIZE // 4
    panels = [("reference", ref), ("FISTA-TV", fista), ("score (gateway)", score)]
    fig = plt.figure(figsize=(11, 6))
    grid = fig.add_gridspec(len(panels), 2, width_ratios=(2.2, 1))
    for row, (name, vol) in enumerate(panels):
        ax = fig.add_subplot(grid[row, 0])
        ax.imshow(
            vol[:, 0, lo:hi, col].numpy(),
            cmap="gray",
            vmin=0,
            vmax=0.6,
            aspect=spacing / PIXEL_MM,
            origin="lower",
        )
        ax.set_title(f"{name}: sagittal, column {col}, rows {lo}-{hi}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    done = [
        (t, int(p.split()[1].split("/")[0]))
        for t, p in timeline
        if p.startswith("sampling ") and "/" in p
    ]
    ax = fig.add_subplot(grid[:, 1])
    if done:
        ax.step([t for t, _ in done], [d for _, d in done], where="post")
    ax.set_xlabel("seconds since submission")
    ax.set_ylabel("slices done (job progress)")
    ax.set_title("progress as the client sees it", fontsize=9)
    fig.tight_layout()
    fig.savefig(DOCS / "volume_gateway.png", dpi=90)
    plt.close(fig)


def render(r: dict) -> str:
    s = r["settings"]
    lines = [
        "# A volume through the gateway, as one job",
        "",
        f"Measured by `python benchmarks/volume_gateway.py` on {r['machine']} ({r['date']}): "
        f"the real head CT's test slab resampled along z to {r['slices']} slices "
        f"({r['spacing_mm']:.2f} mm apart), simulated at 128² on a grid twice as fine, "
        f"{VIEWS} views, Gaussian noise 0.5 %, sent as one measurement to a real gateway with "
        f"{r['workers']} Celery workers (1 torch thread each) on Redis, split into slabs of "
        f"{r['slab_slices']} slices (`SCORERECON_SLAB_SLICES`): {r['slabs']}. `{MODEL}` at its "
        f"card's defaults ({s['nfe']} NFE, K = {s['samples']}, start {s['start']}). Seconds: "
        "wall time from submission to the succeeded job, per slice (both workers together, "
        "on this 2-core machine); FISTA-TV per slice in one process with 2 threads.",
        "",
        "| method | PSNR mean (dB) | PSNR min | z-difference error | s / slice |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {x['method']} | {x['psnr']:.2f} | {x['psnr_min']:.2f} | {x['z_error']:.4f} | "
        f"{x['seconds_per_slice']:.1f} |"
        for x in r["rows"]
    ]
    series = "; ".join(f"“{name}”: {n} instances" for name, n in r["dicom"].items())
    lines += [
        "",
        f"One job, {r['wall_seconds'] / 60:.1f} min from submission to result. Its DICOM "
        f"result: {len(r['dicom'])} series ({series}). The job's progress reported slices "
        "done throughout (right panel).",
        "",
        "The z-difference error is the RMS error of the slice-to-slice differences (0 when "
        "the volume varies along z as the truth does); `docs/benchmarks/volume.md` measures "
        "TV across slices (`tv_z`), which the workers do not apply by default.",
        "",
        "![volume](volume_gateway.png)",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
