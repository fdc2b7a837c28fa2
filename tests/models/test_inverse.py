"""The inverse solver against closed forms (Gaussian prior with an exact score)."""

import pytest
import torch

from models.data import mr_scale
from models.inverse import (
    LEVEL,
    Prior,
    ReconConfig,
    intensity_scale,
    prox_step,
    prox_tv_step,
    proximal_step,
    reconstruct,
    steps_for_nfe,
)
from models.phantoms import ct_phantoms, mri_phantoms
from models.physics import from_spec
from models.sde import VESDE
from tests.models.gaussian import S0, OrthogonalMaskOperator, gaussian_score

SIDE, M = 4, 6


def _problem(seed=0):
    op = OrthogonalMaskOperator(SIDE, M, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_true = S0 * torch.randn(1, 1, SIDE, SIDE, generator=g)
    return op, x_true, op.forward(x_true)


def _prior(sde, side=SIDE):
    return Prior(gaussian_score(sde), sde, side)


# The fast sampler's few steps cost it a few per cent of posterior variance (measured 4 %
# at 100 steps), hence its wider covariance tolerance.
@pytest.mark.parametrize("sampler,steps,tol", [("pc", 400, 0.1), ("fast", 100, 0.12)])
def test_posterior_mean_and_covariance_match_the_gaussian_posterior(sampler, steps, tol):
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=steps)
    cfg = ReconConfig(sampler=sampler, n_steps=steps, eta=0.5, clip=False)  # support: all of R
    rec = reconstruct(op, y, _prior(sde), cfg, n_samples=2000, seed=3, noise_std=0)
    # Analytic posterior: mean Qᵀ P⁻¹(Λ) y, covariance S0² Qᵀ (I − Λ) Q.
    mean = op.T_inv(op.pad(y))
    cov = S0**2 * op.Q.T @ torch.diag((~op.mask).float()) @ op.Q
    flat = rec.samples.reshape(2000, -1)
    emp_cov = torch.cov(flat.T)
    assert (rec.mean - mean).abs().max() < 0.05
    assert float((emp_cov - cov).norm() / cov.norm()) < tol
    assert float(emp_cov.trace() / cov.trace()) == pytest.approx(1.0, abs=0.06)
    assert rec.residual[0] < 1e-4
    assert rec.nfe == steps * (2 if sampler == "pc" else 1)


def test_lambda_zero_gives_unconditional_samples():
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=300)
    cfg = ReconConfig(sampler="pc", n_steps=300, lam=0.0, final_projection=False)
    rec = reconstruct(op, y, _prior(sde), cfg, n_samples=2000, seed=1, noise_std=0)
    flat = rec.samples.reshape(2000, -1)
    assert float(flat.std()) == pytest.approx(S0, rel=0.06)
    assert float(flat.mean(0).abs().max()) < 0.05
    assert rec.residual[0] > 0.3  # the data were ignored


@pytest.mark.parametrize(
    "spec",
    [
        {"modality": "ct", "image_size": 32, "n_views": 8},
        {"modality": "mri", "image_size": 32, "mask": {"kind": "equispaced", "acceleration": 4}},
    ],
)
def test_final_step_reproduces_noiseless_data(spec):
    op = from_spec(spec)
    g = torch.Generator().manual_seed(0)
    x_true = torch.rand(1, 1, 32, 32, generator=g)
    y = op.forward(x_true)
    sde = VESDE(0.01, 5.0, N=20)
    rec = reconstruct(op, y, _prior(sde, 32), ReconConfig(n_steps=20), noise_std=0)
    assert rec.residual[0] < 1e-4
    assert rec.mean.shape == (1, 1, 32, 32) and rec.std.abs().max() == 0


@pytest.mark.parametrize(
    "name,step",
    [
        ("proximal", lambda op, x, y: proximal_step(op, x, y, 1.0)),
        ("proximal-0.5", lambda op, x, y: proximal_step(op, x, y, 0.5)),
        ("map", lambda op, x, y: prox_step(op, x, y, 0.0, 2)),
        ("map-1", lambda op, x, y: prox_step(op, x, y, 1.0, 2)),
    ],
)
@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_each_consistency_step_reduces_the_residual_monotonically(name, step, modality):
    spec = (
        {"modality": "ct", "image_size": 32, "n_views": 12}
        if modality == "ct"
        else {"modality": "mri", "image_size": 32, "mask": {"kind": "random", "acceleration": 4}}
    )
    op = from_spec(spec)
    g = torch.Generator().manual_seed(2)
    y = op.forward(torch.rand(1, 1, 32, 32, generator=g))
    x = torch.rand(1, 1, 32, 32, generator=g)
    norms = []
    for _ in range(6):
        r = op.forward(x) - y
        norms.append(float(r.abs().norm()))
        x = step(op, x, y)
    floor = 1e-5 * norms[0]  # float32 round-off once the data are fitted
    assert all(b < a or b < floor for a, b in zip(norms, norms[1:], strict=False)), norms
    assert norms[-1] < 0.9 * norms[0]


def test_bad_requests_are_refused_with_the_fix():
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=10)
    with pytest.raises(ValueError, match="sampler must be one of"):
        reconstruct(op, y, _prior(sde), ReconConfig(sampler="ode"))
    with pytest.raises(ValueError, match="'langevin' runs with sampler 'ald'"):
        reconstruct(op, y, _prior(sde), ReconConfig(method="langevin"))
    assert steps_for_nfe(ReconConfig(sampler="pc"), 100) == 50
    assert steps_for_nfe(ReconConfig(sampler="fast"), 100) == 100


def test_comparison_methods_run_and_fit_the_data():
    op, x_true, y = _problem()
    sde = VESDE(0.01, 5.0, N=200)
    for cfg in (
        ReconConfig(sampler="pc", method="score-sde", n_steps=200),
        ReconConfig(method="langevin", sampler="ald", n_steps=100, final_projection=False),
    ):
        rec = reconstruct(op, y, _prior(sde), cfg, n_samples=64, seed=0, noise_std=0)
        assert rec.residual[0] < 0.05, (cfg.method, rec.residual)


@pytest.mark.parametrize(
    "spec",
    [
        {
            "modality": "ct",
            "image_size": 32,
            "n_views": 12,
            "geometry": "fan",
            "source_distance": 60,
            "detector_distance": 40,
        },
        {
            "modality": "mri",
            "image_size": 32,
            "coils": 4,
            "mask": {"kind": "equispaced", "acceleration": 4},
        },
    ],
)
def test_operators_without_exact_inverse_use_least_squares(spec):
    op = from_spec(spec)
    y = op.forward(torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)))
    sde = VESDE(0.01, 5.0, N=10)
    rec = reconstruct(op, y, _prior(sde, 32), ReconConfig(n_steps=10), noise_std=0)
    assert rec.provenance["method"] == "map"
    assert rec.residual[0] < 1e-2


def _dense(op, n: int) -> torch.Tensor:
    """A as a dense (m, n²) float64 matrix, column by column."""
    basis = torch.eye(n * n).reshape(n * n, 1, n, n)
    cols = torch.cat([op.forward(basis[i : i + 64]).flatten(1) for i in range(0, n * n, 64)])
    return cols.double().T


@pytest.mark.parametrize("lam", [1.0, 0.6])
def test_ct_proximal_step_is_the_closed_form_of_eq_8_8(lam):
    """Theorem 8.1 for CT: Eq. 8.8 (Euclidean norm) is solved by x + λ A⁺(y − A x); the
    step equals it, where FBP as T⁻¹ removed only about n_views/n_dense of the residual."""
    n = 16
    op = from_spec({"modality": "ct", "image_size": n, "n_views": 6})
    g = torch.Generator().manual_seed(0)
    x, x_true = torch.rand(2, 1, 1, n, n, generator=g)
    y = op.forward(x_true)
    a = _dense(op, n)
    r = y.flatten().double() - a @ x.flatten().double()
    # ASTRA computes in float32: singular values below 1e-5 σ_max are its round-off, not A's.
    expected = x.flatten().double() + lam * torch.linalg.pinv(a, rtol=1e-5) @ r
    got = proximal_step(op, x, y, lam, iters=300).flatten().double()
    assert float((got - expected).norm() / expected.norm()) < 2e-3
    if lam == 1.0:
        assert float((op.forward(got.float().reshape(x.shape)) - y).norm() / y.norm()) < 1e-3


def test_mri_proximal_step_is_eq_8_9():
    """For A = P(Λ) F with F unitary the step is Eq. 8.9 itself, on complex images."""
    op = from_spec(
        {"modality": "mri", "image_size": 32, "mask": {"kind": "random", "acceleration": 4}}
    )
    g = torch.Generator().manual_seed(1)
    x = torch.complex(torch.rand(1, 1, 32, 32, generator=g), torch.rand(1, 1, 32, 32, generator=g))
    y = op.forward(torch.rand(1, 1, 32, 32, generator=g))
    lam, m = 0.7, op.mask.to(torch.complex64)
    tx = op.T(x)
    eq_8_9 = op.T_inv(lam * m * op.pad(y) + (1 - lam) * m * tx + (1 - m) * tx)
    assert torch.allclose(proximal_step(op, x, y, lam), eq_8_9, atol=1e-5)
    # The old real-part T⁻¹ halved corrections whose mirror line is not measured: no more.
    fitted = proximal_step(op, x, y, 1.0)
    assert float((op.forward(fitted) - y).abs().max()) < 1e-5


def test_map_step_weights_noisy_data_and_projects_noiseless_data():
    """μ = 0 fits the data exactly; μ > 0 stays between the estimate and the data."""
    op = from_spec({"modality": "ct", "image_size": 32, "n_views": 12})
    g = torch.Generator().manual_seed(3)
    x, x_true = torch.rand(2, 1, 1, 32, 32, generator=g)
    y = op.forward(x_true)
    exact = prox_step(op, x, y, 0.0, 200)
    assert float((op.forward(exact) - y).norm() / y.norm()) < 1e-3
    damped = prox_step(op, x, y, 50.0, 200)
    r0, r1 = (float((op.forward(v) - y).norm()) for v in (x, damped))
    assert 1e-3 * r0 < r1 < r0
    assert float((damped - x).norm()) < float((exact - x).norm())


def test_noise_level_is_estimated_reported_and_validated():
    op = from_spec({"modality": "ct", "image_size": 64, "n_views": 12})
    y = op.forward(ct_phantoms(1, 64, seed=4))
    y = y + 0.01 * float(y.max()) * torch.randn(y.shape, generator=torch.Generator())
    sde = VESDE(0.01, 5.0, N=10)
    rec = reconstruct(op, y, _prior(sde, 64), ReconConfig(n_steps=10))
    assert rec.noise_std_used[0] == pytest.approx(0.01 * float(y.max()), rel=0.3)
    assert rec.provenance["noise_std_source"] == "estimated from the data"
    rec = reconstruct(op, y, _prior(sde, 64), ReconConfig(n_steps=10), noise_std=0.5)
    assert rec.noise_std_used == [0.5]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_std must be a finite number >= 0"):
            reconstruct(op, y, _prior(sde, 64), ReconConfig(n_steps=2), noise_std=bad)


def test_progress_counts_network_evaluations():
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=10)
    seen: list[tuple[int, int]] = []
    rec = reconstruct(
        op,
        y,
        _prior(sde),
        ReconConfig(sampler="pc", n_steps=10),
        noise_std=0,
        progress=lambda i, n: seen.append((i, n)),
    )
    assert seen[-1] == (rec.nfe, rec.nfe) == (20, 20)


def test_diverged_results_are_flagged_with_the_reason():
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=10)

    def exploding(x, t):
        return 1e3 * torch.ones_like(x)

    rec = reconstruct(op, y, Prior(exploding, sde, SIDE), ReconConfig(n_steps=10), noise_std=0)
    assert rec.diverged is not None and "outside" in rec.diverged

    def grey(x, t):  # data N(0.5, 0.1²) in a VE SDE: an image-like prior on [0, 1]
        return -(x - 0.5) / (0.01 + sde.sigma(t) ** 2).reshape(-1, 1, 1, 1)

    y = op.forward(0.5 + 0.1 * torch.randn(1, 1, SIDE, SIDE, generator=torch.Generator()))
    rec = reconstruct(op, y, Prior(grey, sde, SIDE), ReconConfig(n_steps=10), noise_std=0)
    assert rec.diverged is None


def test_cancel_is_honoured_inside_the_final_projection():
    """Issue 17: the final projection runs up to 3 × 400 CG iterations, longer than many
    sampler steps; a cancel raised after the last sampler step stops it within one CG
    iteration (one forward and one adjoint projection)."""
    from models.inverse import Cancelled, project_affine

    op = from_spec({"modality": "ct", "image_size": 32, "n_views": 8})
    g = torch.Generator().manual_seed(0)
    y = op.forward(torch.rand(1, 1, 32, 32, generator=g))
    sde = VESDE(0.01, 5.0, N=6)
    armed = []
    with pytest.raises(Cancelled, match="final projection"):
        reconstruct(
            op,
            y,
            _prior(sde, 32),
            ReconConfig(n_steps=6),
            noise_std=0,  # noiseless: the final projection runs
            progress=lambda i, n: i == n and armed.append(i),
            cancel=lambda: bool(armed),
        )
    forwards, flag = [0], []

    class Counting:
        def forward(self, x):
            forwards[0] += 1
            if forwards[0] == 5:
                flag.append(forwards[0])
            return op.forward(x)

        def adjoint(self, v):
            return op.adjoint(v)

    with pytest.raises(Cancelled):
        project_affine(Counting(), torch.zeros(1, 1, 32, 32), y, 400, cancel=lambda: bool(flag))
    assert forwards[0] - flag[0] <= 1


def test_every_evaluation_task_builds_its_operator():
    """task_spec("ct-fan") used to raise (no source/detector distances); MRI masks reach
    their acceleration at every level the benchmarks use."""
    from models.evaluate import TASKS, task_spec
    from models.physics.mri import acceleration_of

    for task in TASKS:
        for level in (4, 8, 24) if task.startswith("mri") else (23, 60):
            op = from_spec(task_spec(task, level, 128))
            if task.startswith("mri"):
                assert acceleration_of(op.mask) == pytest.approx(level, rel=0.1)


def test_the_number_of_posterior_samples_defaults_to_the_cards():
    """K comes from the call, else from the config, which a card's ``recon`` sets."""
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=10)
    card = {"recon": {"ct": {"sampler": "fast", "nfe": 10, "samples": 3}}}
    config = ReconConfig.from_card(card, "ct")
    assert config.samples == 3 and config.n_steps == 10
    assert reconstruct(op, y, _prior(sde), config).samples.shape[1] == 3
    assert reconstruct(op, y, _prior(sde), config, 2).samples.shape[1] == 2
    assert ReconConfig.from_card({}, "ct").samples == 1


def _tv(x: torch.Tensor) -> torch.Tensor:
    """Isotropic TV per sample (real and imaginary parts jointly), as tv_prox defines it."""
    dx = torch.zeros_like(x)
    dy = torch.zeros_like(x)
    dx[..., :, :-1] = x[..., :, 1:] - x[..., :, :-1]
    dy[..., :-1, :] = x[..., 1:, :] - x[..., :-1, :]
    return (dx.abs() ** 2 + dy.abs() ** 2).sqrt().flatten(1).sum(1)


def test_tv_map_step_minimises_its_objective():
    """½||Ax' − y||² + ½μ||x' − x||² + w TV(x'): equal to the TV-free step where w = 0,
    lower in objective and in TV than it where w > 0, and at the optimum that many more
    iterations reach (multi-coil MRI, complex images, one weight per sample)."""
    op = from_spec(
        {
            "modality": "mri",
            "image_size": 32,
            "coils": 4,
            "mask": {"kind": "equispaced", "acceleration": 4},
        }
    )
    g = torch.Generator().manual_seed(5)
    x_true = ct_phantoms(2, 32, seed=5).to(torch.complex64)
    y = op.forward(x_true)
    y = y + 0.02 * torch.randn(y.shape, generator=g, dtype=torch.complex64) * op.mask
    x = x_true + 0.1 * torch.randn(x_true.shape, generator=g)
    mu, w = torch.tensor([0.5, 0.5]), torch.tensor([0.0, 0.02])
    lip = 1.05 * op.norm() ** 2

    def objective(v):
        r = op.forward(v) - y
        return (
            0.5 * r.abs().pow(2).flatten(1).sum(1)
            + 0.25 * (v - x).abs().pow(2).flatten(1).sum(1)
            + w * _tv(v)
        )

    start = prox_step(op, x, y, mu, 50)
    out = prox_tv_step(op, x, y, mu, w, 10, 50, lip)
    assert torch.allclose(out[0], start[0])
    assert float(objective(out)[1]) < float(objective(start)[1])
    assert float(_tv(out)[1]) < float(_tv(start)[1])
    best = prox_tv_step(op, x, y, mu, w, 400, 50, lip)
    gap = float(objective(out)[1] - objective(best)[1])
    assert 0 <= gap < 0.05 * float(objective(start)[1] - objective(best)[1])


def test_tv_weight_comes_from_the_card_and_changes_the_result():
    op = from_spec({"modality": "ct", "image_size": 32, "n_views": 12})
    x_true = ct_phantoms(1, 32, seed=6)
    y = op.forward(x_true)
    y = y + 0.01 * float(y.max()) * torch.randn(y.shape, generator=torch.Generator())
    card = {"recon": {"ct": {"sampler": "fast", "nfe": 10, "tv": 50.0}}}
    config = ReconConfig.from_card(card, "ct")
    assert config.tv == 50.0
    sde = VESDE(0.01, 5.0, N=10)
    with_tv = reconstruct(op, y, _prior(sde, 32), config)
    config.tv = 0.0
    without = reconstruct(op, y, _prior(sde, 32), config)
    assert with_tv.provenance["config.tv"] == 50.0
    assert float(_tv(with_tv.mean)[0]) < float(_tv(without.mean)[0])


def test_multicoil_values_of_the_card_apply_to_multicoil_operators_only():
    """Including the posterior std's scale: multi-coil draws, started from the data, are
    calibrated apart (benchmarks/mri_multicoil.py --calibrate-std)."""
    multicoil = {"tv": 10.0, "std_scale": 12.5}
    mri = {"sampler": "fast", "eta": 0.85, "std_scale": 2.0, "multicoil": multicoil}
    card = {"recon": {"mri": mri}}
    spec = {"modality": "mri", "image_size": 32, "mask": {"kind": "equispaced", "acceleration": 4}}
    single, multi = from_spec(spec), from_spec({**spec, "coils": 4})
    prior = Prior(lambda x, t: x, VESDE(0.01, 5.0, N=10), 32, card=card)
    one_coil = ReconConfig.for_prior(prior, "mri", operator=single)
    assert one_coil.tv == 0.0 and one_coil.std_scale == 2.0
    with_coils = ReconConfig.for_prior(prior, "mri", operator=multi)
    assert with_coils.tv == 10.0 and with_coils.eta == 0.85 and with_coils.std_scale == 12.5
    assert ReconConfig.from_card(card, "mri").tv == 0.0


def test_the_cards_larger_values_apply_to_images_larger_than_the_prior_only():
    """``larger`` (benchmarks/larger_images.py) holds what a larger image gets: fewer
    posterior samples and CG iterations there, the card's own at the trained size."""
    larger = {"samples": 2, "cg_iters": 3}
    card = {"image_size": 32, "recon": {"ct": {"samples": 4, "larger": larger}}}
    prior = Prior(lambda x, t: x, VESDE(0.01, 5.0, N=10), 32, card=card)
    same = from_spec({"modality": "ct", "image_size": 32, "n_views": 8})
    bigger = from_spec({"modality": "ct", "image_size": 64, "n_views": 8})
    assert ReconConfig.for_prior(prior, "ct", operator=same).samples == 4
    above = ReconConfig.for_prior(prior, "ct", operator=bigger)
    assert (above.samples, above.cg_iters) == (2, 3)
    assert ReconConfig.for_prior(prior, "ct", operator=same).cg_iters == ReconConfig().cg_iters
    assert ReconConfig.from_card(card, "ct").samples == 4  # no size named: the card's own
    assert ReconConfig.from_card(card, "ct", image_size=(64, 64)).samples == 2
    assert ReconConfig.from_card(card, "ct", image_size=(32, 48)).samples == 2  # either side


def test_a_slice_comes_out_the_same_alone_or_in_a_batch():
    """Slice i of a stack draws from its own stream (seed + i): a volume solved in one
    batch equals its slices solved one by one, as a split across workers solves them."""
    op = from_spec({"modality": "ct", "image_size": 32, "n_views": 12})
    y = op.forward(ct_phantoms(3, 32, seed=7))
    y = y + 0.01 * float(y.max()) * torch.randn(y.shape, generator=torch.Generator())
    prior = _prior(VESDE(0.01, 5.0, N=10), 32)
    config = ReconConfig(n_steps=20)
    batch = reconstruct(op, y, prior, config, 2, seed=5)
    alone = [reconstruct(op, y[i : i + 1], prior, config, 2, seed=5 + i) for i in range(3)]
    assert torch.allclose(batch.samples, torch.cat([a.samples for a in alone]), atol=1e-4)
    other = reconstruct(op, y[1:2], prior, config, 2, seed=5)
    assert not torch.allclose(other.samples, alone[1].samples, atol=1e-3)


def test_z_tv_couples_the_slices_of_a_stack_only_when_asked():
    """tv_z = 0: a stack is its slices (previous test); tv_z > 0: neighbouring slices of
    a noisy stack of one repeated object come out closer to each other."""
    op = from_spec({"modality": "ct", "image_size": 32, "n_views": 12})
    x = ct_phantoms(1, 32, seed=8).repeat(4, 1, 1, 1)
    y = op.forward(x)
    y = y + 0.03 * float(y.max()) * torch.randn(y.shape, generator=torch.Generator())
    prior = _prior(VESDE(0.01, 5.0, N=10), 32)
    plain = reconstruct(op, y, prior, ReconConfig(n_steps=20), 1, seed=1)
    coupled = reconstruct(op, y, prior, ReconConfig(n_steps=20, tv_z=200.0), 1, seed=1)

    def z_variation(rec):
        return float((rec.mean[1:] - rec.mean[:-1]).abs().mean())

    assert z_variation(coupled) < 0.7 * z_variation(plain)


def test_a_warm_start_from_the_data_keeps_the_gaussian_posterior():
    """The fast sampler started at t₀ from the forward-diffused least-squares image (CCDF)
    still draws the posterior when σ(t₀) covers that image's error (here 5.4 S0): the mean
    and covariance of the Gaussian posterior, in the configured number of NFE, all spent
    below t₀."""
    op, _, y = _problem()
    sde = VESDE(0.01, 5.0, N=50)
    cfg = ReconConfig(sampler="fast", n_steps=50, eta=0.5, clip=False, start=0.9)
    times: list[float] = []
    score = gaussian_score(sde)

    def recording(x, t):
        times.append(float(t[0]))
        return score(x, t)

    rec = reconstruct(op, y, Prior(recording, sde, SIDE), cfg, n_samples=2000, seed=3, noise_std=0)
    mean = op.T_inv(op.pad(y))
    cov = S0**2 * op.Q.T @ torch.diag((~op.mask).float()) @ op.Q
    emp_cov = torch.cov(rec.samples.reshape(2000, -1).T)
    assert (rec.mean - mean).abs().max() < 0.05
    assert float((emp_cov - cov).norm() / cov.norm()) < 0.12
    assert rec.nfe == 50 and max(times) == pytest.approx(0.9 * sde.T)
    # Started at a σ(t₀) below the image's error (0.2 S0), the draws are too narrow: the
    # condition the card's choice of ``start`` on validation data guards.
    cfg.start = 0.2
    narrow = reconstruct(op, y, _prior(sde), cfg, n_samples=2000, seed=3, noise_std=0)
    narrow_cov = torch.cov(narrow.samples.reshape(2000, -1).T)
    assert float(narrow_cov.trace() / cov.trace()) < 0.5


@pytest.mark.parametrize("coils", [1, 4])
def test_mr_results_come_in_the_measurements_own_units(coils):
    """k-space in a scanner's arbitrary units (here × 1e-4) is solved in the prior's unit
    (models.inverse.intensity_scale) and returned in its own: the result scales with the
    data, with the same draws, and each slice's unit is reported; on data in the prior's
    unit, the unit read from the undersampled image is near the reference's own."""
    spec = {"modality": "mri", "image_size": 32, "mask": {"kind": "random", "acceleration": 4}}
    op = from_spec({**spec, "coils": coils} if coils > 1 else spec)
    x = mri_phantoms(2, 32, seed=3)
    y = op.forward(x)
    y = y + 0.01 * torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator())
    prior = _prior(VESDE(0.01, 5.0, N=10), 32)
    config = ReconConfig(sampler="fast", n_steps=10)
    ours = reconstruct(op, y, prior, config, 2, seed=1)
    scanner = reconstruct(op, y * 1e-4, prior, config, 2, seed=1)
    assert torch.allclose(scanner.mean, ours.mean * 1e-4, rtol=1e-3, atol=1e-9)
    assert torch.allclose(scanner.std, ours.std * 1e-4, rtol=1e-3, atol=1e-9)
    units = torch.tensor(ours.provenance["intensity_scale"])
    assert torch.allclose(torch.tensor(scanner.provenance["intensity_scale"]), units * 1e-4)
    assert scanner.noise_std_used == pytest.approx([s * 1e-4 for s in ours.noise_std_used])
    for unit, ref in zip(units, x, strict=True):
        assert 0.7 < float(unit) * LEVEL / mr_scale(ref.numpy()) < 1.1
    ct = from_spec({"modality": "ct", "image_size": 32, "n_views": 12})
    assert intensity_scale(ct, ct.forward(ct_phantoms(1, 32))).tolist() == [1.0]
    with pytest.raises(ValueError, match="intensity_level"):
        reconstruct(op, y, prior, ReconConfig(sampler="fast", intensity_level=1.5))
