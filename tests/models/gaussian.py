"""Shared analytic test problem: data ~ N(0, S0² I), whose score is exact at every t."""

import torch

S0 = 0.5


def gaussian_score(sde):
    """∇ log p_t for Gaussian data under ``sde``: −x / (m(t)² S0² + σ(t)²)."""

    def score(x, t):
        mc = sde.marginal_prob(torch.ones(len(t), 1), t)[0].flatten()
        std = sde.marginal_prob(torch.zeros(len(t), 1), t)[1]
        var = mc**2 * S0**2 + std**2
        return -x / var.reshape(-1, *([1] * (x.ndim - 1)))

    return score
