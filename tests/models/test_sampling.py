"""Samplers against a Gaussian data set, whose score is exact at every t."""

import pytest
import torch

from models.sampling import ode_sampler, pc_sampler
from models.sampling.pc import Cancelled
from models.sde import VESDE, VPSDE
from tests.models.gaussian import S0, gaussian_score

CASES = [
    (VESDE(0.01, 5.0, N=300), "reverse_diffusion", "langevin"),
    (VESDE(0.01, 5.0, N=300), "ancestral", "none"),
    (VESDE(0.01, 5.0, N=300), "euler_maruyama", "none"),
    (VPSDE(N=300), "reverse_diffusion", "langevin"),
    (VPSDE(N=300), "ancestral", "none"),
    (VPSDE(N=300), "euler_maruyama", "langevin"),
]


@pytest.mark.parametrize("sde,predictor,corrector", CASES)
def test_pc_sampler_recovers_gaussian_and_counts_nfe(sde, predictor, corrector, rng):
    steps = []
    res = pc_sampler(
        sde,
        gaussian_score(sde),
        (3000, 4),
        predictor,
        corrector,
        generator=rng,
        progress=lambda i, n: steps.append(i),
    )
    assert float(res.samples.std()) == pytest.approx(S0, rel=0.06)
    assert abs(float(res.samples.mean())) < 0.03
    assert res.nfe == sde.N * (2 if corrector == "langevin" else 1)
    assert steps[-1] == sde.N


@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0), VPSDE()])
def test_probability_flow_ode_recovers_gaussian(sde, rng):
    res = ode_sampler(sde, gaussian_score(sde), (3000, 4), n_steps=100, generator=rng)
    assert float(res.samples.std()) == pytest.approx(S0, rel=0.05)
    assert res.nfe == 200


def test_consistency_step_is_applied_before_each_step(rng):
    sde = VESDE(0.01, 5.0, N=50)
    calls = []

    def k(x, t):
        calls.append(float(t[0]))
        x = x.clone()
        x[:, 0] = 0.25  # pin one coordinate: the sample must honour it
        return x

    res = pc_sampler(sde, gaussian_score(sde), (64, 3), consistency=k, generator=rng)
    assert len(calls) == 2 * sde.N
    assert torch.allclose(res.samples[:, 0], torch.full((64,), 0.25), atol=0.05)


def test_cancel_and_bad_names(rng):
    sde = VESDE(0.01, 5.0, N=20)
    with pytest.raises(Cancelled, match="step 0"):
        pc_sampler(sde, gaussian_score(sde), (2, 2), cancel=lambda: True, generator=rng)
    with pytest.raises(ValueError, match="predictor must be one of"):
        pc_sampler(sde, gaussian_score(sde), (2, 2), predictor="rk45")


def test_annealed_langevin_recovers_gaussian(rng):
    from models.losses import ncsn_sigmas
    from models.sampling import annealed_langevin

    sigmas = ncsn_sigmas(VESDE(0.01, 5.0), 100)

    def score(x, s):
        return -x / (S0**2 + s[:, None] ** 2)

    res = annealed_langevin(score, sigmas, (3000, 4), n_steps_each=5, step_lr=2e-5, generator=rng)
    assert float(res.samples.std()) == pytest.approx(S0, rel=0.06)
    assert res.nfe == 100 * 5 + 1  # plus the Tweedie denoising step
    with pytest.raises(ValueError, match="decreasing"):
        annealed_langevin(score, sigmas.flip(0), (2, 2))


def test_tweedie_is_the_posterior_mean_for_gaussians(rng):
    from models.sampling import tweedie

    x = torch.randn(5, 3, generator=rng)
    sigma = torch.full((5,), 0.3)

    def score(y, s):
        return -y / (S0**2 + s[:, None] ** 2)

    expected = x * S0**2 / (S0**2 + 0.09)
    assert torch.allclose(tweedie(score, x, sigma), expected, atol=1e-6)


@pytest.mark.parametrize("name", ["pc", "em", "ancestral", "ode", "ald"])
def test_sampler_registry_recovers_gaussian(name, rng):
    from models.sampling.registry import sample

    sde = VESDE(0.01, 5.0, N=300)
    res = sample(name, sde, gaussian_score(sde), (3000, 4), n_steps=300, generator=rng)
    assert float(res.samples.std()) == pytest.approx(S0, rel=0.07)
    assert abs(float(res.samples.mean())) < 0.03
    assert res.nfe > 0


def test_rk45_ode_sampler_is_adaptive_and_exact_for_gaussians(rng):
    from models.sampling.registry import sample

    sde = VPSDE()
    loose = sample("ode-rk45", sde, gaussian_score(sde), (2000, 4), generator=rng)
    assert float(loose.samples.std()) == pytest.approx(S0, rel=0.05)
    # The probability-flow ODE of a Gaussian maps x_T to x_0 linearly: check it exactly.
    x_init = torch.randn(8, 4, generator=rng)
    res = ode_sampler(
        sde, gaussian_score(sde), (8, 4), method="rk45", x_init=x_init, rtol=1e-7, atol=1e-7
    )
    m, s = sde.marginal_prob(torch.ones(1, 1), torch.tensor([1.0]))
    var_T = float(m) ** 2 * S0**2 + float(s) ** 2
    scale = (S0**2 / var_T) ** 0.5  # the flow rescales by the ratio of marginal std devs
    eps_m, eps_s = sde.marginal_prob(torch.ones(1, 1), torch.tensor([1e-3]))
    scale *= ((float(eps_m) ** 2 * S0**2 + float(eps_s) ** 2) / S0**2) ** 0.5
    assert torch.allclose(res.samples, x_init * scale, rtol=1e-4, atol=1e-5)
    assert res.nfe < 400


def test_sampler_registry_refuses_bad_requests():
    from models.sampling.registry import sample

    sde = VPSDE()
    with pytest.raises(ValueError, match="sampler must be one of"):
        sample("ddpm++", sde, gaussian_score(sde), (2, 2))
    with pytest.raises(ValueError, match="VE model"):
        sample("ald", sde, gaussian_score(sde), (2, 2))
    with pytest.raises(ValueError, match="deterministic"):
        sample("ode", sde, gaussian_score(sde), (2, 2), consistency=lambda x, t: x)


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "ancestral"])
@pytest.mark.parametrize("sde", [VESDE(0.01, 5.0, N=1000), VPSDE(N=1000)])
def test_pc_sampler_with_fewer_steps_than_the_sde_discretisation(sde, predictor, rng):
    # Regression: the discrete predictors once stepped 1/N of the noise per step, so
    # 100 steps of an N = 1000 SDE left the samples almost as noisy as the prior.
    res = pc_sampler(
        sde, gaussian_score(sde), (3000, 4), predictor, "langevin", n_steps=100, generator=rng
    )
    assert float(res.samples.std()) == pytest.approx(S0, rel=0.08)
    assert res.nfe == 200


# The most score evaluations one step of each sampler makes (its NFE per step).
STEP_NFE = {"pc": 2, "em": 1, "ancestral": 2, "ode": 2, "ode-rk45": 1, "ald": 1, "fast": 1}


@pytest.mark.parametrize("name", sorted(STEP_NFE))
def test_every_sampler_stops_within_one_step_of_a_cancel(name, rng):
    """Issue 17: a cancel takes effect within one sampler step. The flag is raised inside a
    score evaluation (mid-step); at most the rest of that step may run before Cancelled."""
    from models.sampling.registry import sample

    sde = VESDE(0.01, 5.0, N=50) if name != "ode-rk45" else VPSDE()
    score, calls, flagged = gaussian_score(sde), [0], []

    def counting(x, t):
        calls[0] += 1
        if calls[0] == 7 and not flagged:
            flagged.append(calls[0])
        return score(x, t)

    with pytest.raises(Cancelled):
        sample(
            name, sde, counting, (16, 4), n_steps=50, generator=rng, cancel=lambda: bool(flagged)
        )
    assert 0 <= calls[0] - flagged[0] <= STEP_NFE[name], (name, calls[0], flagged)
