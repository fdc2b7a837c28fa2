"""Noise-conditional score network s_θ(x, σ) for the NCSN objective and annealed Langevin
dynamics (seed 002, ch. 5; NCSNv2, seed 003).

The body is the NCSN++ U-Net of :mod:`models.nets.ncsnpp` conditioned on log σ itself (random
Fourier features) instead of on a diffusion time, with its output divided by σ (NCSNv2
technique 3: ||s(x, σ)|| ∝ 1/σ). The noise levels are the geometric sequence σ_1 > … > σ_L
(technique 2) of a VE SDE, so the same model also serves the VE samplers through σ(t).
"""

from __future__ import annotations

import torch
from torch import nn

from models.nets.ncsnpp import NCSNpp, NetConfig


def _identity(sigma: torch.Tensor) -> torch.Tensor:
    return sigma


class NCSN(nn.Module):
    """s_θ(x, σ): an NCSN++ body whose conditioning input is σ (shape ``(B,)``)."""

    def __init__(self, config: NetConfig, sigmas: torch.Tensor):
        super().__init__()
        if config.embedding != "fourier" or not config.scale_by_sigma:
            raise ValueError("NCSN needs embedding='fourier' and scale_by_sigma=True")
        if not bool((sigmas[1:] < sigmas[:-1]).all()):
            raise ValueError("sigmas must be strictly decreasing (σ_1 = σ_max first)")
        self.config = config
        self.register_buffer("sigmas", sigmas.float())
        self.body = NCSNpp(config, _identity)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.body(x, sigma)
