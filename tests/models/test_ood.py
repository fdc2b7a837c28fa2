"""The out-of-distribution check (models/ood.py) and the calibrated posterior std (issue 24).

Closed forms first: the DSM loss of an exact Gaussian score, the two-sided typicality score,
AUROC, the threshold's percentile and the K-sample factor's coverage. Then the bundled
``ct-default`` on real held-out slices under the evaluation protocol: a CT slice is not
flagged, an MR slice measured as a CT sinogram is. Needs the real data (``make realdata``).
"""

import math

import pytest
import torch

from models.inverse import (
    Prior,
    ReconConfig,
    calibrated_std,
    fit_std_scale,
    k_sample_factor,
    reconstruct,
    std_ratios,
)
from models.ood import (
    OODCheck,
    auroc,
    calibrate,
    dsm_losses,
    held_out_false_alarms,
    mahalanobis,
    slice_comment,
    summary,
    to_prior_grid,
)
from models.protocol import fine_slices, simulate
from models.realdata import available
from models.sde import VESDE


def _gaussian_score(sde: VESDE, mu: float, s: float):
    """The exact score of x_t when x ~ N(μ, s² I): −(x_t − μ) / (s² + σ(t)²)."""

    def score(x, t):
        var = s**2 + sde.sigma(t).reshape(-1, 1, 1, 1) ** 2
        return -(x - mu) / var

    return score


def test_the_dsm_loss_of_an_exact_score_is_its_closed_form():
    """For x ~ N(μ, s² I) and the exact score, E(σ s(x + σz) + z)² = s² / (s² + σ²)."""
    sde, mu, s = VESDE(0.01, 10.0), 0.4, 0.2
    g = torch.Generator().manual_seed(1234)  # not the losses' noise stream (seeds 0-3)
    x = mu + s * torch.randn(4, 1, 64, 64, generator=g)
    times = (0.1, 0.3, 0.5)
    losses = dsm_losses(_gaussian_score(sde, mu, s), sde, x, times)
    sigma = sde.sigma(torch.tensor(times, dtype=torch.float64))
    expected = s**2 / (s**2 + sigma**2)
    assert torch.allclose(losses.mean(dim=0), expected, rtol=0.03), (losses.mean(0), expected)
    # A score whose mean is off by δ: s²/v + σ²δ²/v², v = s² + σ².
    delta, v = 0.3, s**2 + sigma**2
    wrong = dsm_losses(_gaussian_score(sde, mu + delta, s), sde, x, times)
    assert torch.allclose(wrong.mean(dim=0), s**2 / v + sigma**2 * delta**2 / v**2, rtol=0.03)


def test_a_slice_scores_the_same_alone_or_in_a_stack():
    sde = VESDE(0.01, 10.0)
    x = torch.rand(3, 1, 16, 16)
    score = _gaussian_score(sde, 0.5, 0.3)
    stack = dsm_losses(score, sde, x, seed=5)
    alone = dsm_losses(score, sde, x[2:3], seed=7)
    assert torch.equal(stack[2], alone[0])


def test_the_score_is_two_sided_and_zero_at_the_centre():
    """Mahalanobis distance of log ℓ: losses at the centre score 0, twice and half as large
    score alike, and a change along a direction the calibration slices vary in costs less
    than the same change across it."""
    centre = torch.log(torch.tensor([0.5, 0.1]))
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
    p = torch.linalg.inv(cov)
    logs = centre + torch.log(torch.tensor([[1.0, 1.0], [2.0, 2.0], [0.5, 0.5], [2.0, 0.5]]))
    s = mahalanobis(logs, centre.double(), p)
    assert float(s[0]) < 1e-9 and torch.isclose(s[1], s[2])
    assert float(s[3]) > 3 * float(s[1])  # against the correlation: atypical


def test_auroc_is_the_probability_an_outlier_outscores_an_inlier():
    assert auroc([1, 2, 3], [4, 5]) == 1.0
    assert auroc([4, 5], [1, 2, 3]) == 0.0
    assert auroc([1, 2], [1, 2]) == 0.5
    assert auroc([0, 10], [5]) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])


def test_calibration_puts_the_threshold_at_the_percentile_of_validation_scores():
    torch.manual_seed(0)
    level = torch.exp(0.3 * torch.randn(400, 1))  # anatomy: all times together
    val = level * torch.exp(0.05 * torch.randn(400, 3)) * torch.tensor([0.8, 0.3, 0.05])
    check = calibrate(val, (0.1, 0.2, 0.3), percentile=90.0)
    scores = check.typicality(val)
    assert abs(float((scores > check.threshold).float().mean()) - 0.10) < 0.01
    assert torch.allclose(torch.tensor(check.centre).double(), torch.log(val.double()).mean(0))
    # A profile unlike the calibration's (one time off by a factor 1.5) is flagged; the
    # same slice at another overall level (another anatomy) is not.
    probe = torch.tensor([[0.8, 0.3, 0.05]]).double()
    assert float(check.typicality(probe * torch.tensor([1.5, 1.0, 1.0]))) > check.threshold
    assert float(check.typicality(probe * 1.3)) < check.threshold
    again = OODCheck.from_card({"ood": check.to_card()})
    assert again == check
    assert OODCheck.from_card({}) is None
    with pytest.raises(ValueError, match="ood.method"):
        OODCheck.from_card({"ood": {**check.to_card(), "method": "magic"}})
    with pytest.raises(ValueError, match="precision"):
        OODCheck.from_card({"ood": {**check.to_card(), "precision": [[1.0]]}})
    with pytest.raises(ValueError, match="two validation"):
        calibrate(val[:1], (0.1, 0.2, 0.3))


def test_a_check_fitted_on_few_slices_flags_most_in_domain_slices_it_did_not_see():
    times = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)

    def draw(n: int) -> torch.Tensor:
        level = torch.exp(0.3 * torch.randn(n, 1))
        return level * torch.exp(0.05 * torch.randn(n, 6)) * torch.linspace(0.8, 0.05, 6)

    torch.manual_seed(0)
    # Many slices: left out, about 1 − percentile of them exceed the others' threshold.
    assert abs(held_out_false_alarms(draw(300)[:, :3], times[:3], 90.0) - 0.10) < 0.03
    assert held_out_false_alarms(draw(116), times, 99.0) <= 0.05
    # Twelve slices for a 6 × 6 covariance: in sample 1 % by construction, left out most.
    few = draw(12)
    check = calibrate(few, times, 99.0)
    assert int((check.typicality(few) > check.threshold).sum()) <= 1
    assert held_out_false_alarms(few, times, 99.0) > 0.5
    with pytest.raises(ValueError, match="three calibration slices"):
        held_out_false_alarms(few[:2], times)


def test_a_stack_verdict_names_its_flagged_slices_and_each_slice_its_comment():
    verdicts = [
        {"score": 0.1, "threshold": 0.5, "flag": False, "method": "dsm on the reconstruction"},
        {"score": 0.9, "threshold": 0.5, "flag": True, "method": "dsm on the reconstruction"},
    ]
    s = summary(verdicts)
    assert (
        s["flag"] and s["flagged_slices"] == [1] and s["score"] == 0.9 and s["scores"] == [0.1, 0.9]
    )
    assert slice_comment(s, 1).startswith(
        "OUT OF DISTRIBUTION"
    ) and "0.9 > threshold 0.5" in slice_comment(s, 1)
    assert slice_comment(s, 0).startswith("In-distribution check passed (score 0.1")
    assert summary([]) is None


def test_slices_are_brought_to_the_priors_grid_as_its_validation_slices_were():
    """Padded with air to a square, then resized with anti-aliasing (models.realdata)."""
    import numpy as np

    from models.realdata import _square

    g = torch.Generator().manual_seed(0)
    rect = torch.rand(1, 1, 96, 64, generator=g)
    ours = to_prior_grid(rect, 32)[0, 0].numpy()
    theirs = _square(rect[0, 0].double().numpy(), 32)
    assert ours.shape == (32, 32) and abs(ours[:, :3]).max() < 0.05  # air at the sides
    assert np.corrcoef(ours.ravel(), theirs.ravel())[0, 1] > 0.95
    same = torch.rand(2, 1, 32, 32, generator=g)
    assert torch.equal(to_prior_grid(same, 32), same)


def test_the_k_sample_factor_gives_95_percent_coverage_of_a_further_draw():
    """K draws of N(0, 1) and a further one (the truth, were the posterior exact):
    |x − x̄| ≤ 2 κ(K) s_K holds about 95 % of the time (2 rather than 1.96: a little over)."""
    g = torch.Generator().manual_seed(0)
    for k in (2, 4, 8):
        draws = torch.randn(200_000, k + 1, generator=g, dtype=torch.float64)
        samples, truth = draws[:, :k], draws[:, k]
        std = samples.std(dim=1)
        inside = (truth - samples.mean(dim=1)).abs() <= 2 * calibrated_std(std, k, 1.0)
        assert 0.95 <= float(inside.double().mean()) <= 0.962, (k, float(inside.double().mean()))
        raw = (truth - samples.mean(dim=1)).abs() <= 2 * std
        assert float(raw.double().mean()) < 0.93  # what the raw std of K draws covers
    assert math.isclose(k_sample_factor(4), 3.182446 * math.sqrt(1.25) / 1.959964, rel_tol=1e-5)


def test_fit_std_scale_makes_the_band_cover_95_percent_of_errors_the_raw_std_understates():
    """Errors three times what K = 4 draws' std says: the fitted c brings the ±2 c κ(K) s_K
    band to 95 % coverage of fresh pixels with the same understatement, and no further."""
    g = torch.Generator().manual_seed(0)
    k, n = 4, 100_000
    std = 0.01 + 0.05 * torch.rand(2, n, generator=g, dtype=torch.float64)
    ref = torch.zeros(2, n, dtype=torch.float64)
    mean = 3 * std * torch.randn(2, n, generator=g, dtype=torch.float64)
    c = fit_std_scale(std_ratios(ref[0], mean[0], std[0]), k)
    assert math.isclose(c * k_sample_factor(k), 1.96 * 3 / 2, rel_tol=0.03), c
    fresh = std_ratios(ref[1], mean[1], calibrated_std(std[1], k, c))
    assert 0.94 <= float((fresh <= 1).double().mean()) <= 0.96
    # No spread where there is error: no scale can cover it, and it says so.
    with pytest.raises(ValueError, match="do not vary"):
        fit_std_scale(std_ratios(ref[0], mean[0], torch.zeros(n)), k)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fit_std_scale(std_ratios(ref[0], mean[0], std[0]), 1)


@pytest.fixture(scope="module")
def ct_prior():
    if not available():
        pytest.skip("no real data fetched (make realdata / scorerecon data fetch)")
    prior = Prior.load("ct-default", bf16=None)
    assert OODCheck.from_card(prior.card) is not None, "ct-default's card has no OOD check"
    return prior


@pytest.mark.parametrize("modality, flagged", [("ct", False), ("mri", True)])
def test_ct_default_flags_an_mr_slice_and_not_a_ct_slice(ct_prior, modality, flagged):
    """Held-out test slices, measured as 23-view CT sinograms on a grid twice as fine with
    the protocol's noise, reconstructed with the card's defaults (and its check)."""
    fine = fine_slices(modality, "test", 128, 3)[1:2]
    sim = simulate(fine, "ct-sparse", 23, "gaussian:0.005", seed=3)
    config = ReconConfig.for_prior(ct_prior, "ct")
    rec = reconstruct(sim.operator, sim.y, ct_prior, config, None, 3)
    (verdict,) = rec.ood
    assert verdict["flag"] is flagged, verdict
    assert verdict["method"] == "dsm on the classical image"  # as the card says
    assert any("OUT OF DISTRIBUTION" in w for w in rec.warnings) is flagged


def test_reconstruct_reports_the_calibrated_std_and_checks_divergence_on_the_raw_one():
    """std_scale c: the std reported is c κ(K) times the K draws' (same seed, same draws)."""
    from tests.models.gaussian import S0, OrthogonalMaskOperator, gaussian_score

    sde = VESDE(0.01, 5.0)
    op = OrthogonalMaskOperator(8, 40, 0)
    x = S0 * torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    prior = Prior(gaussian_score(sde), sde, 8)
    config = ReconConfig(n_steps=20)
    raw = reconstruct(op, op.forward(x), prior, config, 4, 0, 0.01)
    config.std_scale = 2.0
    calibrated = reconstruct(op, op.forward(x), prior, config, 4, 0, 0.01)
    assert torch.equal(raw.mean, calibrated.mean)
    assert torch.allclose(calibrated.std, 2.0 * k_sample_factor(4) * raw.std)
    # A scale large enough to put the reported std past the saturation bound changes nothing
    # of the verdict: divergence is judged on the draws' own spread.
    config.std_scale = 0.3 / max(float(raw.std.mean()), 1e-6)
    assert reconstruct(op, op.forward(x), prior, config, 4, 0, 0.01).diverged is None
    assert prior.card == {} and raw.ood == []  # no card, no check
