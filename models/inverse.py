"""Solving inverse problems with an unconditional score prior (seed 002, ch. 8, app. B.6).

``reconstruct(operator, y, prior, config)`` draws K posterior samples per measurement as one
batch with one of the samplers of :mod:`models.sampling`, with a data-consistency step
through the samplers' hooks, and returns their mean, per-pixel standard deviation, NFE,
data residual, the noise level it assumed, warnings, and provenance.

Data consistency (``ReconConfig.method``; every step is the solution of a proximal problem,
computed exactly where the operator allows it):

- ``proximal`` (Theorem 8.1): Eq. 8.8 with the Euclidean norm,
  x' = argmin_z (1 − λ)||z − x||² + λ min{||z − u||² : A u = ŷ_t}, whose solution is
  x' = x + λ A⁺(ŷ_t − A x) (:func:`proximal_step`). For A = P(Λ) T with unitary T (MRI)
  A⁺ = T⁻¹ P⁻¹(Λ) and this is Eq. 8.9 exactly; for CT, where the Radon transform on the
  dense angle set is not invertible, A⁺ is computed by conjugate gradients, so the step
  is still the exact solution of Eq. 8.8 rather than FBP's approximation of it (which
  removed only n_views/n_dense of the residual). ŷ_t = α(t) y + β(t) A z (ch. 8.3.2).
- ``map`` (the default): x' = argmin ||A x' − y||² + μ_t ||x' − x||² with
  μ_t = σ_y² / r_t², r_t = ρ β(t)/α(t): the maximum a posteriori step for Gaussian noise of
  std σ_y when the current estimate is off by about r_t (:func:`prox_step`). For noiseless
  data μ_t = 0 and it is the projection onto {A x = y}; noisy data are never fitted
  exactly. Closed form for single-coil MRI, conjugate gradients otherwise.
  With ``tv`` = λ > 0 the step also carries an isotropic total-variation term,
  x' = argmin ½||A x' − y||² + ½μ_t ||x' − x||² + λ σ_y² TV(x') (:func:`prox_tv_step`):
  the MAP step for a prior that is the score model's Gaussian around x times exp(−λ TV),
  which holds the solution to piecewise-smooth images where the score model is unsure
  (images unlike its training data) and, like DiffusionMBIR's TV, costs no network call.
- ``score-sde``: the crude conditional score of app. B.5.9 (Eq. B.36),
  s(x, t) + ∇ log p_t(ŷ_t | x) with p_t(ŷ_t | x) ≈ N(A x, (α² σ_y² + β² ||A||²) I).
- ``langevin``: annealed Langevin dynamics on s(x, σ) + Aᵀ(y − A x)/(σ_y² + γ² σ²) (Jalal et
  al.); the other comparison method of ch. 8.4 (sampler ``ald`` only).

MR images are complex: for an MRI operator the image in data consistency is
x = (u + i v) e^{iφ}, where u is what the sampler and the prior see (a magnitude-like real
image), v the part of the image in quadrature that only the data determine, and φ a smooth
phase estimated from the calibration lines (Chung & Ye score the real and imaginary parts
alike; a magnitude prior scores u only). Results are |x|; the phase is kept.

MR k-space arrives in a scanner's arbitrary units, and the prior learned magnitudes divided
by the 99.5th percentile of their foreground (models.data.mr_scale): each MR measurement is
divided by that unit, estimated from its own SENSE image (:func:`intensity_scale`), before
the prior sees it, and the results are multiplied back, so ``reconstruct(a y) = a
reconstruct(y)``. CT sinograms are in physical units and are left as they are.

The noise level σ_y is the spec's ``noise_std`` when stated, else estimated from the data
(:mod:`models.noise`), and is reported (``noise_std_used``). Each result is checked for
divergence (values far outside the data range, a saturated posterior std, non-finite
values): ``Reconstruction.diverged`` says why, so a caller can fail the job.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch

from models.baselines import LEVEL, classical_image, intensity_scale
from models.holdout import HOLDOUT, choose
from models.nets.patch import partition_pixels, tiled_pixels, tiled_score
from models.noise import estimate_noise
from models.ood import OODCheck
from models.ood import warning as ood_warning
from models.physics.base import LinearOperator, conjugate_gradient, real_inner
from models.physics.mri import MRIOperator
from models.sampling.pc import Cancelled, Progress
from models.sampling.registry import sample
from models.sde import SDE, VESDE, RowGenerators, ScoreFn, per_sample, randn

METHODS = ("map", "proximal", "score-sde", "langevin")
RECON_SAMPLERS = ("fast", "pc", "em", "ald")
# Reference pixels above this (on the prior's [0, 1] scale) are the object, where the
# posterior std's coverage is fitted and measured (the background is trivially covered).
OBJECT_LEVEL = 0.05
DEFAULT_SAMPLER, DEFAULT_NFE = "fast", 100
__all__ = ["Cancelled", "Prior", "ReconConfig", "Reconstruction", "reconstruct"]

# Divergence: a reconstruction on the [0, 1] scale with more than 1 % of its pixels beyond
# these bounds, or a posterior std above STD_SATURATED on average, is not an image.
RANGE_LOW, RANGE_HIGH, RANGE_FRACTION, STD_SATURATED = -0.5, 1.5, 0.01, 0.25


@dataclass
class Prior:
    """A score model ready for reconstruction: s(x, t), its SDE and image size."""

    score_fn: ScoreFn
    sde: SDE
    image_size: int
    name: str = "custom"
    sha256: str = ""
    card: dict = field(default_factory=dict)
    engine: str = "torch fp32"  # what runs the network: torch fp32 / torch bf16 / onnxruntime
    # The torch network's (score, engine) where another engine runs it: for what that engine's
    # graph cannot do (attention within windows, which the ONNX graph traced over the whole map).
    torch_path: tuple[ScoreFn, str] | None = None

    @classmethod
    def load(cls, model: str, bf16: bool | None = False, backend: str = "torch") -> Prior:
        """A bundled prior by name (``ct-default``) or a model directory; ``bf16`` autocast
        (``None``: where :func:`models.registry.bf16_is_fast`); ``backend`` ``onnx`` runs
        its network on ONNX Runtime (:mod:`models.onnx_score`), exported once per weights
        hash into the temporary folder."""
        from models.registry import bf16_is_fast, load_model, score_fn_of

        net, sde, card = load_model(model)
        if backend not in ("torch", "onnx"):
            raise ValueError(f"backend must be 'torch' or 'onnx', got {backend!r}")
        bf16 = bf16_is_fast() if bf16 is None else bf16
        engine = f"torch {'bf16' if bf16 else 'fp32'}"
        score = score_fn_of(net, sde, bf16=bf16)
        torch_path = None
        if backend == "onnx":
            import tempfile

            kind = (card.get("architecture") or {}).get("name")
            if kind != "ncsnpp":
                raise ValueError(f"the ONNX backend runs whole-image NCSN++ priors, not {kind}")

            from models.onnx_score import export, onnx_score_fn

            size = int(card["image_size"])
            digest = card.get("weights_sha256", "")[:16] or "unhashed"
            path = Path(tempfile.gettempdir()) / "scorerecon-onnx" / f"{digest}-{size}.onnx"
            if digest == "unhashed" or not path.exists():
                export(net, path, size, int(card.get("architecture", {}).get("in_channels", 1)))
            torch_path = (score, engine)
            score, engine = onnx_score_fn(path), "onnxruntime fp32"
        return cls(
            score,
            sde,
            int(card["image_size"]),
            card.get("name", str(model)),
            card.get("weights_sha256", ""),
            card,
            engine,
            torch_path,
        )

    @property
    def any_size(self) -> bool:
        """True for a patch prior (PaDIS), whose network works at any image size."""
        return (self.card.get("architecture") or {}).get("name") == "ncsnpp-patch"

    @property
    def size_multiple(self) -> int:
        """What an image side must be a multiple of for the network to take it whole."""
        return size_multiple(self.card)

    @property
    def modality(self) -> str | None:
        """``ct`` or ``mri`` when the card says what the prior was trained on."""
        from models.registry import card_modality

        return card_modality(self.card, self.name)


@dataclass
class ReconConfig:
    """Sampler and data-consistency settings.

    Defaults: the fast sampler at 100 NFE with the ``map`` step, which is the best sampler at
    that budget on held-out data (``docs/benchmarks/quality.md``); PC with λ and r of
    app. B.6.4 remains available by name. A prior's card may hold tuned values
    (``recon`` → modality → settings), which :meth:`for_prior` applies.
    """

    sampler: str = DEFAULT_SAMPLER
    method: str = "auto"  # map, except proximal for PC on operators A = P(Λ)T
    n_steps: int = DEFAULT_NFE
    lam: float = 1.0  # λ of Eqs. 8.8-8.9
    snr: float = 0.16  # r, the corrector's signal-to-noise ratio
    rho: float = 1.0  # r_t = ρ β/α: the estimate's error scale in the map step
    cg_iters: int = 5  # per data-consistency step solved by CG
    final_projection: bool = True  # exact projection at the end for noiseless data
    final_cg_iters: int = 400
    eta: float = 0.5  # fast sampler: fraction of fresh noise when re-noising
    tv: float = 0.0  # fast sampler: λ, the weight λ σ_y² of a TV term in its map step (0: none)
    tv_iters: int = 10  # FISTA iterations of that step
    tv_z: float = 0.0  # λ_z: weight λ_z σ_y² of TV across the slices of a stack (0: none)
    # fast sampler: candidate λ, chosen per slice by k-space hold-out (models/holdout.py);
    # empty: ``tv`` for every slice. Costs one single-sample solve per candidate.
    tv_holdout: tuple[float, ...] = ()
    start: float = 1.0  # fast sampler: starting time as a fraction of T (< 1: from the data)
    start_cg_iters: int = 20  # CG iterations of the least-squares image it then starts from
    clip: bool = True  # fast sampler: clip each clean estimate to [0, 1] before data consistency
    patch_wise: bool = True  # images larger than a whole-image prior: patch-wise, or whole
    windowed_attention: bool = False  # whole: attention within windows of the trained span
    langevin_gamma: float = 1.0
    samples: int = 1  # posterior samples K averaged into the result when the caller names none
    std_scale: float = 0.0  # c of :func:`calibrated_std` fitted on real validation slices; 0: raw
    ood: bool = True  # score each slice against the prior's calibrated OOD check, if it has one
    intensity_level: float = LEVEL  # MR: where a measurement's unit lands in the prior's range

    def nfe_per_step(self) -> int:
        return 2 if self.sampler == "pc" else 3 if self.sampler == "ald" else 1

    def holdout_candidates(self) -> tuple[float, ...]:
        """The λ a hold-out chooses among: ``tv_holdout`` where its TV map step runs (the
        fast sampler with the map step), else none. Each costs one single-sample solve on
        operators that can hold lines out (models/holdout.py)."""
        runs = self.sampler == "fast" and self.method in ("auto", "map", "cg")
        return tuple(float(v) for v in self.tv_holdout) if runs else ()

    @classmethod
    def for_prior(
        cls,
        prior: Prior | None,
        modality: str,
        sampler: str | None = None,
        nfe: int | None = None,
        operator: LinearOperator | None = None,
    ) -> ReconConfig:
        """The defaults, then the prior card's tuned values for this modality and sampler,
        then the caller's sampler and NFE budget. The card's ``recon`` → modality holds the
        default sampler's values, and other samplers' under ``samplers`` → name; values
        tuned for an acquisition (``multicoil``, :func:`acquisition`) of ``operator`` under
        that name override the default sampler's, and so do those under ``larger`` for an
        ``operator`` whose image is larger than the prior's trained size."""
        card = prior.card if prior else {}
        size = tuple(operator.image_shape) if operator is not None else None
        return cls.from_card(card, modality, sampler, nfe, acquisition(operator), size)

    @classmethod
    def from_card(
        cls,
        card: dict,
        modality: str,
        sampler: str | None = None,
        nfe: int | None = None,
        acquisition: str | None = None,
        image_size: tuple[int, ...] | None = None,
    ) -> ReconConfig:
        """:meth:`for_prior` from a model card alone (no weights loaded: the gateway);
        ``image_size``: the image's (rows, cols), for the card's ``larger`` values."""
        tuned = ((card or {}).get("recon") or {}).get(modality) or {}
        if acquisition and isinstance(tuned.get(acquisition), dict):
            tuned = {**tuned, **tuned[acquisition]}
        trained = int((card or {}).get("image_size") or 0)
        if image_size and trained and max(image_size) > trained:
            # Chosen where the prior meets a larger image (benchmarks/larger_images.py: K and
            # CG iterations, the best PSNR within the time floor against FISTA-TV there).
            tuned = {**tuned, **(tuned.get("larger") or {})}
        sampler = sampler or tuned.get("sampler", DEFAULT_SAMPLER)
        config = cls(sampler=sampler)
        if tuned.get("sampler", DEFAULT_SAMPLER) != sampler:
            # Another sampler's tuned values (``scorerecon tune --sampler pc``), if any.
            tuned = (tuned.get("samplers") or {}).get(sampler) or {}
            tuned = {**tuned, "sampler": sampler} if tuned else tuned
        if tuned.get("sampler", DEFAULT_SAMPLER) == sampler:
            names = {f.name for f in fields(cls)} - {"sampler", "n_steps"}
            for key, value in tuned.items():
                if key in names:
                    setattr(config, key, type(getattr(config, key))(value))
        config.n_steps = steps_for_nfe(config, nfe or int(tuned.get("nfe", DEFAULT_NFE)))
        return config


def size_multiple(card: dict) -> int:
    """What an image side must be a multiple of for a card's network to take it whole: 2
    per downsampling of its U-Net (``channel_mult`` levels; NCSN wraps the same U-Net)."""
    from models.nets.ncsnpp import NetConfig

    arch = (card or {}).get("architecture") or {}
    return 2 ** (len(arch.get("channel_mult") or NetConfig.channel_mult) - 1)


def network_pixels(card: dict, shape: tuple[int, int], config: ReconConfig) -> int:
    """The pixels the score network evaluates, at most, per image and score evaluation when
    a card's prior reconstructs a rows × cols image at ``config``: its own size padded, a
    larger image patch-wise or whole (:func:`models.nets.patch.tiled_pixels`), a patch
    prior's partition into its patches. What a job's cost counts (the gateway's limits),
    rather than rows × cols, which undercounts padding and partitions."""
    rows, cols = (int(v) for v in shape)
    arch = (card or {}).get("architecture") or {}
    if arch.get("name") == "ncsnpp-patch":
        return partition_pixels(rows, cols, int(arch["patch_size"]))
    size = int((card or {}).get("image_size") or max(rows, cols))
    return tiled_pixels(rows, cols, size, None if config.patch_wise else size_multiple(card))


def acquisition(operator: LinearOperator | None) -> str | None:
    """``multicoil`` for multi-coil MRI, whose tuned values may differ from single-coil's
    (the card's ``recon`` → ``mri`` → ``multicoil``); ``None`` otherwise."""
    return "multicoil" if getattr(operator, "coils", 1) > 1 else None


def steps_for_nfe(config: ReconConfig, nfe: int) -> int:
    """The step count that spends about ``nfe`` network evaluations with this sampler."""
    return max(2, round(nfe / config.nfe_per_step()))


@dataclass
class Reconstruction:
    mean: torch.Tensor  # (B, 1, H, W), magnitude for MRI
    std: torch.Tensor  # (B, 1, H, W), over the K posterior samples
    samples: torch.Tensor  # (B, K, H, W)
    nfe: int
    residual: list[float]  # ||A x̄ − y|| / ||y|| per slice
    seconds: float
    provenance: dict
    noise_std_used: list[float] = field(default_factory=list)  # σ_y per slice
    phase: torch.Tensor | None = None  # (B, 1, H, W) radians, MRI only
    warnings: list[str] = field(default_factory=list)
    diverged: str | None = None  # why the result is not an image, or None
    ood: list[dict] = field(default_factory=list)  # per slice, models.ood.OODCheck.assess

    def centre_columns(self, columns: int) -> Reconstruction:
        """The images cut to their central ``columns`` (an MR scanner's displayed field of
        view, reconSpace, of an image solved on all encoded lines)."""
        phase = None if self.phase is None else centre_columns(self.phase, columns)
        return replace(
            self,
            mean=centre_columns(self.mean, columns),
            std=centre_columns(self.std, columns),
            samples=centre_columns(self.samples, columns),
            phase=phase,
        )


def centre_columns(x: torch.Tensor, columns: int) -> torch.Tensor:
    """The central ``columns`` of images (…, H, W)."""
    left = (x.shape[-1] - columns) // 2
    return x[..., left : left + columns].contiguous()


def merge(parts: list[Reconstruction]) -> Reconstruction:
    """Reconstructions of consecutive slices (or batches) as one, in order."""

    def cat(name: str) -> torch.Tensor | None:
        values = [getattr(p, name) for p in parts]
        return None if any(v is None for v in values) else torch.cat(values)

    first = parts[0]
    return Reconstruction(
        mean=cat("mean"),
        std=cat("std"),
        samples=cat("samples"),
        nfe=sum(p.nfe for p in parts),
        residual=[r for p in parts for r in p.residual],
        seconds=sum(p.seconds for p in parts),
        provenance={
            **first.provenance,
            **{  # per slice: each part's list, in order
                key: [v for p in parts for v in p.provenance[key]]
                for key in ("noise_std_used", "intensity_scale", "tv_used")
                if all(key in p.provenance for p in parts)
            },
        },
        noise_std_used=[s for p in parts for s in p.noise_std_used],
        phase=cat("phase"),
        warnings=[w for p in parts for w in p.warnings],
        ood=[v for p in parts for v in p.ood],
        diverged=next((p.diverged for p in parts if p.diverged is not None), None),
    )


def _coefficients(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t), β(t): x_t = α x_0 + β z, so ŷ_t = α y + β A z follows the same law (ch. 8.3.2)."""
    mean, std = sde.marginal_prob(torch.ones(len(t), 1, device=t.device), t)
    return mean.flatten(), std


def _adjoint(op: LinearOperator, x_like: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Aᴴ into the image domain of ``x_like`` (complex images need the complex adjoint)."""
    return op.adjoint_complex if x_like.is_complex() else op.adjoint


def prox_step(
    op: LinearOperator,
    x: torch.Tensor,
    y: torch.Tensor,
    mu: torch.Tensor | float,
    iters: int,
    each: Callable[[], None] | None = None,
) -> torch.Tensor:
    """argmin ||A x' − y||² + μ ||x' − x||² (μ ≥ 0 per sample); μ = 0: the nearest x' to x
    with A x' = y (the minimum-norm correction).

    Closed form for single-coil MRI (T = F unitary): on measured k-space samples
    (y + μ F x)/(1 + μ), elsewhere F x. Otherwise CG on (AᴴA + μ) δ = Aᴴ(y − A x) from
    δ = 0, whose iterates stay in range(Aᴴ) + μ-damped directions, in float64 for MRI.
    """
    mu_t = torch.as_tensor(mu, dtype=torch.float64).reshape(-1)
    if isinstance(op, MRIOperator) and x.is_complex():
        z = op.T(x)
        measured = op.subsample(z)
        w = per_sample(1.0 / (1.0 + mu_t.to(torch.float32)), measured)
        return op.T_inv(z + op.pad(w * (y - measured)))
    adjoint = _adjoint(op, x)
    mu_b = per_sample(mu_t.to(torch.float32), x)
    dtype = x.dtype
    work = torch.complex128 if x.is_complex() else torch.float64
    rhs = adjoint(y - op.forward(x)).to(work)

    def normal(v: torch.Tensor) -> torch.Tensor:
        return adjoint(op.forward(v.to(dtype))).to(work) + mu_b * v

    return x + conjugate_gradient(normal, rhs, n_iter=iters, each=each).to(dtype)


def prox_tv_step(
    op: LinearOperator,
    x: torch.Tensor,
    y: torch.Tensor,
    mu: torch.Tensor | float,
    weight: torch.Tensor | float,
    iters: int,
    cg_iters: int,
    lipschitz: float,
    weight_z: float = 0.0,
    slices: int = 1,
) -> torch.Tensor:
    """argmin ½||A x' − y||² + ½μ ||x' − x||² + weight·TV(x') + weight_z·TV_z(x') (per
    sample; isotropic TV in the plane, of the real and imaginary parts jointly for complex
    images; TV_z across the ``slices`` of a stack, whose rows are slice-major: slice i's
    samples are rows i·K … i·K + K − 1, the layout of :func:`reconstruct`).

    FISTA (Beck & Teboulle 2009) with step 1/(L + μ), ``lipschitz`` L ≥ ||A||², started
    from the TV-free solution (:func:`prox_step`, ``cg_iters``), which it equals where
    both weights are 0; ``iters`` iterations, each one A, one Aᴴ and the TV proxes (the
    in-plane and the z prox in turn: the prox of their sum only approximately, as
    DiffusionMBIR's split).
    """
    from models.baselines import tv_prox, tv_prox_axis

    start = prox_step(op, x, y, mu, cg_iters)
    w = torch.as_tensor(weight, dtype=torch.float32).reshape(-1).expand(x.shape[0])
    use_z = weight_z > 0 and slices > 1
    if iters < 1 or (bool((w <= 0).all()) and not use_z):
        return start
    adjoint = _adjoint(op, x)
    mu_b = per_sample(torch.as_tensor(mu, dtype=torch.float32).reshape(-1), x)
    step = 1.0 / (lipschitz + mu_b)
    w_b = per_sample(w, x)
    current, z, t = start, start, 1.0
    for _ in range(iters):
        grad = adjoint(op.forward(z) - y) + mu_b * (z - x)
        nxt = tv_prox(z - step * grad, w_b * step, n_iter=10)
        if use_z:
            stack = nxt.reshape(slices, -1, *nxt.shape[1:])
            nxt = tv_prox_axis(stack, weight_z * float(step.min()), 0, 10).reshape(nxt.shape)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        z = nxt + ((t - 1) / t_next) * (nxt - current)
        current, t = nxt, t_next
    return current if use_z else torch.where(w_b > 0, current, start)


def proximal_step(
    op: LinearOperator, x: torch.Tensor, y: torch.Tensor, lam: float, iters: int = 30
) -> torch.Tensor:
    """Theorem 8.1 / Eq. 8.8 (Euclidean norm): x + λ A⁺(y − A x); Eq. 8.9 when T is unitary."""
    return x + lam * (prox_step(op, x, y, 0.0, iters) - x)


def project_affine(
    op: LinearOperator,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    rounds: int = 3,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The nearest x' to x with A x' = y, by CGLS restarted up to ``rounds`` times until
    ||A x' − y|| ≤ 1e-5 ||y|| (CG stops relative to its starting residual). ``cancel`` is
    checked before every CG iteration (up to ``rounds × iters``, longer than many sampler
    steps) and raises :class:`Cancelled`."""
    y_norm = float(real_inner(y, y)) ** 0.5
    each = None if cancel is None else lambda: _stop_if(cancel, "the final projection")
    for _ in range(rounds):
        r = y - op.forward(x)
        if float(real_inner(r, r)) ** 0.5 <= 1e-5 * y_norm:
            break
        x = prox_step(op, x, y, 0.0, iters, each)
    return x


def _stop_if(cancel: Callable[[], bool], where: str) -> None:
    """Raise :class:`Cancelled` if ``cancel()`` says so."""
    if cancel():
        raise Cancelled(f"cancelled during {where}")


def _resolve_method(op: LinearOperator, config: ReconConfig) -> str:
    method = config.method
    if method == "auto":
        method = "proximal" if config.sampler == "pc" and op.has_decomposition else "map"
        method = "langevin" if config.sampler == "ald" else method
    if method == "cg":  # the earlier name of the least-squares step
        method = "map"
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} or 'auto'; got {method!r}")
    if method == "langevin" and config.sampler != "ald":
        raise ValueError("method 'langevin' runs with sampler 'ald'")
    if config.sampler == "fast" and method not in ("map", "proximal"):
        raise ValueError("sampler 'fast' runs with method 'map' or 'proximal'")
    return method


class _ImageDomain:
    """Between the sampler's real images u and the operator's images x.

    CT: x = u. MRI: x = (u + i v) e^{iφ} with φ from the calibration lines, fixed; the prior
    estimate of v, the quadrature part, is zero, and each data-consistency step's v is kept
    (one per posterior sample) for the magnitude and phase of the result.
    """

    def __init__(self, op: LinearOperator, y: torch.Tensor):
        self.complex = op.complex_measurements and hasattr(op, "adjoint_complex")
        self.phase = self.v = None
        if self.complex:
            low = op.low_resolution(y) if hasattr(op, "low_resolution") else op.adjoint_complex(y)
            self.phase = _smooth_phase(low)
            self.v = torch.zeros(low.shape, dtype=torch.float32)

    def join(self, u: torch.Tensor) -> torch.Tensor:
        """The complex image whose in-phase part is ``u`` and whose quadrature part is its
        prior estimate, zero: a smooth-phase image has none (phase-constrained). Only the
        data put some back, in each step's correction (kept in ``v`` for the result)."""
        return torch.complex(u, torch.zeros_like(u)) * self.phase if self.complex else u

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """u from a data-consistent complex image, whose smoothed phase then replaces φ:
        as the image sharpens, so does the phase estimate (first from the calibration
        lines alone)."""
        if not self.complex:
            return x
        self.phase = _smooth_phase(x, keep=float("inf"), fallback=self.phase)
        w = x * self.phase.conj()
        self.v = w.imag.to(torch.float32)
        return w.real.to(torch.float32)

    def image(self, u: torch.Tensor) -> torch.Tensor:
        """The image the last data-consistency step left: (u + i v) e^{iφ} (MRI), u (CT)."""
        return torch.complex(u, self.v) * self.phase if self.complex else u

    def magnitude(self, u: torch.Tensor) -> torch.Tensor:
        return self.image(u).abs() if self.complex else u

    def angle(self, u: torch.Tensor) -> torch.Tensor | None:
        return self.image(u).angle() if self.complex else None


def _smooth_phase(
    low: torch.Tensor, keep: float = 0.05, fallback: torch.Tensor | None = None
) -> torch.Tensor:
    """e^{iφ} from a low-resolution complex image: its own phase where its magnitude exceeds
    ``keep`` of the peak; elsewhere (background, and the small negative lobes a low-pass
    leaves beside edges, whose phase would flip by π) the phase of a much smoother version,
    which carries the object's smooth phase out into those pixels (``keep`` = ∞: the smooth
    phase everywhere; ``fallback`` where even that has no magnitude)."""
    from models.physics.mri import fft2c, ifft2c

    rows, cols = low.shape[-2:]
    fr = torch.fft.fftshift(torch.fft.fftfreq(rows)) * rows
    fc = torch.fft.fftshift(torch.fft.fftfreq(cols)) * cols
    radius2 = fr[:, None] ** 2 + fc[None, :] ** 2
    smooth = ifft2c(fft2c(low) * torch.exp(-radius2 / (2 * (max(rows, cols) / 32) ** 2)))
    peak = per_sample(low.abs().flatten(1).amax(dim=1).clamp_min(1e-30), low)
    unit_low = low / low.abs().clamp_min(1e-30)
    unit_smooth = smooth / smooth.abs().clamp_min(1e-30)
    default = torch.ones_like(unit_smooth) if fallback is None else fallback
    unit = torch.where(smooth.abs() > 1e-6 * peak, unit_smooth, default)
    return torch.where(low.abs() > keep * peak, unit_low, unit).to(torch.complex64)


def reconstruct(
    operator: LinearOperator,
    y: torch.Tensor,
    prior: Prior,
    config: ReconConfig | None = None,
    n_samples: int | None = None,
    seed: int = 0,
    noise_std: float | None = None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Reconstruction:
    """K = ``n_samples`` posterior samples for each of the B measurements in ``y`` (``None``:
    the config's ``samples``, which a prior's card may set); the result is their mean.
    Slice i draws its noise from a stream seeded ``seed + i``, so a stack solved in one batch
    equals its slices solved one by one (slice i with ``seed + i``).

    ``noise_std``: σ_y in measurement units; ``None`` estimates it from ``y``; 0 declares
    the data noiseless (they are then fitted exactly). ``progress(nfe_done, nfe_total)``.
    MR data are solved in the prior's unit (:func:`intensity_scale`); the results are in the
    measurement's units.
    """
    config = config or ReconConfig()
    if config.sampler not in RECON_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(RECON_SAMPLERS)}")
    n_samples = config.samples if n_samples is None else n_samples
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    if noise_std is not None and not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError("noise_std must be a finite number >= 0 (or None: estimated)")
    h, w = operator.image_shape
    method = _resolve_method(operator, config)
    started = time.perf_counter()
    sde, op = prior.sde, operator
    b, k = y.shape[0], n_samples
    tv_slices, tv_how = [config.tv] * b, "configured"
    if config.holdout_candidates():
        tv_slices, tv_how = _holdout_tv(op, y, prior, config, seed, noise_std, progress, cancel)
        if tv_how == HOLDOUT:
            progress = _after(progress, len(config.holdout_candidates()))
    unit = intensity_scale(op, y, config.intensity_level)
    y = y / per_sample(unit, y).to(y.real.dtype)
    # Slice i's K samples draw from their own stream, seeded seed + i: a slice comes out the
    # same whether it is solved alone (with seed + i) or in a batch of slices.
    gen = RowGenerators([seed + i for i in range(b)], k)
    y_rep = y.repeat_interleave(k, dim=0)
    shape = (b * k, 1, h, w)
    sigma = (
        estimate_noise(op, y).to(torch.float64)
        if noise_std is None
        else torch.full((b,), float(noise_std), dtype=torch.float64) / unit
    )
    sigma_rep = sigma.repeat_interleave(k)
    tv_rep = torch.tensor(tv_slices, dtype=torch.float64).repeat_interleave(k)
    use_tv = bool((tv_rep > 0).any()) or (config.tv_z > 0 and b > 1)
    domain = _ImageDomain(op, y_rep)
    op_norm = op.norm() if method == "score-sde" else 1.0

    def noisy_measurement(t: torch.Tensor) -> torch.Tensor:
        alpha, beta = _coefficients(sde, t)
        z = randn(shape, gen)
        return per_sample(alpha, y_rep) * y_rep + per_sample(beta, y_rep) * op.forward(z)

    def map_weight(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """μ_t = (scale σ_y)² / r_t², r_t = ρ β(t)/α(t) (scale α(t) for ŷ_t: noise α σ_y)."""
        alpha, beta = (c.to(torch.float64) for c in _coefficients(sde, t))
        r = (config.rho * beta / alpha).clamp_min(1e-12)
        return (scale * sigma_rep) ** 2 / r**2

    def consistency(u: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Eqs. 8.6-8.7: a step towards ŷ_t before each predictor and corrector step."""
        x = domain.join(u)
        if method == "proximal":
            x = proximal_step(op, x, noisy_measurement(t), config.lam)
        else:
            alpha = _coefficients(sde, t)[0].to(torch.float64)
            x = prox_step(op, x, noisy_measurement(t), map_weight(t) * alpha**2, config.cg_iters)
        return domain.split(x)

    def project(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The fast sampler's step on its clean (Tweedie) estimate, towards y itself; the
        estimate is first clipped to the prior's intensity range [0, 1] (its support)."""
        x = domain.join(x0.clamp(0.0, 1.0) if config.clip else x0)
        if method == "proximal":
            x = proximal_step(op, x, y_rep, config.lam)
        elif use_tv:
            x = prox_tv_step(
                op,
                x,
                y_rep,
                map_weight(t),
                tv_rep * sigma_rep**2,
                config.tv_iters,
                config.cg_iters,
                lipschitz(),
                config.tv_z * float((sigma**2).mean()),
                b,
            )
        else:
            x = prox_step(op, x, y_rep, map_weight(t), config.cg_iters)
        return domain.split(x)

    norms: list[float] = []

    def lipschitz() -> float:
        """1.05 ||A||², by power iteration once per reconstruction."""
        if not norms:
            norms.append(1.05 * op.norm() ** 2)
        return norms[0]

    score_fn, engine = prior.score_fn, prior.engine
    if (h, w) != (prior.image_size, prior.image_size) and not prior.any_size:
        # Images of another size: the prior applied patch-wise or whole (models/nets/patch.py).
        whole = None if config.patch_wise else prior.size_multiple
        if whole and config.windowed_attention and prior.torch_path is not None:
            score_fn, engine = prior.torch_path  # windows: the torch network's attention
        score_fn = tiled_score(
            score_fn,
            prior.image_size,
            lambda t: _coefficients(sde, t)[1].float(),
            seed,
            whole,
            config.windowed_attention,
        )
    if method == "langevin":
        score_fn = _likelihood_score(score_fn, sde, op, y_rep, sigma_rep, config)
    if method == "score-sde":
        score_fn = _conditional_score(score_fn, sde, op, noisy_measurement, sigma_rep, op_norm)
    if config.sampler == "fast":
        hook: dict = {"project": project, "eta": config.eta}
        if config.start < 1.0:
            hook.update(_warm_start(op, y_rep, sde, config, domain, gen, shape))
    else:
        hook = {} if method in ("langevin", "score-sde") else {"consistency": consistency}
    per_step = config.nfe_per_step()

    def nfe_progress(i: int, total: int) -> None:
        if progress is not None:
            progress(i * per_step, total * per_step)

    res = sample(
        config.sampler,
        sde,
        score_fn,
        shape,
        n_steps=config.n_steps,
        snr=config.snr,
        generator=gen,
        progress=nfe_progress,
        cancel=cancel,
        **hook,
    )
    u = res.samples
    noiseless = bool((sigma_rep == 0).all())
    if noiseless and config.final_projection:
        x = project_affine(op, domain.image(u), y_rep, config.final_cg_iters, cancel=cancel)
        u = domain.split(x)
    elif not noiseless and config.sampler != "fast" and method != "proximal":
        # A last MAP step at the smallest noise level (the fast sampler ended with one).
        t0 = torch.full((b * k,), 1e-3)
        u = domain.split(prox_step(op, domain.join(u), y_rep, map_weight(t0), config.cg_iters))
    images = domain.magnitude(u)
    samples = images.reshape(b, k, h, w)
    mean = samples.mean(dim=1, keepdim=True)
    std = samples.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(mean)
    phase = None
    if domain.complex:
        phase = domain.angle(u).reshape(b, k, h, w)[:, :1]
    with torch.no_grad():
        fitted = domain.image(u).reshape(b, k, 1, h, w).mean(dim=1) if domain.complex else mean
        r = op.forward(fitted) - y
    residual = [
        math.sqrt(float(real_inner(r[i], r[i])) / max(float(real_inner(y[i], y[i])), 1e-30))
        for i in range(b)
    ]
    diverged, warnings = _check(mean, std, residual, sigma, y)  # on the draws' own spread
    if config.std_scale > 0 and k > 1:
        std = calibrated_std(std, k, config.std_scale)
    check = OODCheck.from_card(prior.card) if config.ood else None
    verdicts = []
    if check is not None:  # on the prior's own grid, as it was calibrated
        scored = mean if check.on == "reconstruction" else classical_image(op, y)
        verdicts = check.assess(prior.score_fn, sde, scored, seed, prior.image_size)
    warnings += [f"slice {i}: {ood_warning(v)}" for i, v in enumerate(verdicts) if v["flag"]]
    back = per_sample(unit, samples).to(samples.dtype)  # to the measurement's units
    sigma = sigma * unit
    return Reconstruction(
        mean=mean * back,
        std=std * back,
        samples=samples * back,
        nfe=res.nfe,
        residual=residual,
        seconds=time.perf_counter() - started,
        provenance={
            "model": prior.name,
            "model_sha256": prior.sha256,
            "engine": engine,
            "sde": type(sde).__name__,
            "method": method,
            "samples": k,
            "seed": seed,
            "noise_std": noise_std,
            "noise_std_used": [float(s) for s in sigma],
            "noise_std_source": "spec" if noise_std is not None else "estimated from the data",
            "intensity_scale": [float(s) for s in unit],
            "complex_image": domain.complex,
            "tv_used": tv_slices,
            "tv_chosen_by": tv_how,
            **{f"config.{key}": v for key, v in asdict(config).items()},
        },
        noise_std_used=[float(s) for s in sigma],
        phase=phase,
        warnings=warnings,
        diverged=diverged,
        ood=verdicts,
    )


def _holdout_tv(
    op: LinearOperator,
    y: torch.Tensor,
    prior: Prior,
    config: ReconConfig,
    seed: int,
    noise_std: float | None,
    progress: Progress | None,
    cancel: Callable[[], bool] | None,
) -> tuple[list[float], str]:
    """Each slice's TV weight among ``config.tv_holdout``: the one whose single-sample
    solve from the other lines best predicts held-out measured lines (models/holdout.py).
    Progress counts these solves first, then the reconstruction's own."""
    candidates = config.holdout_candidates()
    solves = len(candidates) * y.shape[0]
    done: list[int] = []

    def solve(kept: LinearOperator, y_kept: torch.Tensor, weight: float, slice_seed: int):
        def step(i: int, total: int) -> None:
            if progress is not None:  # the hold-out counts as len(candidates) solves of B
                n = len(candidates) + 1
                progress((len(done) * total + i) * (n - 1) // solves, n * total)

        trial = replace(config, tv=weight, tv_holdout=(), samples=1, ood=False, std_scale=0.0)
        rec = reconstruct(kept, y_kept, prior, trial, 1, slice_seed, noise_std, step, cancel)
        done.append(1)
        return rec.mean if rec.phase is None else rec.mean * torch.exp(1j * rec.phase)

    return choose(op, y, candidates, solve, seed, config.tv)


def _after(progress: Progress | None, solves: int) -> Progress | None:
    """``progress`` of the main solve, counted after ``solves`` solves of the same length."""
    if progress is None:
        return None
    return lambda i, total: progress(solves * total + i, (solves + 1) * total)


def k_sample_factor(k: int) -> float:
    """κ(K) = t_{0.975, K−1} √(1 + 1/K) / z_{0.975}: how much wider than the std of K
    posterior samples an interval must be to hold a further draw (the truth, were the
    posterior exact) with 95 % probability, given that the mean and std come from K draws."""
    from scipy.stats import norm, t

    return float(t.ppf(0.975, k - 1) * math.sqrt(1 + 1 / k) / norm.ppf(0.975))


def calibrated_std(std: torch.Tensor, k: int, scale: float) -> torch.Tensor:
    """The posterior std reported for K samples: c κ(K) s_K, with c fitted on real
    validation slices so that |x − x̄| ≤ 2 std holds at 95 % of their object's pixels
    (``benchmarks/ood.py``, stored in the card as ``std_scale``)."""
    return std * (scale * k_sample_factor(k))


def std_ratios(
    ref: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, object_only: bool = False
) -> torch.Tensor:
    """|x − x̄| / (2 s) per pixel, flattened: how far a ±2 s band must stretch to hold the
    truth there (≤ 1: it does; ∞ where s = 0 and the error is not, 0 where neither is);
    ``object_only``: the object's pixels alone (ref > OBJECT_LEVEL)."""
    err, s = (ref - mean).abs().flatten(), std.flatten()
    ratio = torch.where(s > 0, err / (2 * s), torch.where(err > 0, math.inf, 0.0))
    return ratio[ref.flatten() > OBJECT_LEVEL] if object_only else ratio


def fit_std_scale(ratios: torch.Tensor, k: int, coverage: float = 0.95) -> float:
    """c of :func:`calibrated_std` for K samples: the ``coverage`` quantile of ``ratios``
    (:func:`std_ratios` of raw K-sample stds on validation slices) over κ(K), so that
    |x − x̄| ≤ 2 c κ(K) s_K holds at that fraction of those pixels."""
    if k < 2:
        raise ValueError("a posterior std needs at least 2 samples (k >= 2)")
    scale = float(torch.quantile(ratios.to(torch.float64), coverage)) / k_sample_factor(k)
    if not math.isfinite(scale):
        raise ValueError(
            f"more than {1 - coverage:.0%} of the pixels have an error but no spread: "
            "the samples do not vary, so no scale of their std can cover the error"
        )
    return scale


def _warm_start(
    op: LinearOperator,
    y: torch.Tensor,
    sde: SDE,
    config: ReconConfig,
    domain: _ImageDomain,
    gen: RowGenerators,
    shape: tuple[int, ...],
) -> dict:
    """The fast sampler's start from the data instead of pure noise (Chung, Sim & Ye's
    come-closer-diffuse-faster): the least-squares image x_c (``start_cg_iters`` CG
    iterations from 0; clipped to [0, 1] where ``clip``), diffused to t₀ = ``start``·T by
    the forward process, x_t₀ = α(t₀) x_c + β(t₀) z. Its error is drowned by noise of std
    β(t₀), so the reverse steps need only cover [ε, t₀]."""
    t0 = config.start * sde.T
    x_c = prox_step(op, domain.join(torch.zeros(shape)), y, 0.0, config.start_cg_iters)
    u = domain.split(x_c)
    u = u.clamp(0.0, 1.0) if config.clip else u
    alpha, beta = _coefficients(sde, torch.full((shape[0],), t0))
    x_init = per_sample(alpha, u) * u + per_sample(beta, u) * randn(shape, gen)
    return {"x_init": x_init, "t_start": t0}


def _check(
    mean: torch.Tensor, std: torch.Tensor, residual: list[float], sigma: torch.Tensor, y
) -> tuple[str | None, list[str]]:
    """Why the result is not an image (or None), and warnings for one that is doubtful."""
    if not bool(torch.isfinite(mean).all()) or not bool(torch.isfinite(std).all()):
        return "the sampler produced non-finite values", []
    outside = ((mean < RANGE_LOW) | (mean > RANGE_HIGH)).flatten(1).float().mean(dim=1)
    for i, frac in enumerate(outside.tolist()):
        if frac > RANGE_FRACTION:
            lo, hi = float(mean[i].min()), float(mean[i].max())
            return (
                f"slice {i}: {100 * frac:.1f} % of pixels lie outside [{RANGE_LOW}, {RANGE_HIGH}] "
                f"(values {lo:.3g} to {hi:.3g} on the [0, 1] scale): the sampler diverged; "
                "raise nfe, or state the measurement's noise_std"
            ), []
    saturated = std.flatten(1).mean(dim=1)
    for i, s in enumerate(saturated.tolist()):
        if s > STD_SATURATED:
            return f"slice {i}: posterior std {s:.3g} is saturated: the sampler diverged", []
    warnings = []
    for i, rel in enumerate(residual):
        y_norm = float(real_inner(y[i], y[i])) ** 0.5
        explained = float(sigma[i]) * math.sqrt(2 * y[i].numel()) / max(y_norm, 1e-30)
        if rel > 5 * explained + 0.05:
            warnings.append(
                f"slice {i}: data residual {rel:.3g} is more than the estimated noise explains "
                f"({explained:.3g}); the prior may not fit this anatomy"
            )
    return None, warnings


def _conditional_score(score_fn: ScoreFn, sde: SDE, op, noisy_measurement, sigma, op_norm):
    """Eq. B.36: s(x, t) + Aᵀ(ŷ_t − A x)/(α² σ_y² + β² ||A||²), with a fresh ŷ_t."""

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, beta = _coefficients(sde, t)
        variance = alpha.double() ** 2 * sigma**2 + beta.double() ** 2 * op_norm**2
        weight = per_sample((1.0 / variance).float(), x)
        return score_fn(x, t) + weight * op.adjoint(noisy_measurement(t) - op.forward(x))

    return score


def _likelihood_score(score_fn: ScoreFn, sde: SDE, op, y, sigma, config) -> ScoreFn:
    """s(x, t) + Aᵀ(y − A x) / (σ_y² + γ² σ(t)²): Jalal et al.'s posterior score for ALD."""
    if not isinstance(sde, VESDE):
        raise ValueError("method 'langevin' needs a VE prior")

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = sde.sigma(t).double()
        weight = per_sample((1.0 / (sigma**2 + (config.langevin_gamma * s) ** 2)).float(), x)
        return score_fn(x, t) + weight * op.adjoint(y - op.forward(x))

    return score
