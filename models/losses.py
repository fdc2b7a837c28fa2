"""Score-matching objectives for the same time-conditioned networks.

- Continuous-time denoising score matching (Eq. 7.7) with λ(t) = σ²(t), or the likelihood
  weighting λ(t) = g²(t) (ch. 9.4), optionally with importance sampling of t (ch. 9.5).
- Sliced score matching and its variance-reduced form SSM-VR (seed 001, Eqs. 6-7 there;
  seed 002 ch. 3), with Rademacher or Gaussian projections, on noise-perturbed data.
- The NCSN multi-σ objective (ch. 5, Eq. 5.4 weighting λ(σ) = σ²).

A ``score_fn(x, t)`` returns an estimate of ∇ₓ log p_t(x) for a batch.
"""

from __future__ import annotations

import math

import torch

from models.sde import SDE, VESDE, ScoreFn, per_sample


class ImportanceSampler:
    """Draws t ∈ [eps, 1] with density ∝ g²(t)/σ²(t) by inverse CDF on a fine grid (ch. 9.5).

    With that density, the likelihood-weighted DSM loss becomes Z·½||σ s + z||², with
    Z = ∫ g²/σ² dt, an unbiased estimate with far less variance than uniform t.
    """

    def __init__(self, sde: SDE, eps: float = 1e-5, grid: int = 10_000):
        t = torch.linspace(eps, sde.T, grid, dtype=torch.float64)
        _, g = sde.sde(torch.zeros(grid, 1, dtype=torch.float64), t)
        _, std = sde.marginal_prob(torch.zeros(grid, 1, dtype=torch.float64), t)
        density = g**2 / std**2
        cdf = torch.cumulative_trapezoid(density, t)
        self.t = t
        self.cdf = torch.cat([torch.zeros(1, dtype=torch.float64), cdf])
        self.Z = float(self.cdf[-1])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64) * self.Z
        idx = torch.searchsorted(self.cdf, u).clamp(1, len(self.t) - 1)
        c0, c1 = self.cdf[idx - 1], self.cdf[idx]
        frac = (u - c0) / (c1 - c0).clamp_min(1e-300)
        return (self.t[idx - 1] + frac * (self.t[idx] - self.t[idx - 1])).float()


def dsm_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: torch.Tensor,
    weighting: str = "sigma2",
    importance: ImportanceSampler | None = None,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Continuous-time DSM (Eq. 7.7): E_t λ(t) E ||s(x_t, t) − ∇ log p_{0t}(x_t | x_0)||² / 2.

    :param weighting: ``sigma2`` (λ = σ², the sample-quality default) or ``likelihood``
        (λ = g², which bounds the negative log-likelihood, ch. 9.4).
    :param importance: an :class:`ImportanceSampler` for ``likelihood`` weighting.
    :param shard: ``(rank, world)``: t and z are drawn for the whole batch, then this process
        keeps samples ``rank::world``, so data-parallel ranks together reproduce exactly the
        loss one process computes on the whole batch.
    """
    b = x0.shape[0]
    if importance is not None:
        if weighting != "likelihood":
            raise ValueError("importance sampling applies to weighting='likelihood' only")
        t = importance.sample(b, generator).to(x0.device)
    else:
        t = torch.rand(b, generator=generator, device=x0.device) * (sde.T - eps) + eps
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    rank, world = shard
    x0, t, z = x0[rank::world], t[rank::world], z[rank::world]
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + per_sample(std, x0) * z
    score = score_fn(xt, t)
    residual = (score * per_sample(std, x0) + z).flatten(1).pow(2).sum(1)  # σ²||s + z/σ||²
    if weighting == "sigma2":
        weighted = residual
    elif weighting == "likelihood":
        if importance is not None:
            weighted = residual * importance.Z
        else:
            _, g = sde.sde(xt, t)
            weighted = residual * g**2 / std**2
    else:
        raise ValueError(f"weighting must be 'sigma2' or 'likelihood', got {weighting!r}")
    return 0.5 * weighted.mean()


def sliced_score_matching(
    score_fn: ScoreFn,
    x: torch.Tensor,
    t: torch.Tensor,
    n_projections: int = 1,
    projection: str = "rademacher",
    variance_reduction: bool = False,
    generator: torch.Generator | None = None,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sliced score matching (seed 001): E_v[vᵀ∇ₓ(vᵀ s) + ½ (vᵀ s)²].

    SSM-VR replaces ½ (vᵀ s)² with its expectation ½||s||² (valid for projections with
    E[v vᵀ] = I). Needs a score function differentiable in x. ``weight`` (B,) weights each
    sample's term, e.g. λ(t) = σ²(t) when x was perturbed at different noise levels.
    """
    x = x.detach().requires_grad_(True)
    s = score_fn(x, t)
    total = torch.zeros((), device=x.device)
    for _ in range(n_projections):
        v = torch.randn(x.shape, generator=generator, device=x.device)
        if projection == "rademacher":
            v = v.sign()
        elif projection != "gaussian":
            raise ValueError(f"projection must be 'rademacher' or 'gaussian', got {projection!r}")
        vs = (v * s).flatten(1).sum(1)
        (grad_vs,) = torch.autograd.grad(vs.sum(), x, create_graph=True)
        first = (v * grad_vs).flatten(1).sum(1)
        second = 0.5 * s.flatten(1).pow(2).sum(1) if variance_reduction else 0.5 * vs**2
        term = first + second
        total = total + (term if weight is None else weight * term).mean()
    return total / n_projections


OBJECTIVES = ("dsm", "likelihood", "ssm", "ssm-vr", "ncsn")


def objective_loss(
    score_fn: ScoreFn,
    sde: SDE,
    x0: torch.Tensor,
    objective: str = "dsm",
    importance: ImportanceSampler | None = None,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """The training loss by name, for a time-conditioned score network.

    ``dsm``: Eq. 7.7 with λ = σ²; ``likelihood``: λ = g² (ch. 9.4), importance-sampled when an
    :class:`ImportanceSampler` is given; ``ssm`` / ``ssm-vr``: sliced score matching of the
    perturbed marginal p_t (seed 001) with λ = σ²(t), Rademacher projections. The SSM losses
    equal DSM up to a constant independent of the network (seed 001, Eq. 4 vs. Eq. 8), so
    curves are comparable in shape, not in level. ``ncsn``: the multi-σ objective for a
    noise-conditional network that carries its levels as ``score_fn.sigmas``. ``shard``
    (data parallelism, see :func:`dsm_loss`) splits the batch after the noise is drawn.
    """
    if shard[1] > 1 and objective not in ("dsm", "likelihood"):
        x0 = x0[shard[0] :: shard[1]]  # SSM/NCSN noise is drawn per shard
    if objective == "ncsn":
        sigmas = getattr(score_fn, "sigmas", None)
        if sigmas is None:
            raise ValueError(
                "objective 'ncsn' needs a noise-conditional network (models.nets.ncsn)"
            )
        return ncsn_loss(score_fn, x0, sigmas, generator)
    if objective in ("dsm", "likelihood"):
        weighting = "sigma2" if objective == "dsm" else "likelihood"
        return dsm_loss(score_fn, sde, x0, weighting, importance, eps, generator, shard)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    b = x0.shape[0]
    t = torch.rand(b, generator=generator, device=x0.device) * (sde.T - eps) + eps
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    mean, std = sde.marginal_prob(x0, t)
    xt = mean + per_sample(std, x0) * z
    return sliced_score_matching(
        score_fn,
        xt,
        t,
        variance_reduction=objective == "ssm-vr",
        generator=generator,
        weight=std**2,
    )


def ncsn_loss(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """NCSN objective (ch. 5): Σ_i σ_i² E||s(x̃, σ_i) + (x̃ − x)/σ_i²||² / 2, σ_i drawn per sample.

    ``score_fn`` receives the drawn σ (shape ``(B,)``) as its conditioning input.
    """
    idx = torch.randint(len(sigmas), (x0.shape[0],), generator=generator, device=x0.device)
    sigma = sigmas.to(x0.device)[idx]
    z = torch.randn(x0.shape, generator=generator, device=x0.device)
    xt = x0 + per_sample(sigma, x0) * z
    score = score_fn(xt, sigma)
    return 0.5 * (score * per_sample(sigma, x0) + z).flatten(1).pow(2).sum(1).mean()


def ncsn_sigmas(sde: VESDE, n: int) -> torch.Tensor:
    """Geometric noise levels σ_max … σ_min of a VE SDE, for the NCSN objective and ALD."""
    return torch.exp(torch.linspace(math.log(sde.sigma_max), math.log(sde.sigma_min), n))
