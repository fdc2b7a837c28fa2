"""Predictor-corrector and probability-flow ODE sampling loops (seed 002, ch. 7.3-7.4).

Data consistency is a pluggable step ``k(x, t) -> x`` run before every predictor and
corrector step (Eqs. 8.6-8.7); without it the loops generate unconditional samples. Each
run counts its score-network evaluations (NFE) and reports progress.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from models.sampling.correctors import CORRECTORS
from models.sampling.predictors import PREDICTORS
from models.sde import SDE, ScoreFn

Consistency = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]


class CountingScore:
    """Wraps a score function and counts its evaluations (NFE)."""

    def __init__(self, score_fn: ScoreFn):
        self.score_fn, self.nfe = score_fn, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        return self.score_fn(x, t)


@dataclass
class SampleResult:
    samples: torch.Tensor
    nfe: int


class Cancelled(RuntimeError):
    """Raised when a cancel check asks a running sampler to stop."""


def pc_sampler(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    n_corrector_steps: int = 1,
    n_steps: int | None = None,
    eps: float = 1e-3,
    consistency: Consistency | None = None,
    denoise: bool = True,
    generator: torch.Generator | None = None,
    device=None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    x_init: torch.Tensor | None = None,
) -> SampleResult:
    """PC sampling (Algorithms B.4/B.5) from t = 1 down to ``eps`` in ``n_steps`` steps."""
    if predictor not in PREDICTORS:
        raise ValueError(f"predictor must be one of {sorted(PREDICTORS)}, got {predictor!r}")
    if corrector not in CORRECTORS:
        raise ValueError(f"corrector must be one of {sorted(CORRECTORS)}, got {corrector!r}")
    counted = CountingScore(score_fn)
    n = n_steps or sde.N
    # The predictors' discrete chains (and VP's corrector step) follow the SDE's N: sampling
    # in n steps needs the SDE discretised into n, or each step removes 1/N of the noise.
    sde = sde.with_steps(n)
    pred = PREDICTORS[predictor](sde, counted)
    corr = CORRECTORS[corrector](sde, counted, snr, n_corrector_steps)
    x = sde.prior_sampling(shape, generator, device) if x_init is None else x_init
    ts = torch.linspace(sde.T, eps, n, device=device)
    dt = (sde.T - eps) / n
    mean = x
    with torch.no_grad():
        for i, t_scalar in enumerate(ts):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled at step {i} of {n}")
            t = torch.full((shape[0],), float(t_scalar), device=device)
            if corrector != "none":
                if consistency is not None:
                    x = consistency(x, t)
                x, mean = corr.step(x, t, generator)
            if consistency is not None:
                x = consistency(x, t)
            x, mean = pred.step(x, t, dt, generator)
            if progress is not None:
                progress(i + 1, n)
    return SampleResult(mean if denoise else x, counted.nfe)


def ode_sampler(
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    n_steps: int = 200,
    eps: float = 1e-3,
    method: str = "heun",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    generator: torch.Generator | None = None,
    device=None,
    progress: Progress | None = None,
    x_init: torch.Tensor | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SampleResult:
    """Probability-flow ODE (Eq. 7.13) from t = 1 to ``eps``.

    ``method="heun"``: ``n_steps`` fixed second-order steps (2 NFE each). ``method="rk45"``:
    adaptive Dormand-Prince (scipy's ``solve_ivp``) to the tolerances ``rtol``/``atol``, as in
    the paper's ODE sampler; its NFE is whatever the tolerances demand. ``cancel`` is checked
    before every step (before every drift evaluation for RK45, whose steps it chooses).
    """
    counted = CountingScore(score_fn)
    rsde = sde.reverse(counted, probability_flow=True)
    x = sde.prior_sampling(shape, generator, device) if x_init is None else x_init
    if method == "rk45":
        return SampleResult(_rk45(rsde, x, sde.T, eps, rtol, atol, progress, cancel), counted.nfe)
    if method != "heun":
        raise ValueError(f"method must be 'heun' or 'rk45', got {method!r}")
    ts = torch.linspace(sde.T, eps, n_steps + 1, device=device)
    with torch.no_grad():
        for i in range(n_steps):
            if cancel is not None and cancel():
                raise Cancelled(f"cancelled at step {i} of {n_steps}")
            t0 = torch.full((shape[0],), float(ts[i]), device=device)
            t1 = torch.full((shape[0],), float(ts[i + 1]), device=device)
            h = float(ts[i + 1] - ts[i])
            d0, _ = rsde.sde(x, t0)
            x_euler = x + h * d0
            d1, _ = rsde.sde(x_euler, t1)
            x = x + h * 0.5 * (d0 + d1)
            if progress is not None:
                progress(i + 1, n_steps)
    return SampleResult(x, counted.nfe)


def _rk45(
    rsde, x: torch.Tensor, t0: float, t1: float, rtol, atol, progress, cancel=None
) -> torch.Tensor:
    """Adaptive RK45 on the flattened batch; progress reports the fraction of [t1, t0] done."""
    from scipy.integrate import solve_ivp

    shape, device, dtype = x.shape, x.device, x.dtype

    def f(t: float, y: np.ndarray) -> np.ndarray:
        if cancel is not None and cancel():
            raise Cancelled(f"cancelled at t = {t:.4g}")
        xt = torch.from_numpy(y).to(device=device, dtype=dtype).reshape(shape)
        with torch.no_grad():
            drift, _ = rsde.sde(xt, torch.full((shape[0],), t, device=device, dtype=dtype))
        if progress is not None:
            progress(round(1000 * (t0 - t) / (t0 - t1)), 1000)
        return drift.reshape(-1).double().cpu().numpy()

    y0 = x.reshape(-1).double().cpu().numpy()
    sol = solve_ivp(f, (t0, t1), y0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise RuntimeError(f"probability-flow ODE solver failed: {sol.message}")
    return torch.from_numpy(sol.y[:, -1]).to(device=device, dtype=dtype).reshape(shape)
