import pytest
import torch

from models.nets.ncsnpp import build
from models.sde import VPSDE
from models.training import Cancelled, TrainConfig, train


def _net():
    torch.manual_seed(0)  # parameter initialisation only
    return build("tiny", None, embedding="positional", scale_by_sigma=False)


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.rand(32, 1, 16, 16, generator=g) > 0.5).float()


def test_resume_equals_uninterrupted(tmp_path):
    sde, data = VPSDE(), _data()
    cfg = TrainConfig(steps=6, batch_size=4, warmup=2, checkpoint_every=3, loss_log_every=1)
    full = train(_net(), sde, data, cfg)
    ckpt = tmp_path / "ckpt.safetensors"
    part = train(_net(), sde, data, TrainConfig(**{**cfg.__dict__, "steps": 3}), ckpt)
    assert part.step == 3
    resumed = train(_net(), sde, data, cfg, ckpt)
    assert resumed.step == 6 and len(resumed.losses) == 6
    # The first half of the loss curve is restored from the checkpoint exactly.
    assert resumed.losses[:3] == full.losses[:3]
    # EMA differs from the raw weights and is finite.
    p_net = next(resumed.net.parameters())
    p_ema = next(resumed.ema.parameters())
    assert torch.isfinite(p_ema).all() and not torch.equal(p_net, p_ema)


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
