"""Objectives checked on Gaussian data, where the exact score is known in closed form."""

import pytest
import torch

from models.losses import ImportanceSampler, dsm_loss, ncsn_loss, ncsn_sigmas, sliced_score_matching
from models.sde import VESDE, VPSDE
from tests.models.gaussian import S0, gaussian_score


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE()])
@pytest.mark.parametrize("weighting", ["sigma2", "likelihood"])
def test_dsm_is_smallest_at_the_true_score(sde, weighting, rng):
    x0 = torch.randn(4096, 8, generator=rng) * S0
    true = gaussian_score(sde)

    def off(x, t):
        return 1.3 * true(x, t)

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert dsm_loss(true, sde, x0, weighting, generator=g1) < dsm_loss(
        off, sde, x0, weighting, generator=g2
    )


def test_importance_sampling_is_unbiased_and_lower_variance(rng):
    sde = VPSDE()
    # eps = 1e-2 keeps the uniform estimator's variance finite (g²/σ² ~ 1/t near 0).
    sampler = ImportanceSampler(sde, eps=1e-2)
    score = gaussian_score(sde)
    x0 = torch.randn(2048, 8, generator=rng) * S0
    uni = torch.stack(
        [dsm_loss(score, sde, x0, "likelihood", eps=1e-2, generator=rng) for _ in range(100)]
    )
    imp = torch.stack(
        [dsm_loss(score, sde, x0, "likelihood", sampler, generator=rng) for _ in range(100)]
    )
    assert float(imp.mean()) == pytest.approx(float(uni.mean()), rel=0.1)
    assert float(imp.std()) < float(uni.std())


@pytest.mark.parametrize("projection", ["rademacher", "gaussian"])
@pytest.mark.parametrize("vr", [False, True])
def test_sliced_score_matching_matches_closed_form(projection, vr, rng):
    """For N(0, s²I) in d dims and the true score −x/s², the SSM objective is −d/(2s²)."""
    d = 6
    x = torch.randn(20000, d, generator=rng) * S0

    def score(x, t):
        return -x / S0**2

    value = sliced_score_matching(score, x, torch.zeros(len(x)), 2, projection, vr, generator=rng)
    assert float(value.detach()) == pytest.approx(-d / (2 * S0**2), rel=0.05)


def test_ncsn_loss_and_sigmas(rng):
    sde = VESDE(0.01, 5.0)
    sig = ncsn_sigmas(sde, 10)
    assert sig[0] == pytest.approx(5.0) and sig[-1] == pytest.approx(0.01)
    x0 = torch.randn(4096, 4, generator=rng) * S0

    def true(x, s):
        return -x / (S0**2 + s[:, None] ** 2)

    def off(x, s):
        return 0.7 * true(x, s)

    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert ncsn_loss(true, x0, sig, g1) < ncsn_loss(off, x0, sig, g2)
