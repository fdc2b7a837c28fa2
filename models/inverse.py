"""Solving inverse problems with an unconditional score prior (seed 002, ch. 8, app. B.6).

``reconstruct(operator, y, prior, config)`` draws K posterior samples per measurement as one
batch with one of the samplers of :mod:`models.sampling`, adding a data-consistency step
``k(x, ŷ_t, λ)`` before every predictor and corrector step (Eqs. 8.6-8.7) through the
samplers' ``consistency`` hook, and returns their mean, per-pixel standard deviation, NFE,
data residual and provenance.

Data-consistency methods (``ReconConfig.method``):

- ``proximal`` (Theorem 8.1, Eq. 8.9) for operators A = P(Λ) T:
  x' = T⁻¹[λ Λ P⁻¹(Λ) ŷ_t + (1 − λ) Λ T x + (I − Λ) T x], with ŷ_t = α(t) y + β(t) A z
  (ch. 8.3.2; α, β the SDE's marginal mean coefficient and standard deviation). Computed in
  the equivalent residual form x' = x + λ T⁻¹ P⁻¹(Λ)(ŷ_t − A x), which is identical for an
  exact T⁻¹ and, where T⁻¹ is approximate (FBP), applies the approximation to the residual
  only instead of re-reconstructing the whole image at every step.
- ``cg``: least squares, x' = argmin λ||A x − ŷ_t||² + (1 − λ)||x − x_t||², by a few
  conjugate-gradient iterations; for operators with no exact T⁻¹ (fan beam, multi-coil MRI).
- ``score-sde``: the crude conditional score of app. B.5.9 (replace the measured part by
  ŷ_t, i.e. the proximal step with λ = 1); a comparison method of ch. 8.4.
- ``langevin``: annealed Langevin dynamics on s(x, σ) + Aᵀ(y − A x)/(σ_y² + γ² σ²) (Jalal et
  al.); the other comparison method of ch. 8.4 (sampler ``ald`` only).

For noiseless measurements a final step projects the mean-free sample onto {x : A x = y}
(λ = 1, solved by CG on A Aᵀ), so the returned images reproduce the data (B.6.4). The fast
sampler (``sampler="fast"``) instead applies the least-squares step to each Tweedie estimate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from models.physics.base import LinearOperator, conjugate_gradient, real_inner
from models.sampling.pc import Cancelled, Progress
from models.sampling.registry import sample
from models.sde import SDE, VESDE, ScoreFn, per_sample

METHODS = ("proximal", "cg", "score-sde", "langevin")
RECON_SAMPLERS = ("pc", "em", "ald", "fast")
__all__ = ["Cancelled", "Prior", "ReconConfig", "Reconstruction", "reconstruct"]


@dataclass
class Prior:
    """A score model ready for reconstruction: s(x, t), its SDE and image size."""

    score_fn: ScoreFn
    sde: SDE
    image_size: int
    name: str = "custom"
    sha256: str = ""
    card: dict = field(default_factory=dict)

    @classmethod
    def load(cls, model: str, bf16: bool = False) -> Prior:
        """A bundled prior by name (``ct-default``) or a model directory."""
        from models.registry import load_model, score_fn_of

        net, sde, card = load_model(model)
        return cls(
            score_fn_of(net, sde, bf16=bf16),
            sde,
            int(card["image_size"]),
            card.get("name", str(model)),
            card.get("weights_sha256", ""),
            card,
        )


@dataclass
class ReconConfig:
    """Sampler and data-consistency settings (app. B.6.4 defaults for the PC sampler)."""

    sampler: str = "pc"
    method: str = "auto"  # proximal where A = P(Λ)T, else cg
    n_steps: int = 500
    lam: float = 1.0  # λ of Eq. 8.9 (1: full replacement of the measured part)
    snr: float = 0.16  # r, the corrector's signal-to-noise ratio
    cg_iters: int = 3  # per data-consistency step (method cg and the fast sampler)
    final_projection: bool = True  # λ = 1 step at the end for noiseless data
    final_cg_iters: int = 400
    eta: float = 0.5  # fast sampler: fraction of fresh noise when re-noising
    langevin_gamma: float = 1.0

    def nfe_per_step(self) -> int:
        return 2 if self.sampler == "pc" else 3 if self.sampler == "ald" else 1


def steps_for_nfe(config: ReconConfig, nfe: int) -> int:
    """The step count that spends about ``nfe`` network evaluations with this sampler."""
    return max(2, round(nfe / config.nfe_per_step()))


@dataclass
class Reconstruction:
    mean: torch.Tensor  # (B, 1, H, W)
    std: torch.Tensor  # (B, 1, H, W), over the K posterior samples
    samples: torch.Tensor  # (B, K, H, W)
    nfe: int
    residual: list[float]  # ||A x̄ − y|| / ||y|| per slice
    seconds: float
    provenance: dict


def _coefficients(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α(t), β(t): x_t = α x_0 + β z, so ŷ_t = α y + β A z follows the same law (ch. 8.3.2)."""
    mean, std = sde.marginal_prob(torch.ones(len(t), 1, device=t.device), t)
    return mean.flatten(), std


def project_affine(
    op: LinearOperator,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    rounds: int = 3,
    cancel: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """The nearest x' to x with A x' = y, by CGLS: CG on AᵀA δ = Aᵀ(y − A x) from δ = 0.

    The iterates stay in range(Aᵀ), so the limit is the minimum-norm correction (the
    projection), and ||A x' − y|| decreases monotonically with the iterations. CG stops
    relative to its starting residual, so a start far from the data is refined by up to
    ``rounds`` restarts until ||A x' − y|| ≤ 1e-5 ||y||. ``cancel`` is checked before every
    CG iteration (up to ``rounds × iters`` of them, which take longer than many sampler
    steps) and raises :class:`Cancelled`.
    """
    normal = lambda v: op.adjoint(op.forward(v))  # noqa: E731
    y_norm = float(real_inner(y, y)) ** 0.5
    each = None if cancel is None else lambda: _stop_if(cancel, "the final projection")
    for _ in range(rounds):
        r = y - op.forward(x)
        if float(real_inner(r, r)) ** 0.5 <= 1e-5 * y_norm:
            break
        x = x + conjugate_gradient(normal, op.adjoint(r), n_iter=iters, each=each)
    return x


def _stop_if(cancel: Callable[[], bool], where: str) -> None:
    """Raise :class:`Cancelled` if ``cancel()`` says so."""
    if cancel():
        raise Cancelled(f"cancelled during {where}")


def least_squares_step(
    op: LinearOperator, x: torch.Tensor, y: torch.Tensor, lam: float, iters: int
) -> torch.Tensor:
    """argmin λ||A x' − y||² + (1 − λ)||x' − x||² by CG started at x."""
    if lam >= 1.0:
        return project_affine(op, x, y, iters)
    rhs = lam * op.adjoint(y) + (1 - lam) * x
    return conjugate_gradient(
        lambda v: lam * op.adjoint(op.forward(v)) + (1 - lam) * v, rhs, n_iter=iters, x0=x
    )


def proximal_step(op, x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """Eq. 8.9 in residual form: x + λ T⁻¹ P⁻¹(Λ)(y − A x)."""
    return x + lam * op.T_inv(op.pad(y - op.forward(x)))


def _resolve_method(op: LinearOperator, config: ReconConfig) -> str:
    method = config.method
    if method == "auto":
        method = "proximal" if op.has_decomposition and _exact_inverse(op) else "cg"
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)} or 'auto'; got {method!r}")
    if method in ("proximal", "score-sde") and not op.has_decomposition:
        raise ValueError(f"method {method!r} needs an operator A = P(Λ)T; use 'cg'")
    if method == "langevin" and config.sampler != "ald":
        raise ValueError("method 'langevin' runs with sampler 'ald'")
    return method


def _exact_inverse(op: LinearOperator) -> bool:
    geometry = getattr(op, "geometry", None)
    return geometry is None or geometry.beam == "parallel"


def reconstruct(
    operator: LinearOperator,
    y: torch.Tensor,
    prior: Prior,
    config: ReconConfig | None = None,
    n_samples: int = 1,
    seed: int = 0,
    noise_std: float = 0.0,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Reconstruction:
    """K = ``n_samples`` posterior samples for each of the B measurements in ``y``."""
    config = config or ReconConfig()
    if config.sampler not in RECON_SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(RECON_SAMPLERS)}")
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    if operator.image_size != prior.image_size:
        raise ValueError(
            f"image_size {operator.image_size} differs from the prior's {prior.image_size}; "
            f"set the spec's image_size to {prior.image_size}"
        )
    method = _resolve_method(operator, config)
    started = time.perf_counter()
    sde, op = prior.sde, operator
    gen = torch.Generator().manual_seed(seed)
    b, k, n = y.shape[0], n_samples, prior.image_size
    y_rep = y.repeat_interleave(k, dim=0)
    shape = (b * k, 1, n, n)
    lam = 1.0 if method == "score-sde" else config.lam

    def noisy_measurement(t: torch.Tensor) -> torch.Tensor:
        alpha, beta = _coefficients(sde, t)
        z = torch.randn(shape, generator=gen)
        return per_sample(alpha, y_rep) * y_rep + per_sample(beta, y_rep) * op.forward(z)

    def consistency(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        y_t = noisy_measurement(t)
        if method == "cg":
            return least_squares_step(op, x, y_t, lam, config.cg_iters)
        return proximal_step(op, x, y_t, lam)

    def project(x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return least_squares_step(op, x0, y_rep, lam, config.cg_iters)

    score_fn = prior.score_fn
    if method == "langevin":
        score_fn = _likelihood_score(prior.score_fn, sde, op, y_rep, noise_std, config)
    hook = {} if method == "langevin" else {"consistency": consistency}
    if config.sampler == "fast":
        hook = {"project": project, "eta": config.eta}
    res = sample(
        config.sampler,
        sde,
        score_fn,
        shape,
        n_steps=config.n_steps,
        snr=config.snr,
        generator=gen,
        progress=progress,
        cancel=cancel,
        **hook,
    )
    x = res.samples
    if config.final_projection and noise_std == 0:
        x = project_affine(op, x, y_rep, config.final_cg_iters, cancel=cancel)
    samples = x.reshape(b, k, n, n)
    mean = samples.mean(dim=1, keepdim=True)
    std = samples.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(mean)
    with torch.no_grad():
        r = op.forward(mean) - y
    residual = [
        math.sqrt(float(real_inner(r[i], r[i])) / max(float(real_inner(y[i], y[i])), 1e-30))
        for i in range(b)
    ]
    return Reconstruction(
        mean=mean,
        std=std,
        samples=samples,
        nfe=res.nfe,
        residual=residual,
        seconds=time.perf_counter() - started,
        provenance={
            "model": prior.name,
            "model_sha256": prior.sha256,
            "sde": type(sde).__name__,
            "method": method,
            "samples": k,
            "seed": seed,
            "noise_std": noise_std,
            **{f"config.{key}": v for key, v in asdict(config).items()},
        },
    )


def _likelihood_score(score_fn: ScoreFn, sde: SDE, op, y, noise_std: float, config) -> ScoreFn:
    """s(x, t) + Aᵀ(y − A x) / (σ_y² + γ² σ(t)²): Jalal et al.'s posterior score for ALD."""
    if not isinstance(sde, VESDE):
        raise ValueError("method 'langevin' needs a VE prior")

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = sde.sigma(t)
        weight = 1.0 / (noise_std**2 + (config.langevin_gamma * sigma) ** 2)
        return score_fn(x, t) + per_sample(weight, x) * op.adjoint(y - op.forward(x))

    return score
