"""Classical reconstructions to compare against: FBP, SIRT, CGLS, FISTA-TV for CT; zero-filled
(root sum of squares over coils), SENSE, L1-wavelet and TV-regularised SENSE for MRI.

Defaults were tuned on 128² phantoms in the model's [0, 1] intensity range:
SIRT 200 iterations, CGLS 30 (it semi-converges: more iterations amplify noise and
streaks), FISTA-TV 200 iterations with TV weight 2e-3 for CT (sinogram values are line
integrals in pixel units) and 1e-3 for MRI (orthonormal FFT keeps image units). SENSE is CG
on the normal equations (Pruessmann et al. 2001), 30 iterations with Tikhonov λ = 1e-2;
L1-wavelet SENSE is sigpy's ``L1WaveletRecon`` (Daubechies-4, weight 1e-3), as the field
runs it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.data import mr_scale
from models.physics.base import LinearOperator, conjugate_gradient
from models.physics.ct import CTOperator
from models.physics.mri import MRIOperator, MultiCoilMRIOperator
from models.sde import per_sample


def _difference(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Forward differences along ``dim``, zero at the last index (Neumann boundary)."""
    n = x.shape[dim]
    d = torch.zeros_like(x)
    d.narrow(dim, 0, n - 1).copy_(x.narrow(dim, 1, n - 1) - x.narrow(dim, 0, n - 1))
    return d


def _divergence(p: torch.Tensor, dim: int) -> torch.Tensor:
    """The negative adjoint of :func:`_difference` along ``dim``."""
    n = p.shape[dim]
    d = torch.zeros_like(p)
    d.narrow(dim, 0, 1).copy_(p.narrow(dim, 0, 1))
    d.narrow(dim, 1, n - 2).copy_(p.narrow(dim, 1, n - 2) - p.narrow(dim, 0, n - 2))
    d.narrow(dim, n - 1, 1).copy_(-p.narrow(dim, n - 2, 1))
    return d


def _dual_projection(v: torch.Tensor, weight, dims: tuple[int, ...], n_iter: int) -> torch.Tensor:
    """argmin_u ½||u − v||² + weight·Σ_pixels ||(∂_d u)_{d ∈ dims}||₂ by Chambolle's dual
    projection (step 0.248 < 1/(4 len(dims))); complex values: real and imaginary jointly."""
    p = torch.zeros(*v.shape, len(dims), dtype=v.dtype, device=v.device)

    def div(q: torch.Tensor) -> torch.Tensor:
        return sum(_divergence(q[..., i], d) for i, d in enumerate(dims))

    for _ in range(n_iter):
        u = div(p) - v / weight
        g = torch.stack([_difference(u, d) for d in dims], dim=-1)
        norm = g.abs().pow(2).sum(-1, keepdim=True).sqrt()
        p = (p + 0.248 * g) / (1 + 0.248 * norm)
    return v - weight * div(p)


def tv_prox(v: torch.Tensor, weight: float | torch.Tensor, n_iter: int = 30) -> torch.Tensor:
    """argmin_u ½||u − v||² + weight·TV(u), isotropic TV, by Chambolle's dual projection.

    ``weight`` is a number or a tensor that broadcasts against ``v`` (one per sample);
    samples of weight 0 come back unchanged."""
    if not torch.is_tensor(weight):
        if weight <= 0:
            return v
    elif bool((weight <= 0).all()):
        return v
    else:
        weight = weight.to(v.real.dtype).clamp_min(1e-12)
    return _dual_projection(v, weight, (-1, -2), n_iter)


def tv_prox_axis(
    v: torch.Tensor, weight: float | torch.Tensor, dim: int = 0, n_iter: int = 30
) -> torch.Tensor:
    """argmin_u ½||u − v||² + weight·Σ|u_{i+1} − u_i| along ``dim`` alone (anisotropic 1-D
    TV, e.g. across the slices of a volume), by the same dual projection as :func:`tv_prox`;
    complex values take the modulus of each difference."""
    if not torch.is_tensor(weight) and weight <= 0:
        return v
    if v.shape[dim] < 2:
        return v
    w = torch.as_tensor(weight, dtype=v.real.dtype).clamp_min(1e-12)
    return _dual_projection(v, w, (dim % v.ndim,), n_iter)


def fista_tv(
    op: LinearOperator,
    y: torch.Tensor,
    tv_weight: float,
    n_iter: int = 200,
    x0: torch.Tensor | None = None,
    nonneg: bool = True,
) -> torch.Tensor:
    """FISTA (Beck & Teboulle 2009) for ½||A x − y||² + tv_weight·TV(x), x ≥ 0.

    Step size 1/L with L = ||A||² from a power-iteration estimate (times 1.05 for safety).
    For MRI (an operator with ``adjoint_complex``) the image is complex, as MR images are,
    with the joint TV of its real and imaginary parts; the caller takes the magnitude.
    """
    lip = 1.05 * op.norm() ** 2
    complex_image = hasattr(op, "adjoint_complex")
    adjoint = op.adjoint_complex if complex_image else op.adjoint
    dtype = torch.complex64 if complex_image else torch.float32
    shape = (y.shape[0], 1, *op.image_shape)
    x = torch.zeros(shape, dtype=dtype) if x0 is None else x0.clone().to(dtype)
    z, t = x.clone(), 1.0
    for _ in range(n_iter):
        grad = adjoint(op.forward(z) - y)
        x_new = tv_prox(z - grad / lip, tv_weight / lip)
        if nonneg and not complex_image:
            x_new = x_new.clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return x


def fbp(op: CTOperator, y: torch.Tensor) -> torch.Tensor:
    """FBP from the measured angles (missing angles zero, weight rescaled by their share)."""
    rows = op.measured_rows()
    share = 1.0 if rows is None else len(rows) / op.mask.shape[0]
    return op.fbp(op.pad(y)) / share


def _ct_only(op: LinearOperator, method: str) -> CTOperator:
    if not isinstance(op, CTOperator):
        raise ValueError(
            f"method '{method}' is for CT; for MRI use 'zero-filled', 'sense', 'cs-wavelet' or "
            "'cs-tv'"
        )
    return op


def _mri_only(op: LinearOperator, method: str) -> LinearOperator:
    if not isinstance(op, MRIOperator | MultiCoilMRIOperator):
        raise ValueError(
            f"method '{method}' is for MRI; for CT use 'fbp', 'sirt', 'cgls' or 'fista-tv'"
        )
    return op


def _zero_filled(op: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    return _mri_only(op, "zero-filled").zero_filled(y)


def sense(op: LinearOperator, y: torch.Tensor, n_iter: int = 30, lam: float = 1e-2) -> torch.Tensor:
    """SENSE: the complex image minimising ||A x − y||² + λ||x||², by CG on the normal
    equations (AᴴA + λI) x = Aᴴ y (single- or multi-coil). Unregularised CG semi-converges:
    with estimated coil maps, their small errors are amplified by the g-factor as iterations
    go on, so λ = 1e-2 (images in [0, 1], maps of RSS 1) keeps it stable."""
    op = _mri_only(op, "sense")
    return conjugate_gradient(
        lambda v: op.adjoint_complex(op.forward(v)) + lam * v, op.adjoint_complex(y), n_iter
    )


def _full_kspace(op: LinearOperator, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-filled k-space ``(B, C, H, W)`` and maps ``(C, H, W)`` (ones for one coil)."""
    if isinstance(op, MRIOperator):
        return op.pad(y), torch.ones(1, *op.image_shape, dtype=torch.complex64)
    maps = op.sensitivities
    if op.whitening is not None:  # W F S = F (W S): W mixes coils pixel by pixel
        maps = torch.einsum("dc,chw->dhw", op.whitening, maps)
    return y * op.mask, maps


def cs_wavelet(
    op: LinearOperator, y: torch.Tensor, weight: float = 1e-3, n_iter: int = 100
) -> torch.Tensor:
    """L1-wavelet SENSE: min ½||A x − y||² + weight ||Ψ x||₁ (Daubechies-4), complex, by
    sigpy's ``L1WaveletRecon`` (FISTA), one slice at a time."""
    import sigpy.mri

    op = _mri_only(op, "cs-wavelet")
    k, maps = _full_kspace(op, y)
    mask = op.mask.numpy().astype("float32")
    slices = [
        sigpy.mri.app.L1WaveletRecon(
            k[b].numpy(), maps.numpy(), weight, weights=mask, max_iter=n_iter, show_pbar=False
        ).run()
        for b in range(len(k))
    ]
    return torch.stack([torch.as_tensor(s) for s in slices])[:, None].to(torch.complex64)


# Where an MR measurement's unit (models.data.mr_scale of its SENSE image) lands in the
# prior's [0, 1], and so the CS weights' (tuned on images in that range): below 1, as
# undersampling blurs the brightest thin structures (:func:`intensity_scale`); a prior's
# card may override it (ReconConfig.intensity_level).
LEVEL = 0.8
SCALE_CG_ITERS = 10  # SENSE iterations of the image that intensity_scale measures


def intensity_scale(op: LinearOperator, y: torch.Tensor, level: float = LEVEL) -> torch.Tensor:
    """Per measurement, the prior's intensity 1 in the measurement's units (B,): for MRI,
    :func:`models.data.mr_scale` of the magnitude of its SENSE image (a few CG iterations),
    over ``level``; ones for CT. The level leaves headroom: an undersampled image blurs thin
    bright structures (the scalp), so its unit reads up to ~25 % below the fully sampled
    image's, and the prior never saw intensities above 1."""
    b = y.shape[0]
    if not isinstance(op, MRIOperator | MultiCoilMRIOperator):
        return torch.ones(b, dtype=torch.float64)
    if not 0 < level <= 1:
        raise ValueError(f"intensity_level must lie in (0, 1], got {level}")
    with torch.no_grad():
        x = sense(op, y, n_iter=SCALE_CG_ITERS).abs().reshape(b, -1).double().numpy()
    units = [max(mr_scale(x[i]), 1e-30) / level for i in range(b)]
    return torch.tensor(units, dtype=torch.float64)


def _in_unit(method: Callable[[LinearOperator, torch.Tensor], torch.Tensor]):
    """``method`` run on MR data divided by their unit and its image multiplied back: for
    the nonlinear CS methods, whose weights hold for images in [0, 1], on data in any
    scanner's units."""

    def run(op: LinearOperator, y: torch.Tensor) -> torch.Tensor:
        unit = intensity_scale(op, y).to(torch.float32)
        x = method(op, y / per_sample(unit, y).to(y.dtype))
        return x * per_sample(unit, x)

    return run


METHODS: dict[str, Callable[[LinearOperator, torch.Tensor], torch.Tensor]] = {
    "fbp": lambda op, y: fbp(_ct_only(op, "fbp"), y),
    "sirt": lambda op, y: _ct_only(op, "sirt").astra_iterative(y, "SIRT", 200),
    "cgls": lambda op, y: _ct_only(op, "cgls").astra_iterative(y, "CGLS", 30),
    "fista-tv": lambda op, y: fista_tv(_ct_only(op, "fista-tv"), y, 2e-3),
    "zero-filled": _zero_filled,
    "sense": lambda op, y: sense(op, y).abs(),
    "cs-wavelet": _in_unit(lambda op, y: cs_wavelet(op, y).abs()),
    "cs-tv": _in_unit(lambda op, y: fista_tv(_mri_only(op, "cs-tv"), y, 1e-3).abs()),
}


def baseline_name(op: LinearOperator) -> str:
    """The classical reconstruction shown beside a score-based one: zero-filled for MRI,
    FBP for CT."""
    return "zero-filled" if isinstance(op, MRIOperator | MultiCoilMRIOperator) else "fbp"


def reconstruct_baseline(op: LinearOperator, y: torch.Tensor, method: str) -> torch.Tensor:
    """Run a classical method by name (see ``METHODS``) on measurements ``y``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    with torch.no_grad():
        return METHODS[method](op, y)


def classical_image(op: LinearOperator, y: torch.Tensor) -> torch.Tensor:
    """The classical image shown beside a result (:func:`baseline_name`) as a magnitude in
    [0, 1]: what an OOD check calibrated on the baseline scores (models.ood)."""
    x = reconstruct_baseline(op, y, baseline_name(op))
    return (x.abs() if x.is_complex() else x).clamp(0, 1)
