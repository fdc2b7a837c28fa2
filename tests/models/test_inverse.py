"""The inverse solver against closed forms (Gaussian prior with an exact score)."""

import pytest
import torch

from models.inverse import (
    Prior,
    ReconConfig,
    least_squares_step,
    proximal_step,
    reconstruct,
    steps_for_nfe,
)
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
    cfg = ReconConfig(sampler=sampler, n_steps=steps, eta=0.5)
    rec = reconstruct(op, y, _prior(sde), cfg, n_samples=2000, seed=3)
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
    cfg = ReconConfig(n_steps=300, lam=0.0, final_projection=False)
    rec = reconstruct(op, y, _prior(sde), cfg, n_samples=2000, seed=1)
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
    rec = reconstruct(op, y, _prior(sde, 32), ReconConfig(n_steps=20))
    assert rec.residual[0] < 1e-4
    assert rec.mean.shape == (1, 1, 32, 32) and rec.std.abs().max() == 0


@pytest.mark.parametrize(
    "name,step",
    [
        ("proximal", lambda op, x, y: proximal_step(op, x, y, 1.0)),
        ("proximal-0.5", lambda op, x, y: proximal_step(op, x, y, 0.5)),
        ("cg", lambda op, x, y: least_squares_step(op, x, y, 1.0, 2)),
        ("cg-0.5", lambda op, x, y: least_squares_step(op, x, y, 0.5, 2)),
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
    with pytest.raises(ValueError, match="image_size 4 differs"):
        reconstruct(op, y, _prior(sde, 8))
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
        ReconConfig(method="score-sde", n_steps=200),
        ReconConfig(method="langevin", sampler="ald", n_steps=100, final_projection=False),
    ):
        rec = reconstruct(op, y, _prior(sde), cfg, n_samples=64, seed=0)
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
    rec = reconstruct(op, y, _prior(sde, 32), ReconConfig(n_steps=10))
    assert rec.provenance["method"] == "cg"
    assert rec.residual[0] < 1e-2
    if not op.has_decomposition:  # multi-coil: the proximal step is refused with the fix
        with pytest.raises(ValueError, match="needs an operator A = P.*use 'cg'"):
            reconstruct(op, y, _prior(sde, 32), ReconConfig(n_steps=2, method="proximal"))


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
