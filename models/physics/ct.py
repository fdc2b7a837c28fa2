"""2D CT: parallel- and fan-beam Radon transforms through ASTRA, with autograd.

T is the Radon transform on a dense angle set; Λ keeps the measured angles (sparse view)
or removes the metal trace (metal artifact removal), so that A = P(Λ) T (Proposition 8.1,
seed 002 ch. 8.3.1). Geometry is built as ASTRA ``parallel_vec`` / ``fanflat_vec`` so that
the rotation centre and detector can be shifted by sub-pixel offsets (this is how the
operator is aligned with ``skimage.transform.radon``, which centres on pixel N//2).

On the CPU the ``linear`` (parallel) and ``line_fanflat`` (fan) projectors are used: their
back projectors are the matched adjoints of the forward projectors. When ASTRA reports a
GPU, ``FP_CUDA``/``BP_CUDA`` are used instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import astra
import numpy as np
import torch

from models.physics.base import DecomposedOperator, conjugate_gradient


@dataclass(frozen=True)
class CTGeometry:
    """Scanner geometry; lengths in mm, angles in radians.

    :param image_size: N for an N×N image.
    :param angles: projection angles of T (the dense set).
    :param n_detectors: detector bins.
    :param pixel_size: image pixel size.
    :param detector_spacing: bin width on the detector.
    :param source_distance: source-to-isocentre distance (fan beam only).
    :param detector_distance: isocentre-to-detector distance (fan beam only).
    :param volume_offset: shift of the image centre (x, y), in pixels.
    :param detector_offset: shift of the detector centre, in bins.
    """

    image_size: int
    angles: tuple[float, ...]
    n_detectors: int
    pixel_size: float = 1.0
    detector_spacing: float = 1.0
    beam: str = "parallel"
    source_distance: float = 0.0
    detector_distance: float = 0.0
    volume_offset: tuple[float, float] = (0.0, 0.0)
    detector_offset: float = 0.0

    def vectors(self) -> np.ndarray:
        """ASTRA vec-geometry rows, one per angle."""
        a = np.asarray(self.angles, dtype=np.float64)
        ray = np.stack([np.sin(a), -np.cos(a)], axis=1)
        u = np.stack([np.cos(a), np.sin(a)], axis=1) * self.detector_spacing
        shift = self.detector_offset * u
        if self.beam == "parallel":
            return np.concatenate([ray, shift, u], axis=1)
        src = ray * self.source_distance
        det = -ray * self.detector_distance + shift
        return np.concatenate([src, det, u], axis=1)


class _AstraProjector:
    """Owns the ASTRA geometry and projector for one CTGeometry; frees them on close."""

    def __init__(self, geom: CTGeometry):
        self.geom = geom
        n, ps = geom.image_size, geom.pixel_size
        ox, oy = geom.volume_offset
        half = n * ps / 2
        self.vol_geom = astra.create_vol_geom(
            n, n, -half + ox * ps, half + ox * ps, -half + oy * ps, half + oy * ps
        )
        kind = "parallel_vec" if geom.beam == "parallel" else "fanflat_vec"
        self.proj_geom = astra.create_proj_geom(kind, geom.n_detectors, geom.vectors())
        self.cuda = bool(astra.use_cuda())
        if self.cuda:
            name = "cuda"
        else:
            name = "linear" if geom.beam == "parallel" else "line_fanflat"
        self.projector_id = astra.create_projector(name, self.proj_geom, self.vol_geom)
        self.sino_shape = (len(geom.angles), geom.n_detectors)

    def run(self, algo: str, vol: np.ndarray, sino: np.ndarray, iterations: int = 1) -> None:
        """Run ASTRA algorithm ``algo`` (FP, BP, SIRT, CGLS; CUDA variant on a GPU) on
        linked arrays, freeing every object it creates."""
        vid = astra.data2d.link("-vol", self.vol_geom, vol)
        sid = astra.data2d.link("-sino", self.proj_geom, sino)
        alg = None
        try:
            cfg = astra.astra_dict(algo + ("_CUDA" if self.cuda else ""))
            cfg["ProjectorId"] = self.projector_id
            cfg["ProjectionDataId"] = sid
            cfg["VolumeDataId" if algo == "FP" else "ReconstructionDataId"] = vid
            alg = astra.algorithm.create(cfg)
            astra.algorithm.run(alg, iterations)
        finally:
            if alg is not None:
                astra.algorithm.delete(alg)
            astra.data2d.delete([vid, sid])

    def fp(self, images: np.ndarray) -> np.ndarray:
        out = np.zeros((images.shape[0], *self.sino_shape), dtype=np.float32)
        for i in range(images.shape[0]):
            self.run("FP", np.ascontiguousarray(images[i], dtype=np.float32), out[i])
        return out

    def bp(self, sinos: np.ndarray) -> np.ndarray:
        n = self.geom.image_size
        out = np.zeros((sinos.shape[0], n, n), dtype=np.float32)
        for i in range(sinos.shape[0]):
            self.run("BP", out[i], np.ascontiguousarray(sinos[i], dtype=np.float32))
        return out

    def close(self) -> None:
        if self.projector_id is not None:
            astra.projector.delete(self.projector_id)
            self.projector_id = None

    def __del__(self) -> None:  # pragma: no cover - safety net; close() is the contract
        try:
            self.close()
        except Exception:
            pass


def _apply(fn, t: torch.Tensor) -> torch.Tensor:
    """Run an ASTRA numpy map on a (B, 1, ...) tensor, keeping dtype and device."""
    arr = t.detach().to("cpu", torch.float32).numpy()[:, 0]
    return torch.from_numpy(fn(arr)).unsqueeze(1).to(device=t.device, dtype=t.dtype)


class _AstraMap(torch.autograd.Function):
    """A linear ASTRA map whose gradient is its matched transpose (FP ↔ BP)."""

    @staticmethod
    def forward(ctx, x, fn, fn_transpose):  # type: ignore[override]
        ctx.fn_transpose = fn_transpose
        return _apply(fn, x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return _apply(ctx.fn_transpose, g), None, None


def ramp_filter(sino: torch.Tensor, spacing: float, window: str = "ram-lak") -> torch.Tensor:
    """Filter projections along the detector axis with the band-limited ramp.

    Uses the discrete spatial ramp kernel (Kak & Slaney, eq. 3.61), which avoids the
    DC offset of a sampled |ω|; ``window`` may be ``ram-lak`` or ``hann``.
    """
    n = sino.shape[-1]
    size = 1 << math.ceil(math.log2(2 * n))
    k = torch.arange(-(size // 2), size // 2, dtype=torch.float64)
    h = torch.zeros(size, dtype=torch.float64)
    h[k == 0] = 1.0 / (4 * spacing**2)
    odd = (k.abs() % 2) == 1
    h[odd] = -1.0 / (math.pi * k[odd] * spacing) ** 2
    H = torch.fft.fft(torch.fft.ifftshift(h)).real * spacing
    if window == "hann":
        w = torch.fft.fftfreq(size, dtype=torch.float64)
        H = H * (0.5 + 0.5 * torch.cos(2 * math.pi * w))
    elif window != "ram-lak":
        raise ValueError(f"window must be 'ram-lak' or 'hann', got {window!r}")
    spec = torch.fft.fft(sino.double(), n=size, dim=-1) * H.to(sino.device)
    return torch.fft.ifft(spec, dim=-1).real[..., :n].to(sino.dtype)


def fan_fbp(g: CTGeometry, z: torch.Tensor, window: str = "ram-lak") -> torch.Tensor:
    """Flat-detector fan-beam FBP over a full 2π scan (Kak & Slaney, ch. 3.4.2).

    Projections are rescaled to a virtual detector through the isocentre (spacing
    Δs = spacing·D/(D+d)), cosine-weighted by D/√(D²+s²), ramp filtered, and back projected
    pixel by pixel with the distance weight 1/U², U = (D − r·e_s)/D; the 2π scan counts
    every ray twice, hence the factor ½ in Δβ/2. Runs in torch, so it follows the device.
    """
    d_so, d_od = g.source_distance, g.detector_distance
    n, ps, nd = g.image_size, g.pixel_size, g.n_detectors
    ds = g.detector_spacing * d_so / (d_so + d_od)
    dev = z.device
    s = (torch.arange(nd, dtype=torch.float64, device=dev) - (nd - 1) / 2 + g.detector_offset) * ds
    q = ramp_filter(z.double() * (d_so / torch.sqrt(d_so**2 + s**2)), ds, window)
    idx = torch.arange(n, dtype=torch.float64, device=dev) - (n - 1) / 2
    xs = (idx + g.volume_offset[0]) * ps
    ys = (-idx + g.volume_offset[1]) * ps  # ASTRA's row 0 is the top (largest y)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    out = torch.zeros(z.shape[0], n, n, dtype=torch.float64, device=dev)
    for k, beta in enumerate(g.angles):
        sin_b, cos_b = math.sin(beta), math.cos(beta)
        dist = d_so - (xx * sin_b - yy * cos_b)
        pos = (xx * cos_b + yy * sin_b) * d_so / dist / ds + (nd - 1) / 2 - g.detector_offset
        lo = pos.floor().clamp(0, nd - 2)
        w = (pos - lo).clamp(0, 1)
        lo = lo.long()
        row = q[:, 0, k]
        val = row[:, lo] * (1 - w) + row[:, lo + 1] * w
        out += val * ((pos >= 0) & (pos <= nd - 1)) * (d_so / dist) ** 2
    scale = math.pi / len(g.angles)
    return (out * scale).unsqueeze(1).to(z.dtype)


class CTOperator(DecomposedOperator):
    """A = P(Λ) T with T the Radon transform over ``geometry.angles``.

    :param geometry: the dense-angle geometry of T.
    :param mask: boolean ``(n_angles, n_detectors)``; True where a bin is measured.
    """

    def __init__(self, geometry: CTGeometry, mask: torch.Tensor | None = None):
        self.geometry = geometry
        self.image_size = geometry.image_size
        self._proj = _AstraProjector(geometry)
        self._sub: _AstraProjector | None = None
        self._sub_checked = False
        shape = (len(geometry.angles), geometry.n_detectors)
        self.mask = torch.ones(shape, dtype=torch.bool) if mask is None else mask.bool()
        if tuple(self.mask.shape) != shape:
            raise ValueError(f"mask must have shape {shape}, got {tuple(self.mask.shape)}")

    @property
    def complex_measurements(self) -> bool:
        return False

    def close(self) -> None:
        """Release the ASTRA objects now (they are also released on garbage collection)."""
        self._proj.close()
        if self._sub is not None:
            self._sub.close()

    def _measured_projector(self) -> _AstraProjector | None:
        """A projector over the measured angles only, when Λ keeps whole rows: then
        A = P(Λ) T is computed without projecting the unmeasured angles (for 23 of 184
        angles, 8× less work per forward and adjoint)."""
        if self._sub is None and not self._sub_checked:
            self._sub_checked = True
            rows = self.measured_rows()
            if rows is not None:
                g = self.geometry
                angles = tuple(g.angles[i] for i in rows.tolist())
                self._sub = _AstraProjector(CTGeometry(**{**g.__dict__, "angles": angles}))
        return self._sub

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sub = self._measured_projector()
        if sub is None:
            return super().forward(x)
        return _AstraMap.apply(x, sub.fp, sub.bp)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        sub = self._measured_projector()
        if sub is None:
            return super().adjoint(y)
        return _AstraMap.apply(y, sub.bp, sub.fp)

    def T(self, x: torch.Tensor) -> torch.Tensor:
        return _AstraMap.apply(x, self._proj.fp, self._proj.bp)

    def T_adjoint(self, z: torch.Tensor) -> torch.Tensor:
        return _AstraMap.apply(z, self._proj.bp, self._proj.fp)

    def fbp(self, z: torch.Tensor, window: str = "ram-lak") -> torch.Tensor:
        """Filtered back projection of a full sinogram over T's angles (parallel beam).

        .. math:: x = \\frac{\\pi}{K} \\sum_k (q_k * h)(\\langle r, \\theta_k \\rangle)

        Exact in the limit of dense angles over [0, π). Fan beam: see :func:`fan_fbp`.
        """
        g = self.geometry
        if g.beam != "parallel":
            return fan_fbp(g, z, window)
        q = ramp_filter(z, g.detector_spacing, window)
        scale = math.pi / len(g.angles) * g.detector_spacing / g.pixel_size**2
        return self.T_adjoint(q) * scale

    def T_inv(self, z: torch.Tensor, method: str = "auto", n_iter: int = 100) -> torch.Tensor:
        """Invert T: ``fbp`` (fast, approximate) or ``cg`` (least squares on T^T T)."""
        if method == "auto":
            method = "fbp"
        if method == "fbp":
            return self.fbp(z)
        if method == "cg":
            x0 = self.fbp(z)
            return conjugate_gradient(
                lambda v: self.T_adjoint(self.T(v)), self.T_adjoint(z), n_iter=n_iter, x0=x0
            )
        raise ValueError(f"method must be 'auto', 'fbp' or 'cg', got {method!r}")

    def measured_rows(self) -> torch.Tensor | None:
        """Indices of fully measured angles when Λ keeps whole rows (sparse view), else None."""
        sel = self._line_selection()
        return sel[1] if sel is not None and sel[0] == 0 else None

    def astra_iterative(self, y: torch.Tensor, algorithm: str, n_iter: int) -> torch.Tensor:
        """Run ASTRA's SIRT or CGLS on the measured angles (CUDA variant on a GPU).

        Needs a row mask (sparse view); for other masks use the operator-level solvers.
        """
        sub = self._measured_projector()
        if sub is None:
            raise ValueError(f"{algorithm} needs a sparse-view (row) mask; use 'fista-tv'")
        n = self.geometry.image_size
        out = np.zeros((y.shape[0], n, n), dtype=np.float32)
        for b in range(y.shape[0]):
            sino = np.ascontiguousarray(y[b, 0].detach().cpu().numpy(), dtype=np.float32)
            sub.run(algorithm, out[b], sino, n_iter)
        return torch.from_numpy(out).unsqueeze(1).to(y.device)


def uniform_angles(n: int, beam: str = "parallel") -> tuple[float, ...]:
    """n angles spread evenly over [0, π) (parallel) or [0, 2π) (fan)."""
    span = math.pi if beam == "parallel" else 2 * math.pi
    return tuple(float(a) for a in np.arange(n) * span / n)


def sparse_view(
    image_size: int,
    n_views: int,
    beam: str = "parallel",
    n_full_views: int | None = None,
    **geometry: float,
) -> CTOperator:
    """Sparse-view CT: T on a dense set of ``n_full_views`` angles, Λ keeps every k-th.

    The dense set defaults to the smallest multiple of ``n_views`` that is at least 180
    (parallel) or 360 (fan), so the measured angles are exactly a subset of T's angles.
    """
    base = 180 if beam == "parallel" else 360
    if n_full_views is None:
        n_full_views = n_views * math.ceil(base / n_views)
    if n_full_views % n_views:
        raise ValueError(f"n_full_views ({n_full_views}) must be a multiple of n_views ({n_views})")
    geometry.setdefault("n_detectors", default_detectors(image_size, beam, geometry))
    geom = CTGeometry(
        image_size=image_size, angles=uniform_angles(n_full_views, beam), beam=beam, **geometry
    )
    mask = torch.zeros(n_full_views, geom.n_detectors, dtype=torch.bool)
    mask[:: n_full_views // n_views] = True
    return CTOperator(geom, mask)


def default_detectors(image_size: int, beam: str, geometry: dict) -> int:
    """Enough bins to cover the image diagonal (magnified onto the detector for fan beam)."""
    spacing = geometry.get("detector_spacing", 1.0)
    width = image_size * geometry.get("pixel_size", 1.0) * math.sqrt(2)
    if beam == "fan":
        d_so, d_od = geometry["source_distance"], geometry["detector_distance"]
        width *= (d_so + d_od) / d_so
    return int(math.ceil(width / spacing)) + 2


def remove_metal_trace(
    op: CTOperator,
    y: torch.Tensor,
    metal: torch.Tensor | None = None,
    threshold_hu: float | None = None,
) -> tuple[CTOperator, torch.Tensor, torch.Tensor]:
    """Metal artifact removal as an inverse problem: drop the metal trace from the data.

    ``y`` is a measurement of ``op`` (whose rows are all measured). The metal mask is given,
    or found by thresholding the FBP of ``y`` at ``threshold_hu`` (HU, with the model's map
    x = (HU + 1000) / 4000) and dilating by one pixel for partial volume; one mask serves
    the whole batch (their union). Returns the operator that measures only the bins whose
    rays miss the metal, those bins of ``y``, and the mask.
    """
    if op.measured_rows() is None or len(op.measured_rows()) != len(op.geometry.angles):
        raise ValueError("metal trace removal needs a fully sampled sinogram (every view)")
    full = op.pad(y)
    if metal is None:
        if threshold_hu is None:
            raise ValueError("give a metal mask or metal_threshold_hu")
        unit = (threshold_hu + 1000.0) / 4000.0
        x = op.fbp(full)
        found = (x > unit).any(dim=0, keepdim=True).float()
        metal = torch.nn.functional.max_pool2d(found, 3, stride=1, padding=1)[0, 0] > 0
    if tuple(metal.shape) != (op.image_size, op.image_size):
        raise ValueError(f"metal mask must be {op.image_size}x{op.image_size}")
    mar = metal_trace_operator(op, metal.bool())
    return mar, mar.subsample(full), metal.bool()


def metal_trace_operator(base: CTOperator, metal: torch.Tensor) -> CTOperator:
    """Metal artifact removal: Λ drops every bin whose ray crosses the metal mask.

    :param base: operator supplying the dense geometry (its own mask is ignored).
    :param metal: boolean ``(H, W)`` image-space metal mask.
    """
    trace = base.T(metal.float()[None, None])[0, 0] > 1e-6
    return CTOperator(base.geometry, ~trace)
