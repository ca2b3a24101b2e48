r"""The prior type the solvers see: a velocity field plus its normalisation.

Public images live in :math:`[0, 1]`. A prior works in its own *model space*,
:math:`x_{\text{model}} = a\,x + b` (``scale`` :math:`a`, ``shift`` :math:`b`; the default
maps :math:`[0,1]` to :math:`[-1,1]`). Solvers convert once at entry (:meth:`FlowPrior.to_model`)
and once at exit (:meth:`FlowPrior.from_model`); note that a linear operator :math:`A` acting on
public images acts on model-space states as :math:`A((x_m - b)/a)`.

A prior exposes ``image_size``, ``channels`` and, for CT priors, ``hu_window`` (the HU range
mapped to :math:`[0, 1]` in training), so scripts can prepare data exactly as the prior saw it.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ctflow.flow.gaussian import GaussianVelocity
from ctflow.flow.integrate import integrate

__all__ = ["FlowPrior", "gaussian_prior"]


class FlowPrior:
    """A flow-matching prior: ``velocity(x, t)`` in model space and its normalisation.

    Args:
        velocity: callable ``v(x, t)`` (an ``nn.Module`` or any function).
        image_size: side length of the square images the prior models.
        channels: image channels.
        scale, shift: model-space normalisation :math:`x_m = \\text{scale}\\,x + \\text{shift}`.
        hu_window: ``(lo, hi)`` HU range mapped to ``[0, 1]`` (CT priors), else ``None``.
        name: a label for reports.
        config: the JSON config the prior was loaded from (if any).
    """

    def __init__(self, velocity: Callable, *, image_size: int, channels: int = 1,
                 scale: float = 2.0, shift: float = -1.0,
                 hu_window: Optional[Tuple[float, float]] = None, name: str = "prior",
                 config: Optional[dict] = None):
        if scale == 0:
            raise ValueError("scale must be non-zero")
        self.velocity = velocity
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.scale = float(scale)
        self.shift = float(shift)
        self.hu_window = tuple(hu_window) if hu_window is not None else None
        self.name = name
        self.config = dict(config or {})

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Per-item image shape ``(C, H, W)``."""
        return (self.channels, self.image_size, self.image_size)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """Public ``[0, 1]`` image to model space."""
        return self.scale * x + self.shift

    def from_model(self, x: torch.Tensor) -> torch.Tensor:
        """Model space to the public ``[0, 1]`` range (not clipped)."""
        return (x - self.shift) / self.scale

    def to(self, device=None, dtype=None) -> "FlowPrior":
        """Move a module velocity field (in place) and return ``self``."""
        if isinstance(self.velocity, torch.nn.Module):
            self.velocity.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "FlowPrior":
        if isinstance(self.velocity, torch.nn.Module):
            self.velocity.eval()
            for p in self.velocity.parameters():
                p.requires_grad_(False)
        return self

    @torch.no_grad()
    def sample(self, n: int, *, steps: int = 50, method: str = "midpoint",
               generator: Optional[torch.Generator] = None, device=None,
               dtype=torch.float32) -> torch.Tensor:
        """``n`` samples in ``[0, 1]`` (unclipped) by integrating noise from t=0 to t=1."""
        z = torch.randn((n, *self.shape), generator=generator, dtype=dtype).to(device or "cpu")
        return self.from_model(integrate(self.velocity, z, 0.0, 1.0, steps, method, grad=False))

    def hu_to_unit(self, hu: torch.Tensor) -> torch.Tensor:
        """HU values to the prior's ``[0, 1]`` range (clipped to the window)."""
        if self.hu_window is None:
            raise ValueError(f"prior {self.name!r} declares no hu_window")
        lo, hi = self.hu_window
        return ((hu - lo) / (hi - lo)).clamp(0.0, 1.0)

    def unit_to_hu(self, x: torch.Tensor) -> torch.Tensor:
        """``[0, 1]`` values back to HU (the inverse of :meth:`hu_to_unit` inside the window)."""
        if self.hu_window is None:
            raise ValueError(f"prior {self.name!r} declares no hu_window")
        lo, hi = self.hu_window
        return x * (hi - lo) + lo

    def __repr__(self) -> str:
        return (f"FlowPrior(name={self.name!r}, image_size={self.image_size}, "
                f"channels={self.channels}, hu_window={self.hu_window})")


def gaussian_prior(mu: torch.Tensor, sigma: torch.Tensor, *, name: str = "gaussian") -> FlowPrior:
    """A prior whose data distribution is :math:`N(\\mu, \\operatorname{diag}\\sigma^2)` in
    *model space*, with the exact closed-form velocity (:class:`GaussianVelocity`).

    ``mu`` and ``sigma`` have shape ``(C, H, W)`` with ``H == W``. The normalisation is the
    identity (``scale=1, shift=0``), so model space and public space coincide.
    """
    mu = torch.as_tensor(mu)
    if mu.ndim != 3 or mu.shape[1] != mu.shape[2]:
        raise ValueError(f"mu must have shape (C, N, N), got {tuple(mu.shape)}")
    return FlowPrior(GaussianVelocity(mu, sigma), image_size=mu.shape[-1], channels=mu.shape[0],
                     scale=1.0, shift=0.0, name=name)
