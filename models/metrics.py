"""Image quality metrics with an explicit data range.

All metrics compare a reconstruction ``x`` with a reference ``ref`` (same shape). The
``data_range`` is the span of valid intensities (1.0 for the model's [0, 1] range); it is
never inferred from the images, so numbers are comparable across methods.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import structural_similarity


def _np(a) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64).squeeze()


def psnr(x, ref, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB: 10 log10(range² / MSE)."""
    mse = float(np.mean((_np(x) - _np(ref)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(data_range**2 / mse)


def ssim(x, ref, data_range: float = 1.0) -> float:
    """Structural similarity (Wang et al. 2004, Gaussian window σ=1.5) of a 2D image."""
    return float(
        structural_similarity(
            _np(x),
            _np(ref),
            data_range=data_range,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
    )


def nmse(x, ref) -> float:
    """Normalised mean squared error ||x - ref||² / ||ref||²."""
    r = _np(ref)
    return float(np.sum((_np(x) - r) ** 2) / max(np.sum(r**2), 1e-30))


def data_residual(op, x: torch.Tensor, y: torch.Tensor) -> float:
    """Data-consistency residual ||A x − y|| / ||y||."""
    with torch.no_grad():
        return float((op.forward(x) - y).abs().norm() / y.abs().norm().clamp_min(1e-30))
