"""Autoregressive conditional score models trained with composite score matching (AR-CSM).

Seed 000: Meng, Yu, Song, Song & Ermon, "Autoregressive Score Matching", NeurIPS 2020.

A density over R^D is factorised by the chain rule, q(x) = prod_d q(x_d | x_<d), and each
univariate conditional is represented only by its score s_d(x_<d, x_d) = d/dx_d log q(x_d | x_<d)
(Definition 1 of seed 000). The scores need no normalisation, so they can come from a free-form
network, yet they define one proper joint density (Theorem 3), which we recover here by 1-D
numerical integration: that is what makes AR-CSM usable as a per-slice likelihood (an
out-of-distribution score) rather than only as a sampler.

Why this model for the service: its log-likelihood is exact up to 1-D quadrature (no ODE, no
Hutchinson noise as in models/likelihood.py), and composite score matching (CSM, Eq. (3)-(5))
needs only D univariate derivatives, which one backward pass gives (see
:func:`scores_and_derivatives`), instead of the Hessian trace of plain score matching.

Conventions: the model works internally in standardised units z = (x - loc) / scale (``loc``
per dimension, ``scale`` one number, both fitted to the training data); every public function
takes and returns data units, scores in 1/data-unit and densities per data-unit^D.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

Sigma = float | torch.Tensor | None
Progress = Callable[[int, int, float], None]  # (step, total, loss), as models/training.py


class ConditionalScoreModel(Protocol):
    """What :func:`csm_loss` needs: D conditional scores where s_d depends on ``x`` only through
    x_d and on ``context`` only through context_<d (so one backward pass gives ds_d/dx_d)."""

    def conditional_scores(
        self, x: torch.Tensor, sigma: Sigma = None, context: torch.Tensor | None = None
    ) -> torch.Tensor: ...


# --------------------------------------------------------------------------------------------
# Architecture (Sec. 4.1 of seed 000)
# --------------------------------------------------------------------------------------------


class MaskedLinear(nn.Linear):
    """A linear layer whose weight is multiplied by a fixed 0/1 mask (MADE)."""

    def __init__(self, mask: torch.Tensor, bias: bool = True):
        super().__init__(mask.shape[1], mask.shape[0], bias=bias)
        self.register_buffer("mask", mask.to(torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADEContext(nn.Module):
    """MADE-style masked MLP giving the context vectors c_d in R^c, c_d a function of x_<d only.

    Degrees (Germain et al. 2015): input j has degree j (1-based); hidden units get degrees
    1..D-1 in turn; a unit sees the units of the previous layer whose degree is <= its own; the
    c outputs of dimension d see the hidden units of degree < d. A strictly lower-triangular
    direct connection x_<d -> c_d is added (MADE's "direct connections"), which lets linear
    (Gaussian) dependencies be learnt quickly. c_1 is a learnt constant.
    """

    def __init__(self, dim: int, context_dim: int, hidden: Sequence[int]):
        super().__init__()
        self.dim, self.context_dim = dim, context_dim
        d_in = torch.arange(1, dim + 1)
        degrees = [d_in]
        layers: list[nn.Module] = []
        for width in hidden:
            deg = torch.arange(width) % max(dim - 1, 1) + 1
            layers.append(MaskedLinear(deg[:, None] >= degrees[-1][None, :]))
            degrees.append(deg)
        self.hidden = nn.ModuleList(layers)
        d_out = d_in.repeat_interleave(context_dim)  # output (d, j) -> degree d
        self.out = MaskedLinear(d_out[:, None] > degrees[-1][None, :])
        self.direct = MaskedLinear(d_out[:, None] > d_in[None, :], bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) standardised inputs -> (N, D, c) contexts."""
        h = z
        for layer in self.hidden:
            h = F.silu(layer(h))
        c = self.out(h) + self.direct(z)
        return c.view(z.shape[0], self.dim, self.context_dim)


class ARCSM(nn.Module):
    """Neural AR-CSM over R^D (Sec. 4.1 of seed 000), conditioned on a noise level sigma.

    Score network. A :class:`MADEContext` gives c_d(x_<d); a small network shared by all
    dimensions maps h_d = [c_d, x_d, log sigma] to the scalar conditional score (in standardised
    units z)

        s_d = -(z_d - mu(c_d)) / v(c_d, sigma)  +  B tanh(g(h_d) / B),
        v = v_min + v_max * sigmoid(a(c_d)) + sigma_z^2,

    where mu and a are linear heads on c_d and g is an MLP (SiLU, last layer zero at
    initialisation, so training starts from a Gaussian autoregressive model). The first term is
    a context-dependent Gaussian base score: it is what MADE-Gaussian would give, it makes
    linear-Gaussian structure cheap to learn, and adding sigma_z^2 to its variance is exact for
    the per-dimension noise annealing (noise on x_d alone adds sigma^2 to the conditional
    variance). This Gaussian head is our addition to the paper's plain MLP on h_d.

    Tails (Definition 1, condition 2). The residual score is bounded, |B tanh(g/B)| <= B, so its
    energy grows at most like B |z_d|, while the base energy is -(z_d - mu)^2 / (2 v) with
    v <= v_sup = v_min + v_max + sigma_z^2 for every context: E_d(z_d) <= const + B |z_d| -
    (z_d - mu)^2 / (2 v_sup), so Z_d = int exp(E_d) dz_d is finite for every x_<d and every
    parameter value, whatever training does.
    """

    def __init__(
        self,
        dim: int,
        context_dim: int = 16,
        context_hidden: Sequence[int] = (256, 256),
        score_hidden: Sequence[int] = (64, 64),
        residual_bound: float = 32.0,
        max_variance: float = 10.0,
        min_variance: float = 1e-4,
    ):
        super().__init__()
        if not score_hidden:
            raise ValueError("score_hidden needs at least one layer")
        self.dim = dim
        self.residual_bound = float(residual_bound)
        self.max_variance = float(max_variance)
        self.min_variance = float(min_variance)
        self.made = MADEContext(dim, context_dim, context_hidden)
        self.mean_head = nn.Linear(context_dim, 1)
        self.var_head = nn.Linear(context_dim, 1)
        nn.init.zeros_(self.var_head.weight)  # v ~ 1 (the standardised data's variance) at init
        nn.init.constant_(self.var_head.bias, math.log(1.0 / (self.max_variance - 1.0)))
        h0 = score_hidden[0]
        self.res_in = nn.Linear(context_dim, h0)  # the c_d part of the first layer
        self.res_x = nn.Parameter(torch.randn(h0))  # ... its x_d column
        self.res_sigma = nn.Parameter(0.1 * torch.randn(h0))  # ... its log sigma column
        self.res_hidden = nn.ModuleList(
            nn.Linear(a, b) for a, b in zip(score_hidden[:-1], score_hidden[1:], strict=True)
        )
        self.res_out = nn.Linear(score_hidden[-1], 1)
        nn.init.zeros_(self.res_out.weight)
        nn.init.zeros_(self.res_out.bias)
        # Data standardisation and bookkeeping, set by train_arcsm (fit_standardisation).
        self.register_buffer("loc", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("sigma_min", torch.zeros(()))  # default evaluation noise level
        self.register_buffer("support", torch.tensor([-4.0, 4.0]))  # data range, for the grid

    # -- units -----------------------------------------------------------------------------

    def fit_standardisation(self, data: torch.Tensor) -> None:
        """Set loc (per-dimension mean), scale (one pooled std) and the support (data range)."""
        data = data.detach().to(self.loc)
        self.loc.copy_(data.mean(0))
        self.scale.copy_((data - self.loc).pow(2).mean().sqrt().clamp_min(1e-8))
        self.support.copy_(torch.stack([data.min(), data.max()]))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.loc) / self.scale

    def _sigma_z(self, sigma: Sigma, n: int, like: torch.Tensor) -> torch.Tensor:
        """Noise level per sample, (n,), in standardised units; None -> ``sigma_min``."""
        s = self.sigma_min if sigma is None else torch.as_tensor(sigma)
        s = s.to(like).reshape(-1)
        return (s.expand(n) if s.numel() == 1 else s) / self.scale

    # -- the score network -----------------------------------------------------------------

    def context(self, z_hat: torch.Tensor) -> torch.Tensor:
        """(N, D) standardised context inputs -> (N, D, c) context vectors c_d(z_hat_<d)."""
        return self.made(z_hat)

    def gaussian_head(
        self, c: torch.Tensor, sigma_z: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Base mean and variance (N, D) from contexts (N, D, c) and noise (N,)."""
        mu = self.mean_head(c)[..., 0]
        v = self.max_variance * torch.sigmoid(self.var_head(c)[..., 0])
        return mu, v + self.min_variance + sigma_z[:, None] ** 2

    def residual(self, c: torch.Tensor, z: torch.Tensor, sigma_z: torch.Tensor) -> torch.Tensor:
        """Bounded residual score B tanh(g(c_d, z, log sigma)/B) at points z (N, D, K) -> (N, D, K).

        The first layer is split into its c_d, x_d and sigma columns so that K points per
        (sample, dimension) reuse one c_d product (used for the quadrature grid).
        """
        feat = torch.log(sigma_z.clamp_min(1e-4))[:, None, None, None]
        pre = self.res_in(c)[:, :, None, :] + z[..., None] * self.res_x + feat * self.res_sigma
        h = F.silu(pre)
        for layer in self.res_hidden:
            h = F.silu(layer(h))
        g = self.res_out(h)[..., 0]
        return self.residual_bound * torch.tanh(g / self.residual_bound)

    def _scores_z(self, c: torch.Tensor, z: torch.Tensor, sigma_z: torch.Tensor) -> torch.Tensor:
        mu, v = self.gaussian_head(c, sigma_z)
        return -(z - mu) / v + self.residual(c, z[..., None], sigma_z)[..., 0]

    def conditional_scores(
        self, x: torch.Tensor, sigma: Sigma = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """s_theta,d(x_<d, x_d) = d/dx_d log q_sigma(x_d | x_<d), (N, D), in data units.

        ``x`` supplies the scalar x_d of each dimension (x-tilde in App. C.2 of seed 000),
        ``context`` the inputs of the context network (x-hat; ``x`` itself when None);
        ``sigma`` is the noise level of x_d (a number or (N,), data units; None: ``sigma_min``).
        """
        ctx = x if context is None else context
        sigma_z = self._sigma_z(sigma, x.shape[0], x)
        c = self.context(self.standardise(ctx))
        return self._scores_z(c, self.standardise(x), sigma_z) / self.scale

    def scores_and_derivatives(
        self,
        x: torch.Tensor,
        sigma: Sigma = None,
        context: torch.Tensor | None = None,
        create_graph: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_d, ds_d/dx_d), both (N, D); see :func:`scores_and_derivatives`."""
        return scores_and_derivatives(self, x, sigma, context, create_graph)


def scores_and_derivatives(
    model: ConditionalScoreModel,
    x: torch.Tensor,
    sigma: Sigma = None,
    context: torch.Tensor | None = None,
    create_graph: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Conditional scores s_d and their derivatives ds_d/dx_d (N, D), by autograd.

    The context inputs are a separate (detached) tensor, so s_d depends on the differentiated
    tensor only through its entry x_d: the gradient of sum_{n,d} s_d is then exactly the
    diagonal ds_d/dx_d, in one backward pass (this is why CSM is cheap, Sec. 3 of seed 000).
    ``create_graph`` keeps the graph for training through the derivatives.
    """
    ctx = (x if context is None else context).detach()
    with torch.enable_grad():
        xt = x.detach().requires_grad_(True)
        s = model.conditional_scores(xt, sigma, context=ctx)
        (ds,) = torch.autograd.grad(s.sum(), xt, create_graph=create_graph)
    return s, ds


# --------------------------------------------------------------------------------------------
# Composite score matching (Sec. 3 of seed 000)
# --------------------------------------------------------------------------------------------


def csm_loss(
    model: ConditionalScoreModel,
    x: torch.Tensor,
    sigma: Sigma = None,
    context: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The unbiased CSM estimator, Eq. (5) of seed 000:

        J_CSM = (1/N) sum_i sum_d [ 0.5 s_theta,d(x_i)^2 + d s_theta,d(x_i) / d x_i,d ],

    which equals the CSM divergence of Eq. (3) up to a constant independent of theta
    (Theorem 2). ``x`` are samples of the distribution being fitted (no noise is added here),
    in data units; ``reduction`` "none" gives the (N,) per-sample sums instead of their mean.
    Differentiable in the model's parameters whenever grad mode is on.
    """
    s, ds = scores_and_derivatives(model, x, sigma, context, create_graph=torch.is_grad_enabled())
    per_sample = (0.5 * s**2 + ds).sum(1)
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"unknown reduction {reduction!r}")


# --------------------------------------------------------------------------------------------
# Training with per-dimension noise annealing (App. C.2 of seed 000)
# --------------------------------------------------------------------------------------------


def geometric_sigmas(sigma_max: float, sigma_min: float, levels: int) -> tuple[float, ...]:
    """sigma_1 > ... > sigma_L with a constant ratio (App. C.2 of seed 000)."""
    if levels == 1:
        return (float(sigma_min),)
    r = (sigma_min / sigma_max) ** (1.0 / (levels - 1))
    return tuple(float(sigma_max * r**i) for i in range(levels))


@dataclass
class ARCSMConfig:
    """Model size and optimisation settings; the defaults suit 8x8 patches on a CPU.

    ``sigmas`` is the annealing ladder in data units, largest first (App. C.2 of seed 000 uses
    10 levels, 0.2 -> 0.04 for data in [-1, 1]; the defaults are that ladder, shortened, for data
    in [0, 1]); an empty tuple trains the noiseless model (sigma = 0).
    """

    context_dim: int = 16
    context_hidden: tuple[int, ...] = (256, 256)
    score_hidden: tuple[int, ...] = (64, 64)
    residual_bound: float = 32.0
    steps: int = 2000
    batch_size: int = 256
    lr: float = 1e-3
    final_lr_fraction: float = 0.1  # cosine decay of the learning rate to lr * this
    grad_clip: float = 10.0
    sigmas: tuple[float, ...] = (0.1, 0.05, 0.02)
    seed: int = 0


def annealed_batch(
    x: torch.Tensor, sigma_i: float, sigma_hat: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x-tilde, x-hat) of App. C.2 of seed 000: x-tilde = x + sigma_i eps feeds the scalar x_d
    of every dimension, x-hat = x + sigma_hat eps' (independent noise, sigma_hat = sigma_L at
    every stage) feeds the context network."""
    eps = torch.randn(x.shape, generator=generator).to(x)
    eps_hat = torch.randn(x.shape, generator=generator).to(x)
    return x + sigma_i * eps, x + sigma_hat * eps_hat


def train_arcsm(
    data: torch.Tensor, config: ARCSMConfig | None = None, progress: bool | Progress = True
) -> ARCSM:
    """Fit an :class:`ARCSM` to ``data`` (M, D) by CSM (Eq. (5) of seed 000) with Adam.

    Noise annealing per dimension (App. C.2): the steps are split equally into L stages; stage i
    trains on pairs (x-tilde at sigma_i, x-hat at sigma_L) from :func:`annealed_batch`, with the
    model told sigma_i. Deviations from the paper: (a) a fixed step budget per stage instead of
    training each stage to convergence; (b) one sigma-conditioned network carried from stage to
    stage (the paper keeps the model as learnt at each stage, for annealed sampling); since the
    last stage is sigma_L, the returned model is meant to be evaluated at sigma_L (its
    ``sigma_min``, the default of every evaluation function), earlier levels only warm it up.
    The loss is computed in standardised units (J of Eq. (5) times scale^2), one number per
    step; the learning rate follows a cosine decay over all steps.

    Deterministic for a given ``config.seed``: initial weights are drawn under a forked,
    seeded global generator, batches and noise from a private one. ``progress``: True for a
    tqdm bar, False for none, or a callable (step, total, loss).
    """
    cfg = config or ARCSMConfig()
    data = data.detach().to(torch.float32)
    if data.ndim != 2:
        raise ValueError(f"data must be (M, D), got {tuple(data.shape)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = ARCSM(
            data.shape[1],
            context_dim=cfg.context_dim,
            context_hidden=cfg.context_hidden,
            score_hidden=cfg.score_hidden,
            residual_bound=cfg.residual_bound,
        )
    model.fit_standardisation(data)
    sigmas = tuple(sorted(cfg.sigmas, reverse=True)) or (0.0,)
    model.sigma_min.fill_(sigmas[-1])
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def lr_at(step: int) -> float:
        cos = 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1)))
        return cfg.lr * (cfg.final_lr_fraction + (1 - cfg.final_lr_fraction) * cos)

    bar = tqdm(total=cfg.steps, desc="train AR-CSM", unit="step", disable=progress is not True)
    per_stage = math.ceil(cfg.steps / len(sigmas))
    scale2 = float(model.scale) ** 2
    model.train()
    for step in range(cfg.steps):
        sigma_i = sigmas[min(step // per_stage, len(sigmas) - 1)]
        idx = torch.randint(data.shape[0], (cfg.batch_size,), generator=gen)
        x_tilde, x_hat = annealed_batch(data[idx], sigma_i, sigmas[-1], gen)
        loss = scale2 * csm_loss(model, x_tilde, sigma_i, context=x_hat)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        value = loss.item()
        if callable(progress):
            progress(step + 1, cfg.steps, value)
        bar.update(1)
        if step % 20 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{value:.4g}", sigma=f"{sigma_i:.3g}")
    bar.close()
    model.eval()
    return model


# --------------------------------------------------------------------------------------------
# Normalised density by 1-D quadrature (Theorem 3 of seed 000)
# --------------------------------------------------------------------------------------------


def default_grid(model: ARCSM, sigma: Sigma = None) -> torch.Tensor:
    """A uniform grid over the training data's range plus 25 % margins on each side, with a
    spacing no larger than the narrowest conditional std the model can express,
    sqrt(scale^2 v_min + sigma^2), the point count clamped to [129, 1025]."""
    lo, hi = (float(v) for v in model.support)
    width = max(hi - lo, 1e-6)
    a, b = lo - 0.25 * width, hi + 0.25 * width
    s = float(model.sigma_min if sigma is None else torch.as_tensor(sigma).min())
    std_min = math.sqrt(float(model.scale) ** 2 * model.min_variance + s**2)
    points = min(max(math.ceil((b - a) / std_min) + 1, 129), 1025)
    return torch.linspace(a, b, points, dtype=torch.float64)


def _resolve_grid(model: ARCSM, grid: torch.Tensor | int | None, sigma: Sigma) -> torch.Tensor:
    if grid is None:
        return default_grid(model, sigma)
    if isinstance(grid, int):
        g = default_grid(model, sigma)
        return torch.linspace(float(g[0]), float(g[-1]), grid, dtype=torch.float64)
    g = torch.as_tensor(grid, dtype=torch.float64).reshape(-1)
    if g.numel() < 2 or not bool((g[1:] > g[:-1]).all()):
        raise ValueError("grid must hold at least 2 strictly increasing points")
    return g


def _take_last(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src[n, d, idx[n, d]] for src (N, D, K) and idx (N, D)."""
    return torch.gather(src, 2, idx[..., None])[..., 0]


@torch.no_grad()
def log_conditionals(
    model: ARCSM,
    x: torch.Tensor,
    sigma: Sigma = None,
    grid: torch.Tensor | int | None = None,
    chunk_elements: int = 1 << 23,
) -> torch.Tensor:
    """log q_sigma(x_d | x_<d) for every sample and dimension, (N, D), nats, data units.

    Theorem 3 of seed 000 maps the conditional scores to normalised conditionals:
    log q(x_d | x_<d) = E_d(x_d) - log Z_d, with E_d an antiderivative of s_d in x_d
    (Definition 1, condition 1) and Z_d = int exp(E_d) dx_d (condition 2). On a 1-D grid t_1 <
    ... < t_K (``grid``: points, a point count, or None for :func:`default_grid`):

    * the Gaussian base part of E_d is integrated in closed form, -(z - mu)^2 / (2 v) (the
      trapezoid rule would give the same, being exact for a score linear in x_d, but a running
      sum of such large terms loses float precision); the bounded residual score is integrated
      by the cumulative trapezoid rule from t_1 (E_d(t_1) = 0: the anchor, which cancels);
    * E_d at x_d adds one trapezoid step from the grid point nearest x_d (from the nearest end
      when x_d lies off the grid);
    * log Z_d is the trapezoid rule on exp(E_d(t_k)), as a logsumexp; mass outside the grid
      is neglected, so the grid must cover where the conditionals live (the default does).

    Vectorised over samples, dimensions and grid points: the context network runs once per
    sample, the residual MLP on N x D x K points, in chunks of about ``chunk_elements`` floats.
    """
    if x.ndim != 2 or x.shape[1] != model.dim:
        raise ValueError(f"x must be (N, {model.dim}), got {tuple(x.shape)}")
    x = x.to(model.loc)
    t = _resolve_grid(model, grid, sigma)
    scale = model.scale.double()
    tz = ((t[None, :] - model.loc.double()[:, None]) / scale).to(x)  # (D, K) per dimension
    tz64 = tz.double()
    dt = tz64[:, 1:] - tz64[:, :-1]  # (D, K-1)
    log_w = torch.log(torch.cat([dt[:, :1], dt[:, 1:] + dt[:, :-1], dt[:, -1:]], 1) / 2)
    n, d, k = x.shape[0], model.dim, t.numel()
    width = model.res_in.out_features
    step = max(1, chunk_elements // (d * k * width))
    sigma_all = model._sigma_z(sigma, n, x)
    out = []
    for i in range(0, n, step):
        z = model.standardise(x[i : i + step])
        sz = sigma_all[i : i + step]
        c = model.context(z)
        mu, v = (a.double() for a in model.gaussian_head(c, sz))
        g_grid = model.residual(c, tz.expand(z.shape[0], d, k), sz).double()  # (n, D, K)
        g_x = model.residual(c, z[..., None], sz)[..., 0].double()
        cum = torch.cumsum(0.5 * (g_grid[..., 1:] + g_grid[..., :-1]) * dt, -1)
        big_g = torch.cat([torch.zeros_like(cum[..., :1]), cum], -1)  # (n, D, K)
        z64 = z.double()
        grid_n = tz64.expand(z.shape[0], d, k)
        at = _take_last
        j = torch.searchsorted(tz64.contiguous(), z64.T.contiguous()).T  # (n, D) insertion
        j_lo, j_hi = (j - 1).clamp(0, k - 1), j.clamp(0, k - 1)
        nearer_lo = (z64 - at(grid_n, j_lo)).abs() <= (at(grid_n, j_hi) - z64).abs()
        j_near = torch.where(nearer_lo, j_lo, j_hi)
        t_near, g_near = at(grid_n, j_near), at(g_grid, j_near)
        big_g_x = at(big_g, j_near)
        big_g_x = big_g_x + 0.5 * (z64 - t_near) * (g_near + g_x)
        e_x = -((z64 - mu) ** 2) / (2 * v) + big_g_x
        e_grid = -((tz64[None] - mu[..., None]) ** 2) / (2 * v[..., None]) + big_g
        log_z = torch.logsumexp(e_grid + log_w[None], -1)
        out.append(e_x - log_z - torch.log(scale))
    return torch.cat(out).to(x.dtype)


def log_density(
    model: ARCSM,
    x: torch.Tensor,
    sigma: Sigma = None,
    grid: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Normalised log q_sigma(x) = sum_d log q_sigma(x_d | x_<d) (chain rule, Sec. 3 of seed 000),
    (N,) nats per data-unit^D; see :func:`log_conditionals` for the quadrature. ``sigma``
    defaults to the model's ``sigma_min``: the density of the data convolved with N(0,
    sigma_L^2 I), the smallest level of the annealing ladder (App. C.2), evaluated at ``x`` as
    given (no noise is added)."""
    return log_conditionals(model, x, sigma, grid).sum(1)


def bits_per_dim(
    model: ARCSM,
    x: torch.Tensor,
    sigma: Sigma = None,
    grid: torch.Tensor | int | None = None,
    scale: float = 1.0,
    levels: int | None = 256,
) -> torch.Tensor:
    """Bits per dimension of each sample, (N,).

    Convention: the caller's data u lie in [0, 1] and the model was trained on x = offset +
    ``scale`` * u (``x`` is passed in the model's units; an offset changes nothing). Then
    log p_u(u) = log q(x) + D log(scale) (the Jacobian), and, as models/likelihood.py does for
    data quantised to ``levels`` levels, the density is read on [0, levels):

        bpd = (-log q(x) / D - log(scale) + log(levels)) / log 2.

    ``levels=None`` drops the last term (bits per dimension of the continuous density on [0, 1]).
    """
    nats = -log_density(model, x, sigma, grid) / model.dim - math.log(scale)
    if levels is not None:
        nats = nats + math.log(levels)
    return nats / math.log(2)


# --------------------------------------------------------------------------------------------
# Image patches and the per-slice out-of-distribution score
# --------------------------------------------------------------------------------------------


def image_patches(images: torch.Tensor, size: int = 8, stride: int | None = None) -> torch.Tensor:
    """All size x size patches of (N, 1, H, W) images at ``stride`` (default ``size``: a
    non-overlapping tiling; borders that do not fill a patch are dropped), flattened in raster
    order (row by row, which is the autoregressive order), image by image: (M, size*size).

    (models/nets/patch.py draws random, zero-padded crops for the PaDIS prior; this is the
    deterministic, unpadded tiling a likelihood over a slice needs.)
    """
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be (N, 1, H, W), got {tuple(images.shape)}")
    stride = size if stride is None else stride
    p = images[:, 0].unfold(1, size, stride).unfold(2, size, stride)  # (N, r, c, s, s)
    return p.reshape(-1, size * size)


def patch_nll_score(
    model: ARCSM,
    image: torch.Tensor,
    size: int = 8,
    stride: int | None = None,
    sigma: Sigma = None,
    grid: torch.Tensor | int | None = None,
) -> float:
    """Mean negative log-likelihood per dimension (nats) of a slice's patches under ``model``:
    mean over the patches of -log q(patch) / (size^2). A slice unlike the training data (noise,
    a metal implant, another anatomy) scores higher. ``image``: (H, W), (1, H, W) or
    (1, 1, H, W), in the units the model was trained in."""
    if model.dim != size * size:
        raise ValueError(f"model is over {model.dim} dimensions, patches have {size * size}")
    img = image.reshape(1, 1, *image.shape[-2:])
    patches = image_patches(img, size, stride)
    return float(-log_density(model, patches, sigma, grid).mean() / model.dim)
