"""Cartesian MRI: A = P(Λ) F (single coil) and A = M F S (multi-coil).

F is the centred orthonormal 2D FFT (``ifftshift → fft2(norm="ortho") → fftshift``), so
T = F is unitary and T⁻¹ = Fᴴ (Proposition 8.1 holds exactly). Masks select phase-encoding
lines (columns, the last axis), as fastMRI defines them: acceleration R keeps about 1/R
of the lines, including a fully sampled centre of ``center_fraction`` of them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from models.physics.base import DecomposedOperator, LinearOperator


def fft2c(x: torch.Tensor) -> torch.Tensor:
    """Centred orthonormal 2D FFT over the last two axes."""
    x = torch.fft.ifftshift(x, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))


def ifft2c(k: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2c` (and its adjoint: F is unitary)."""
    k = torch.fft.ifftshift(k, dim=(-2, -1))
    return torch.fft.fftshift(torch.fft.ifft2(k, norm="ortho"), dim=(-2, -1))


def _shape(size: int | tuple[int, int]) -> tuple[int, int]:
    """(rows, cols) of an N×N or rectangular image."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def mix_coils(w: torch.Tensor | None, k: torch.Tensor) -> torch.Tensor:
    """``w`` (C, C) applied along the coil axis of ``(..., C, H, W)`` (``None``: unchanged)."""
    return k if w is None else torch.einsum("dc,...chw->...dhw", w, k)


def _lines_to_mask(size: int | tuple[int, int], lines: np.ndarray) -> torch.Tensor:
    mask = torch.zeros(*_shape(size), dtype=torch.bool)
    mask[:, torch.from_numpy(lines.astype(np.int64))] = True
    return mask


def _center_lines(size: int, center_fraction: float) -> np.ndarray:
    n_low = max(1, int(round(size * center_fraction)))
    start = (size - n_low + 1) // 2
    return np.arange(start, start + n_low)


def equispaced_mask(
    size: int | tuple[int, int], acceleration: float, center_fraction: float
) -> torch.Tensor:
    """fastMRI-style equispaced lines: a full centre plus evenly spaced outer lines.

    The outer lines are spread evenly over the lines outside the centre, so that the total
    is ``round(cols / acceleration)`` and the achieved acceleration matches the request.
    ``size`` is N (N×N) or (rows, cols); lines are columns.
    """
    cols = _shape(size)[1]
    _check_mask_args(cols, acceleration, center_fraction)
    center = _center_lines(cols, center_fraction)
    n_outer = max(0, int(round(cols / acceleration)) - len(center))
    rest = np.setdiff1d(np.arange(cols), center)
    picks = np.unique(np.round(np.linspace(0, len(rest) - 1, n_outer)).astype(np.int64))
    lines = np.concatenate([center, rest[picks]]) if n_outer else center
    return _lines_to_mask(size, lines)


def random_mask(
    size: int | tuple[int, int], acceleration: float, center_fraction: float, seed: int = 0
) -> torch.Tensor:
    """fastMRI-style random lines: a full centre plus outer lines drawn without replacement."""
    cols = _shape(size)[1]
    _check_mask_args(cols, acceleration, center_fraction)
    center = _center_lines(cols, center_fraction)
    n_outer = max(0, int(round(cols / acceleration)) - len(center))
    rest = np.setdiff1d(np.arange(cols), center)
    rng = np.random.default_rng(seed)
    outer = rng.choice(rest, size=min(n_outer, len(rest)), replace=False)
    return _lines_to_mask(size, np.concatenate([center, outer]))


def _check_mask_args(size: int, acceleration: float, center_fraction: float) -> None:
    if acceleration < 1:
        raise ValueError(f"acceleration must be >= 1, got {acceleration}")
    if not 0 < center_fraction <= 1:
        raise ValueError(f"center_fraction must be in (0, 1], got {center_fraction}")
    if size < 2:
        raise ValueError(f"image size must be >= 2, got {size}")


def calibration_lines(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the fully sampled centre: the run of measured lines through the centre."""
    measured = mask.any(dim=0)
    centre = mask.shape[-1] // 2
    if not bool(measured[centre]):
        return torch.zeros(0, dtype=torch.long)
    lo = hi = centre
    while lo > 0 and bool(measured[lo - 1]):
        lo -= 1
    while hi + 1 < len(measured) and bool(measured[hi + 1]):
        hi += 1
    return torch.arange(lo, hi + 1)


def calibration_window(mask: torch.Tensor) -> torch.Tensor:
    """A separable Hann window over the calibration lines (zero elsewhere): a low-pass whose
    image has little ringing, so its phase is a smooth estimate of the object's."""
    lines = calibration_lines(mask)
    rows, cols = mask.shape
    window = torch.zeros(rows, cols)
    if len(lines) == 0:
        return window
    width = len(lines)
    col = torch.hann_window(width + 2, periodic=False)[1:-1]
    row_width = min(rows, width * rows // max(cols, 1) + 2)
    row = torch.zeros(rows)
    start = (rows - row_width) // 2
    row[start : start + row_width] = torch.hann_window(row_width + 2, periodic=False)[1:-1]
    window[:, lines] = row[:, None] * col[None, :]
    return window


def acceleration_of(mask: torch.Tensor) -> float:
    """Achieved acceleration: all k-space samples over the measured ones."""
    return mask.numel() / max(1, int(mask.sum()))


class MRIOperator(DecomposedOperator):
    """Single-coil Cartesian MRI, A = P(Λ) F.

    Images are real ``(B, 1, H, W)`` (magnitude priors); measurements complex64. With a
    line mask the measurement is ``(B, 1, H, n_lines)``; with any other 2D mask it is the
    flat ``(B, 1, m)`` vector of measured samples.

    :param image_size: N for N×N images.
    :param mask: boolean ``(N, N)`` k-space mask Λ.
    """

    def __init__(self, image_size: int, mask: torch.Tensor):
        if tuple(mask.shape) != (image_size, image_size):
            raise ValueError(f"mask must be {image_size}x{image_size}, got {tuple(mask.shape)}")
        self.image_size = image_size
        self.mask = mask.bool()

    @property
    def complex_measurements(self) -> bool:
        return True

    def T(self, x: torch.Tensor) -> torch.Tensor:
        return fft2c(x.to(torch.complex64) if not x.is_complex() else x)

    def T_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        return ifft2c(z).real

    def T_inv(self, z: torch.Tensor) -> torch.Tensor:
        """Exact inverse of T = F, complex: MR images carry a phase, and taking the real part
        here would halve every correction whose mirror line is not measured."""
        return ifft2c(z)

    def adjoint_complex(self, y: torch.Tensor) -> torch.Tensor:
        """Aᴴ y as a complex image (``adjoint`` is its real part, for real-image solvers)."""
        return ifft2c(self.pad(y))

    def low_resolution(self, y: torch.Tensor) -> torch.Tensor:
        """The complex image of the calibration lines alone, Hann-windowed (phase estimates)."""
        return ifft2c(self.pad(y) * calibration_window(self.mask))

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """Zero-filled reconstruction |Fᴴ P⁻¹(Λ) y| (the classical MRI baseline)."""
        return ifft2c(self.pad(y)).abs()


class MultiCoilMRIOperator(LinearOperator):
    """Multi-coil Cartesian MRI, A = M F S with given sensitivity maps S (one slice's).

    No invertible T exists (S maps one image to C coil images), so this operator has no
    Proposition 8.1 decomposition; solvers use least squares (CG) for data consistency.
    Images may be rectangular, ``(B, 1, H, W)``; measurements are the zero-filled k-space
    ``(B, C, H, W)``, fastMRI's layout. With a ``whitening`` matrix W (C×C) the operator is
    W M F S, for data pre-whitened by the same W (:func:`models.physics.coils.prewhiten`):
    least squares then weighs the coils by their correlated noise, and the image keeps the
    scale of the unwhitened maps.

    :param image_shape: N for N×N images, or ``(H, W)``.
    :param mask: boolean ``(H, W)`` k-space mask.
    :param sensitivities: complex ``(C, H, W)`` coil maps.
    """

    def __init__(
        self,
        image_shape: int | tuple[int, int],
        mask: torch.Tensor,
        sensitivities: torch.Tensor,
        whitening: torch.Tensor | None = None,
    ):
        shape = (image_shape, image_shape) if isinstance(image_shape, int) else image_shape
        shape = tuple(int(s) for s in shape)
        if sensitivities.ndim != 3 or tuple(sensitivities.shape[1:]) != shape:
            raise ValueError(f"sensitivities must have shape (coils, {shape[0]}, {shape[1]})")
        if tuple(mask.shape) != shape:
            raise ValueError(f"mask must be {shape[0]}x{shape[1]}, got {tuple(mask.shape)}")
        self._shape = shape
        self.image_size = shape[0] if shape[0] == shape[1] else None
        self.mask = mask.bool()
        self.sensitivities = sensitivities.to(torch.complex64)
        self.whitening = None if whitening is None else whitening.to(torch.complex64)

    @property
    def image_shape(self) -> tuple[int, int]:
        return self._shape

    @property
    def complex_measurements(self) -> bool:
        return True

    @property
    def coils(self) -> int:
        return int(self.sensitivities.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coil_images = x.to(torch.complex64) * self.sensitivities[None]
        return mix_coils(self.whitening, fft2c(coil_images)) * self.mask

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.adjoint_complex(y).real

    def adjoint_complex(self, y: torch.Tensor) -> torch.Tensor:
        """Aᴴ y as a complex image."""
        w = None if self.whitening is None else self.whitening.conj().T
        coil_images = ifft2c(mix_coils(w, y * self.mask)) * torch.conj(self.sensitivities[None])
        return coil_images.sum(dim=1, keepdim=True)

    def low_resolution(self, y: torch.Tensor) -> torch.Tensor:
        """Coil-combined complex image of the calibration lines alone (phase estimates)."""
        return self.adjoint_complex(y * calibration_window(self.mask))

    def without_lines(self, lines: torch.Tensor) -> MultiCoilMRIOperator:
        """The same operator with the k-space columns ``lines`` not measured (the maps and
        the whitening kept): the solve a hold-out of those lines leaves (models/holdout.py)."""
        mask = self.mask.clone()
        mask[:, lines] = False
        return MultiCoilMRIOperator(self._shape, mask, self.sensitivities, self.whitening)

    def zero_filled(self, y: torch.Tensor) -> torch.Tensor:
        """Root sum of squares of the zero-filled coil images (the field's baseline); of the
        unwhitened coils when the data were whitened."""
        if self.whitening is not None:
            y = mix_coils(torch.linalg.inv(self.whitening), y)
        return ifft2c(y * self.mask).abs().pow(2).sum(dim=1, keepdim=True).sqrt()


def birdcage_sensitivities(image_size: int, coils: int) -> torch.Tensor:
    """Smooth synthetic coil maps around the field of view, normalised to sum-of-squares 1."""
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij"
    )
    maps = []
    for c in range(coils):
        phi = 2 * math.pi * c / coils
        cx, cy = 1.5 * math.cos(phi), 1.5 * math.sin(phi)
        mag = torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 2.0)
        phase = torch.exp(1j * (phi + 0.5 * (xx * math.cos(phi) + yy * math.sin(phi))))
        maps.append(mag * phase)
    s = torch.stack(maps)
    return (s / s.abs().pow(2).sum(0, keepdim=True).sqrt()).to(torch.complex64)
