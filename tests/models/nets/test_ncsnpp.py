import pytest
import torch

from models.losses import dsm_loss
from models.nets.ncsnpp import PRESETS, build, count_parameters
from models.sde import VESDE, VPSDE


def test_preset_sizes():
    ve = VESDE(0.01, 50.0)
    assert count_parameters(build("tiny", ve.sigma)) < 500_000
    assert 1_000_000 <= count_parameters(build("small", ve.sigma)) <= 3_000_000
    with pytest.raises(ValueError, match="preset must be one of"):
        build("huge")


@pytest.mark.parametrize("preset", ["tiny", "small"])
def test_shapes_and_sigma_scaling(preset, rng):
    ve = VESDE(0.01, 50.0)
    net = build(preset, ve.sigma)
    with torch.no_grad():
        for p in net.conv_out.parameters():
            p.normal_(0, 0.1, generator=rng)
    size = 8 * 2 ** (len(PRESETS[preset].channel_mult) - 1)
    x = torch.randn(3, 1, size, size, generator=rng)
    t = torch.tensor([0.1, 0.5, 0.9])
    out = net(x, t)
    assert out.shape == x.shape
    unscaled = build(preset, ve.sigma, scale_by_sigma=False)
    unscaled.load_state_dict(net.state_dict())
    expected = unscaled(x, t) / ve.sigma(t).reshape(-1, 1, 1, 1)
    assert torch.allclose(out, expected, rtol=1e-4, atol=1e-6)


def test_time_conditioning_changes_output(rng):
    net = build("tiny", None, embedding="positional", scale_by_sigma=False)
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1 and float(p.abs().sum()) == 0:
                p.normal_(0, 0.05, generator=rng)
    x = torch.randn(1, 1, 16, 16, generator=rng).repeat(2, 1, 1, 1)
    out = net(x, torch.tensor([0.1, 0.9]))
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_a_few_dsm_steps_reduce_the_loss():
    torch.manual_seed(0)  # network initialisation only; data and noise use generators
    sde = VPSDE()
    net = build("tiny", None, embedding="positional", scale_by_sigma=False)
    g = torch.Generator().manual_seed(0)
    data = (torch.rand(64, 1, 16, 16, generator=g) > 0.5).float()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)

    def loss(gen):
        return dsm_loss(net, sde, data, generator=gen)

    before = float(loss(torch.Generator().manual_seed(9)).detach())
    for step in range(40):
        opt.zero_grad()
        loss(torch.Generator().manual_seed(step)).backward()
        opt.step()
    after = float(loss(torch.Generator().manual_seed(9)).detach())
    assert after < 0.8 * before


def test_noise_conditional_ncsn_trains_saves_and_samples(tmp_path):
    from models.losses import ncsn_sigmas
    from models.nets.ncsn import NCSN
    from models.registry import load_model, save_model, score_fn_of
    from models.sampling.registry import sample
    from models.sde import VESDE
    from models.training import TrainConfig, train

    sde = VESDE(0.01, 4.0)
    torch.manual_seed(0)
    net = NCSN(PRESETS["tiny"], ncsn_sigmas(sde, 10))
    x, s = torch.rand(3, 1, 16, 16), torch.tensor([4.0, 0.5, 0.01])
    out = net(x, s)
    assert out.shape == x.shape
    data = torch.rand(16, 1, 16, 16)
    res = train(net, sde, data, TrainConfig(steps=3, batch_size=4, objective="ncsn"))
    assert len(res.losses) == 1
    save_model(tmp_path / "n", res.ema, sde, {"image_size": 16})
    loaded, sde2, _ = load_model(tmp_path / "n")
    assert isinstance(loaded, NCSN) and torch.equal(loaded.sigmas, net.sigmas)
    assert torch.allclose(loaded(x, s), res.ema(x, s), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    smp = sample("ald", sde2, score_fn_of(loaded, sde2), (2, 1, 16, 16), n_steps=5, generator=g)
    assert smp.samples.shape == (2, 1, 16, 16) and torch.isfinite(smp.samples).all()
    with pytest.raises(ValueError, match="decreasing"):
        NCSN(PRESETS["tiny"], ncsn_sigmas(sde, 10).flip(0))
