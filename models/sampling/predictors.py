"""Predictors: one numerical step of the reverse-time SDE (seed 002, ch. 7.3, app. B.5.3)."""

from __future__ import annotations

import torch

from models.sde import SDE, VESDE, VPSDE, ScoreFn, per_sample, randn


class Predictor:
    """x_{t−Δt} from x_t: returns (sample, mean without the final noise)."""

    def __init__(self, sde: SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.sde = sde
        self.score_fn = score_fn
        self.rsde = sde.reverse(score_fn, probability_flow)

    def step(
        self, x: torch.Tensor, t: torch.Tensor, dt: float, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class EulerMaruyamaPredictor(Predictor):
    """Euler-Maruyama on the reverse SDE (Algorithm 8.1): x − f̄ Δt + ḡ √Δt z."""

    def step(self, x, t, dt, generator):
        drift, diffusion = self.rsde.sde(x, t)
        mean = x - drift * dt
        z = randn(x.shape, generator, x.device)
        return mean + per_sample(diffusion, x) * dt**0.5 * z, mean


class ReverseDiffusionPredictor(Predictor):
    """Reverse diffusion (app. B.5.3): x − f_i + G_i² s + G_i z, the PC default for VE."""

    def step(self, x, t, dt, generator):
        f, G = self.rsde.discretize(x, t)
        mean = x - f
        z = randn(x.shape, generator, x.device)
        return mean + per_sample(G, x) * z, mean


class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling of SMLD (VE, app. B.5.3) or DDPM (VP, Eq. 7.4)."""

    def step(self, x, t, dt, generator):
        sde = self.sde
        z = randn(x.shape, generator, x.device)
        if isinstance(sde, VESDE):
            sig = sde.sigma(t)
            sig_prev = torch.where(
                t - dt <= 0, torch.zeros_like(t), sde.sigma((t - dt).clamp_min(0))
            )
            score = self.score_fn(x, t)
            mean = x + per_sample(sig**2 - sig_prev**2, x) * score
            std = torch.sqrt(sig_prev**2 * (sig**2 - sig_prev**2) / sig**2)
            return mean + per_sample(std, x) * z, mean
        if isinstance(sde, VPSDE):
            beta = sde.beta(t) * dt
            score = self.score_fn(x, t)
            mean = (x + per_sample(beta, x) * score) / torch.sqrt(1 - per_sample(beta, x))
            return mean + per_sample(beta.sqrt(), x) * z, mean
        raise ValueError("ancestral sampling is defined for VE and VP SDEs")


PREDICTORS: dict[str, type[Predictor]] = {
    "euler_maruyama": EulerMaruyamaPredictor,
    "reverse_diffusion": ReverseDiffusionPredictor,
    "ancestral": AncestralSamplingPredictor,
}
