import math

import pytest
import torch

from models.likelihood import bits_per_dim, log_likelihood
from models.sde import VESDE, VPSDE
from tests.models.gaussian import S0, gaussian_score


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE()])
def test_ode_likelihood_matches_gaussian_logpdf(sde, rng):
    d = 4
    x = torch.randn(256, d, generator=rng) * S0
    exact = -0.5 * d * math.log(2 * math.pi * S0**2) - x.pow(2).sum(1) / (2 * S0**2)
    est = log_likelihood(sde, gaussian_score(sde), x, n_steps=100, generator=rng)
    # Hutchinson noise averages out over the batch; the ODE error is small per sample.
    assert float(est.mean()) == pytest.approx(float(exact.mean()), abs=0.05 * d)
    assert float((est - exact).abs().median()) < 0.5


def test_bits_per_dim_convention():
    assert float(bits_per_dim(torch.tensor([0.0]), 10)) == pytest.approx(8.0)
