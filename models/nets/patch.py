"""A patch-based score prior (PaDIS: Hu, Song, Xu, Shen & Fessler, NeurIPS 2024).

The network sees P×P patches together with two position channels (the patch pixels' row
and column in image coordinates, scaled so the image spans [−1, 1]). The whole-image prior
is the product of patch priors over a partition of the zero-padded image, so its score is
the patch scores tiled back together. The partition is shifted at random at every call,
which spreads the patch seams over the image as sampling proceeds.

Why: a few real volumes are a small data set, and a 128² image holds ~25 distinct 32²
patches at every shift, so the patch network sees far more distinct training examples for
the same data and compute; and the same network applies at any image size (256², 512²).

Zero padding is part of the distribution the network learns: a training patch may reach
past the image into zeros (air), and at sampling time the padded region of x_t is filled
with fresh N(0, σ(t)²) noise, the marginal of a zero background at time t.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from models.nets.ncsnpp import ATTENTION_WINDOW, NCSNpp


def positions(
    top: torch.Tensor, left: torch.Tensor, patch: int, height: int, width: int
) -> torch.Tensor:
    """(B, 2, P, P) row and column coordinates of patches whose top-left pixels are
    ``(top, left)`` in an image of ``height × width``; pixel centres of the image span
    (−1, 1), the padding lies beyond."""
    r = torch.arange(patch, dtype=torch.float32)
    rows = (top[:, None].float() + r[None] + 0.5) / height * 2 - 1
    cols = (left[:, None].float() + r[None] + 0.5) / width * 2 - 1
    return torch.stack(
        [
            rows[:, :, None].expand(-1, patch, patch),
            cols[:, None, :].expand(-1, patch, patch),
        ],
        1,
    )


def random_patches(
    images: torch.Tensor, patch: int, per_image: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_image`` random P×P crops of each zero-padded image, with their positions.

    Top-left corners are drawn uniformly from [−(P−1), N] on each axis: exactly the corners a
    shifted partition of the padded image produces at sampling time (see :class:`PatchPrior`).
    """
    b, c, h, w = images.shape
    n = b * per_image
    src = images.repeat_interleave(per_image, 0)
    top = torch.randint(-(patch - 1), h + 1, (n,), generator=generator)
    left = torch.randint(-(patch - 1), w + 1, (n,), generator=generator)
    padded = nn.functional.pad(src, (patch, patch, patch, patch))
    r = (top + patch)[:, None] + torch.arange(patch)[None]  # (n, P) rows in the padded image
    q = (left + patch)[:, None] + torch.arange(patch)[None]
    idx = torch.arange(n)[:, None, None]
    crops = padded.permute(0, 2, 3, 1)[idx, r[:, :, None], q[:, None, :]].permute(0, 3, 1, 2)
    return crops.contiguous(), positions(top, left, patch, h, w).to(images.device)


class PatchPrior(nn.Module):
    """Whole-image score s(x, t) assembled from a patch network ``net`` (PaDIS).

    :param net: an :class:`NCSNpp` with ``in_channels = C + 2`` (image and positions) and
        ``out_channels = C``, trained with :meth:`patch_score` on :func:`random_patches`.
    :param patch: the patch size P; image sides need not be multiples of it.
    :param seed: of the generator that draws the partition shifts and the padding noise, so
        a reconstruction repeats exactly.
    """

    def __init__(self, net: NCSNpp, patch: int, seed: int = 0):
        super().__init__()
        self.net = net
        self.patch = patch
        self.config = net.config
        self.sigma_fn = net.sigma_fn
        self._gen = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        self._gen.manual_seed(seed)

    def patch_score(self, x: torch.Tensor, pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score of patches ``x`` (B, C, P, P) at ``pos`` (B, 2, P, P)."""
        return self.net(torch.cat([x, pos.to(x.dtype)], 1), t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() in (1, x.shape[0]) else t
        sigma = self.sigma_fn(t) if self.sigma_fn is not None else torch.zeros_like(t)

        def score(tiles, top, left, tt):
            return self.patch_score(tiles, positions(top, left, self.patch, h, w).to(x.device), tt)

        return partition_apply(x, t, self.patch, sigma, score, self._gen)


def partition_apply(
    x: torch.Tensor,
    t: torch.Tensor,
    patch: int,
    pad_std: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    generator: torch.Generator,
) -> torch.Tensor:
    """``fn(tiles, top, left, t)`` over a randomly shifted partition of ``x`` (B, C, H, W)
    into P×P tiles, the results tiled back. The canvas beyond the image is filled with
    N(0, pad_std²) noise per image (the marginal of a zero background at time t); ``top``
    and ``left`` are the tiles' corners in image coordinates (negative: in the padding)."""
    b, c, h, w = x.shape
    p = patch
    oy, ox = (int(v) for v in torch.randint(0, p, (2,), generator=generator))
    ny, nx = math.ceil((h + oy) / p), math.ceil((w + ox) / p)
    noise = torch.randn((b, c, ny * p, nx * p), generator=generator).to(x)
    canvas = noise * pad_std.reshape(-1, 1, 1, 1).to(x)
    canvas[:, :, oy : oy + h, ox : ox + w] = x
    # (B, C, ny, P, nx, P) -> (B·ny·nx, C, P, P), row-major over the tiles
    tiles = canvas.reshape(b, c, ny, p, nx, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, c, p, p)
    top = (torch.arange(ny) * p - oy).repeat_interleave(nx).repeat(b)
    left = (torch.arange(nx) * p - ox).repeat(ny).repeat(b)
    out = fn(tiles, top, left, t.repeat_interleave(ny * nx))
    out = out.reshape(b, ny, nx, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(b, c, ny * p, nx * p)[:, :, oy : oy + h, ox : ox + w]


def partition_pixels(rows: int, cols: int, patch: int) -> int:
    """The pixels of :func:`partition_apply`'s tiles on a rows × cols image, at most: its
    random shift can add a row and a column of tiles."""
    return -(-(rows + patch - 1) // patch) * (-(-(cols + patch - 1) // patch)) * patch * patch


def tiled_pixels(rows: int, cols: int, tile: int, whole: int | None = None) -> int:
    """The pixels the network evaluates, at most, in one call of :func:`tiled_score` on a
    rows × cols image: one tile × tile canvas for an image that fits; the canvas rounded up
    to multiples of ``whole`` taken whole; else the shifted partition's tiles."""
    if rows <= tile and cols <= tile:
        return tile * tile
    if whole:
        return -(-rows // whole) * whole * (-(-cols // whole) * whole)
    return partition_pixels(rows, cols, tile)


def tiled_score(
    score_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    tile: int,
    pad_std: Callable[[torch.Tensor], torch.Tensor],
    seed: int = 0,
    whole: int | None = None,
    windowed: bool = False,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A whole-image score of side ``tile`` applied to images of any size. An image that
    fits is padded: centred on one tile×tile canvas whose margin is noise of std
    ``pad_std(t)`` (the marginal of a zero background), one evaluation. A larger one is
    scored patch-wise, on a shifted partition into tile×tile pieces (:func:`partition_apply`)
    whose seams move at every call; or, with ``whole`` (the network's size multiple, for a
    fully convolutional one), whole, on a canvas padded the same way to the next multiple
    of ``whole``: one evaluation of the network at the image's size, no seams; with
    ``windowed``, its attention layers then attend within windows of the span they were
    trained on (:data:`models.nets.ncsnpp.ATTENTION_WINDOW`) rather than over the image."""
    gen = torch.Generator().manual_seed(seed)

    def padded(x: torch.Tensor, t: torch.Tensor, std: torch.Tensor, rows: int, cols: int):
        h, w = x.shape[-2:]
        top, left = (rows - h) // 2, (cols - w) // 2
        canvas = torch.randn((*x.shape[:2], rows, cols), generator=gen).to(x) * std
        canvas[..., top : top + h, left : left + w] = x
        return score_fn(canvas, t)[..., top : top + h, left : left + w]

    def score(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if (h, w) == (tile, tile):
            return score_fn(x, t)
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() in (1, x.shape[0]) else t
        std = pad_std(t).reshape(-1, 1, 1, 1).to(x)
        if h <= tile and w <= tile:
            return padded(x, t, std, tile, tile)
        if whole:
            rows, cols = -(-h // whole) * whole, -(-w // whole) * whole
            if not windowed:
                return padded(x, t, std, rows, cols)
            token = ATTENTION_WINDOW.set((tile / rows, tile / cols))
            try:
                return padded(x, t, std, rows, cols)
            finally:
                ATTENTION_WINDOW.reset(token)
        return partition_apply(x, t, tile, std, lambda v, _a, _b, tt: score_fn(v, tt), gen)

    return score


def from_whole_image(net: NCSNpp) -> NCSNpp:
    """A patch network warm-started from a whole-image one: the same weights, with input
    channels for the positions that start at zero (so it first acts as the whole-image net
    applied to crops)."""
    from models.nets.ncsnpp import NetConfig

    c = net.config.in_channels
    cfg = NetConfig(**{**net.config.to_dict(), "in_channels": c + 2, "out_channels": c})
    out = NCSNpp(cfg, net.sigma_fn)
    state = net.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 2, *w.shape[2:])], 1)
    out.load_state_dict(state)
    return out
