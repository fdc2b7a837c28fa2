"""Test-time adaptation of a prior to one measurement (the third prior of issue 19).

A prior trained on a few volumes knows anatomy in general, not this patient's. Before
sampling, a copy of the network is fine-tuned for a few steps by denoising score matching
(Eq. 7.7) on a classical reconstruction of the measurement itself (FISTA-TV / CS-TV), at
noise levels σ ≥ ``sigma_floor`` only: at those levels the classical image's errors
(streaks, TV staircasing, of a few percent) are buried under the noise, so what the network
learns is this patient's layout of bone, tissue and air, while the fine scales stay the
prior's. Only the biases and the GroupNorm gains move (a few thousand parameters, as in
BitFit), which keeps a few steps on one image from overfitting it.

This is in the spirit of steerable conditional diffusion (Barbano et al., 2023), which
adapts a prior to the measurement during sampling; here the adaptation is a separate pass
before it, so any sampler of :mod:`models.inverse` runs unchanged.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from models.data import augment
from models.inverse import Prior
from models.registry import score_fn_of, time_conditioned
from models.sde import VESDE


def adaptable_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Biases and normalisation gains: the parameters adaptation may change."""
    chosen = []
    for name, p in net.named_parameters():
        is_norm = ".norm" in name or name.startswith("norm")
        p.requires_grad_(name.endswith(".bias") or is_norm)
        if p.requires_grad:
            chosen.append(p)
    return chosen


def adapt_prior(
    net: torch.nn.Module,
    prior: Prior,
    images: torch.Tensor,
    steps: int = 40,
    sigma_floor: float = 0.05,
    lr: float = 1e-3,
    batch: int = 4,
    seed: int = 0,
) -> Prior:
    """A copy of ``prior`` (whose network is ``net``) fine-tuned on ``images`` (N, 1, n, n),
    a classical reconstruction of the measurement on the prior's [0, 1] scale.

    t is drawn so that σ(t) is log-uniform on [``sigma_floor``, σ_max]; each step draws
    ``batch`` augmented copies (flips, small rotations and scalings, intensity jitter).
    """
    sde = prior.sde
    if not isinstance(sde, VESDE):
        raise ValueError("test-time adaptation is written for VE SDE priors")
    sigma_max = float(sde.sigma(torch.tensor(1.0)))
    if not 0 < sigma_floor < sigma_max:
        raise ValueError(f"sigma_floor must be in (0, {sigma_max:g}), got {sigma_floor}")
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, n, n), got {tuple(images.shape)}")
    tuned = copy.deepcopy(net).to(memory_format=torch.contiguous_format).train()
    params = adaptable_parameters(tuned)
    opt = torch.optim.Adam(params, lr=lr)
    model = time_conditioned(tuned, sde)
    gen = torch.Generator().manual_seed(seed)
    lo, hi = math.log(sigma_floor), math.log(sigma_max)
    clean = images.detach().float().clamp(0, 1)
    for _ in range(steps):
        x0 = augment(clean[torch.randint(len(clean), (batch,), generator=gen)], gen)
        sigma = torch.exp(lo + (hi - lo) * torch.rand(batch, generator=gen))
        t = sde.t_of_sigma(sigma)
        z = torch.randn(x0.shape, generator=gen)
        s = model(x0 + sigma[:, None, None, None] * z, t)
        loss = 0.5 * (s * sigma[:, None, None, None] + z).flatten(1).pow(2).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    tuned.eval()
    card = {**prior.card, "adapted": {"steps": steps, "sigma_floor": sigma_floor, "lr": lr}}
    return replace(prior, score_fn=score_fn_of(tuned, sde), card=card, name=f"{prior.name}+tta")
