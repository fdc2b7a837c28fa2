"""A time-conditioned MLP score network for low-dimensional data ``(B, D)``.

Used where an image U-Net is beside the point: toy distributions whose score is known in
closed form (the tests' 2-D Gaussian mixture) and quick checks of objectives and samplers.
Same conditioning as NCSN++: Fourier features of log σ(t) and output divided by σ(t) for a VE
SDE (``sigma_fn``), sinusoidal features of t otherwise.
"""

from __future__ import annotations

import torch
from torch import nn

from models.nets.ncsnpp import GaussianFourierProjection, positional_embedding


class ScoreMLP(nn.Module):
    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, emb: int = 32, sigma_fn=None):
        super().__init__()
        self.sigma_fn, self.emb = sigma_fn, emb
        if sigma_fn is not None:
            self.fourier = GaussianFourierProjection(emb, scale=4.0)
        layers: list[nn.Module] = [nn.Linear(dim + emb, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.sigma_fn is None:
            return self.net(torch.cat([x, positional_embedding(t, self.emb)], dim=1))
        sigma = self.sigma_fn(t)
        h = torch.cat([x, self.fourier(torch.log(sigma))], dim=1)
        return self.net(h) / sigma[:, None]
