r"""A small convolutional autoencoder for latent flow priors, and its latent normalisation.

Architecture (:class:`AutoEncoder`, fully convolutional and *local*: no normalisation layers,
so a model trained on crops behaves the same on whole images, and the decoder of a latent
depends only on nearby latent pixels):

* encoder: a 3×3 stem to ``base`` channels, then per level ``l`` (``len(channel_mults)``
  levels) ``num_res_blocks`` residual blocks :math:`h + W_2\,\mathrm{SiLU}(W_1\,\mathrm{SiLU}(h))`
  of width ``base * channel_mults[l]`` and a stride-2 3×3 convolution to the next width
  (not after the last level), a residual block and a 3×3 convolution to ``latent_channels``;
* decoder: the mirror image, with nearest-neighbour upsampling followed by a 3×3 convolution,
  ending in a linear 3×3 convolution to ``channels`` (no output squashing, so the decoder
  stays differentiable with useful gradients everywhere, which the solvers' data steps need).

The downsampling factor is :math:`f = 2^{L-1}`; an image of side :math:`S` has a latent of
shape ``(latent_channels, S/f, S/f)``.

Training (:mod:`ctflow.training.autoencoder`) minimises
:math:`\mathbb E\,\|D(E(x) + \sigma_n\varepsilon) - x\|_1/n
+ \|D(E(x)+\sigma_n\varepsilon) - x\|_2^2/n + \beta\,\|E(x)\|^2/m` (noise injection
:math:`\sigma_n` and the latent penalty :math:`\beta` keep the latent scale
bounded and the decoder smooth around the codes, which is what a flow
sampling imperfect latents, and a solver moving latents, need).

:class:`LatentCodec` adds the latent normalisation of the flow's *model space*,
:math:`z_m = (z - \mu_c)/s_c` per latent channel :math:`c` (the mean and standard deviation of
the training codes, the analogue of Stable Diffusion's ``shift_factor``/``scaling_factor``),
and maps public images in :math:`[0, 1]` to model-space latents (:meth:`LatentCodec.encode`)
and back (:meth:`LatentCodec.decode`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn
import torch.nn.functional as F

__all__ = ["AutoEncoder", "LatentCodec"]


class _Res(nn.Module):
    """:math:`h + W_2\\,\\mathrm{SiLU}(W_1\\,\\mathrm{SiLU}(h))` (3×3 convolutions; the second
    one starts small so that every block starts close to the identity)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(0.1)
            self.conv2.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class _Up(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AutoEncoder(nn.Module):
    """Convolutional autoencoder ``x -> z -> x`` (see the module docstring).

    Args (keyword-only):
        channels: image channels.
        latent_channels: latent channels.
        base: width of the first level.
        channel_mults: width multipliers per level; the downsampling factor is
            ``2 ** (len(channel_mults) - 1)``.
        num_res_blocks: residual blocks per level (encoder and decoder).
        image_size: the image side the model is meant for (recorded; must be divisible by the
            factor), or ``None``.
    """

    def __init__(self, *, channels: int = 1, latent_channels: int = 4, base: int = 16,
                 channel_mults: Sequence[int] = (1, 2, 4), num_res_blocks: int = 1,
                 image_size: Optional[int] = 128):
        super().__init__()
        mults = tuple(int(m) for m in channel_mults)
        if channels < 1 or latent_channels < 1 or base < 1 or num_res_blocks < 0 or not mults \
                or min(mults) < 1:
            raise ValueError("AutoEncoder: channels, latent_channels, base >= 1, "
                             "num_res_blocks >= 0 and non-empty positive channel_mults "
                             f"required; got channels={channels}, latent_channels="
                             f"{latent_channels}, base={base}, num_res_blocks={num_res_blocks}, "
                             f"channel_mults={channel_mults}")
        self.factor = 2 ** (len(mults) - 1)
        if image_size is not None and image_size % self.factor:
            raise ValueError(f"AutoEncoder: image_size={image_size} is not divisible by the "
                             f"downsampling factor {self.factor}")
        self.config = {"type": "AutoEncoder", "channels": int(channels),
                       "latent_channels": int(latent_channels), "base": int(base),
                       "channel_mults": list(mults), "num_res_blocks": int(num_res_blocks),
                       "image_size": None if image_size is None else int(image_size)}
        widths = [base * m for m in mults]
        enc: list = [nn.Conv2d(channels, widths[0], 3, padding=1)]
        for lvl, w in enumerate(widths):
            enc += [_Res(w) for _ in range(num_res_blocks)]
            if lvl != len(widths) - 1:
                enc.append(nn.Conv2d(w, widths[lvl + 1], 3, stride=2, padding=1))
        enc += [_Res(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        dec: list = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1), _Res(widths[-1])]
        for lvl in reversed(range(len(widths))):
            dec += [_Res(widths[lvl]) for _ in range(num_res_blocks)]
            if lvl != 0:
                dec.append(_Up(widths[lvl], widths[lvl - 1]))
        dec += [nn.SiLU(), nn.Conv2d(widths[0], channels, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @classmethod
    def from_config(cls, config: dict) -> "AutoEncoder":
        """Rebuild from :attr:`config` (unknown keys raise ``ValueError``)."""
        cfg = dict(config)
        kind = cfg.pop("type", "AutoEncoder")
        if kind != "AutoEncoder":
            raise ValueError(f"config describes a {kind!r}, not an AutoEncoder")
        allowed = {"channels", "latent_channels", "base", "channel_mults", "num_res_blocks",
                   "image_size"}
        unknown = sorted(set(cfg) - allowed)
        if unknown:
            raise ValueError(f"unknown AutoEncoder config keys: {unknown}")
        return cls(**cfg)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def latent_shape(self, image_size: int) -> tuple:
        """``(latent_channels, S/f, S/f)`` for images of side ``image_size``."""
        if image_size % self.factor:
            raise ValueError(f"image side {image_size} is not divisible by {self.factor}")
        s = image_size // self.factor
        return (self.config["latent_channels"], s, s)

    def _check(self, x: torch.Tensor, ch: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != ch:
            raise ValueError(f"AutoEncoder: {what} must have shape (B, {ch}, H, W), got "
                             f"{tuple(x.shape)}")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, H, W)`` (public ``[0, 1]``) → raw latent ``(B, c, H/f, W/f)``."""
        self._check(x, self.config["channels"], "x")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"AutoEncoder: image size {tuple(x.shape[-2:])} is not divisible "
                             f"by {self.factor}")
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latent → image (public range, not clipped)."""
        self._check(z, self.config["latent_channels"], "z")
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class LatentCodec(nn.Module):
    r"""An autoencoder plus the per-channel latent normalisation of the flow's model space:
    :math:`z_m = (E(x) - \mu)/s`, :math:`x = D(s\,z_m + \mu)`.

    ``mean`` and ``std`` have one entry per latent channel (buffers, saved with the weights).
    """

    def __init__(self, autoencoder: AutoEncoder, mean: Optional[torch.Tensor] = None,
                 std: Optional[torch.Tensor] = None):
        super().__init__()
        c = autoencoder.config["latent_channels"]
        self.autoencoder = autoencoder
        mean = torch.zeros(c) if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        std = torch.ones(c) if std is None else torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != (c,) or std.shape != (c,) or bool((std <= 0).any()):
            raise ValueError(f"LatentCodec: mean and std must have shape ({c},) with std > 0, "
                             f"got {tuple(mean.shape)} and {tuple(std.shape)}")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("std", std.clone())

    @property
    def config(self) -> dict:
        return dict(self.autoencoder.config)

    def _bc(self, v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.to(like).reshape(1, -1, 1, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Public image → model-space latent :math:`(E(x) - \\mu)/s`."""
        z = self.autoencoder.encode(x)
        return (z - self._bc(self.mean, z)) / self._bc(self.std, z)

    def decode(self, zm: torch.Tensor) -> torch.Tensor:
        """Model-space latent → public image :math:`D(s z_m + \\mu)` (not clipped)."""
        return self.autoencoder.decode(zm * self._bc(self.std, zm) + self._bc(self.mean, zm))

    @torch.no_grad()
    def fit_normalisation(self, images: torch.Tensor, *, batch_size: int = 32) -> None:
        """Set ``mean``/``std`` to the per-channel statistics of the raw codes of ``images``."""
        codes = torch.cat([self.autoencoder.encode(images[i:i + batch_size])
                           for i in range(0, images.shape[0], batch_size)])
        self.mean.copy_(codes.mean(dim=(0, 2, 3)))
        self.std.copy_(codes.std(dim=(0, 2, 3)).clamp_min(1e-6))
