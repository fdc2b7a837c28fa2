"""Volumes: a stack of contiguous real CT slices, and whether TV across the slices helps.

Contiguous slices of the real head CT (models/realdata.py: the validation slab for choosing,
the test slab for the figures), each simulated under the evaluation protocol (a grid twice
as fine, 23 views, Gaussian noise 0.5 %) and the stack reconstructed as one job does: one
batch, K posterior samples per slice, ``ct-default``'s card settings. Compared: FISTA-TV per
slice (weight tuned on validation), the score solver slice by slice (tv_z = 0: a stack equals
its slices), and the score solver with the z-TV term in its map step (ReconConfig.tv_z, the
DiffusionMBIR idea) at the λ_z chosen on validation. Per method: PSNR per slice (mean), the
error of the slice-to-slice differences (how consistent along z), seconds per slice; and a
sagittal picture through the stack.

Run: ``python benchmarks/volume.py [--slices 12] [--samples 4]``.
Writes docs/benchmarks/volume.{md,json,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from models.inverse import Prior, ReconConfig, reconstruct  # noqa: E402
from models.metrics import psnr  # noqa: E402
from models.noise import estimate_noise  # noqa: E402
from models.protocol import classical, simulate, tune_classical  # noqa: E402
from models.realdata import real_slices  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
MODEL, TASK, VIEWS, NOISE, SIZE = "ct-default", "ct-sparse", 23, "gaussian:0.005", 128
SLICE_MM, PIXEL_MM = 1.5, 245.0 / SIZE  # Cranium.inv3: 1.5 mm slices, a 245 mm field of view
LAMBDA_Z = (0.0, 3.0, 10.0, 30.0)  # grid for λ_z, in units of the classical TV weight / σ_y²


def stack(split: str, n: int, seed: int):
    """``n`` contiguous slices from the middle of ``split``, simulated (Simulated)."""
    vol = torch.from_numpy(real_slices("ct", split, 2 * SIZE))[:, None]
    start = max(0, (len(vol) - n) // 2)
    return simulate(vol[start : start + n], TASK, VIEWS, NOISE, seed)


def z_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS error of the slice-to-slice differences: 0 when the stack varies along z as the
    truth does, whatever each slice's own error."""
    return float(((x[1:] - x[:-1]) - (ref[1:] - ref[:-1])).pow(2).mean().sqrt())


def score(sim, prior: Prior, config: ReconConfig, k: int) -> tuple[torch.Tensor, float]:
    t = time.perf_counter()
    rec = reconstruct(sim.operator, sim.y, prior, config, k, 0)
    return rec.mean.clamp(0, 1), (time.perf_counter() - t) / len(sim.y)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=12, help="contiguous test slices")
    parser.add_argument("--val-slices", type=int, default=8, help="contiguous val slices")
    parser.add_argument("--samples", type=int, default=None, help="K (default: the card's)")
    args = parser.parse_args()
    prior = Prior.load(MODEL, bf16=None)  # the workers' engine
    val, test = stack("val", args.val_slices, 1), stack("test", args.slices, 2)
    weight, _ = tune_classical(val, "ct")
    sigma2 = float(estimate_noise(val.operator, val.y).pow(2).mean())  # λ_z's unit: weight/σ²
    base = ReconConfig.for_prior(prior, "ct")
    k = args.samples or base.samples
    choice = {}
    for factor in LAMBDA_Z:  # K = 1 on validation: the choice, not the figure
        config = ReconConfig.for_prior(prior, "ct")
        config.tv_z = factor * weight / sigma2
        image, _ = score(val, prior, config, 1)
        choice[factor] = statistics.fmean(
            psnr(image[i], val.reference[i]) for i in range(len(image))
        )
        print(f"  val λ_z {config.tv_z:.4g}: {choice[factor]:.2f} dB", flush=True)
    best = max(choice, key=choice.get)
    rows, images = [], {}
    t = time.perf_counter()
    images["FISTA-TV"] = classical(test, "ct", weight)
    seconds = {"FISTA-TV": (time.perf_counter() - t) / len(test.y)}
    for name, factor in (("score, slice by slice", 0.0), ("score + z-TV", best)):
        config = ReconConfig.for_prior(prior, "ct")
        config.tv_z = factor * weight / sigma2
        images[name], seconds[name] = score(test, prior, config, k)
    ref = test.reference
    for name, image in images.items():
        rows.append(
            {
                "method": name,
                "psnr": statistics.fmean(psnr(image[i], ref[i]) for i in range(len(ref))),
                "psnr_min": min(psnr(image[i], ref[i]) for i in range(len(ref))),
                "z_error": z_error(image, ref),
                "seconds_per_slice": seconds[name],
            }
        )
        print(f"  {name}: {rows[-1]}", flush=True)
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    result = {
        "machine": machine,
        "date": time.strftime("%Y-%m-%d"),
        "slices": len(ref),
        "samples": k,
        "engine": prior.engine,
        "fista_weight": weight,
        "lambda_z": best * weight / sigma2,
        "val": {f"{f * weight / sigma2:.4g}": v for f, v in choice.items()},
        "rows": rows,
    }
    (DOCS / "volume.json").write_text(json.dumps(result, indent=2))
    col = SIZE // 2
    panels = [("reference", ref)] + list(images.items())
    fig, axes = plt.subplots(2, len(panels), figsize=(2.6 * len(panels), 5.2), squeeze=False)
    for c, (name, vol) in enumerate(panels):
        axes[0, c].imshow(vol[len(vol) // 2, 0].numpy(), cmap="gray", vmin=0, vmax=0.6)
        axes[0, c].set_title(name, fontsize=8)
        sagittal = vol[:, 0, :, col].numpy()  # (slices, rows): z down, anterior-posterior across
        axes[1, c].imshow(
            sagittal, cmap="gray", vmin=0, vmax=0.6, aspect=SLICE_MM / PIXEL_MM, origin="lower"
        )
        axes[1, c].set_title("sagittal, column 64", fontsize=8)
        for ax in axes[:, c]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(DOCS / "volume.png", dpi=90)
    plt.close(fig)
    lines = [
        "# Volumes: a stack of contiguous slices, and TV across them",
        "",
        f"Measured by `python benchmarks/volume.py` on {machine} ({result['date']}): "
        f"{len(ref)} contiguous real CT test slices ({SLICE_MM} mm apart) at {SIZE}², "
        f"{VIEWS} views, Gaussian noise 0.5 %, reconstructed as one stack by `{MODEL}` "
        f"({prior.engine}, K = {k}, the card's fast sampler at 100 NFE); FISTA-TV per slice "
        f"(weight {weight}, tuned on validation). λ_z chosen on {len(val.y)} contiguous "
        "validation slices with one sample: "
        + ", ".join(f"λ_z {key}: {v:.2f} dB" for key, v in result["val"].items())
        + f" → λ_z = {result['lambda_z']:.4g}.",
        "",
        "z error: RMS error of the slice-to-slice differences (lower: more consistent along z).",
        "",
        "| method | PSNR mean (dB) | PSNR worst slice | z error | s / slice |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['psnr']:.2f} | {r['psnr_min']:.2f} | {r['z_error']:.4f} | "
        f"{r['seconds_per_slice']:.1f} |"
        for r in rows
    ]
    lines += ["", "![volume](volume.png)", ""]
    (DOCS / "volume.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
