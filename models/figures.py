"""Pictures people look at: sample grids, loss curves, image montages (PNG, no display)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def grid(images: torch.Tensor | np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tile a batch (N, 1, H, W) or (N, H, W) into one 2-D array, row-major, clipped to [0, 1]."""
    a = images.detach().cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
    if a.ndim == 4:
        a = a[:, 0]
    n, h, w = a.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    out = np.zeros((rows * h, cols * w), dtype=np.float32)
    for i in range(n):
        r, c = divmod(i, cols)
        out[r * h : (r + 1) * h, c * w : (c + 1) * w] = np.clip(a[i], 0, 1)
    return out


def loss_curve(
    curves: dict[str, Sequence[tuple[int, float]]], path: str | Path, title: str = "training loss"
) -> Path:
    """Plot one or more (step, loss) series on a log scale; also a 10-point moving average."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, pts in curves.items():
        if not pts:
            continue
        steps, vals = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
        (line,) = ax.plot(steps, vals, alpha=0.3, lw=0.8)
        k = min(10, len(vals))
        smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, color=line.get_color(), label=label)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def preview(
    mean: torch.Tensor, std: torch.Tensor, baseline: torch.Tensor, unit: float = 1.0
) -> tuple[np.ndarray, float]:
    """Reconstruction | posterior std (scaled to its maximum) | classical baseline, for one
    slice, the images shown in units of ``unit`` (an MR slice's intensity scale: its
    measurement's units are arbitrary); returns the image and the std scale."""
    scale = max(float(std.max()), 1e-6 * unit)
    panels = torch.stack([mean.squeeze() / unit, std.squeeze() / scale, baseline.squeeze() / unit])
    return grid(panels[:, None], cols=3), scale
