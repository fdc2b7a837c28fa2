"""Samplers by name, so the CLI, the workers and the inverse solver pick them the same way.

``sample(name, sde, score_fn, shape, ...)`` runs one of:

- ``pc``: reverse-diffusion predictor + Langevin corrector (the paper's default, B.6.4);
- ``em``: Euler-Maruyama predictor alone (Algorithm 8.1);
- ``ancestral``: ancestral-sampling predictor + Langevin corrector;
- ``ode``: probability-flow ODE, Heun steps; ``ode-rk45``: adaptive RK45 to a tolerance;
- ``ald``: annealed Langevin dynamics (NCSN) on the VE noise scales, a time-conditioned
  network serving as s(x, σ) through t(σ);
- ``fast``: the DDIM-type Tweedie sampler of :mod:`models.sampling.ddim` (1 NFE per step),
  whose hook ``project(x0, t)`` acts on the clean estimate instead.

Every sampler takes the same ``consistency(x, t)`` hook (the data-consistency step of the
inverse solver) except the ODE ones, whose deterministic flow it would break. Every sampler
calls ``cancel()`` before each step (each Langevin step of ALD, each drift evaluation of
RK45) and raises ``Cancelled`` when it answers True, so a cancel takes effect within a step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from models.losses import ncsn_sigmas
from models.sampling.ald import annealed_langevin
from models.sampling.ddim import Project, tweedie_sampler
from models.sampling.pc import Consistency, Progress, SampleResult, ode_sampler, pc_sampler
from models.sde import SDE, VESDE, ScoreFn

SAMPLERS = ("pc", "em", "ancestral", "ode", "ode-rk45", "ald", "fast")


def sample(
    name: str,
    sde: SDE,
    score_fn: ScoreFn,
    shape: tuple[int, ...],
    n_steps: int = 500,
    snr: float = 0.16,
    consistency: Consistency | None = None,
    generator: torch.Generator | None = None,
    device=None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    project: Project | None = None,
    eta: float = 0.0,
    x_init: torch.Tensor | None = None,
    t_start: float | None = None,
) -> SampleResult:
    """Draw ``shape[0]`` samples with the named sampler; ``n_steps`` is its step count
    (noise levels for ALD, ignored by ``ode-rk45``). ``project`` and ``eta`` are the fast
    sampler's clean-estimate hook and stochasticity."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}; got {name!r}")
    common = {"generator": generator, "device": device, "progress": progress}
    if name == "fast":
        if consistency is not None:
            raise ValueError("sampler 'fast' takes a project(x0, t) hook, not consistency")
        return tweedie_sampler(
            sde,
            score_fn,
            shape,
            n_steps,
            eta,
            project=project,
            cancel=cancel,
            x_init=x_init,
            t_start=t_start,
            **common,
        )
    if name in ("pc", "em", "ancestral"):
        predictor = {"pc": "reverse_diffusion", "em": "euler_maruyama", "ancestral": "ancestral"}
        return pc_sampler(
            sde,
            score_fn,
            shape,
            predictor[name],
            "none" if name == "em" else "langevin",
            snr=snr,
            n_steps=n_steps,
            consistency=consistency,
            cancel=cancel,
            **common,
        )
    if consistency is not None and name.startswith("ode"):
        raise ValueError(f"sampler {name!r} is deterministic and takes no consistency step")
    if name == "ode":
        return ode_sampler(sde, score_fn, shape, n_steps=n_steps, cancel=cancel, **common)
    if name == "ode-rk45":
        return ode_sampler(sde, score_fn, shape, method="rk45", cancel=cancel, **common)
    if not isinstance(sde, VESDE):
        raise ValueError("sampler 'ald' needs a VE model (noise-conditional on σ)")
    return annealed_langevin(
        lambda x, s: score_fn(x, sde.t_of_sigma(s)),
        ncsn_sigmas(sde, n_steps),
        shape,
        consistency=None
        if consistency is None
        else (lambda x, s: consistency(x, sde.t_of_sigma(s))),
        cancel=cancel,
        **common,
    )
