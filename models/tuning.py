"""Bayesian optimisation of the solver's parameters per prior and task (app. B.6.4 tuned λ and
r on a validation set with 100 steps of Bayesian optimisation); the best values go into the
model card (``recon`` → modality), where every reconstruction picks them up by default.

Tuned under the evaluation protocol (:mod:`models.protocol`): validation slices of the real
data (never the test slabs) or held-out phantoms, simulated on a finer grid with realistic
noise, the noise level estimated from the data as in service. Parameters by sampler: the fast
sampler's ρ (error scale of the map step) and η (fresh noise); PC's λ and r.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Sequence

import torch

from models.inverse import Prior, ReconConfig, reconstruct, steps_for_nfe
from models.metrics import psnr
from models.protocol import Simulated, simulate

# The noise the validation measurements carry, by modality (see models/protocol.py).
DEFAULT_NOISE = {"ct": "gaussian:0.005", "mri": "complex:0.01"}


def validation_images(modality: str, size: int, n: int, data: str = "real") -> torch.Tensor:
    """``n`` validation slices at twice ``size``: real (the ``val`` slabs) or phantoms."""
    if data == "real":
        from models.protocol import fine_slices

        return fine_slices(modality, "val", size, n)
    from models.phantoms import ct_phantoms, mri_phantoms

    make = ct_phantoms if modality == "ct" else mri_phantoms
    return make(n, 2 * size, seed=2)  # seed 2: never trained on


def tune(
    prior: Prior,
    images_fine: torch.Tensor,
    task: str,
    level: int,
    sampler: str = "fast",
    nfe: int = 100,
    trials: int = 20,
    seed: int = 0,
    noise: str | None = None,
    progress: bool = True,
) -> dict:
    """Maximise mean PSNR over ``images_fine`` (N, 1, 2n, 2n) with optuna's TPE."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    modality = "ct" if task.startswith("ct") else "mri"
    noise = noise or DEFAULT_NOISE[modality]
    sim = simulate(images_fine, task, level, noise, seed)

    def objective(trial: optuna.Trial) -> float:
        cfg = ReconConfig(sampler=sampler)
        if sampler == "fast":
            cfg.rho = trial.suggest_float("rho", 0.02, 3.0, log=True)
            cfg.eta = trial.suggest_float("eta", 0.0, 1.0)
        else:
            cfg.lam = trial.suggest_float("lam", 0.05, 1.0)
            cfg.snr = trial.suggest_float("snr", 0.02, 0.4, log=True)
        cfg.n_steps = steps_for_nfe(cfg, nfe)
        scores = []
        for i in range(len(sim.y)):
            rec = reconstruct(sim.operator, sim.y[i : i + 1], prior, cfg, 1, seed + i)
            scores.append(psnr(rec.mean[0].clamp(0, 1), sim.reference[i]))
        return statistics.fmean(scores)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    return {
        "sampler": sampler,
        "nfe": nfe,
        **study.best_params,
        "psnr": study.best_value,
        "trials": trials,
        "images": len(images_fine),
        "task": task,
        "level": level,
        "noise": noise,
    }


def search_outward(
    measure: Callable[[float], float],
    grid: Sequence[float],
    factor: float,
    extend: int,
    *,
    up: bool = True,
    down: bool = True,
    digits: int = 4,
    measured: dict[float, float] | None = None,
) -> dict[float, float]:
    """``measure(v)`` (a validation score, higher better) of each value of ``grid``, then,
    while the best (ties: the smallest) is the largest value tried and ``up``, or the
    smallest and ``down``, one more value past that edge (× or ÷ ``factor`` > 1, rounded to
    ``digits``), ``extend`` times at most: the best of a grid that ended at its edge may lie
    outside it. ``measured``: scores known already, not measured again. Ascending by value."""
    if factor <= 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    scores = dict(measured or {})
    for v in grid:
        if v not in scores:
            scores[v] = measure(v)
    for _ in range(extend):
        values = sorted(scores)
        best = max(values, key=scores.get)
        if up and best == values[-1]:
            v = round(best * factor, digits)
        elif down and best == values[0]:
            v = round(best / factor, digits)
        else:
            break
        scores[v] = measure(v)
    return dict(sorted(scores.items()))


def grid_search(
    prior: Prior,
    sim: Simulated,
    grid: dict[str, tuple],
    nfe: int = 100,
    log: bool = True,
    samples: tuple[int, ...] = (1,),
    min_gain: float = 0.3,
) -> dict:
    """The fast sampler's settings from ``grid`` (e.g. ``{"rho": (0.3, 1.0), "eta": (0.5,
    0.85)}``) with the best mean PSNR on the validation measurements ``sim``; a few points
    where Bayesian optimisation (:func:`tune`) would cost too much.

    Then, at those settings, the number of posterior samples K averaged into the result (the
    posterior mean, which minimises the expected squared error, where one sample does not):
    each larger K of ``samples`` is kept only if it gains at least ``min_gain`` dB over the
    smaller one kept, since it costs K times the time.
    """

    def mean_psnr(cfg: ReconConfig) -> float:
        return statistics.fmean(
            psnr(
                reconstruct(sim.operator, sim.y[i : i + 1], prior, cfg, None, i)
                .mean[0]
                .clamp(0, 1),
                sim.reference[i],
            )
            for i in range(len(sim.y))
        )

    best: dict = {"psnr": -float("inf")}
    for values in itertools.product(*grid.values()):
        settings = dict(zip(grid, values, strict=True))
        cfg = ReconConfig(sampler="fast", **settings)
        cfg.n_steps = steps_for_nfe(cfg, nfe)
        mean = mean_psnr(cfg)
        if log:
            print(f"  {prior.name} {settings}: {mean:.2f} dB", flush=True)
        if mean > best["psnr"]:
            best = {"sampler": "fast", "nfe": nfe, **settings, "psnr": mean}
    best["samples"] = 1
    for k in sorted(set(samples) - {1}):
        cfg = ReconConfig(sampler="fast", **{key: best[key] for key in grid}, samples=k)
        cfg.n_steps = steps_for_nfe(cfg, nfe)
        mean = mean_psnr(cfg)
        if log:
            print(f"  {prior.name} samples {k}: {mean:.2f} dB", flush=True)
        if mean >= best["psnr"] + min_gain:
            best |= {"samples": k, "psnr": mean}
    return best
