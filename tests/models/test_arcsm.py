"""AR-CSM (models/arcsm.py, seed 000): composite score matching against closed forms, density
estimates against known densities, quadrature normalisation, and the patch OOD score."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from models.arcsm import (
    ARCSM,
    ARCSMConfig,
    bits_per_dim,
    csm_loss,
    image_patches,
    log_density,
    patch_nll_score,
    train_arcsm,
)

torch.set_num_threads(1)


def gaussian_conditionals(mu: torch.Tensor, cov: torch.Tensor):
    """Schur complements: x_d | x_<d ~ N(mu_d + a_d . (x_<d - mu_<d), v_d)."""
    coeffs, variances = [], []
    for d in range(len(mu)):
        if d == 0:
            a = cov.new_zeros(0)
            v = cov[0, 0]
        else:
            a = torch.linalg.solve(cov[:d, :d], cov[:d, d])
            v = cov[d, d] - cov[d, :d] @ a
        coeffs.append(a)
        variances.append(v)
    return coeffs, torch.stack(variances)


class ExactGaussianScores(nn.Module):
    """The exact conditional scores s_d = -(x_d - m_d(context_<d)) / v_d of N(mu, cov),
    optionally perturbed (mean shift in units of the conditional std, variance factor)."""

    def __init__(self, mu, cov, shift: float = 0.0, var_factor: float = 1.0):
        super().__init__()
        self.mu = mu
        self.coeffs, self.v = gaussian_conditionals(mu, cov)
        self.shift, self.var_factor = shift, var_factor

    def conditional_scores(self, x, sigma=None, context=None):
        ctx = x if context is None else context
        m = torch.stack(
            [self.mu[d] + (ctx[:, :d] - self.mu[:d]) @ a for d, a in enumerate(self.coeffs)], 1
        )
        m = m + self.shift * self.v.sqrt()
        return -(x - m) / (self.var_factor * self.v)


def random_gaussian(dim: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=g, dtype=dtype)
    cov = a @ a.T / dim + 0.3 * torch.eye(dim, dtype=dtype)
    mu = torch.randn(dim, generator=g, dtype=dtype)
    return mu, cov, g


def sample_gaussian(mu, cov, n, g):
    chol = torch.linalg.cholesky(cov)
    return mu + torch.randn(n, len(mu), generator=g, dtype=mu.dtype) @ chol.T


def test_csm_loss_matches_closed_form_and_theorem_2():
    mu, cov, g = random_gaussian(4, seed=1)
    x = sample_gaussian(mu, cov, 40_000, g)
    exact = ExactGaussianScores(mu, cov)
    with torch.no_grad():  # csm_loss differentiates in x internally, not in any parameter
        per_sample = csm_loss(exact, x, reduction="none")
    analytic = float(-0.5 * (1.0 / exact.v).sum())
    se = float(per_sample.std()) / math.sqrt(len(x))
    got = float(per_sample.mean())
    assert abs(got - analytic) < 4 * se, f"J_CSM {got:.4f} vs analytic {analytic:.4f} (se {se:.4f})"

    # Theorem 2 of seed 000: J(q) - J(p) = L_CSM(q; p) = 0.5 E sum_d (s_d - s_q,d)^2, sample by
    # sample in expectation: the mean of the per-sample differences is 0 up to Monte Carlo error.
    perturbed = ExactGaussianScores(mu, cov, shift=0.3, var_factor=1.4)
    with torch.no_grad():
        j_pert = csm_loss(perturbed, x, reduction="none")
    fisher = 0.5 * ((perturbed.conditional_scores(x) - exact.conditional_scores(x)) ** 2).sum(1)
    assert float(j_pert.mean()) > got + 0.2, f"perturbed J {float(j_pert.mean()):.4f} vs {got:.4f}"
    diff = j_pert - per_sample - fisher
    se_diff = float(diff.std()) / math.sqrt(len(x))
    assert abs(float(diff.mean())) < 4 * se_diff, (
        f"J gap {float((j_pert - per_sample).mean()):.4f} vs Fisher divergence "
        f"{float(fisher.mean()):.4f} (se {se_diff:.4f})"
    )


def test_arcsm_is_autoregressive_and_derivatives_are_exact():
    torch.manual_seed(0)
    model = ARCSM(5, context_dim=4, context_hidden=(32, 32), score_hidden=(16, 16)).double()
    with torch.no_grad():
        model.res_out.weight.normal_(0, 0.5)  # a non-zero residual score
    x = torch.randn(7, 5, dtype=torch.float64)
    s = model.conditional_scores(x, sigma=0.1)
    for j in range(5):  # s_d must ignore x_j for j > d
        y = x.clone()
        y[:, j] += 1.0
        changed = (model.conditional_scores(y, sigma=0.1) - s).abs().amax(0) > 1e-12
        assert not changed[:j].any(), f"s_<{j} depends on x_{j}: {changed.tolist()}"
        assert changed[j:].all(), f"s_>={j} ignores x_{j}: {changed.tolist()}"
    s2, ds = model.scores_and_derivatives(x, sigma=0.1)
    assert torch.allclose(s2, s)
    eps = 1e-6
    fd = torch.stack(
        [
            (
                model.conditional_scores(x + eps * torch.eye(5, dtype=x.dtype)[d], 0.1, context=x)
                - model.conditional_scores(x - eps * torch.eye(5, dtype=x.dtype)[d], 0.1, context=x)
            )[:, d]
            / (2 * eps)
            for d in range(5)
        ],
        1,
    )
    assert torch.allclose(ds, fd, rtol=1e-5, atol=1e-6), f"max err {(ds - fd).abs().max():.2e}"


def test_training_recovers_gaussian_conditional_scores():
    mu, cov, g = random_gaussian(4, seed=2)
    data = sample_gaussian(mu, cov, 8000, g).float()
    cfg = ARCSMConfig(
        context_dim=8,
        context_hidden=(64,),
        score_hidden=(32,),
        steps=600,
        batch_size=256,
        lr=3e-3,
        sigmas=(0.3, 0.1),
        seed=0,
    )
    model = train_arcsm(data, cfg, progress=False)
    # The model at sigma_L = 0.1 is that of the data plus N(0, 0.1^2 I) noise.
    noisy_cov = cov + 0.01 * torch.eye(4, dtype=cov.dtype)
    truth = ExactGaussianScores(mu, noisy_cov)
    y = sample_gaussian(mu, noisy_cov, 4000, g)
    s_true = truth.conditional_scores(y)
    with torch.no_grad():
        s_model = model.conditional_scores(y.float()).double()
    rel = float((s_model - s_true).norm() / s_true.norm())
    baseline = ExactGaussianScores(mu * 0, torch.eye(4, dtype=cov.dtype)).conditional_scores(y)
    rel_baseline = float((baseline - s_true).norm() / s_true.norm())
    assert rel < 0.1, f"relative score error {rel:.3f} (N(0, I) gives {rel_baseline:.3f})"


def mixture(dtype=torch.float64):
    weights = torch.tensor([0.4, 0.6], dtype=dtype)
    means = torch.tensor([[-1.5, -0.5], [1.0, 1.0]], dtype=dtype)
    covs = torch.tensor([[[0.25, 0.15], [0.15, 0.25]], [[0.2, -0.1], [-0.1, 0.3]]], dtype=dtype)
    return weights, means, covs


def mixture_sample(n, g, noise: float = 0.0):
    w, m, c = mixture()
    k = torch.multinomial(w, n, replacement=True, generator=g)
    chol = torch.linalg.cholesky(c)
    z = torch.randn(n, 2, generator=g, dtype=w.dtype)
    x = m[k] + (chol[k] @ z[..., None])[..., 0]
    return x + noise * torch.randn(n, 2, generator=g, dtype=w.dtype)


def mixture_log_density(x, noise: float = 0.0):
    w, m, c = mixture()
    c = c + noise**2 * torch.eye(2, dtype=c.dtype)
    comp = torch.distributions.MultivariateNormal(m, c)
    return torch.logsumexp(comp.log_prob(x[:, None, :]) + w.log(), 1)


def test_density_of_a_2d_mixture_is_learnt():
    g = torch.Generator().manual_seed(3)
    data = mixture_sample(10_000, g).float()
    cfg = ARCSMConfig(
        context_dim=8,
        context_hidden=(64, 64),
        score_hidden=(32, 32),
        steps=800,
        batch_size=256,
        lr=3e-3,
        sigmas=(0.3, 0.1),
        seed=0,
    )
    model = train_arcsm(data, cfg, progress=False)
    held_out = mixture_sample(2000, g, noise=0.1)
    truth = float(mixture_log_density(held_out, noise=0.1).mean())
    got = float(log_density(model, held_out.float()).mean())
    gap = (truth - got) / 2
    assert abs(gap) < 0.1, f"mean log q {got:.4f} vs log p {truth:.4f}: {gap:.4f} nats/dim"
    # bits/dim is the same number in bits, with the Jacobian of the caller's scaling.
    bpd = bits_per_dim(model, held_out[:50].float(), scale=2.0, levels=None)
    ref = (-log_density(model, held_out[:50].float()) / 2 - math.log(2.0)) / math.log(2)
    assert torch.allclose(bpd, ref)


def test_log_density_normalises_for_fixed_weights():
    torch.manual_seed(4)
    model = ARCSM(2, context_dim=4, context_hidden=(16,), score_hidden=(16, 16)).double()
    with torch.no_grad():  # an arbitrary, far from Gaussian model: no training involved
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.sigma_min.fill_(0.1)
    c = model.context(torch.zeros(1, 2, dtype=torch.float64))
    res = model.residual(c, torch.zeros(1, 2, 1, dtype=torch.float64), torch.tensor([0.1]))
    assert res.abs().min() > 0.5, "the residual score should matter in this check"
    lo, hi, n = -8.0, 8.0, 161
    axis = torch.linspace(lo, hi, n, dtype=torch.float64)
    xx, yy = torch.meshgrid(axis, axis, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    lq = log_density(model, pts, grid=torch.linspace(-9.0, 9.0, 97, dtype=torch.float64))
    total = float(lq.exp().sum() * (axis[1] - axis[0]) ** 2)
    assert abs(total - 1) < 0.02, f"integral of q over the plane {total:.4f}"


def smooth_images(n: int, g: torch.Generator, size: int = 32) -> torch.Tensor:
    """Blurred random fields scaled to mean 0.5, std 0.12: (n, 1, size, size) in ~[0, 1]."""
    noise = torch.randn(n, 1, size + 16, size + 16, generator=g)
    r = torch.arange(-8, 9, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * 3.0**2))
    k = k / k.sum()
    x = nn.functional.conv2d(noise, k.view(1, 1, 1, -1))
    x = nn.functional.conv2d(x, k.view(1, 1, -1, 1))
    x = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
    return 0.5 + 0.12 * x


def test_image_patches_tile_in_raster_order():
    img = torch.arange(2 * 10 * 12, dtype=torch.float32).view(2, 1, 10, 12)
    p = image_patches(img, size=4, stride=3)
    assert p.shape == (2 * 3 * 3, 16)
    assert torch.equal(p[4].view(4, 4), img[0, 0, 3:7, 3:7])  # 2nd row, 2nd column of image 0
    assert torch.equal(p[9 + 2].view(4, 4), img[1, 0, 0:4, 6:10])
    assert image_patches(img, size=4).shape == (2 * 2 * 3, 16)  # default stride: tiling


def test_patch_nll_flags_noise_and_implants():
    g = torch.Generator().manual_seed(5)
    train = smooth_images(48, g)
    cfg = ARCSMConfig(
        context_dim=8,
        context_hidden=(128,),
        score_hidden=(32,),
        steps=300,
        batch_size=128,
        lr=3e-3,
        sigmas=(0.05, 0.02),
        seed=0,
    )
    model = train_arcsm(image_patches(train, 8, stride=4), cfg, progress=False)
    test = smooth_images(4, g)
    noisy = test + 0.1 * torch.randn(test.shape, generator=g)
    implant = test.clone()
    implant[:, :, 12:18, 12:18] = 1.0
    scores = {
        name: [patch_nll_score(model, im, size=8, stride=4) for im in imgs]
        for name, imgs in (("clean", test), ("noisy", noisy), ("implant", implant))
    }
    report = {k: [round(v, 3) for v in vs] for k, vs in scores.items()}
    for i in range(len(test)):
        assert scores["clean"][i] < scores["noisy"][i], report
        assert scores["clean"][i] < scores["implant"][i], report


def test_training_is_deterministic():
    data = torch.randn(256, 3, generator=torch.Generator().manual_seed(6))
    cfg = ARCSMConfig(context_hidden=(16,), score_hidden=(8,), steps=5, batch_size=32, seed=7)
    a, b = train_arcsm(data, cfg, progress=False), train_arcsm(data, cfg, progress=False)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    c = train_arcsm(data, ARCSMConfig(**{**cfg.__dict__, "seed": 8}), progress=False)
    assert not torch.equal(a.res_in.weight, c.res_in.weight)


@pytest.mark.parametrize("bad", [torch.zeros(3, 4), torch.zeros(2, 2, 8, 8)])
def test_shapes_are_checked(bad):
    model = ARCSM(3, context_hidden=(8,), score_hidden=(8,))
    with pytest.raises(ValueError):
        if bad.ndim == 2:
            log_density(model, bad)
        else:
            image_patches(bad)
