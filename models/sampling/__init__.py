"""Samplers for score-based priors: predictors, correctors and the PC / ODE loops."""

from models.sampling.ald import annealed_langevin, tweedie
from models.sampling.correctors import CORRECTORS, LangevinCorrector, NoneCorrector
from models.sampling.pc import CountingScore, SampleResult, ode_sampler, pc_sampler
from models.sampling.predictors import (
    PREDICTORS,
    AncestralSamplingPredictor,
    EulerMaruyamaPredictor,
    ReverseDiffusionPredictor,
)

__all__ = [
    "CORRECTORS",
    "PREDICTORS",
    "AncestralSamplingPredictor",
    "CountingScore",
    "EulerMaruyamaPredictor",
    "LangevinCorrector",
    "NoneCorrector",
    "ReverseDiffusionPredictor",
    "SampleResult",
    "annealed_langevin",
    "tweedie",
    "ode_sampler",
    "pc_sampler",
]
