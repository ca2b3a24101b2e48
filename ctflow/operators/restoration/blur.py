"""Gaussian blur (:class:`GaussianBlur`), circular (FFT, exact shifted normal solve) or with
zero boundary (convolution, no closed-form solve)."""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ctflow.operators.restoration.image import ImageOperator, ImageSize

__all__ = ["GaussianBlur", "gaussian_kernel_1d"]


def gaussian_kernel_1d(sigma: float, size: int) -> torch.Tensor:
    r"""Normalised 1-D Gaussian :math:`g_i \propto e^{-i^2/2\sigma^2}`, ``i = -(size//2)..size//2``."""
    r = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-0.5 * (r / sigma) ** 2)
    return g / g.sum()


def _conv_matrix_1d(n: int, g: torch.Tensor) -> torch.Tensor:
    """``(n, n)`` matrix of the same-size zero-padded 1-D convolution with ``g`` (odd length)."""
    i = torch.arange(n)
    d = i[:, None] - i[None, :] + g.numel() // 2
    valid = (d >= 0) & (d < g.numel())
    return torch.where(valid, g[d.clamp(0, g.numel() - 1)], torch.zeros((), dtype=g.dtype))


class GaussianBlur(ImageOperator):
    r"""Gaussian blur :math:`(Ax)_n = \sum_m k_m\, x_{n-m}` (a convolution, not a correlation).

    Args:
        image_size: ``H`` or ``(H, W)``.
        sigma: standard deviation in pixels, a float or ``(sigma_y, sigma_x)``; ``> 0``.
        kernel_size: odd int or ``(kh, kw)``; default ``2 * ceil(3 sigma) + 1`` per axis. The
            truncated kernel is renormalised to sum 1, so constant images are preserved
            (circular boundary).
        boundary: ``"circular"`` -- periodic convolution by FFT, :math:`\widehat{Ax} = \hat K
            \hat x` with :math:`\hat K` the DFT of the kernel wrapped onto the ``H x W`` torus
            (any kernel size allowed); the adjoint is the correlation
            :math:`\overline{\hat K}\hat x`, and the shifted normal solve is exact:
            :math:`x = \mathcal F^{-1}[\hat b / (|\hat K|^2 + s)]`.
            ``"zero"`` -- same-size convolution of the zero-padded image; adjoint by transposed
            convolution; no closed-form solve (returns ``None``).
    """

    name = "GaussianBlur"

    def __init__(self, image_size: ImageSize, *, sigma: Union[float, Sequence[float]],
                 kernel_size: Union[None, int, Sequence[int]] = None,
                 boundary: str = "circular"):
        super().__init__(image_size)
        sig = (float(sigma),) * 2 if np.ndim(sigma) == 0 else tuple(float(s) for s in sigma)
        if len(sig) != 2 or not all(math.isfinite(s) and s > 0 for s in sig):
            raise ValueError(f"GaussianBlur: sigma must be > 0 (a float or a pair), got {sigma!r}")
        if kernel_size is None:
            ks = tuple(2 * math.ceil(3.0 * s) + 1 for s in sig)
        elif np.ndim(kernel_size) == 0:
            ks = (int(kernel_size),) * 2
        else:
            ks = tuple(int(k) for k in kernel_size)
        if len(ks) != 2 or any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(f"GaussianBlur: kernel_size must be odd and positive "
                             f"(an int or a pair), got {kernel_size!r}")
        if boundary not in ("circular", "zero"):
            raise ValueError(f"GaussianBlur: boundary must be 'circular' or 'zero', "
                             f"got {boundary!r}")
        self.sigma, self.kernel_size, self.boundary = sig, ks, boundary
        self._axes = tuple(gaussian_kernel_1d(sg, k) for sg, k in zip(sig, ks))
        self._kernel = torch.outer(*self._axes)      # separable: k_ij = g_y(i) g_x(j)
        H, W = self.image_size
        ii = ((torch.arange(ks[0]) - ks[0] // 2) % H)[:, None].expand(ks)
        jj = ((torch.arange(ks[1]) - ks[1] // 2) % W)[None, :].expand(ks)
        psf = torch.zeros(H, W, dtype=torch.float64)
        psf.index_put_((ii, jj), self._kernel, accumulate=True)   # kernel wrapped on the torus
        self._khat = torch.fft.fft2(psf)                          # its DFT, complex128
        self._k2 = self._khat.abs() ** 2                          # |K^|^2, the symbol of A^T A

    @property
    def kernel(self) -> torch.Tensor:
        """The normalised ``kernel_size`` Gaussian kernel (float64, sums to 1)."""
        return self._kernel.clone()

    def __repr__(self) -> str:
        return (f"GaussianBlur(image_size={self.image_size}, sigma={self.sigma}, "
                f"kernel_size={self.kernel_size}, boundary={self.boundary!r})")

    # circular: diagonal in the DFT basis
    def _spectral(self, x: torch.Tensor, mult_key: str, mult: torch.Tensor) -> torch.Tensor:
        H, W = self.image_size
        if x.is_complex():
            return torch.fft.ifft2(torch.fft.fft2(x) * self._const(mult_key, mult, x))
        half = mult[..., : W // 2 + 1]
        return torch.fft.irfft2(torch.fft.rfft2(x) * self._const(mult_key + "/r", half, x),
                                s=(H, W))

    def _conv(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if x.is_complex():
            return torch.complex(self._conv(x.real, transpose), self._conv(x.imag, transpose))
        B, C, H, W = x.shape
        # conv2d correlates, so flip the kernel to convolve.
        w = self._const("kflip", torch.flip(self._kernel, (0, 1)), x)[None, None]
        pad = (self.kernel_size[0] // 2, self.kernel_size[1] // 2)
        z = x.reshape(B * C, 1, H, W)
        z = F.conv_transpose2d(z, w, padding=pad) if transpose else F.conv2d(z, w, padding=pad)
        return z.reshape(B, C, H, W)

    def _forward(self, x):
        if self.boundary == "circular":
            return self._spectral(x, "khat", self._khat)
        return self._conv(x, transpose=False)

    def _adjoint(self, y):
        if self.boundary == "circular":
            return self._spectral(y, "khat_conj", self._khat.conj())
        return self._conv(y, transpose=True)

    def norm(self, **kwargs) -> float:
        r"""Exact :math:`\|A\|_2`, no power iteration.

        Circular: :math:`\max_\omega |\hat K(\omega)|`. Zero boundary: the separable kernel
        makes :math:`A = A_y \otimes A_x` (1-D zero-padded convolution matrices), so
        :math:`\|A\| = \|A_y\|\,\|A_x\|`, each from the singular values of a small matrix.
        """
        if self._norm_cache is None:
            if self.boundary == "circular":
                self._norm_cache = float(self._khat.abs().max())
            else:
                self._norm_cache = math.prod(
                    float(torch.linalg.matrix_norm(_conv_matrix_1d(n, g), ord=2))
                    for n, g in zip(self.image_size, self._axes))
        return self._norm_cache

    def solve_shifted_normal(self, b, shift):
        s = self._check_rhs(b, shift)
        if self.boundary != "circular":
            return None
        if s == 0.0 and float(self._k2.min()) == 0.0:
            return None
        H, W = self.image_size
        if b.is_complex():
            return torch.fft.ifft2(torch.fft.fft2(b) / (self._const("k2", self._k2, b) + s))
        k2 = self._const("k2/r", self._k2[:, : W // 2 + 1], b)
        return torch.fft.irfft2(torch.fft.rfft2(b) / (k2 + s), s=(H, W))
