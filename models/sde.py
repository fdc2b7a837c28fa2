"""Forward SDEs of score-based generative modelling (seed 002, ch. 7 and app. B.5.2).

Each SDE ``dx = f(x, t) dt + g(t) dw`` (Eq. 7.5) on t ∈ [0, 1] provides its Gaussian
perturbation kernel ``marginal_prob`` (mean and std of x(t) given x(0)), its prior π,
a one-step discretisation (Eqs. 7.8, 7.10) and, from the one definition,
``reverse(score_fn, probability_flow)``: the reverse-time SDE (Eq. 7.6) or the probability
flow ODE (Eq. 7.13).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cached_property

import torch

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RowGenerators:
    """One random stream per group of ``rows`` consecutive batch rows (one slice's K
    posterior samples): each group's noise depends on its own seed alone, so a slice's
    reconstruction does not depend on which other slices share its batch, or its worker.
    Accepted wherever a sampler takes a ``generator`` (see :func:`randn`)."""

    def __init__(self, seeds: list[int], rows: int = 1):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.rows = rows

    def randn(self, shape: tuple[int, ...], device=None) -> torch.Tensor:
        if shape[0] != len(self.generators) * self.rows:
            raise ValueError(
                f"a batch of {shape[0]} rows needs {shape[0] // max(self.rows, 1)} streams of "
                f"{self.rows}, not {len(self.generators)}"
            )
        parts = [torch.randn((self.rows, *shape[1:]), generator=g) for g in self.generators]
        return torch.cat(parts).to(device)


def randn(shape, generator=None, device=None) -> torch.Tensor:
    """``torch.randn`` from a ``torch.Generator``, or row by row from :class:`RowGenerators`."""
    if isinstance(generator, RowGenerators):
        return generator.randn(tuple(shape), device)
    return torch.randn(shape, generator=generator, device=device)


def per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample ``(B,)`` tensor to broadcast against ``x``."""
    return v.reshape(-1, *([1] * (x.ndim - 1)))


class SDE:
    """Base class: subclasses define ``sde``, ``marginal_prob`` and the prior."""

    #: number of discretisation steps used by ``discretize`` and the samplers by default
    N: int = 1000
    T: float = 1.0
    eps: float = 1e-5  # smallest time used in training and sampling

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f(x, t) and diffusion g(t) (shape ``(B,)``)."""
        raise NotImplementedError

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std (shape ``(B,)``) of p_{0t}(x(t) | x(0))."""
        raise NotImplementedError

    def prior_sampling(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor:
        raise NotImplementedError

    def prior_std(self) -> float:
        raise NotImplementedError

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log π(z) per sample for the Gaussian prior N(0, prior_std² I)."""
        s = self.prior_std()
        n = z[0].numel()
        return -0.5 * n * math.log(2 * math.pi * s * s) - z.flatten(1).pow(2).sum(1) / (2 * s * s)

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward step x_{i+1} = x_i + f_i + G_i z (Euler-Maruyama unless overridden)."""
        dt = 1.0 / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * math.sqrt(dt)

    def with_steps(self, n: int) -> SDE:
        """The same SDE discretised into ``n`` steps (the discrete chains of the reverse-
        diffusion and ancestral predictors step from noise level i to i − 1 of N)."""
        if n == self.N:
            return self
        params = {k: v for k, v in vars(self).items() if isinstance(v, int | float)}
        return type(self)(**{**params, "N": n})

    def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (Eq. 7.6) or, with ``probability_flow``, the ODE (Eq. 7.13)."""
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
    """Reverse-time process built from a forward SDE and a score function."""

    def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool):
        self.forward_sde = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.N = forward.N
        self.T = forward.T

    def sde(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drift f − g² s (or f − ½ g² s for the ODE) and diffusion (0 for the ODE)."""
        drift, diffusion = self.forward_sde.sde(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        g2 = per_sample(diffusion**2, x)
        drift = drift - g2 * self.score_fn(x, t) * weight
        return drift, torch.zeros_like(diffusion) if self.probability_flow else diffusion

    def discretize(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reverse diffusion discretisation (app. B.5.3): f_i − G_i² s, G_i."""
        f, G = self.forward_sde.discretize(x, t)
        weight = 0.5 if self.probability_flow else 1.0
        rev_f = f - per_sample(G**2, x) * self.score_fn(x, t) * weight
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


class VESDE(SDE):
    """Variance exploding SDE, dx = σ(t) √(2 log(σ_max/σ_min)) dw (Eq. 7.9).

    σ(t) = σ_min (σ_max/σ_min)^t; the discrete chain is Eq. 7.8 (SMLD / NCSN).
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        if not 0 < sigma_min < sigma_max:
            raise ValueError("need 0 < sigma_min < sigma_max")
        self.sigma_min, self.sigma_max, self.N = sigma_min, sigma_max, N

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def t_of_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of σ(t): lets a time-conditioned network serve as s(x, σ) for ALD."""
        return torch.log(sigma / self.sigma_min) / math.log(self.sigma_max / self.sigma_min)

    def sde(self, x, t):
        g = self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))
        return torch.zeros_like(x), g

    def marginal_prob(self, x0, t):
        return x0, self.sigma(t)

    def prior_std(self) -> float:
        return self.sigma_max

    def prior_sampling(self, shape, generator=None, device=None):
        return randn(shape, generator, device) * self.sigma_max

    def discretize(self, x, t):
        """Eq. 7.8: x_i = x_{i-1} + √(σ_i² − σ_{i-1}²) z."""
        i = (t * (self.N - 1) / self.T).round().long()
        sigmas = self.discrete_sigmas.to(t.device)
        prev = torch.where(i == 0, torch.zeros_like(t), sigmas[(i - 1).clamp_min(0)])
        return torch.zeros_like(x), torch.sqrt(sigmas[i] ** 2 - prev**2)

    @cached_property
    def discrete_sigmas(self) -> torch.Tensor:
        """σ_1 … σ_N, the geometric sequence of noise scales (app. B.5.2); computed once."""
        return torch.exp(torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))


class VPSDE(SDE):
    """Variance preserving SDE, dx = −½ β(t) x dt + √β(t) dw (Eq. 7.11), linear β (DDPM)."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        self.beta_min, self.beta_max, self.N = beta_min, beta_max, N

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def _log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sde(self, x, t):
        b = self.beta(t)
        return -0.5 * per_sample(b, x) * x, torch.sqrt(b)

    def marginal_prob(self, x0, t):
        lmc = self._log_mean_coeff(t)
        return per_sample(torch.exp(lmc), x0) * x0, torch.sqrt(1.0 - torch.exp(2.0 * lmc))

    def prior_std(self) -> float:
        return 1.0

    def prior_sampling(self, shape, generator=None, device=None):
        return randn(shape, generator, device)

    def discretize(self, x, t):
        """Eq. 7.10: x_i = √(1 − β_i) x_{i-1} + √β_i z, β_i = β(t)/N."""
        beta_i = self.beta(t) / self.N
        return (torch.sqrt(1.0 - per_sample(beta_i, x)) - 1.0) * x, torch.sqrt(beta_i)


class SubVPSDE(VPSDE):
    """sub-VP SDE (Eq. 7.12): the VP drift with diffusion √(β(t)(1 − e^{−2∫β})).

    Its variance is bounded by the VP SDE's at every t (app. B.5.2).
    """

    def sde(self, x, t):
        drift, _ = super().sde(x, t)
        discount = 1.0 - torch.exp(4.0 * self._log_mean_coeff(t))  # 1 − e^{−2∫β}
        return drift, torch.sqrt(self.beta(t) * discount)

    def marginal_prob(self, x0, t):
        lmc = self._log_mean_coeff(t)
        return per_sample(torch.exp(lmc), x0) * x0, 1.0 - torch.exp(2.0 * lmc)

    def discretize(self, x, t):
        return SDE.discretize(self, x, t)


SDES: dict[str, type[SDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}


def sigma_max_from_data(data: torch.Tensor, max_pairs: int = 2_000_000) -> float:
    """NCSNv2 technique 1 (ch. 6.3): σ_max = the largest Euclidean distance between training points.

    For N samples the exact maximum over all pairs is computed in blocks (no N² matrix);
    beyond ``max_pairs`` pairs, a seeded subset of rows is compared with all samples.
    """
    flat = data.flatten(1).double()
    n = flat.shape[0]
    rows = flat
    if n * n > max_pairs:
        g = torch.Generator().manual_seed(0)
        rows = flat[torch.randperm(n, generator=g)[: max(1, max_pairs // n)]]
    best = 0.0
    for block in rows.split(256):
        best = max(best, float(torch.cdist(block, flat).max()))
    return best
