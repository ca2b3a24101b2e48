r"""A U-Net velocity model :math:`v_\theta(x, t)` for flow matching.

Architecture (DDPM-style, small enough to train on a CPU):

* time :math:`t \in [0, 1]` is embedded by sinusoidal features of :math:`1000\,t`
  (``base`` frequencies, geometric from 1 to 1/10000) followed by a two-layer MLP
  (``SiLU``) to ``4 * base`` features;
* an encoder of ``len(channel_mults)`` levels, each with ``num_res_blocks`` residual blocks
  (GroupNorm, SiLU, 3×3 conv, additive time projection, GroupNorm, SiLU, dropout, 3×3 conv,
  1×1 skip when the width changes) and a stride-2 convolution between levels;
* a middle block (residual, self-attention, residual);
* a decoder mirroring the encoder with skip connections (``num_res_blocks + 1`` blocks per
  level, nearest-neighbour upsampling followed by a 3×3 conv);
* multi-head self-attention after the residual blocks of every level listed in
  ``attention_levels`` (level 0 is the full resolution);
* GroupNorm, SiLU and a zero-initialised 3×3 conv to ``channels`` outputs, so that an
  untrained model predicts :math:`v = 0`.

The image side must be divisible by :math:`2^{L-1}` (``L`` levels). ``model.config`` is a
JSON-serialisable dict and ``UNet.from_config(model.config)`` rebuilds the same architecture.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, *, max_period: float = 10000.0,
                       scale: float = 1000.0) -> torch.Tensor:
    r"""Sinusoidal features :math:`[\cos(s t \omega_k), \sin(s t \omega_k)]`,
    :math:`\omega_k = \text{max\_period}^{-k/(d/2)}`, of a batch of times ``t`` of shape ``(B,)``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                            device=t.device) / half)
    args = (scale * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


NORMS = ("group", "channel")


class ChannelNorm(nn.Module):
    """Layer normalisation over the channels of each pixel (no spatial statistics).

    Unlike GroupNorm it does not depend on the image extent, so a network trained on patches
    computes the same features on a whole image (away from the borders) as on its patches.
    """

    def __init__(self, ch: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ch))
        self.bias = nn.Parameter(torch.zeros(ch))
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias,
                         self.eps)
        return y.permute(0, 3, 1, 2)


def _norm(ch: int, groups: int, kind: str = "group") -> nn.Module:
    if kind == "channel":
        return ChannelNorm(ch)
    return nn.GroupNorm(math.gcd(ch, groups), ch)


class ResBlock(nn.Module):
    """GroupNorm–SiLU–conv, plus a time projection, GroupNorm–SiLU–dropout–conv, residual."""

    def __init__(self, cin: int, cout: int, tdim: int, *, groups: int, dropout: float,
                 norm: str = "group"):
        super().__init__()
        self.norm1 = _norm(cin, groups, norm)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = _norm(cout, groups, norm)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(temb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (residual)."""

    def __init__(self, ch: int, *, heads: int, groups: int, norm: str = "group"):
        super().__init__()
        if ch % heads:
            raise ValueError(f"attention width {ch} is not divisible by num_heads={heads}")
        self.heads = heads
        self.norm = _norm(ch, groups, norm)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, temb=None) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2),
                                             v.transpose(-1, -2))
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x, temb=None):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, temb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """U-Net velocity field ``v(x, t)``; ``x`` of shape ``(B, C, H, W)``, ``t`` of shape ``(B,)``
    (a scalar is broadcast) in ``[0, 1]``.

    Args (keyword-only):
        channels: image channels (input and output).
        base: width of the first level.
        channel_mults: width multipliers per level (``len`` = number of levels).
        num_res_blocks: residual blocks per encoder level.
        attention_levels: levels (0 = full resolution) with self-attention; the middle block
            always has one.
        num_heads: attention heads.
        dropout: dropout rate in the residual blocks.
        groups: GroupNorm groups (reduced to a divisor of the width where needed).
        norm: ``"group"`` (GroupNorm, statistics over the whole feature map) or
            ``"channel"`` (:class:`ChannelNorm`, per pixel): a network trained on patches
            and applied to whole images needs ``"channel"``.
        mid_attention: self-attention in the middle block (its cost grows with the square
            of the pixel count, so a size-agnostic prior leaves it out).
        image_size: the image side the model is meant for (recorded in the config and checked
            in :meth:`forward` to be divisible by the total downsampling), or ``None``.

    With the defaults (``base=16, channel_mults=(1, 2, 4, 6), num_res_blocks=2,
    attention_levels=(2,)``) the model has 2.46 M parameters and costs about 1.3 GFLOP per
    64×64 image and forward pass: widths grow quickly with depth so that the full-resolution
    levels, which dominate the cost on a CPU, stay thin.
    """

    def __init__(self, *, channels: int = 1, base: int = 16,
                 channel_mults: Sequence[int] = (1, 2, 4, 6), num_res_blocks: int = 2,
                 attention_levels: Sequence[int] = (2,), num_heads: int = 4,
                 dropout: float = 0.0, groups: int = 8, image_size: int | None = 64,
                 norm: str = "group", mid_attention: bool = True):
        super().__init__()
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        channel_mults = tuple(int(m) for m in channel_mults)
        attention_levels = tuple(int(a) for a in attention_levels)
        if channels < 1 or base < 1 or num_res_blocks < 1 or not channel_mults:
            raise ValueError("channels, base, num_res_blocks must be >= 1 and channel_mults "
                             f"non-empty; got channels={channels}, base={base}, "
                             f"num_res_blocks={num_res_blocks}, channel_mults={channel_mults}")
        bad = [a for a in attention_levels if not 0 <= a < len(channel_mults)]
        if bad:
            raise ValueError(f"attention_levels {bad} outside 0..{len(channel_mults) - 1}")
        self.factor = 2 ** (len(channel_mults) - 1)
        if image_size is not None and image_size % self.factor:
            raise ValueError(f"image_size={image_size} is not divisible by {self.factor} "
                             f"({len(channel_mults)} levels)")
        self.config = {
            "type": "UNet", "channels": int(channels), "base": int(base),
            "channel_mults": list(channel_mults), "num_res_blocks": int(num_res_blocks),
            "attention_levels": list(attention_levels), "num_heads": int(num_heads),
            "dropout": float(dropout), "groups": int(groups),
            "image_size": None if image_size is None else int(image_size),
        }
        if norm != "group":
            self.config["norm"] = norm
        if not mid_attention:
            self.config["mid_attention"] = False
        self.base = base
        tdim = 4 * base
        self.time_mlp = nn.Sequential(nn.Linear(base, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.stem = nn.Conv2d(channels, base, 3, padding=1)
        kw = dict(groups=groups, dropout=dropout, norm=norm)
        akw = dict(heads=num_heads, groups=groups, norm=norm)

        self.down = nn.ModuleList()
        skips = [base]
        ch = base
        for lvl, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                blocks = [ResBlock(ch, base * mult, tdim, **kw)]
                ch = base * mult
                if lvl in attention_levels:
                    blocks.append(AttnBlock(ch, **akw))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if lvl != len(channel_mults) - 1:
                self.down.append(nn.ModuleList([Downsample(ch)]))
                skips.append(ch)

        mid = [ResBlock(ch, ch, tdim, **kw)]
        if mid_attention:
            mid.append(AttnBlock(ch, **akw))
        self.mid = nn.ModuleList(mid + [ResBlock(ch, ch, tdim, **kw)])

        self.up = nn.ModuleList()
        for lvl, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                blocks = [ResBlock(ch + skips.pop(), base * mult, tdim, **kw)]
                ch = base * mult
                if lvl in attention_levels:
                    blocks.append(AttnBlock(ch, **akw))
                self.up.append(nn.ModuleList(blocks))
            if lvl != 0:
                self.up.append(nn.ModuleList([Upsample(ch)]))

        self.out_norm = _norm(ch, groups, norm)
        self.out_conv = nn.Conv2d(ch, channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @classmethod
    def from_config(cls, config: dict) -> "UNet":
        """Rebuild a model from :attr:`config` (unknown keys raise ``ValueError``)."""
        cfg = dict(config)
        kind = cfg.pop("type", "UNet")
        if kind != "UNet":
            raise ValueError(f"config describes a {kind!r}, not a UNet")
        allowed = {"channels", "base", "channel_mults", "num_res_blocks", "attention_levels",
                   "num_heads", "dropout", "groups", "image_size", "norm", "mid_attention"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown UNet config keys: {unknown}")
        return cls(**cfg)

    def num_parameters(self) -> int:
        """Number of trainable parameters."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.config["channels"]:
            raise ValueError(f"x must have shape (B, {self.config['channels']}, H, W), "
                             f"got {tuple(x.shape)}")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by "
                             f"{self.factor}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        temb = self.time_mlp(timestep_embedding(t, self.base).to(x.dtype))
        h = self.stem(x)
        hs = [h]
        for blocks in self.down:
            for blk in blocks:
                h = blk(h, temb)
            hs.append(h)
        for blk in self.mid:
            h = blk(h, temb)
        for blocks in self.up:
            if isinstance(blocks[0], ResBlock):
                h = torch.cat([h, hs.pop()], dim=1)
            for blk in blocks:
                h = blk(h, temb)
        return self.out_conv(F.silu(self.out_norm(h)))
