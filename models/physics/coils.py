"""Receive coils: sensitivity maps from a physical model or from the data, and coil noise.

- :func:`loop_coil_sensitivities`: the complex receive fields of circular loop coils on a
  cylinder around the field of view, by Biot-Savart (simulation; unlike the smooth birdcage
  of :func:`models.physics.mri.birdcage_sensitivities`, each loop sees a local patch with a
  steep fall-off and its own phase wrap).
- :func:`espirit_maps`: sensitivities estimated from the auto-calibration lines of the data
  (ESPIRiT, Uecker et al. 2014), normalised to a root sum of squares of one inside the object
  and zero outside it; our own, because a Cartesian scan's calibration region is the full
  readout by a few lines, and the square region sigpy's ``EspiritCalib`` takes does not fit
  narrow ACS (checked against sigpy where both apply, in the tests).
- :func:`noise_covariance`, :func:`whitening_matrix`, :func:`whiten`, :func:`prewhiten`:
  coil noise is correlated (coils couple and overlap); pre-whitening with the Cholesky
  factor of its covariance makes it white and equal, which least-squares data consistency
  assumes. The covariance comes from a noise scan when there is one, else from the ends of
  the readout, where an object of finite extent leaves only noise (:func:`noise_from_kspace`).
- :func:`rss`: root-sum-of-squares coil combination, the zero-filled baseline of the field.

Shapes: one slice's maps are ``(C, H, W)``; k-space is ``(..., C, H, W)``, centred.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.physics.mri import calibration_lines, mix_coils

# ESPIRiT's kernel (3 wide at least) must fit its calibration lines with room to move.
MIN_ACS_LINES = 8


def loop_coil_sensitivities(
    shape: tuple[int, int],
    coils: int,
    radius: float = 0.45,
    distance: float = 1.5,
    rings: int | None = None,
    segments: int = 64,
    extent: float | None = None,
) -> torch.Tensor:
    """Receive fields ``(C, H, W)`` complex64 of ``coils`` circular loops (Biot-Savart).

    The loops (``radius``) lie on a cylinder of radius ``distance`` around the field of
    view, facing its axis; lengths are in units of ``extent`` pixels (default half the
    larger image side; give the object's when the grid is larger, e.g. an oversampled
    readout, so the coils stay where they are). With more
    than 8 coils they sit on two rings at z = ±radius, as head and knee arrays do. The
    receive sensitivity of a coil is B_x − i B_y of the field its unit current makes in the
    image plane (the negatively rotating component, which a receive coil picks up). Maps
    are scaled so that their root sum of squares peaks at 1.
    """
    if coils < 1:
        raise ValueError(f"coils must be >= 1, got {coils}")
    rows, cols = shape
    half = extent or max(rows, cols) / 2
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
    threshold: float = 0.02,
    crop: float = 0.95,
    kernel_width: int | None = None,
    calib_rows: int = 32,
) -> torch.Tensor:
    """ESPIRiT sensitivities ``(C, H, W)`` complex64 from one slice's k-space ``(C, H, W)``
    (Uecker et al., MRM 2014), normalised to RSS 1 where they apply, zero elsewhere.

    The calibration region is the fully sampled centre as a Cartesian scan has it: the run
    of lines through the centre that ``mask`` names and the data hold (nonzero),
    by the central ``calib_rows`` readout points; it need not be square, which sigpy's and
    BART's defaults assume. Its k×k×C patches span the signal subspace (singular values
    above ``threshold`` of the largest); each pixel's C×C operator built from those kernels
    has an eigenvalue near 1 exactly where the object is, whose eigenvector is the coil
    sensitivity there (``crop``: the eigenvalue below which a pixel gets no map). The
    kernel is at most 6 wide and at most half the calibration lines minus one, so that the
    patches outnumber their unknowns. Each pixel's map keeps an arbitrary phase; it is
    referenced to the first coil's, as sigpy and BART do.
    """
    k = torch.as_tensor(kspace).to(torch.complex64)
    if k.ndim != 3:
        raise ValueError(f"k-space of one slice must be (coils, rows, cols), got {tuple(k.shape)}")
    coils, rows, cols = k.shape
    acquired = (k != 0).any(dim=0)  # lines the mask names but the data lack do not count
    lines = calibration_lines(acquired if mask is None else acquired & mask.bool())
    kw = kernel_width or min(6, len(lines) // 2 - 1)
    if kw < 3 or len(lines) < max(MIN_ACS_LINES, kw + 3):
        raise ValueError(
            f"ESPIRiT needs a fully sampled k-space centre of at least {MIN_ACS_LINES} lines "
            f"(auto-calibration lines); the data have {len(lines)}: acquire ACS lines "
            "or send the coil sensitivities"
        )
    n_rows = min(rows, max(calib_rows, len(lines)))
    top = (rows - n_rows + 1) // 2
    calib = k[:, top : top + n_rows, int(lines[0]) : int(lines[-1]) + 1]
    patches = calib.unfold(1, kw, 1).unfold(2, kw, 1)  # (C, r, c, kw, kw)
    a = patches.permute(1, 2, 0, 3, 4).reshape(-1, coils * kw * kw)
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    kernels = vh[s > threshold * s[0]].reshape(-1, coils, kw, kw)
    # Each pixel's operator G(x) = Σ_j g_j(x) g_j(x)ᴴ / k², g_j the image-domain kernel j.
    g_sum = torch.zeros(rows, cols, coils, coils, dtype=torch.complex64)
    for chunk in kernels.split(16):
        pad = torch.zeros(len(chunk), coils, rows, cols, dtype=torch.complex64)
        pad[..., :kw, :kw] = chunk
        g = torch.fft.fftshift(torch.fft.ifft2(pad) * (rows * cols), dim=(-2, -1))
        g_sum += torch.einsum("jchw,jdhw->hwcd", g, g.conj())
    values, vectors = torch.linalg.eigh(g_sum / (kw * kw))
    maps = vectors[..., -1].permute(2, 0, 1)
    maps = maps * torch.exp(-1j * torch.angle(maps[:1]))
    return (maps * (values[..., -1] > crop)).to(torch.complex64)


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


def noise_from_oversampled(kspace: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Noise samples ``(C, M)`` from k-space ``(..., C, 2H, W)`` whose readout was 2×
    oversampled: along the readout the object fills the central half of the field of view,
    so in hybrid space (readout position × phase-encoding line) the outer quarters of every
    measured line hold noise alone, whatever the object's own k-space looks like."""
    k = kspace.reshape(-1, *kspace.shape[-3:])
    rows = k.shape[-2]
    hybrid = torch.fft.fftshift(
        torch.fft.ifft(torch.fft.ifftshift(k, dim=-2), dim=-2, norm="ortho"), dim=-2
    )
    measured = mask.bool().any(dim=0).nonzero().flatten()
    width = mask.shape[-1]
    # High phase-encoding frequencies only: there the object's own profile, and the ringing
    # of its edges along the readout, are weakest.
    high = measured[(measured - width // 2).abs() > width // 4]
    cols = high if len(high) else measured
    edge = max(1, rows // 8)  # the outer eighth each side, farthest from the object
    outer = torch.cat([hybrid[..., :edge, :], hybrid[..., rows - edge :, :]], -2)
    outer = outer[..., cols].movedim(-3, 0)
    return outer.reshape(k.shape[-3], -1)


def whitening_matrix(covariance: torch.Tensor) -> torch.Tensor:
    """W = L⁻¹ with L Lᴴ = Ψ/mean(diag Ψ): W n has identity covariance times the mean coil
    noise variance, so whitened data keep their units and noise level."""
    psi = covariance.to(torch.complex128)
    scale = psi.diagonal().real.mean()
    chol = torch.linalg.cholesky(psi / scale)
    return torch.linalg.inv(chol).to(torch.complex64)


def whiten(kspace: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Apply the whitening matrix ``w`` (C, C) along the coil axis of ``(..., C, H, W)``."""
    return mix_coils(w, kspace.to(torch.complex64))


def prewhiten(op, y: torch.Tensor, noise: torch.Tensor | None = None):
    """``(op_w, y_w)``: a multi-coil operator and its slice's data ``y`` (1, C, H, W), both
    whitened by W from the coil noise covariance: of the ``noise`` samples (C, M), from a
    noise scan or an oversampled readout (:func:`noise_from_oversampled`), when there are
    any, else of the measured k-space's readout ends (:func:`noise_from_kspace`), which
    holds for objects well inside the field of view."""
    from models.physics.mri import MultiCoilMRIOperator

    samples = noise if noise is not None else noise_from_kspace(y, op.mask)
    w = whitening_matrix(noise_covariance(samples))
    op_w = MultiCoilMRIOperator(op.image_shape, op.mask, op.sensitivities, whitening=w)
    return op_w, whiten(y, w) * op.mask
