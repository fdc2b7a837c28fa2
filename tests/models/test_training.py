import pytest
import torch

from models.nets.ncsnpp import build
from models.sde import VPSDE
from models.training import Cancelled, TrainConfig, ema_decay_at, train


def _net():
    torch.manual_seed(0)  # parameter initialisation only
    return build("tiny", None, embedding="positional", scale_by_sigma=False)


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(32, 1, 16, 16, generator=g) > 0.5).float()


def test_resume_continues_bit_identically(tmp_path):
    sde, data = VPSDE(), _data()
    cfg = TrainConfig(steps=6, batch_size=4, warmup=2, checkpoint_every=3, loss_log_every=1)
    full = train(_net(), sde, data, cfg)
    ckpt = tmp_path / "ckpt.safetensors"
    part = train(_net(), sde, data, TrainConfig(**{**cfg.__dict__, "steps": 3}), ckpt)
    assert part.step == 3
    resumed = train(_net(), sde, data, cfg, ckpt)
    assert resumed.step == 6 and resumed.losses == full.losses
    for a, b in zip(full.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    p_net, p_ema = next(resumed.net.parameters()), next(resumed.ema.parameters())
    assert torch.isfinite(p_ema).all() and not torch.equal(p_net, p_ema)


def test_ema_decay_warms_up():
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(90, 0.999) == pytest.approx(0.91)
    assert ema_decay_at(100_000, 0.999) == 0.999


def test_a_fine_tune_keeps_its_ema_near_the_weights_it_started_from():
    """Without the EMA warm-up (a warm-started fine-tune) the average starts at the given
    weights and moves by at most 1 − 0.999 per step; with it, it follows the net at once."""
    sde, data = VPSDE(), _data()
    start = [p.detach().clone() for p in _net().parameters()]

    def moved(result) -> tuple[float, float]:
        ema = sum(
            float((p - s).norm()) for p, s in zip(result.ema.parameters(), start, strict=True)
        )
        net = sum(
            float((p - s).norm()) for p, s in zip(result.net.parameters(), start, strict=True)
        )
        return ema, net

    cfg = TrainConfig(steps=20, batch_size=4, lr=1e-2, warmup=1, loss_log_every=5)
    ema, net = moved(train(_net(), sde, data, TrainConfig(**{**cfg.__dict__, "ema_warmup": False})))
    assert net > 0 and ema < 0.05 * net
    ema, net = moved(train(_net(), sde, data, cfg))
    assert ema > 0.5 * net


@pytest.mark.parametrize("objective", ["ssm-vr", "likelihood"])
def test_other_objectives_train(objective):
    cfg = TrainConfig(
        steps=3,
        batch_size=2,
        objective=objective,
        loss_log_every=1,
        importance_sampling=objective == "likelihood",
    )
    res = train(_net(), VPSDE(), _data(), cfg)
    assert len(res.losses) == 3 and all(torch.isfinite(torch.tensor(v)) for _, v in res.losses)


def test_fit_prior_exports_a_usable_model_with_pictures(tmp_path):
    from models.registry import load_model
    from models.sde import VESDE
    from models.training import fit_prior

    sde = VESDE(0.01, 8.0)
    torch.manual_seed(0)
    net = build("tiny", sde.sigma)
    cfg = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, loss_log_every=1)
    card = {"name": "m", "image_size": 16}
    fit_prior(_data(), tmp_path / "m", sde, net, cfg, card, preview=2, preview_steps=3)
    loaded, sde2, card2 = load_model(tmp_path / "m")
    assert card2["steps"] == 4 and card2["total_steps"] == 4 and len(card2["loss_curve"]) == 4
    assert isinstance(sde2, VESDE) and sde2.sigma_max == 8.0
    assert (tmp_path / "m" / "m_loss.png").stat().st_size > 1000
    assert (tmp_path / "m" / "m_samples.png").exists()


def test_cancel_keeps_a_checkpoint(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    calls = iter([False, False, True])
    with pytest.raises(Cancelled, match="step 2"):
        train(
            _net(),
            VPSDE(),
            _data(),
            TrainConfig(steps=10, batch_size=2),
            ckpt,
            cancel=lambda: next(calls),
        )
    assert ckpt.exists()
