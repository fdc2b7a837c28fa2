"""Bayesian optimisation of the solver's λ and corrector r per task (app. B.6.4 tuned them
to maximise SSIM on a validation set); the best values go into the model card, where
``scorerecon reconstruct`` picks them up by default."""

from __future__ import annotations

import statistics

import torch

from models.inverse import Prior, ReconConfig, reconstruct, steps_for_nfe
from models.metrics import ssim
from models.physics import from_spec


def tuned_key(modality: str, sampler: str) -> str:
    """Where a card keeps the tuned values for a modality and sampler."""
    return f"{modality}-{sampler}"


def tune(
    prior: Prior,
    images: torch.Tensor,
    spec: dict,
    sampler: str = "pc",
    nfe: int = 100,
    trials: int = 20,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Maximise mean SSIM over ``images`` with optuna's TPE; returns the best λ, r and SSIM."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    op = from_spec(spec)
    with torch.no_grad():
        ys = op.forward(images)

    def objective(trial: optuna.Trial) -> float:
        cfg = ReconConfig(sampler=sampler, lam=trial.suggest_float("lam", 0.05, 1.0))
        if sampler in ("pc", "ald"):
            cfg.snr = trial.suggest_float("snr", 0.02, 0.4, log=True)
        cfg.n_steps = steps_for_nfe(cfg, nfe)
        scores = []
        for i in range(len(images)):
            rec = reconstruct(op, ys[i : i + 1], prior, cfg, 1, seed + i, spec.get("noise_std", 0))
            scores.append(ssim(rec.mean[0].clamp(0, 1), images[i]))
        return statistics.fmean(scores)

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials, show_progress_bar=progress)
    return {
        **study.best_params,
        "ssim": study.best_value,
        "trials": trials,
        "nfe": nfe,
        "images": len(images),
        "spec": spec,
    }
