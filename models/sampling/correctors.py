"""Correctors: score-only MCMC at a fixed t (Langevin, Eq. B.37; annealed Langevin, ch. 5)."""

from __future__ import annotations

import torch

from models.sde import SDE, VPSDE, ScoreFn, per_sample, randn


class Corrector:
    def __init__(self, sde: SDE, score_fn: ScoreFn, snr: float, n_steps: int):
        self.sde, self.score_fn, self.snr, self.n_steps = sde, score_fn, snr, n_steps

    def step(self, x, t, generator) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class NoneCorrector(Corrector):
    """No correction (plain predictor-only sampling)."""

    def step(self, x, t, generator):
        return x, x


class LangevinCorrector(Corrector):
    """Langevin dynamics with step ε = 2 α (r ||z|| / ||s||)² set by the signal-to-noise r.

    α = 1 − β_i for VP (app. B.5.7, Algorithm B.5) and 1 otherwise. For the exact score of
    the perturbed marginal ||s|| ≈ ||z|| / σ_t; ε is capped at four times the value that
    gives, so a degenerate network (an untrained one outputs s = 0) cannot blow x up.
    """

    def step(self, x, t, generator):
        alpha = torch.ones_like(t)
        if isinstance(self.sde, VPSDE):
            alpha = 1.0 - self.sde.beta(t) / self.sde.N
        mean = x
        std = self.sde.marginal_prob(torch.zeros_like(t), t)[1]
        for _ in range(self.n_steps):
            grad = self.score_fn(x, t)
            z = randn(x.shape, generator, x.device)
            g_norm = grad.flatten(1).norm(dim=1).mean()
            z_norm = z.flatten(1).norm(dim=1).mean()
            eps = 2 * alpha * (self.snr * z_norm / g_norm.clamp_min(1e-12)) ** 2
            eps = torch.minimum(eps, 8 * alpha * (self.snr * std) ** 2)
            mean = x + per_sample(eps, x) * grad
            x = mean + per_sample(torch.sqrt(2 * eps), x) * z
        return x, mean


CORRECTORS: dict[str, type[Corrector]] = {"none": NoneCorrector, "langevin": LangevinCorrector}
