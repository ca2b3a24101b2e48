r"""Image-quality metrics in torch: PSNR, SSIM and relative error.

All three take ``x`` (the estimate) and ``ref`` (the reference) of the same shape, either

* ``(B, C, H, W)`` -- returns a tensor of shape ``(B,)``, one value per image (channels are
  pooled: the MSE/norms run over ``C, H, W``; SSIM averages the per-channel SSIMs); the values
  stay on the input's device and are differentiable, or
* ``(H, W)`` -- a single image; returns a Python ``float``.

NumPy arrays are accepted too (converted with :func:`torch.as_tensor`).

Definitions, with :math:`L` the ``data_range``:

.. math::

    \mathrm{PSNR} = 10 \log_{10} \frac{L^2}{\mathrm{MSE}(x, r)} \quad (+\infty \text{ if } x = r),
    \qquad
    \mathrm{RE} = \frac{\|x - r\|_2}{\|r\|_2},

and SSIM is the mean over the valid (un-padded) image area of

.. math::

    \frac{(2\mu_x\mu_r + C_1)(2\sigma_{xr} + C_2)}{(\mu_x^2 + \mu_r^2 + C_1)(\sigma_x^2 + \sigma_r^2 + C_2)},
    \quad C_1 = (K_1 L)^2,\ C_2 = (K_2 L)^2,

with local means/variances/covariance from an ``11 x 11`` Gaussian window (:math:`\sigma = 1.5`,
population statistics), :math:`K_1 = 0.01`, :math:`K_2 = 0.03` -- the standard definition of
Wang et al. (2004), equal to ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
sigma=1.5, use_sample_covariance=False, data_range=L)``. SSIM is computed in float64.
"""
from __future__ import annotations

import math
from typing import Union

import torch
import torch.nn.functional as F

__all__ = ["psnr", "ssim", "relative_error"]

Result = Union[torch.Tensor, float]


def _pair(x, ref, what: str):
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    ref = ref if isinstance(ref, torch.Tensor) else torch.as_tensor(ref)
    if x.ndim not in (2, 4):
        raise ValueError(f"{what}: x must have shape (B, C, H, W) or (H, W), got {tuple(x.shape)}")
    if tuple(x.shape) != tuple(ref.shape):
        raise ValueError(f"{what}: shape mismatch: x has shape {tuple(x.shape)}, ref has shape "
                         f"{tuple(ref.shape)}")
    if not x.is_floating_point():
        x = x.to(torch.float64)
    ref = ref.to(device=x.device, dtype=x.dtype)
    single = x.ndim == 2
    if single:
        x, ref = x[None, None], ref[None, None]
    return x, ref, single


def _finish(values: torch.Tensor, single: bool) -> Result:
    return float(values[0]) if single else values


def _check_range(data_range, what: str) -> float:
    L = float(data_range)
    if not (math.isfinite(L) and L > 0):
        raise ValueError(f"{what}: data_range must be a positive number, got {data_range!r}")
    return L


def psnr(x, ref, data_range: float = 1.0) -> Result:
    r"""Peak signal-to-noise ratio :math:`10\log_{10}(L^2/\mathrm{MSE})` in dB, per image.

    ``(B, C, H, W)`` inputs give a ``(B,)`` tensor, ``(H, W)`` a float; ``inf`` where
    ``x == ref``.
    """
    L = _check_range(data_range, "psnr")
    x, ref, single = _pair(x, ref, "psnr")
    mse = ((x - ref) ** 2).flatten(1).mean(dim=1)
    return _finish(10.0 * torch.log10(L * L / mse), single)


def relative_error(x, ref) -> Result:
    r""":math:`\|x - r\|_2 / \|r\|_2` per image (``inf``/``nan`` where ``ref`` is zero)."""
    x, ref, single = _pair(x, ref, "relative_error")
    num = (x - ref).flatten(1).norm(dim=1)
    return _finish(num / ref.flatten(1).norm(dim=1), single)


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    r = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def ssim(x, ref, data_range: float = 1.0, *, win_size: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> Result:
    r"""Structural similarity with a Gaussian window (standard parameters by default), per image.

    ``(B, C, H, W)`` inputs give a ``(B,)`` tensor (mean over channels), ``(H, W)`` a float.
    Both image sides must be at least ``win_size``.
    """
    L = _check_range(data_range, "ssim")
    x, ref, single = _pair(x, ref, "ssim")
    if win_size < 1 or win_size % 2 == 0:
        raise ValueError(f"ssim: win_size must be odd and positive, got {win_size!r}")
    B, C, H, W = x.shape
    if H < win_size or W < win_size:
        raise ValueError(f"ssim: images of size ({H}, {W}) are smaller than the "
                         f"{win_size} x {win_size} window")
    out_dtype = x.dtype
    xs = torch.stack([x, ref]).to(torch.float64).reshape(2 * B * C, 1, H, W)
    g = _gaussian_window(win_size, sigma, x.device, torch.float64)
    wy, wx = g.reshape(1, 1, -1, 1), g.reshape(1, 1, 1, -1)

    def blur(z):  # separable 'valid' Gaussian filter: only un-padded pixels
        return F.conv2d(F.conv2d(z, wy), wx)

    stats = blur(torch.cat([xs, xs * xs, xs[: B * C] * xs[B * C:]]))
    n = B * C
    mu_x, mu_r = stats[:n], stats[n:2 * n]
    var_x = stats[2 * n:3 * n] - mu_x ** 2
    var_r = stats[3 * n:4 * n] - mu_r ** 2
    cov = stats[4 * n:] - mu_x * mu_r
    c1, c2 = (k1 * L) ** 2, (k2 * L) ** 2
    smap = ((2 * mu_x * mu_r + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_r ** 2 + c1)
                                                       * (var_x + var_r + c2))
    values = smap.reshape(B, C, -1).mean(dim=2).mean(dim=1).to(out_dtype)
    return _finish(values, single)
