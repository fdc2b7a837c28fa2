"""A tiny score model trained on a 2-D Gaussian mixture approaches the exact score.

The mixture's perturbed score ∇ log p_t is known in closed form, so the σ²-weighted Fisher
divergence E_t E_{x~p_t} σ(t)² ||s_θ(x, t) − ∇ log p_t(x)||² measures what was learned.
"""

import pytest
import torch

from models.nets.mlp import ScoreMLP
from models.sde import VESDE
from models.training import TrainConfig, train

MU = torch.tensor([[-1.5, 0.0], [1.5, 0.0], [0.0, 1.5]])
S = 0.3


def _data(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(len(MU), (n,), generator=g)
    return MU[k] + S * torch.randn(n, 2, generator=g)


def _true_score(sde: VESDE, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.detach().requires_grad_(True)
    var = S**2 + sde.sigma(t) ** 2
    logp = torch.logsumexp(-((x[:, None] - MU[None]) ** 2).sum(-1) / (2 * var[:, None]), 1)
    return torch.autograd.grad(logp.sum(), x)[0]


def _fisher(sde: VESDE, net, n: int = 4000) -> float:
    g = torch.Generator().manual_seed(5)
    t = torch.rand(n, generator=g) * (1 - 1e-3) + 1e-3
    xt = _data(n, g) + sde.sigma(t)[:, None] * torch.randn(n, 2, generator=g)
    with torch.no_grad():
        s = net(xt, t)
    return float((sde.sigma(t)[:, None] ** 2 * (s - _true_score(sde, xt, t)) ** 2).sum(1).mean())


@pytest.mark.parametrize("objective,bound", [("dsm", 0.04), ("ssm-vr", 0.08)])
def test_trained_tiny_model_reaches_a_small_fisher_divergence(objective, bound):
    sde = VESDE(0.01, 4.0)
    torch.manual_seed(0)
    net = ScoreMLP(2, sigma_fn=sde.sigma)
    before = _fisher(sde, net)
    cfg = TrainConfig(
        steps=1500, batch_size=256, lr=2e-3, warmup=50, objective=objective, ema_decay=0.99
    )
    res = train(net, sde, _data(20_000, torch.Generator().manual_seed(0)), cfg)
    after = _fisher(sde, res.ema)
    assert after < bound and after < before / 10, (before, after)
