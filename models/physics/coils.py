"""Receive coils: sensitivity maps from a physical model or from the data, and coil noise.

- :func:`loop_coil_sensitivities`: the complex receive fields of circular loop coils on a
  cylinder around the field of view, by Biot-Savart (simulation; unlike the smooth birdcage
  of :func:`models.physics.mri.birdcage_sensitivities`, each loop sees a local patch with a
  steep fall-off and its own phase wrap).
- :func:`espirit_maps`: sensitivities estimated from the auto-calibration lines of the data
  (ESPIRiT, Uecker et al. 2014, through sigpy's ``EspiritCalib``), normalised to a root sum of
  squares of one inside the object and zero outside it.
- :func:`noise_covariance`, :func:`whitening_matrix`, :func:`whiten`: coil noise is
  correlated (coils couple and overlap); pre-whitening with the Cholesky factor of its
  covariance makes it white and equal, which least-squares data consistency assumes. The
  covariance comes from a noise scan when there is one, else from the k-space corners,
  where an object with a finite extent leaves only noise (:func:`noise_from_kspace`).
- :func:`rss`: root-sum-of-squares coil combination, the zero-filled baseline of the field.

Shapes: one slice's maps are ``(C, H, W)``; k-space is ``(..., C, H, W)``, centred.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.physics.mri import calibration_lines


def loop_coil_sensitivities(
    shape: tuple[int, int],
    coils: int,
    radius: float = 0.45,
    distance: float = 1.5,
    rings: int | None = None,
    segments: int = 64,
) -> torch.Tensor:
    """Receive fields ``(C, H, W)`` complex64 of ``coils`` circular loops (Biot-Savart).

    The loops (``radius``) lie on a cylinder of radius ``distance`` around the field of
    view, facing its axis; lengths are in units of half the larger image side. With more
    than 8 coils they sit on two rings at z = ±radius, as head and knee arrays do. The
    receive sensitivity of a coil is B_x − i B_y of the field its unit current makes in the
    image plane (the negatively rotating component, which a receive coil picks up). Maps
    are scaled so that their root sum of squares peaks at 1.
    """
    if coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    rows, cols = shape
    half = max(rows, cols) / 2
    y = (torch.arange(rows, dtype=torch.float64) - (rows - 1) / 2) / half
    x = (torch.arange(cols, dtype=torch.float64) - (cols - 1) / 2) / half
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    points = torch.stack([xx, yy, torch.zeros_like(xx)], dim=-1).reshape(-1, 3)
    rings = rings or (2 if coils > 8 else 1)
    per_ring = math.ceil(coils / rings)
    theta = torch.linspace(0, 2 * math.pi, segments + 1, dtype=torch.float64)
    maps = []
    for c in range(coils):
        ring, k = divmod(c, per_ring)
        phi = 2 * math.pi * (k + 0.5 * ring) / per_ring
        z = 0.0 if rings == 1 else radius * (2 * ring / (rings - 1) - 1)
        normal = torch.tensor([math.cos(phi), math.sin(phi), 0.0], dtype=torch.float64)
        centre = distance * normal + torch.tensor([0.0, 0.0, z], dtype=torch.float64)
        u = torch.tensor([-math.sin(phi), math.cos(phi), 0.0], dtype=torch.float64)
        v = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
        wire = centre + radius * (torch.cos(theta)[:, None] * u + torch.sin(theta)[:, None] * v)
        dl = wire[1:] - wire[:-1]
        mid = 0.5 * (wire[1:] + wire[:-1])
        r = points[:, None, :] - mid[None]  # (P, M, 3)
        b = torch.linalg.cross(dl[None].expand_as(r), r, dim=-1) / r.norm(dim=-1, keepdim=True) ** 3
        b = b.sum(dim=1)  # Biot-Savart, μ0 I / 4π dropped
        maps.append(torch.complex(b[:, 0], -b[:, 1]).reshape(rows, cols))
    s = torch.stack(maps)
    return (s / s.abs().pow(2).sum(0).sqrt().max()).to(torch.complex64)


def espirit_maps(
    kspace: torch.Tensor | np.ndarray,
    mask: torch.Tensor | None = None,
    calib_width: int | None = None,
    threshold: float = 0.02,
    crop: float = 0.95,
    kernel_width: int = 6,
) -> torch.Tensor:
    """ESPIRiT sensitivities ``(C, H, W)`` complex64 from one slice's k-space ``(C, H, W)``.

    The calibration region is the fully sampled centre: ``calib_width`` lines, by default
    the run of measured lines through the centre of ``mask`` (or of the data's nonzero
    columns). Raises ``ValueError`` naming the problem when the data have no such centre
    (fewer lines than the kernel needs).
    """
    k = torch.as_tensor(kspace).to(torch.complex64)
    if k.ndim != 3:
        raise ValueError(f"k-space of one slice must be (coils, rows, cols), got {tuple(k.shape)}")
    if calib_width is None:
        if mask is None:
            mask = (k != 0).any(dim=0)
        calib_width = len(calibration_lines(mask.bool()))
    if calib_width < kernel_width + 2:
        raise ValueError(
            f"ESPIRiT needs a fully sampled k-space centre of at least {kernel_width + 2} "
            f"lines (auto-calibration lines); the data have {calib_width}: acquire ACS lines "
            "or send the coil sensitivities"
        )
    import sigpy.mri

    maps = sigpy.mri.app.EspiritCalib(
        k.numpy(),
        calib_width=int(min(calib_width, *k.shape[1:])),
        thresh=threshold,
        kernel_width=kernel_width,
        crop=crop,
        show_pbar=False,
    ).run()
    return torch.from_numpy(np.asarray(maps)).to(torch.complex64)


def rss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root sum of squares over the coil axis (``dim``)."""
    return coil_images.abs().pow(2).sum(dim=dim).sqrt()


def noise_covariance(noise: torch.Tensor) -> torch.Tensor:
    """Coil noise covariance ``(C, C)`` from noise samples ``(C, ...)`` (zero mean)."""
    n = noise.reshape(noise.shape[0], -1).to(torch.complex128)
    if n.shape[1] < 2 * n.shape[0]:
        raise ValueError(
            f"{n.shape[1]} noise samples per coil cannot estimate a {n.shape[0]}-coil covariance; "
            "send a longer noise scan"
        )
    return (n @ n.conj().T) / n.shape[1]


def noise_from_kspace(
    kspace: torch.Tensor, mask: torch.Tensor, fraction: float = 0.1
) -> torch.Tensor:
    """Noise samples ``(C, M)`` from measured k-space ``(..., C, H, W)``: the outer
    ``fraction`` of each measured line's readout on both ends, where a compact object's
    signal has decayed to far below the noise."""
    k = kspace.reshape(-1, *kspace.shape[-3:])
    rows = k.shape[-2]
    edge = max(1, int(rows * fraction / 2))
    cols = mask.bool().any(dim=0).nonzero().flatten()
    corner = torch.cat([k[..., :edge, :], k[..., rows - edge :, :]], dim=-2)[..., cols]
    corner = corner.movedim(-3, 0).reshape(k.shape[-3], -1)
    return corner[:, corner.abs().sum(0) > 0]


def whitening_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """W = L⁻¹ with L Lᴴ = Ψ/mean(diag Ψ): W n has identity covariance times the mean coil
    noise variance, so whitened data keep their units and noise level."""
    psi = covariance.to(torch.complex128)
    scale = psi.diagonal().real.mean()
    chol = torch.linalg.cholesky(psi / scale)
    return torch.linalg.inv(chol).to(torch.complex64)


def whiten(kspace: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Apply the whitening matrix ``w`` (C, C) along the coil axis of ``(..., C, H, W)``."""
    return torch.einsum("dc,...chw->...dhw", w, kspace.to(torch.complex64))
