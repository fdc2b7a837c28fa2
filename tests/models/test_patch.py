"""The PaDIS patch prior (models/nets/patch.py) and test-time adaptation (models/adapt.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.adapt import adapt_prior
from models.inverse import Prior
from models.nets.ncsnpp import build
from models.nets.patch import (
    PatchPrior,
    from_whole_image,
    positions,
    random_patches,
    tiled_score,
)
from models.registry import load_model, save_model, score_fn_of
from models.sde import VESDE
from models.training import TrainConfig, train


class Probe(nn.Module):
    """A 'network' that returns one of its input channels: 0 the image, 1 rows, 2 columns."""

    def __init__(self, channel: int):
        super().__init__()
        self.channel = channel
        self.config = build("tiny").config
        self.sigma_fn = VESDE(0.01, 10.0).sigma

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x[:, self.channel : self.channel + 1]


@pytest.mark.parametrize("size", [(32, 32), (40, 24), (17, 29)])
def test_the_assembled_score_puts_every_patch_back_where_it_came_from(size):
    h, w = size
    x = torch.rand(2, 1, h, w)
    t = torch.full((2,), 0.5)
    rows = (torch.arange(h) + 0.5) / h * 2 - 1
    cols = (torch.arange(w) + 0.5) / w * 2 - 1
    for seed in range(4):  # several random partitions
        assert torch.equal(PatchPrior(Probe(0), 8, seed)(x, t), x)
        got_rows = PatchPrior(Probe(1), 8, seed)(x, t)
        got_cols = PatchPrior(Probe(2), 8, seed)(x, t)
        assert torch.allclose(got_rows, rows[:, None].expand(h, w).expand(2, 1, h, w))
        assert torch.allclose(got_cols, cols[None, :].expand(h, w).expand(2, 1, h, w))


def test_random_patches_are_crops_of_the_zero_padded_image_at_their_positions():
    images = torch.rand(3, 1, 16, 16)
    crops, pos = random_patches(images, 8, 5, torch.Generator().manual_seed(0))
    assert crops.shape == (15, 1, 8, 8) and pos.shape == (15, 2, 8, 8)
    padded = nn.functional.pad(images, (8, 8, 8, 8))
    for k in range(15):
        # positions back to pixel indices: (i + 0.5) / 16 * 2 - 1 = p
        top = round(float((pos[k, 0, 0, 0] + 1) / 2 * 16 - 0.5))
        left = round(float((pos[k, 1, 0, 0] + 1) / 2 * 16 - 0.5))
        assert -7 <= top <= 16 and -7 <= left <= 16
        expected = padded[k // 5, :, top + 8 : top + 16, left + 8 : left + 16]
        assert torch.equal(crops[k], expected)


def test_positions_span_the_image_and_reach_past_it_in_the_padding():
    pos = positions(torch.tensor([-4]), torch.tensor([12]), 8, 16, 16)
    assert pos[0, 0, 4, 0] == pytest.approx((0.5 / 16) * 2 - 1)  # row 0 of the image
    assert pos[0, 0, 0, 0] < -1 and pos[0, 1, 0, -1] > 1  # padding beyond the image


def test_a_warm_started_patch_net_first_acts_as_the_whole_image_net():
    sde = VESDE(0.01, 10.0)
    whole = build("tiny", sde.sigma).eval()
    for p in whole.parameters():
        nn.init.normal_(p, std=0.05)
    patch = from_whole_image(whole).eval()
    x, t = torch.rand(2, 1, 16, 16), torch.full((2,), 0.4)
    with torch.no_grad():
        prior = PatchPrior(patch, 16)
        assert torch.allclose(prior.patch_score(x, torch.randn(2, 2, 16, 16), t), whole(x, t))


def test_a_patch_prior_trains_saves_and_reloads_to_the_same_score(tmp_path):
    sde = VESDE(0.01, 5.0)
    prior = PatchPrior(from_whole_image(build("tiny", sde.sigma)), 8)
    data = torch.rand(6, 1, 16, 16)
    result = train(prior, sde, data, TrainConfig(steps=6, batch_size=2, warmup=1))
    assert all(torch.isfinite(torch.tensor(v)) for _, v in result.losses)
    save_model(tmp_path, result.ema, sde, {"name": "p", "image_size": 16})
    loaded, _, card = load_model(tmp_path)
    assert card["architecture"] == {**card["architecture"], "name": "ncsnpp-patch", "patch_size": 8}
    x, t = torch.rand(1, 1, 16, 16), torch.full((1,), 0.3)
    result.ema.reseed(3)
    loaded.reseed(3)
    with torch.no_grad():
        assert torch.allclose(result.ema(x, t), loaded(x, t))


def test_the_bundled_training_refuses_to_mix_a_patch_and_a_whole_image_lineage(tmp_path):
    from models.default_priors import train_default

    sde = VESDE(0.01, 5.0)
    save_model(tmp_path / "m", build("tiny", sde.sigma), sde, {"name": "m", "image_size": 16})
    with pytest.raises(ValueError, match="holds a whole prior; train it with --arch whole"):
        train_default("ct-default", 1, arch="patch", model_dir=tmp_path / "m", runs=tmp_path)


def test_test_time_adaptation_fits_the_image_and_moves_only_biases_and_norms():
    torch.manual_seed(0)
    sde = VESDE(0.01, 5.0)
    net = build("tiny", sde.sigma).eval()
    for p in net.parameters():  # as if trained: every layer passes gradients
        nn.init.normal_(p, std=0.05)
    prior = Prior(score_fn_of(net, sde), sde, 16, "tiny")
    image = torch.zeros(1, 1, 16, 16)
    image[..., 4:12, 4:12] = 0.8

    def loss(score_fn) -> float:
        g = torch.Generator().manual_seed(1)
        sigma = torch.tensor([0.1, 0.3, 1.0, 3.0])
        z = torch.randn(4, 1, 16, 16, generator=g)
        s = score_fn(image + sigma[:, None, None, None] * z, sde.t_of_sigma(sigma))
        return float((s * sigma[:, None, None, None] + z).pow(2).sum() / 2)

    before = {k: v.clone() for k, v in net.state_dict().items()}
    adapted = adapt_prior(net, prior, image, steps=30, sigma_floor=0.1, lr=1e-2)
    assert loss(adapted.score_fn) < 0.9 * loss(prior.score_fn)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # a copy moved
    assert adapted.card["adapted"]["steps"] == 30 and adapted.name == "tiny+tta"
    with pytest.raises(ValueError, match="sigma_floor must be in"):
        adapt_prior(net, prior, image, sigma_floor=10.0)


def test_a_whole_image_score_applies_patch_wise_to_any_size():
    """``tiled_score``: a tile-sized image goes to the score as it is; any other size is cut
    into tiles of the score's side over a shifted, noise-padded canvas, so a score that acts
    pixel by pixel comes back unchanged, and each tile the score sees has its side."""
    seen = []

    def local(x, t):  # pixelwise: the partition cannot show
        seen.append(tuple(x.shape[-2:]))
        return -2.0 * x + t.reshape(-1, 1, 1, 1)

    pad = torch.zeros_like  # noise-free padding: the score sees only the image
    score = tiled_score(local, 8, lambda t: pad(t), seed=0)
    t = torch.full((2,), 0.3)
    for shape in [(8, 8), (20, 12), (5, 7)]:
        x = torch.rand(2, 1, *shape)
        seen.clear()
        got = score(x, t)
        assert seen == [(8, 8)]  # one batch of tiles, or one padded canvas
        assert torch.allclose(got, local(x, t))

    # A score that sees its tile's mean reveals the seams; their places move between calls.
    def mean_score(x, t):
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)

    score = tiled_score(mean_score, 8, lambda t: torch.zeros_like(t), seed=1)
    x = torch.rand(1, 1, 24, 24)
    first, second = score(x, t[:1]), score(x, t[:1])
    assert not torch.equal(first, second)


def test_a_fully_convolutional_score_can_take_a_larger_image_whole():
    """``tiled_score(whole=m)``: an image larger than the tile goes to the score in one
    piece, centred on a canvas padded to the next multiple of m (noise of the background's
    std beyond it), and comes back at its own size; a smaller one still fills one tile."""
    seen = []

    def local(x, t):
        seen.append(tuple(x.shape[-2:]))
        return -2.0 * x + t.reshape(-1, 1, 1, 1)

    score = tiled_score(local, 8, lambda t: torch.zeros_like(t), seed=0, whole=4)
    t = torch.full((2,), 0.3)
    for shape, canvas in [((20, 12), (20, 12)), ((21, 13), (24, 16)), ((5, 7), (8, 8))]:
        x = torch.rand(2, 1, *shape)
        seen.clear()
        got = score(x, t)
        assert seen == [canvas]
        assert torch.allclose(got, local(x, t))

    # No seams: a score that sees the whole canvas's mean gives one value everywhere.
    def mean_score(x, t):
        return x.mean(dim=(-2, -1), keepdim=True).expand_as(x)

    x = torch.rand(1, 1, 24, 24)
    got = tiled_score(mean_score, 8, lambda t: torch.zeros_like(t), whole=8)(x, t[:1])
    assert torch.allclose(got, x.mean().expand_as(x))


def test_windowed_attention_attends_within_each_window_of_the_trained_span():
    """With ATTENTION_WINDOW (½, ½) an attention layer on an 8×8 map acts on each 4×4
    quadrant as on a map of its own (the normalisation, before it, still sees the whole
    map); without one, or with a window that does not tile the map, it attends globally."""
    from models.nets.ncsnpp import ATTENTION_WINDOW, AttnBlock

    torch.manual_seed(0)
    block = AttnBlock(8)
    nn.init.normal_(block.out.weight, std=0.2)  # zero at init: the attention must show
    block.norm = nn.Identity()
    x = torch.randn(2, 8, 8, 8)
    token = ATTENTION_WINDOW.set((0.5, 0.5))
    try:
        windowed = block(x)
        assert torch.allclose(block(x[..., :3, :]), _global(block, x[..., :3, :]))  # 3 ∤ 2
    finally:
        ATTENTION_WINDOW.reset(token)
    for r in (0, 4):
        for c in (0, 4):
            quadrant = x[..., r : r + 4, c : c + 4]
            assert torch.allclose(windowed[..., r : r + 4, c : c + 4], block(quadrant), atol=1e-5)
    assert not torch.allclose(windowed, block(x), atol=1e-3)  # global attention differs


def _global(block, x):
    from models.nets.ncsnpp import ATTENTION_WINDOW

    token = ATTENTION_WINDOW.set(None)
    try:
        return block(x)
    finally:
        ATTENTION_WINDOW.reset(token)


def test_a_whole_image_score_with_windowed_attention_sets_the_trained_span():
    """tiled_score(whole, windowed): the network sees the larger canvas in one piece, with
    windows of tile / canvas of each side; the setting ends with the call."""
    from models.nets.ncsnpp import ATTENTION_WINDOW

    seen = []

    def local(x, t):
        seen.append((tuple(x.shape[-2:]), ATTENTION_WINDOW.get()))
        return -x

    score = tiled_score(local, 8, lambda t: torch.zeros_like(t), whole=4, windowed=True)
    score(torch.rand(1, 1, 16, 24), torch.full((1,), 0.3))
    assert seen == [((16, 24), (0.5, 8 / 24))] and ATTENTION_WINDOW.get() is None
