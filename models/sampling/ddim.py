"""A few-step sampler on the Tweedie estimate (DDIM-type), with a hook on the clean estimate.

At each of ``n_steps`` noise levels t_i (1 NFE each) the score gives the denoised estimate

.. math:: \\hat x_0 = (x_t + \\beta_t^2 s_\\theta(x_t, t)) / \\alpha_t \\quad \\text{(Tweedie)}

and the noise direction :math:`\\hat\\epsilon = -\\beta_t s_\\theta`. An optional
``project(x0, t)`` replaces :math:`\\hat x_0` (the inverse solver puts a least-squares data
consistency step there, where the image is clean and a projection is meaningful), and the
next state is the generalised DDIM step

.. math::
    x_{t'} = \\alpha_{t'} \\hat x_0 + \\sqrt{\\beta_{t'}^2 - c^2}\\,\\hat\\epsilon + c z,
    \\qquad c = \\eta\\,\\frac{\\beta_{t'}}{\\beta_t}
    \\sqrt{\\beta_t^2 - (\\alpha_t \\beta_{t'} / \\alpha_{t'})^2},

deterministic for η = 0 (DDIM) and, for η = 1, a draw from the forward process's posterior
q(x_{t'} | x_t, x̂_0) (ancestral, DDPM-like). α_t, β_t are the SDE's marginal mean
coefficient and standard deviation, so VE, VP and sub-VP SDEs share the code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.sampling.pc import Cancelled, CountingScore, Progress, SampleResult
from models.sde import SDE, ScoreFn, per_sample, randn

Project = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _coefficients(sde: SDE, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = sde.marginal_prob(torch.ones(len(t), 1, device=t.device), t)
    return mean.flatten(), std


def tweedie_sampler(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    n_steps: int = 50,
    eta: float = 0.0,
    eps: float = 1e-3,
    project: Project | None = None,
    generator: torch.Generator | None = None,
    device=None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    x_init: torch.Tensor | None = None,
    t_start: float | None = None,
) -> SampleResult:
    """Sample in ``n_steps`` network evaluations, returning the last (projected) estimate;
    from ``x_init`` at time ``t_start`` (default: a draw from the prior at T)."""
    counted = CountingScore(score_fn)
    x = sde.prior_sampling(shape, generator, device) if x_init is None else x_init
    # Time steps spaced uniformly in log σ for VE (uniform in t is the same thing), else in t.
    ts = torch.linspace(sde.T if t_start is None else t_start, eps, n_steps, device=device)
    x0 = x
    with torch.no_grad():
        for i in range(n_steps):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled at step {i} of {n_steps}")
            t = torch.full((shape[0],), float(ts[i]), device=device)
            a, b = _coefficients(sde, t)
            s = counted(x, t)
            x0 = (x + per_sample(b**2, x) * s) / per_sample(a, x)
            noise_dir = -per_sample(b, x) * s
            if project is not None:
                x0 = project(x0, t)
            if i + 1 < n_steps:
                t_next = torch.full((shape[0],), float(ts[i + 1]), device=device)
                a2, b2 = _coefficients(sde, t_next)
                jump = (b**2 - (a * b2 / a2) ** 2).clamp_min(0).sqrt()
                c = eta * b2 / b * jump
                z = randn(x.shape, generator, x.device)
                keep = (b2**2 - c**2).clamp_min(0).sqrt()
                x = per_sample(a2, x) * x0 + per_sample(keep, x) * noise_dir + per_sample(c, x) * z
            if progress is not None:
                progress(i + 1, n_steps)
    return SampleResult(x0, counted.nfe)
