"""PSNR/SSIM of the classical baselines over view counts (CT) and accelerations (MRI).

Writes docs/benchmarks/baselines.md, baselines.png and baselines_examples.png.
Test images: the Shepp-Logan phantom scikit-image ships, and the same phantom rotated by
30° (the project's anatomical phantom generator is a later issue).
"""

from __future__ import annotations

import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.transform import rotate  # noqa: E402
from tqdm import tqdm  # noqa: E402

from models.baselines import reconstruct_baseline  # noqa: E402
from models.io import bundled_image, load_image  # noqa: E402
from models.metrics import psnr, ssim  # noqa: E402
from models.physics import from_spec  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"
SIZE = 128
CT_VIEWS = (10, 20, 23, 45, 90)
CT_METHODS = ("fbp", "sirt", "fista-tv")
MRI_ACCEL = (4, 8, 24)
MRI_METHODS = ("zero-filled", "cs-tv")


def images() -> list[torch.Tensor]:
    base = load_image(bundled_image(), SIZE)
    turned = rotate(base[0, 0].numpy(), 30, order=1)
    return [base, torch.from_numpy(turned.astype(np.float32))[None, None]]


def main() -> None:
    torch.set_num_threads(2)
    imgs = images()
    results: dict[tuple[str, str, float], list[tuple[float, float, float]]] = {}
    examples = {}
    cases = [("ct", m, v) for v in CT_VIEWS for m in CT_METHODS]
    cases += [("mri", m, a) for a in MRI_ACCEL for m in MRI_METHODS]
    for modality, method, level in tqdm(cases, desc="baselines"):
        if modality == "ct":
            spec = {"modality": "ct", "image_size": SIZE, "n_views": level}
        else:
            spec = {
                "modality": "mri",
                "image_size": SIZE,
                "mask": {"kind": "equispaced", "acceleration": level, "center_fraction": 0.04},
            }
        op = from_spec(spec)
        for k, img in enumerate(imgs):
            y = op.forward(img)
            t = time.perf_counter()
            x = reconstruct_baseline(op, y, method)
            sec = time.perf_counter() - t
            results.setdefault((modality, method, level), []).append(
                (psnr(x, img), ssim(x, img), sec)
            )
            if k == 0 and level in (23, 8):
                examples[(modality, method)] = x[0, 0].numpy()
    lines = [
        "# Classical baselines on phantoms",
        "",
        f"Measured by `benchmarks/baselines.py`: {SIZE}² Shepp-Logan phantom and its 30° "
        "rotation, noiseless measurements, mean over the two images; PSNR/SSIM with data "
        "range 1.0. CT: parallel beam, views spread over [0, π). MRI: equispaced Cartesian "
        "lines, centre fraction 0.04.",
        "",
        "| modality | method | views / R | PSNR dB | SSIM | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for (modality, method, level), vals in results.items():
        a = np.mean(vals, axis=0)
        lines.append(f"| {modality} | {method} | {level} | {a[0]:.2f} | {a[1]:.4f} | {a[2]:.2f} |")
    lines += [
        "",
        "![PSNR and SSIM](baselines.png)",
        "",
        "![23 views and 8x examples](baselines_examples.png)",
    ]
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "baselines.md").write_text("\n".join(lines) + "\n")

    fig, axes = plt.subplots(2, 2, figsize=(9, 6))
    for col, (modality, methods, levels) in enumerate(
        [("ct", CT_METHODS, CT_VIEWS), ("mri", MRI_METHODS, MRI_ACCEL)]
    ):
        for row, metric in enumerate(("PSNR dB", "SSIM")):
            ax = axes[row, col]
            for m in methods:
                ax.plot(
                    levels,
                    [np.mean(results[(modality, m, lv)], axis=0)[row] for lv in levels],
                    "o-",
                    label=m,
                )
            ax.set_xlabel("views" if modality == "ct" else "acceleration R")
            ax.set_ylabel(metric)
            ax.set_title(modality.upper())
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "baselines.png", dpi=110)

    fig, axes = plt.subplots(1, len(examples) + 1, figsize=(3 * (len(examples) + 1), 3.2))
    axes[0].imshow(imgs[0][0, 0], cmap="gray", vmin=0, vmax=1)
    axes[0].set_title("reference")
    for ax, ((modality, method), x) in zip(axes[1:], examples.items(), strict=True):
        ax.imshow(x, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{modality} {method}")
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(DOCS / "baselines_examples.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
