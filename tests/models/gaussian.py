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


class OrthogonalMaskOperator:
    """A = P(Λ) Q on images (B, 1, h, w): Q a random orthogonal D×D matrix, Λ the first m
    of its D outputs. With the isotropic Gaussian prior the posterior is known exactly:
    measured Q-coordinates equal y, the others stay N(0, S0²)."""

    def __new__(cls, side: int, m: int, seed: int = 0):
        from models.physics.base import DecomposedOperator

        class _Op(DecomposedOperator):
            def __init__(self):
                g = torch.Generator().manual_seed(seed)
                d = side * side
                self.Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
                self.Q = self.Q.float()
                self.image_size, self.side = side, side
                self.mask = torch.zeros(d, dtype=torch.bool)
                self.mask[:m] = True

            def T(self, x):
                return (x.flatten(1) @ self.Q.T)[:, None]

            def T_adjoint(self, z):
                return (z[:, 0] @ self.Q).reshape(-1, 1, self.side, self.side)

            T_inv = T_adjoint

        return _Op()
