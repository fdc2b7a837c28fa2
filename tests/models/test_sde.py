"""SDEs against closed forms: a Gaussian data set has an exact score at every t."""

import math

import pytest
import torch

from models.sde import SDES, VESDE, VPSDE, SubVPSDE, sigma_max_from_data
from tests.models.gaussian import S0, gaussian_score


@pytest.mark.parametrize("name", sorted(SDES))
def test_marginal_matches_simulated_forward_chain(name, rng):
    sde = SDES[name](N=500) if name != "ve" else VESDE(0.01, 5.0, N=500)
    x = torch.randn(4000, 4, generator=rng) * S0
    for i in range(sde.N):
        t = torch.full((x.shape[0],), (i + 1) / sde.N)
        f, G = sde.discretize(x, t)
        x = x + f + G[:, None] * torch.randn(x.shape, generator=rng)
    mean_coeff = sde.marginal_prob(torch.ones(1, 1), torch.ones(1))[0].item()
    std = sde.marginal_prob(torch.zeros(1, 1), torch.ones(1))[1].item()
    expected = math.sqrt(mean_coeff**2 * S0**2 + std**2)
    assert float(x.std()) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("probability_flow", [False, True])
def test_reverse_with_exact_score_recovers_data(name, probability_flow, rng):
    sde = SDES[name](N=400) if name != "ve" else VESDE(0.01, 5.0, N=400)
    rev = sde.reverse(gaussian_score(sde), probability_flow)
    # Start from the exact p_1 (not π) so the test isolates the reverse process itself.
    mean_coeff = sde.marginal_prob(torch.ones(1, 1), torch.ones(1))[0].item()
    std1 = sde.marginal_prob(torch.zeros(1, 1), torch.ones(1))[1].item()
    x = torch.randn(4000, 4, generator=rng) * math.sqrt(mean_coeff**2 * S0**2 + std1**2)
    dt = 1.0 / sde.N
    for i in range(sde.N, 0, -1):
        t = torch.full((x.shape[0],), i / sde.N)
        drift, diffusion = rev.sde(x, t)
        x = (
            x
            - drift * dt
            + diffusion[:, None] * math.sqrt(dt) * torch.randn(x.shape, generator=rng)
        )
    assert float(x.std()) == pytest.approx(S0, rel=0.06)


def test_prior_logp_is_normalised():
    sde = VESDE(0.01, 2.0)
    z = torch.zeros(1, 3)
    assert float(sde.prior_logp(z)) == pytest.approx(-1.5 * math.log(2 * math.pi * 4.0))
    assert float(VPSDE().prior_logp(torch.ones(1, 2))) == pytest.approx(-math.log(2 * math.pi) - 1)


def test_subvp_variance_bounded_by_vp():
    t = torch.linspace(0.01, 1, 50)
    x0 = torch.zeros(50, 1)
    assert bool(
        (SubVPSDE().marginal_prob(x0, t)[1] <= VPSDE().marginal_prob(x0, t)[1] + 1e-7).all()
    )


def test_sigma_max_is_largest_pairwise_distance():
    data = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    assert sigma_max_from_data(data) == pytest.approx(5.0)
    with pytest.raises(ValueError):
        VESDE(1.0, 0.5)
