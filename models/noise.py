"""The noise level of a measurement, estimated from the data when the spec does not state it.

Real measurements always carry noise, and a data-consistency step that fits noisy data
exactly (λ = 1) puts that noise into the image. The solver weights data consistency by the
level returned here (:func:`estimate_noise`), in measurement units, per measurement:

* **MRI** (Cartesian lines along the last axis): the outermost readout rows (1/8 at each
  end) of the measured lines outside the central half of k-space: the corners, where an
  anatomical image has almost no energy. Each complex sample there is
  noise of standard deviation σ per component; its magnitude is Rayleigh-distributed with
  median σ √(2 ln 2), so σ̂ = median |k| / √(2 ln 2), robust to the little signal left.
* **CT**: the finest-scale detail of each projection along the detector axis. A fourth
  difference (1, −4, 6, −4, 1)/√70 has standard deviation σ for white noise of std σ and
  cancels the smooth (up to cubic) part of a projection; edges are few, so the median absolute
  deviation (σ̂ = MAD / 0.6745, Donoho & Johnstone) ignores them. For Poisson (count)
  noise the level varies along the projection, and σ̂ is its typical (median) value.

Both are checked against known noise levels in ``tests/models/test_noise.py``.
"""

from __future__ import annotations

import math

import torch

from models.physics.base import LinearOperator

RAYLEIGH_MEDIAN = math.sqrt(2 * math.log(2))
MAD_TO_STD = 0.6745
MRI_EDGE_FRACTION = 1 / 8  # readout rows used at each end of k-space
MRI_OUTER_LINES = 0.5  # phase-encoding lines used: those outside the central half
DETAIL = (1.0, -4.0, 6.0, -4.0, 1.0)  # 4th difference: cancels cubic trends in a projection


def estimate_noise(operator: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    """σ̂ per measurement, shape ``(B,)``, in the units of ``y`` (per real component)."""
    if operator.complex_measurements:
        return _kspace_noise(operator, y)
    return _sinogram_noise(y)


def _kspace_noise(operator: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    if y.ndim == 3:  # a flat vector of samples: no rows to tell the periphery by
        return _mad_std(torch.view_as_real(y).flatten(1))
    k, lines = y, None
    mask = getattr(operator, "mask", None)
    if mask is not None:
        lines = mask.any(dim=0).nonzero().flatten()
        if tuple(y.shape[-2:]) == tuple(mask.shape):  # zero-filled: keep the measured lines
            k = y[..., lines]
    if lines is not None and len(lines) == k.shape[-1]:
        outer = (lines - mask.shape[-1] // 2).abs() > mask.shape[-1] * MRI_OUTER_LINES / 2
        if int(outer.sum()) > 0:
            k = k[..., outer]
    rows = k.shape[-2]
    edge = max(1, int(rows * MRI_EDGE_FRACTION))
    periphery = torch.cat([k[..., :edge, :], k[..., rows - edge :, :]], dim=-2)
    return periphery.abs().flatten(1).median(dim=1).values / RAYLEIGH_MEDIAN


def _sinogram_noise(y: torch.Tensor) -> torch.Tensor:
    if y.shape[-1] < len(DETAIL):
        return torch.zeros(len(y))
    kernel = torch.tensor(DETAIL, dtype=y.dtype).view(1, 1, -1)
    detail = torch.nn.functional.conv1d(y.flatten(0, -2)[:, None], kernel)
    return _mad_std(detail.reshape(len(y), -1) / math.sqrt(sum(c * c for c in DETAIL)))


def _mad_std(values: torch.Tensor) -> torch.Tensor:
    centred = values - values.median(dim=1, keepdim=True).values
    return centred.abs().median(dim=1).values / MAD_TO_STD


def add_noise(
    y: torch.Tensor, std: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``y`` plus white Gaussian noise of ``std`` per real component (complex: real and
    imaginary parts each), the convention of the spec's ``noise_std`` and of the estimates."""
    if std <= 0:
        return y
    noise = torch.randn(y.shape, generator=generator) * std
    if y.is_complex():
        noise = torch.complex(noise, torch.randn(y.shape, generator=generator) * std)
    return y + noise.to(y.dtype)


def poisson_sinogram(
    y: torch.Tensor,
    incident: float,
    mu_per_unit: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Line integrals as a scanner measures them: counts N ~ Poisson(I₀ exp(−μ p)) for the
    physical line integral μ p (``mu_per_unit`` converts the sinogram's units), then
    p̂ = −log(max(N, 1)/I₀)/μ back in the sinogram's units (Beer-Lambert, the usual log step;
    a zero count is clipped to one, as scanners do)."""
    expected = incident * torch.exp(-mu_per_unit * y.double())
    counts = torch.poisson(expected, generator=generator).clamp_min(1.0)
    return (-torch.log(counts / incident) / mu_per_unit).to(y.dtype)
