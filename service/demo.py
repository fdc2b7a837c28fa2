"""``make demo``: the real service, end to end, on embedded defaults.

Starts ``scorerecon serve`` (embedded mode: SQLite job store, in-process worker, no broker)
on a free loopback port with its data under ``out/.service``, creates an API key with
``scorerecon keys create``, then, as a hospital integration would, submits example
measurements through ``POST /v1/reconstructions``: a held-out CT phantom (23 parallel-beam
views) and the Shepp-Logan phantom scikit-image ships, and an MRI phantom (8× equispaced)
when ``mri-default`` is bundled. It polls with a progress bar, downloads the results and
writes side-by-side PNGs (ground truth | FBP or zero-filled | score-based | posterior std)
with PSNR/SSIM to ``out/``, then stops the server it started, by its pid.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.baselines import baseline_name, reconstruct_baseline  # noqa: E402
from models.io import bundled_image, load_image  # noqa: E402
from models.metrics import psnr, ssim  # noqa: E402
from models.phantoms import ct_phantoms, mri_phantoms  # noqa: E402
from models.physics import from_spec  # noqa: E402
from models.registry import bundled_models  # noqa: E402

CT = {"modality": "ct", "geometry": "parallel", "image_size": 128, "n_views": 23}
MRI = {
    "modality": "mri",
    "image_size": 128,
    "mask": {"kind": "equispaced", "acceleration": 8, "center_fraction": 0.04},
}


def cases() -> list[tuple[str, dict, torch.Tensor, str]]:
    out = [
        ("ct_phantom_23_views", CT, ct_phantoms(1, 128, seed=1, kinds=("thorax",)), "ct-default"),
        ("ct_shepp_logan_23_views", CT, load_image(bundled_image(), 128), "ct-default"),
        ("mri_phantom_8x", MRI, mri_phantoms(1, 128, seed=1), "mri-default"),
    ]
    return [c for c in out if c[3] in bundled_models()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, env: dict) -> str:
    cmd = [sys.executable, "-m", "service.cli", *args]
    return subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout


def run(out: Path, nfe: int | None = None, samples: int | None = None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SCORERECON_HOME": str((out / ".service").resolve())}
    key = json.loads(
        _cli("keys", "create", "--scopes", "recon:submit,recon:read", "--owner", "demo", env=env)
    )["key"]
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(out / "service.log", "w"),  # noqa: SIM115 - closed with the process
        start_new_session=True,
    )
    results: dict = {}
    try:
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )
        _wait_ready(client, server)
        for name, spec, image, model in cases():
            results[name] = _one(client, out, name, spec, image, model, nfe, samples)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
    (out / "metrics.json").write_text(json.dumps(results, indent=2))
    return results


def _wait_ready(client: httpx.Client, server: subprocess.Popen) -> None:
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if server.poll() is not None:
            raise RuntimeError("the service exited; see out/service.log")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the service did not become ready within 60 s; see out/service.log")


def _get(client: httpx.Client, url: str) -> httpx.Response:
    """GET, waiting out a 429 as its Retry-After asks (a client as polite as we expect)."""
    while True:
        r = client.get(url)
        if r.status_code != 429:
            r.raise_for_status()
            return r
        time.sleep(float(r.headers.get("Retry-After", "1")))


def _one(
    client, out: Path, name: str, spec: dict, image, model: str, nfe: int | None, k: int | None
) -> dict:
    op = from_spec(spec)
    with torch.no_grad():
        y = op.forward(image)
    buf = io.BytesIO()
    np.save(buf, y.numpy())
    r = client.post(
        "/v1/reconstructions",
        files={"measurement": ("y.npy", buf.getvalue())},
        data={
            "spec": json.dumps(spec),
            "model": model,
            "sampler": "fast",
            # omitted: the card's defaults, what any client gets
            **({"nfe": str(nfe)} if nfe is not None else {}),
            **({"samples": str(k)} if k is not None else {}),
        },
    )
    r.raise_for_status()
    job = r.json()
    bar = tqdm(total=100, desc=name, unit="%")
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(1.0)
        job = _get(client, job["links"]["self"]).json()
        bar.n = round(100 * job["progress"]["fraction"])
        bar.refresh()
    bar.close()
    if job["state"] != "succeeded":
        raise RuntimeError(f"{name}: job {job['id']} {job['state']}: {job['error']}")
    recon = torch.from_numpy(
        np.load(io.BytesIO(_get(client, job["links"]["result_npy"]).content), allow_pickle=False)
    )
    report = _get(client, job["links"]["result_json"]).json()
    std = np.load(io.BytesIO(_get(client, job["links"]["result_std"]).content), allow_pickle=False)
    base = reconstruct_baseline(op, y, baseline_name(op)).clamp(0, 1)
    recon = recon.clamp(0, 1)
    metrics = {
        "score": {"psnr": round(psnr(recon, image), 2), "ssim": round(ssim(recon, image), 4)},
        baseline_name(op): {
            "psnr": round(psnr(base, image), 2),
            "ssim": round(ssim(base, image), 4),
        },
        "nfe": report["nfe"],
        "seconds": report["seconds"],
        "residual": report["residual"][0],
        "coverage_2std": round(float((np.abs(recon.numpy() - image.numpy()) <= 2 * std).mean()), 4),
        "job": job["id"],
        "data_range": 1.0,
    }
    fig, axes = plt.subplots(1, 4, figsize=(12, 3.3))
    bname, sm = baseline_name(op), metrics["score"]
    bm = metrics[bname]
    panels = [
        (image, "ground truth"),
        (base, f"{bname}  {bm['psnr']:.1f} dB / {bm['ssim']:.3f}"),
        (recon, f"score ({model}, {report['nfe']} NFE)  {sm['psnr']:.1f} dB / {sm['ssim']:.3f}"),
    ]
    for ax, (img, title) in zip(axes, panels, strict=False):
        ax.imshow(np.asarray(img).squeeze(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=8)
    im = axes[3].imshow(std.squeeze(), cmap="magma")
    axes[3].set_title(f"posterior std (K={k})", fontsize=8)
    fig.colorbar(im, ax=axes[3], fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=110)
    plt.close(fig)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="out")
    parser.add_argument("--nfe", type=int, default=None, help="default: the model card's")
    parser.add_argument("--samples", type=int, default=None, help="default: the model card's")
    args = parser.parse_args()
    results = run(Path(args.out), args.nfe, args.samples)
    if not results:
        print("no bundled prior yet: train one with `scorerecon train-default ct-default`")
    for name, m in results.items():
        base = next(k for k in m if k in ("fbp", "zero-filled"))
        print(
            f"{name:26s} score {m['score']['psnr']:6.2f} dB / {m['score']['ssim']:.4f}   "
            f"{base} {m[base]['psnr']:6.2f} dB / {m[base]['ssim']:.4f}   NFE {m['nfe']}"
        )
    print(f"side-by-side PNGs and metrics.json in {args.out}/")


if __name__ == "__main__":
    main()
