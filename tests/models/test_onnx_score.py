"""The score network on ONNX Runtime (models/onnx_score.py) agrees with the torch path."""

import pytest
import torch

from models.onnx_score import available, export, onnx_score_fn

pytestmark = pytest.mark.skipif(not available(), reason="the onnx extra is not installed")


def test_onnx_score_matches_torch_on_a_bundled_prior_at_any_batch():
    """ct-default through Prior.load(backend="onnx"): the score at several noise levels and
    batch sizes agrees with the torch path to 1e-3 of its scale."""
    from models.inverse import Prior

    torch.manual_seed(0)
    ref, fast = Prior.load("ct-default"), Prior.load("ct-default", backend="onnx")
    for batch, t in ((1, 0.05), (3, 0.5), (2, 1.0)):
        x = torch.rand(batch, 1, 128, 128) + torch.randn(batch, 1, 128, 128) * t
        times = torch.full((batch,), t)
        a, b = ref.score_fn(x, times), fast.score_fn(x, times)
        assert a.shape == b.shape and b.dtype == torch.float32
        assert float((a - b).abs().max()) <= 1e-3 * float(a.abs().max()), (batch, t)


def test_onnx_graph_takes_other_image_sizes(tmp_path):
    """The exported graph leaves batch and image axes dynamic: a 64² input at a 32² export."""
    from models.nets.ncsnpp import build
    from models.sde import VESDE

    net = build("tiny", VESDE(0.01, 10.0).sigma).eval()
    score = onnx_score_fn(export(net, tmp_path / "tiny.onnx", 32))
    x, t = torch.randn(2, 1, 64, 64), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        expected = net(x, t)
    assert float((score(x, t) - expected).abs().max()) <= 1e-3 * float(expected.abs().max())


def test_the_onnx_backend_refuses_what_it_cannot_run():
    from models.inverse import Prior

    with pytest.raises(ValueError, match="backend must be"):
        Prior.load("ct-default", backend="tensorrt")


def test_attention_within_windows_runs_on_the_torch_network_under_the_onnx_backend():
    """The ONNX graph was traced attending over the whole map; a larger image taken whole
    with windowed attention (ct-default's choice at 256²) runs the torch network instead,
    and says so, giving the torch backend's result; without windows ONNX runs it."""
    from models.inverse import Prior, ReconConfig, reconstruct
    from models.physics import from_spec

    ref, fast = Prior.load("ct-default"), Prior.load("ct-default", backend="onnx")
    op = from_spec({"modality": "ct", "image_size": 256, "n_views": 30})
    y = op.forward(torch.rand(1, 1, 256, 256))
    config = ReconConfig.for_prior(ref, "ct", nfe=4, operator=op)
    config.patch_wise, config.windowed_attention, config.samples = False, True, 1
    a, b = reconstruct(op, y, ref, config, seed=3), reconstruct(op, y, fast, config, seed=3)
    assert b.provenance["engine"] == ref.engine == a.provenance["engine"]
    assert torch.equal(a.mean, b.mean)
    config.windowed_attention = False
    assert reconstruct(op, y, fast, config, seed=3).provenance["engine"] == "onnxruntime fp32"
