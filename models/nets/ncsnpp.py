"""NCSN++-style time-conditioned U-Net (seed 002, ch. 7.4 and app. B.5.5).

Ingredients kept from NCSN++: Gaussian Fourier-feature embedding of log σ(t) for VE SDEs
(sinusoidal embedding of t for VP), BigGAN-style residual blocks that carry the time
embedding and do their own up/down-sampling, skip connections rescaled by 1/√2,
self-attention at low resolution, and for VE the output divided by σ(t) so the network
predicts −z (the noise direction) at unit scale.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class NetConfig:
    """Architecture hyper-parameters (stored verbatim in a model card)."""

    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    blocks_per_level: int = 1
    attention_levels: tuple[int, ...] = (2,)
    embedding: str = "fourier"  # "fourier" (VE) or "positional" (VP, sub-VP)
    scale_by_sigma: bool = True
    dropout: float = 0.0
    in_channels: int = 1
    out_channels: int | None = None  # None: as many as in_channels

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, NetConfig] = {
    "tiny": NetConfig(base_channels=16, channel_mult=(1, 2), attention_levels=(1,)),
    "small": NetConfig(base_channels=32, channel_mult=(1, 2, 2, 2), attention_levels=(2,)),
    "paper": NetConfig(
        base_channels=128,
        channel_mult=(1, 2, 2, 2),
        blocks_per_level=4,
        attention_levels=(2,),
        dropout=0.1,
    ),
}


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar (fixed, not trained): [sin 2πWs, cos 2πWs]."""

    def __init__(self, dim: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("W", torch.randn(dim // 2) * scale)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        proj = s[:, None] * self.W[None] * 2 * math.pi
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


def positional_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Transformer sinusoidal embedding of t·1000 (DDPM convention)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = (t * 1000.0)[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, ch // 4)), ch, eps=1e-6)


class ResBlock(nn.Module):
    """BigGAN-style residual block with time conditioning and optional up/down-sampling."""

    def __init__(self, cin: int, cout: int, temb: int, dropout: float, resample: str | None = None):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.resample = resample
        nn.init.zeros_(self.conv2.weight)

    def _resample(self, h: torch.Tensor) -> torch.Tensor:
        if self.resample == "down":
            return F.avg_pool2d(h, 2)
        if self.resample == "up":
            return F.interpolate(h, scale_factor=2.0, mode="nearest")
        return h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(x))
        h, x = self._resample(h), self._resample(x)
        h = self.conv1(h) + self.temb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.skip(x) + h) / math.sqrt(2.0)


# Attention within windows of the feature map instead of over all of it: the fraction of
# each side (rows, columns) a window spans; None, the whole map. A whole-image prior applied
# to an image k times its trained side then attends over the span it was trained on, at
# 1/k² of the cost (models.nets.patch.tiled_score sets it).
ATTENTION_WINDOW: ContextVar[tuple[float, float] | None] = ContextVar(
    "attention_window", default=None
)


def _windows(h: int, w: int) -> tuple[int, int] | None:
    """The window (rows, cols) in tokens for a map of h × w, or None: the whole map (no
    window set, one as large as the map, or one that does not tile it)."""
    frac = ATTENTION_WINDOW.get()
    if frac is None:
        return None
    wh, ww = max(1, round(h * frac[0])), max(1, round(w * frac[1]))
    if (wh, ww) == (h, w) or h % wh or w % ww:
        return None
    return wh, ww


class AttnBlock(nn.Module):
    """Single-head self-attention over pixels (or windows of them, :data:`ATTENTION_WINDOW`),
    residual and rescaled by 1/√2."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x))  # normalised over the whole map, as trained
        window = _windows(h, w)
        if window is None:
            # (b, 1 head, h·w, c): 4-D, so that the CPU takes the flash kernel (2-3× faster
            # than the math path that 3-D inputs get).
            q, k, v = qkv.reshape(b, 3, 1, c, h * w).transpose(-1, -2).unbind(1)
            a = F.scaled_dot_product_attention(q, k, v)
            return (x + self.out(a.transpose(-1, -2).reshape(b, c, h, w))) / math.sqrt(2.0)
        wh, ww = window
        nh, nw = h // wh, w // ww
        # (b, 3c, h, w) → (b·nh·nw, 3, wh·ww, c): each window a sequence of its own.
        tiles = qkv.reshape(b, 3, c, nh, wh, nw, ww).permute(0, 3, 5, 1, 4, 6, 2)
        q, k, v = tiles.reshape(b * nh * nw, 3, 1, wh * ww, c).unbind(1)
        a = F.scaled_dot_product_attention(q, k, v)
        a = a.reshape(b, nh, nw, wh, ww, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        return (x + self.out(a)) / math.sqrt(2.0)


class NCSNpp(nn.Module):
    """Score network s_θ(x, t) for images ``(B, C, H, W)``; H and W divisible by 2^(levels−1).

    :param config: architecture (see :data:`PRESETS`).
    :param sigma_fn: σ(t) of a VE SDE; used for the Fourier embedding of log σ and the 1/σ
        output scaling. ``None`` for VP/sub-VP (positional embedding of t, no scaling).
    """

    def __init__(self, config: NetConfig, sigma_fn=None):
        super().__init__()
        self.config = config
        self.sigma_fn = sigma_fn
        ch = config.base_channels
        temb = 4 * ch
        if config.embedding == "fourier":
            self.fourier = GaussianFourierProjection(ch)
        self.embed = nn.Sequential(nn.Linear(ch, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(config.in_channels, ch, 3, padding=1)
        levels = len(config.channel_mult)
        self.down = nn.ModuleList()
        skips = [ch]
        cur = ch
        for lvl, mult in enumerate(config.channel_mult):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(cur, ch * mult, temb, config.dropout))
                cur = ch * mult
                if lvl in config.attention_levels:
                    self.down.append(AttnBlock(cur))
                skips.append(cur)
            if lvl != levels - 1:
                self.down.append(ResBlock(cur, cur, temb, config.dropout, "down"))
                skips.append(cur)
        self.mid = nn.ModuleList(
            [
                ResBlock(cur, cur, temb, config.dropout),
                AttnBlock(cur),
                ResBlock(cur, cur, temb, config.dropout),
            ]
        )
        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(config.channel_mult))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch * mult, temb, config.dropout))
                cur = ch * mult
                if lvl in config.attention_levels:
                    self.up.append(AttnBlock(cur))
            if lvl != 0:
                self.up.append(ResBlock(cur, cur, temb, config.dropout, "up"))
        self.norm_out = _norm(cur)
        self.conv_out = nn.Conv2d(cur, config.out_channels or config.in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _embedding(self, t: torch.Tensor) -> torch.Tensor:
        if self.config.embedding == "fourier":
            if self.sigma_fn is None:
                raise ValueError("fourier embedding needs sigma_fn (a VE SDE's sigma)")
            return self.fourier(torch.log(self.sigma_fn(t)))
        return positional_embedding(t, self.config.base_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed(self._embedding(t))
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            if isinstance(m, AttnBlock):
                h = m(h)
                hs[-1] = h
            else:
                h = m(h, emb)
                hs.append(h)
        for m in self.mid:
            h = m(h) if isinstance(m, AttnBlock) else m(h, emb)
        for m in self.up:
            if isinstance(m, AttnBlock):
                h = m(h)
            elif m.resample == "up":
                h = m(h, emb)
            else:
                h = m(torch.cat([h, hs.pop()], dim=1), emb)
        out = self.conv_out(F.silu(self.norm_out(h)))
        if self.config.scale_by_sigma and self.sigma_fn is not None:
            out = out / self.sigma_fn(t).reshape(-1, 1, 1, 1)
        return out


def build(preset: str | NetConfig, sigma_fn=None, **overrides) -> NCSNpp:
    """A network from a preset name (``tiny``, ``small``, ``paper``) or a config."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        preset = PRESETS[preset]
    cfg = NetConfig(**{**preset.to_dict(), **overrides})
    return NCSNpp(cfg, sigma_fn)


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
