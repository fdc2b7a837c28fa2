"""Annealed Langevin dynamics (NCSN, seed 002 ch. 5, Algorithm 5.1) and the Tweedie step.

ALD runs T Langevin steps at each noise level σ_1 > … > σ_L with step sizes
α_i = ε σ_i² / σ_L², using a noise-conditional score s(x, σ). Like the PC sampler it takes a
pluggable ``consistency(x, σ)`` step before every Langevin step (Eqs. 8.6-8.7).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.sampling.pc import Cancelled, CountingScore, SampleResult
from models.sde import per_sample, randn


def annealed_langevin(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sigmas: torch.Tensor,
    shape: tuple[int, ...],
    n_steps_each: int = 3,
    step_lr: float = 2e-5,
    consistency: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device=None,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SampleResult:
    """Sample with ALD from x ~ N(0, σ_1² I); ``sigmas`` must decrease."""
    if not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError("sigmas must be strictly decreasing (σ_max first)")
    counted = CountingScore(score_fn)
    x = randn(shape, generator, device) * float(sigmas[0])
    total = len(sigmas)
    with torch.no_grad():
        for i, sigma in enumerate(sigmas):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled at level {i} of {total}")
            s = torch.full((shape[0],), float(sigma), device=device)
            alpha = step_lr * (float(sigma) / float(sigmas[-1])) ** 2
            for j in range(n_steps_each):
                if j and cancel is not None and cancel():  # a level is n_steps_each steps
                    raise Cancelled(f"cancelled at level {i} of {total}")
                if consistency is not None:
                    x = consistency(x, s)
                z = randn(shape, generator, device)
                x = x + alpha * counted(x, s) + (2 * alpha) ** 0.5 * z
            if progress is not None:
                progress(i + 1, total)
        if denoise:
            x = tweedie(counted, x, torch.full((shape[0],), float(sigmas[-1]), device=device))
    return SampleResult(x, counted.nfe)


def tweedie(score_fn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Tweedie's formula E[x_0 | x] = x + σ² s(x, σ): removes the last noise level."""
    return x + per_sample(sigma**2, x) * score_fn(x, sigma)
