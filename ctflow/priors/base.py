r"""The prior type the solvers see: a velocity field plus its normalisation.

Public images live in :math:`[0, 1]`. A prior works in its own *model space*,
:math:`x_{\text{model}} = a\,x + b` (``scale`` :math:`a`, ``shift`` :math:`b`; the default
maps :math:`[0,1]` to :math:`[-1,1]`). Solvers convert once at entry (:meth:`FlowPrior.to_model`)
and once at exit (:meth:`FlowPrior.from_model`); note that a linear operator :math:`A` acting on
public images acts on model-space states as :math:`A((x_m - b)/a)`.

A prior exposes ``image_size``, ``channels`` and, for CT priors, ``hu_window`` (the HU range
mapped to :math:`[0, 1]` in training), so scripts can prepare data exactly as the prior saw it.

A *size-agnostic* prior (``image_size=None``; a fully convolutional velocity trained on
patches, :mod:`ctflow.training.patches`) models square images of any side divisible by
``size_multiple``; ``pixel_mm`` records the physical pixel sizes (mm) it was trained at, so a
caller can check that an image's pixels are in that range. :meth:`FlowPrior.fits` says
whether an image side suits the prior.
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
        image_size: side length of the square images the prior models, or ``None`` for a
            size-agnostic prior (any side divisible by ``size_multiple``).
        channels: image channels.
        scale, shift: model-space normalisation :math:`x_m = \\text{scale}\\,x + \\text{shift}`.
        hu_window: ``(lo, hi)`` HU range mapped to ``[0, 1]`` (CT priors), else ``None``.
        name: a label for reports.
        config: the JSON config the prior was loaded from (if any).
        size_multiple: the image side must be a multiple of this (size-agnostic priors: the
            network's total down-sampling).
        pixel_mm: ``(min, max)`` pixel sizes in mm of the training images, or ``None``.
    """

    def __init__(self, velocity: Callable, *, image_size: Optional[int], channels: int = 1,
                 scale: float = 2.0, shift: float = -1.0,
                 hu_window: Optional[Tuple[float, float]] = None, name: str = "prior",
                 config: Optional[dict] = None, size_multiple: int = 1,
                 pixel_mm: Optional[Tuple[float, float]] = None):
        if scale == 0:
            raise ValueError("scale must be non-zero")
        if int(size_multiple) < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        self.velocity = velocity
        self.image_size = None if image_size is None else int(image_size)
        self.size_multiple = int(size_multiple)
        self.pixel_mm = None if pixel_mm is None else (float(pixel_mm[0]), float(pixel_mm[1]))
        self.channels = int(channels)
        self.scale = float(scale)
        self.shift = float(shift)
        self.hu_window = tuple(hu_window) if hu_window is not None else None
        self.name = name
        self.config = dict(config or {})

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.velocity(x, t)

    @property
    def size_agnostic(self) -> bool:
        """Whether the prior models images of any (suitable) size."""
        return self.image_size is None

    def fits(self, size: int) -> bool:
        """Whether square images of side ``size`` suit the prior."""
        if self.image_size is not None:
            return int(size) == self.image_size
        return int(size) > 0 and int(size) % self.size_multiple == 0

    def size_text(self) -> str:
        """``"64x64"`` or ``"any NxN, N a multiple of 8"`` (for messages and listings)."""
        if self.image_size is not None:
            return f"{self.image_size}x{self.image_size}"
        return f"any NxN, N a multiple of {self.size_multiple}"

    @property
    def shape(self) -> Tuple[int, int, int]:
        """Per-item image shape ``(C, H, W)`` (a size-agnostic prior has none: use
        :meth:`shape_for`)."""
        if self.image_size is None:
            raise ValueError(f"prior {self.name!r} is size-agnostic ({self.size_text()}); "
                             "use shape_for(size)")
        return (self.channels, self.image_size, self.image_size)

    def shape_for(self, size: Optional[int] = None) -> Tuple[int, int, int]:
        """``(C, size, size)``, checked against the prior (``size`` defaults to
        ``image_size``)."""
        size = self.image_size if size is None else int(size)
        if size is None or not self.fits(size):
            raise ValueError(f"prior {self.name!r} models {self.size_text()} images, "
                             f"not {size}x{size}")
        return (self.channels, size, size)

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
               dtype=torch.float32, size: Optional[int] = None) -> torch.Tensor:
        """``n`` samples in ``[0, 1]`` (unclipped) by integrating noise from t=0 to t=1
        (``size``: the image side of a size-agnostic prior)."""
        z = torch.randn((n, *self.shape_for(size)), generator=generator,
                        dtype=dtype).to(device or "cpu")
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
                f"channels={self.channels}, hu_window={self.hu_window}"
                + (f", size_multiple={self.size_multiple}, pixel_mm={self.pixel_mm}"
                   if self.image_size is None else "") + ")")


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
