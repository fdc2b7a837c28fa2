from pathlib import Path

import pytest
import torch

from models.nets.ncsnpp import build
from models.registry import ModelError, load_model, save_model
from models.sde import VESDE, VPSDE


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_round_trip_and_tamper_detection(tmp_path, kind, rng):
    sde = VESDE(0.01, 20.0, N=100) if kind == "ve" else VPSDE(0.1, 20.0, N=100)
    net = (
        build("tiny", sde.sigma)
        if kind == "ve"
        else build("tiny", None, embedding="positional", scale_by_sigma=False)
    )
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.01)
    save_model(tmp_path / "m", net, sde, {"image_size": 16, "training_data": "test"})
    loaded, sde2, card = load_model(tmp_path / "m")
    x, t = torch.randn(2, 1, 16, 16, generator=rng), torch.tensor([0.2, 0.7])
    assert torch.allclose(loaded(x, t), net.eval()(x, t), atol=1e-6)
    assert type(sde2) is type(sde) and sde2.N == 100 and card["image_size"] == 16
    weights = tmp_path / "m" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ModelError, match="sha256"):
        load_model(tmp_path / "m")
    with pytest.raises(ModelError, match="card.json"):
        load_model(tmp_path / "missing")


def test_fast_inference_modes_agree(rng):
    from models.registry import score_fn_of

    sde = VESDE(0.01, 20.0)
    net = build("tiny", sde.sigma)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=rng) * 0.02)
    x, t = torch.randn(2, 1, 16, 16, generator=rng), torch.tensor([0.3, 0.8])
    ref = net.eval()(x, t).detach()
    fast = score_fn_of(net, channels_last=True)(x, t)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-5)
    half = score_fn_of(net, channels_last=True, bf16=True)(x, t)
    assert (half - ref).norm() / ref.norm() < 0.05


def test_bf16_default_follows_the_hardware_and_is_reported():
    """bf16=None turns autocast on where the probe measures it faster than fp32 (the CPU's
    flags do not tell); the probe runs once per machine and every process reads its result;
    the engine reaches each reconstruction's provenance."""
    import json
    import tempfile

    from models.inverse import Prior, ReconConfig, reconstruct
    from models.physics import from_spec
    from models.registry import BF16_MIN_SPEEDUP, bf16_is_fast, bf16_speedup, cpu_key

    speedup = bf16_speedup()
    # a ratio of two real timings: CPUs without native bf16 measured 0.007 (AVX2-only EPYC)
    assert 0 < speedup < 20
    assert bf16_is_fast() == (speedup >= BF16_MIN_SPEEDUP)
    cache = Path(tempfile.gettempdir()) / "scorerecon-bf16-probe.json"
    assert json.loads(cache.read_text())[cpu_key()] == speedup
    bf16_speedup.cache_clear()  # another process: reads the machine's result, measures nothing
    assert bf16_speedup() == speedup
    auto = Prior.load("ct-default", bf16=None)
    assert auto.engine == ("torch bf16" if bf16_is_fast() else "torch fp32")
    assert Prior.load("ct-default").engine == "torch fp32"
    op = from_spec({"modality": "ct", "image_size": 128, "n_views": 8})
    y = op.forward(torch.zeros(1, 1, 128, 128))
    rec = reconstruct(op, y, auto, ReconConfig(n_steps=2), 1, noise_std=0)
    assert rec.provenance["engine"] == auto.engine
