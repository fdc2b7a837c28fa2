"""Operator throughput: ASTRA forward+adjoint vs scikit-image radon/iradon, one run, side by side.

Writes docs/benchmarks/operators.md and operators.png.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from skimage.transform import iradon, radon  # noqa: E402

from models.io import bundled_image, load_image  # noqa: E402
from models.physics.ct import CTGeometry, CTOperator  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks"


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def main() -> None:
    torch.set_num_threads(2)
    rows = []
    for size in (128, 256):
        image = load_image(bundled_image(), size)
        img_np = image[0, 0].numpy().astype(np.float64)
        for views in (23, 180):
            theta = np.linspace(0.0, 180.0, views, endpoint=False)
            op = CTOperator(
                CTGeometry(
                    size,
                    tuple(np.deg2rad(theta)),
                    size,
                    volume_offset=(-0.5, 0.5),
                    detector_offset=-0.5,
                )
            )
            sino = op.T(image)
            fp = best_of(lambda: op.T(image))  # noqa: B023
            bp = best_of(lambda: op.T_adjoint(sino))  # noqa: B023
            fbp = best_of(lambda: op.fbp(sino))  # noqa: B023
            sk_sino = radon(img_np, theta, circle=True)
            sk_fp = best_of(lambda: radon(img_np, theta, circle=True), 2)  # noqa: B023
            sk_fbp = best_of(lambda: iradon(sk_sino, theta, circle=True), 2)  # noqa: B023
            rel = float(np.linalg.norm(sino[0, 0].numpy() - sk_sino.T) / np.linalg.norm(sk_sino))
            rows.append((size, views, fp, bp, fbp, sk_fp, sk_fbp, rel))
            op.close()
    lines = [
        "# Operator throughput (CPU)",
        "",
        f"Measured by `benchmarks/operators.py` on {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; best of 5 (ASTRA) "
        "or 2 (scikit-image) runs, one image per call. ASTRA uses the `linear` projector on the "
        "CPU; the geometry is aligned with scikit-image's centre convention.",
        "",
        "| size | views | ASTRA FP ms | ASTRA BP ms | our FBP ms | skimage radon ms "
        "| skimage iradon ms | sinogram rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r[0]}² | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} "
            f"| {r[6]:.1f} | {r[7]:.2e} |"
        )
    DOCS.mkdir(parents=True, exist_ok=True)
    (DOCS / "operators.md").write_text("\n".join(lines) + "\n\n![timings](operators.png)\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f"{r[0]}²/{r[1]}v" for r in rows]
    x = np.arange(len(rows))
    for i, (name, col) in enumerate(
        [
            ("ASTRA FP", 2),
            ("ASTRA BP", 3),
            ("our FBP", 4),
            ("skimage radon", 5),
            ("skimage iradon", 6),
        ]
    ):
        ax.bar(x + (i - 2) * 0.16, [r[col] for r in rows], 0.16, label=name)
    ax.set_xticks(x, labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per image")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(DOCS / "operators.png", dpi=120)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
