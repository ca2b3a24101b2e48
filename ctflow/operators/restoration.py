r"""Image-restoration operators on batched images ``(B, C, H, W)``, all torch-native.

Every operator here acts channel-wise on images of domain shape ``(H, W)``, follows its input's
device and dtype, is differentiable by torch autograd, and solves the shifted normal equations

.. math:: (A^T A + s I)\,x = b, \qquad s \ge 0,

exactly in closed form (:meth:`~ctflow.operators.LinearOperator.solve_shifted_normal`), except
the zero-boundary blur, which has no closed form and returns ``None``. With ``s = 0`` a solve
returns ``None`` when :math:`A^T A` is singular.

* :class:`GaussianBlur` -- :math:`Ax = k * x` with a normalised Gaussian kernel :math:`k`;
  circular boundary (diagonal in the DFT basis, :math:`\hat{A} = \hat K`) or zero padding.
* :class:`Inpainting` -- :math:`Ax = m \odot x` with a 0/1 mask :math:`m` (random pixels, a box,
  or free-form brush strokes); self-adjoint, :math:`A^T A = \mathrm{diag}(m)`.
* :class:`SuperResolution` -- :math:`k \times k` average pooling or decimation; both have
  :math:`AA^T = cI` (:math:`c = 1/k^2` resp. :math:`1`), hence the Woodbury solve
  :math:`x = (b - A^T A b / (s + c)) / s`.
* :class:`Denoising` -- the identity.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ctflow.operators.base import LinearOperator, check_batched

__all__ = ["GaussianBlur", "Inpainting", "SuperResolution", "Denoising",
           "random_mask", "box_mask", "freeform_mask"]

ImageSize = Union[int, Sequence[int]]


def _image_size(image_size: ImageSize, owner: str) -> Tuple[int, int]:
    """``int`` or ``(H, W)`` -> ``(H, W)`` of positive ints, else ``ValueError``."""
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        size = (int(image_size), int(image_size))
    else:
        try:
            size = tuple(int(s) for s in image_size)
        except TypeError:
            raise ValueError(f"{owner}: image_size must be an int or an (H, W) pair, "
                             f"got {image_size!r}") from None
        if len(size) != 2:
            raise ValueError(f"{owner}: image_size must be an int or an (H, W) pair, "
                             f"got {image_size!r}")
    if min(size) < 1:
        raise ValueError(f"{owner}: image_size must be positive, got {image_size!r}")
    return size


def _check_shift(shift, owner: str) -> float:
    s = float(shift)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"{owner}: shift must be a finite number >= 0, got {shift!r}")
    return s


def _real_dtype(dtype: torch.dtype) -> torch.dtype:
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


class _ImageOperator(LinearOperator):
    """Shared helpers: image size parsing, per-(device, dtype) constant cache, ``b`` checks."""

    def __init__(self, image_size: ImageSize, range_shape: Optional[Sequence[int]] = None):
        size = _image_size(image_size, type(self).__name__)
        super().__init__(size, size if range_shape is None else range_shape)
        self.image_size: Tuple[int, int] = size
        self._consts = {}

    def _const(self, key: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``value`` on ``like``'s device, in ``like``'s real (or complex) precision."""
        if value.is_complex():
            dtype = torch.complex128 if _real_dtype(like.dtype) == torch.float64 else torch.complex64
        else:
            dtype = _real_dtype(like.dtype)
        k = (key, like.device, dtype)
        if k not in self._consts:
            self._consts[k] = value.to(device=like.device, dtype=dtype)
        return self._consts[k]

    def _check_rhs(self, b: torch.Tensor, shift) -> float:
        check_batched(b, self.domain_shape, what="right-hand side b", owner=self._label())
        return _check_shift(shift, self._label())


# ---------------------------------------------------------------------------------------------
# Masks: (H, W) float32 tensors, 1 = observed, 0 = missing; every random choice is seeded.
def _check_fraction(fraction, what: str) -> float:
    f = float(fraction)
    if not (0.0 <= f < 1.0):
        raise ValueError(f"{what}: fraction (missing share) must be in [0, 1), got {fraction!r}")
    return f


def random_mask(size: Tuple[int, int], *, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Exactly ``round(fraction * H * W)`` missing pixels, a uniform seeded random subset."""
    H, W = size
    f = _check_fraction(fraction, "random_mask")
    g = torch.Generator().manual_seed(int(seed))
    m = torch.ones(H * W, dtype=torch.float32)
    m[torch.randperm(H * W, generator=g)[: round(f * H * W)]] = 0.0
    return m.reshape(H, W)


def box_mask(size: Tuple[int, int], *, box_size=None, position: str = "center",
             seed: int = 0) -> torch.Tensor:
    """One missing ``(h, w)`` rectangle (default half of each side), centred or seeded."""
    H, W = size
    if box_size is None:
        bh, bw = max(1, H // 2), max(1, W // 2)
    elif np.ndim(box_size) == 0:
        bh = bw = int(box_size)
    elif len(box_size) == 2:
        bh, bw = (int(b) for b in box_size)
    else:
        raise ValueError(f"box_mask: box_size must be an int or an (h, w) pair, got {box_size!r}")
    if not (1 <= bh <= H and 1 <= bw <= W):
        raise ValueError(f"box_mask: box_size {box_size!r} must fit the image ({H}, {W})")
    if position == "center":
        top, left = (H - bh) // 2, (W - bw) // 2
    elif position == "random":
        g = torch.Generator().manual_seed(int(seed))
        top = int(torch.randint(0, H - bh + 1, (1,), generator=g))
        left = int(torch.randint(0, W - bw + 1, (1,), generator=g))
    else:
        raise ValueError(f"box_mask: position must be 'center' or 'random', got {position!r}")
    m = torch.ones(H, W, dtype=torch.float32)
    m[top:top + bh, left:left + bw] = 0.0
    return m


def freeform_mask(size: Tuple[int, int], *, fraction: float = 0.25, seed: int = 0,
                  max_strokes: int = 1000) -> torch.Tensor:
    r"""Free-form brush-stroke mask (in the spirit of the free-form masks of inpainting papers).

    Strokes are thick polylines: a random start point, 4--12 vertices, a heading that turns by
    at most :math:`\pm 60^\circ` per vertex, segment lengths in ``[0.1, 0.3] * min(H, W)`` and a
    brush width in ``[0.03, 0.12] * min(H, W)`` (at least 1 pixel), clipped to the image. A
    segment paints every pixel centre within ``width / 2`` of it (a capsule). Segments are
    added until the missing share reaches ``fraction``, so the result overshoots ``fraction``
    by at most one capsule.
    """
    H, W = size
    f = _check_fraction(fraction, "freeform_mask")
    g = torch.Generator().manual_seed(int(seed))

    def u(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))

    side = min(H, W)
    yy = torch.arange(H, dtype=torch.float64)[:, None]
    xx = torch.arange(W, dtype=torch.float64)[None, :]
    missing = torch.zeros(H, W, dtype=torch.bool)
    target = math.ceil(f * H * W - 1e-9)
    count, strokes = 0, 0
    while count < target and strokes < max_strokes:
        strokes += 1
        p = (u(0, H - 1), u(0, W - 1))
        heading = u(0, 2 * math.pi)
        radius = max(0.5, 0.5 * u(0.03 * side, 0.12 * side))
        for _ in range(int(torch.randint(4, 13, (1,), generator=g))):
            heading += u(-math.pi / 3, math.pi / 3)
            length = u(0.1 * side, 0.3 * side)
            q = (min(max(p[0] + length * math.sin(heading), 0.0), H - 1.0),
                 min(max(p[1] + length * math.cos(heading), 0.0), W - 1.0))
            dy, dx = q[0] - p[0], q[1] - p[1]
            d2 = dy * dy + dx * dx
            t = ((yy - p[0]) * dy + (xx - p[1]) * dx) / d2 if d2 > 0 else 0.0 * (yy + xx)
            t = torch.clamp(t, 0.0, 1.0)
            dist2 = (yy - p[0] - t * dy) ** 2 + (xx - p[1] - t * dx) ** 2
            missing |= dist2 <= radius * radius
            count = int(missing.sum())
            p = q
            if count >= target:
                break
    return (~missing).to(torch.float32)


# ---------------------------------------------------------------------------------------------
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


class GaussianBlur(_ImageOperator):
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


# ---------------------------------------------------------------------------------------------
class Inpainting(_ImageOperator):
    r"""Masking :math:`Ax = m \odot x` with a 0/1 mask :math:`m` (1 = observed pixel).

    The range equals the domain (missing pixels read 0), so :math:`A = A^T = A^T A`
    and :math:`(A^T A + sI)^{-1} b = b / (m + s)` elementwise.

    Args:
        image_size: ``H`` or ``(H, W)``.
        mask: an explicit ``(H, W)`` 0/1 (bool, int or float) tensor or array; when given,
            ``kind`` is ignored (reported as ``"custom"``) and ``fraction``/``box_size`` must be
            left unset.
        kind: ``"random"`` -- exactly ``round(fraction * H * W)`` pixels missing, chosen
            uniformly; ``"box"`` -- one missing ``box_size`` rectangle, centred
            (``position="center"``) or at a seeded random place (``position="random"``);
            ``"freeform"`` -- seeded thick polyline brush strokes until at least ``fraction`` of
            the image is missing (see :func:`freeform_mask`).
        fraction: missing fraction in ``[0, 1)``; default 0.5 (random) or 0.25 (freeform).
        box_size: int or ``(h, w)`` hole size for ``"box"``; default half of each side.
        position: ``"center"`` or ``"random"`` (box only).
        seed: seed for every random choice (masks are reproducible).
    """

    name = "Inpainting"

    def __init__(self, image_size: ImageSize, *, mask=None, kind: str = "random",
                 fraction: Optional[float] = None,
                 box_size: Union[None, int, Sequence[int]] = None,
                 position: str = "center", seed: int = 0):
        super().__init__(image_size)
        H, W = self.image_size
        if mask is not None:
            if fraction is not None or box_size is not None:
                raise ValueError("Inpainting: give either mask or (kind, fraction, box_size), "
                                 "not both")
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            m = m.detach().to("cpu")
            if tuple(m.shape) != (H, W):
                raise ValueError(f"Inpainting: mask shape mismatch: expected ({H}, {W}), "
                                 f"got {tuple(m.shape)}")
            m = m.to(torch.float32)
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError("Inpainting: mask values must be 0 or 1")
            kind = "custom"
        elif kind == "random":
            m = random_mask((H, W), fraction=0.5 if fraction is None else fraction, seed=seed)
        elif kind == "box":
            if fraction is not None:
                raise ValueError("Inpainting: kind='box' takes box_size, not fraction")
            m = box_mask((H, W), box_size=box_size, position=position, seed=seed)
        elif kind == "freeform":
            m = freeform_mask((H, W), fraction=0.25 if fraction is None else fraction, seed=seed)
        else:
            raise ValueError(f"Inpainting: kind must be 'random', 'box' or 'freeform', "
                             f"got {kind!r}")
        self.kind, self.seed = kind, int(seed)
        self._mask = m.to(torch.float32).contiguous()

    @property
    def mask(self) -> torch.Tensor:
        """The ``(H, W)`` float32 0/1 mask (1 = observed); a copy."""
        return self._mask.clone()

    @property
    def missing_fraction(self) -> float:
        """Fraction of pixels that are masked out."""
        return 1.0 - float(self._mask.mean())

    def __repr__(self) -> str:
        return (f"Inpainting(image_size={self.image_size}, kind={self.kind!r}, "
                f"missing={self.missing_fraction:.3f}, seed={self.seed})")

    def _forward(self, x):
        return x * self._const("mask", self._mask, x)

    _adjoint = _forward

    def norm(self, **kwargs) -> float:
        """:math:`\\|A\\| = 1` unless every pixel is missing (then 0); exact, no iteration."""
        return float(self._mask.max())

    def solve_shifted_normal(self, b, shift):
        s = self._check_rhs(b, shift)
        if s == 0.0 and float(self._mask.min()) == 0.0:
            return None
        return b / (self._const("mask", self._mask, b) + s)


# ---------------------------------------------------------------------------------------------
class SuperResolution(_ImageOperator):
    r"""Down-sampling by an integer ``factor`` :math:`k`: ``(H, W) -> (H/k, W/k)``.

    ``mode="average"``: :math:`k \times k` average pooling; the adjoint spreads each low-res
    pixel over its block divided by :math:`k^2`; :math:`AA^T = I/k^2`, :math:`\|A\| = 1/k`.
    ``mode="decimate"``: keep pixel ``(k i, k j)``; the adjoint zero-fills; :math:`AA^T = I`.

    With :math:`AA^T = cI`, Woodbury gives the exact shifted normal solve
    :math:`(A^TA + sI)^{-1} b = \big(b - A^T A b/(s + c)\big)/s` for :math:`s > 0`.
    """

    name = "SuperResolution"

    def __init__(self, image_size: ImageSize, *, factor: int, mode: str = "average"):
        size = _image_size(image_size, "SuperResolution")
        if isinstance(factor, bool) or int(factor) != factor or int(factor) < 1:
            raise ValueError(f"SuperResolution: factor must be a positive integer, got {factor!r}")
        k = int(factor)
        if size[0] % k or size[1] % k:
            raise ValueError(f"SuperResolution: image_size {size} is not divisible by "
                             f"factor {k}")
        if mode not in ("average", "decimate"):
            raise ValueError(f"SuperResolution: mode must be 'average' or 'decimate', "
                             f"got {mode!r}")
        super().__init__(size, (size[0] // k, size[1] // k))
        self.factor, self.mode = k, mode
        self._c = 1.0 / (k * k) if mode == "average" else 1.0   # A A^T = c I

    def __repr__(self) -> str:
        return (f"SuperResolution(image_size={self.image_size}, factor={self.factor}, "
                f"mode={self.mode!r})")

    def _forward(self, x):
        k = self.factor
        if self.mode == "decimate":
            return x[..., ::k, ::k]
        B, C, H, W = x.shape
        return x.reshape(B, C, H // k, k, W // k, k).mean(dim=(3, 5))

    def _adjoint(self, y):
        k = self.factor
        B, C, h, w = y.shape
        if self.mode == "average":
            return (y / (k * k)).repeat_interleave(k, dim=-2).repeat_interleave(k, dim=-1)
        out = y.new_zeros(B, C, h, k, w, k)
        out[:, :, :, 0, :, 0] = y
        return out.reshape(B, C, h * k, w * k)

    def norm(self, **kwargs) -> float:
        """:math:`\\|A\\| = \\sqrt{c}` from :math:`AA^T = cI`; exact, no iteration."""
        return math.sqrt(self._c)

    def solve_shifted_normal(self, b, shift):
        s = self._check_rhs(b, shift)
        if s == 0.0:
            return b / self._c if self.factor == 1 else None
        return (b - self._adjoint(self._forward(b)) / (s + self._c)) / s


# ---------------------------------------------------------------------------------------------
class Denoising(_ImageOperator):
    r"""The identity :math:`A = I` on ``(H, W)`` images; :math:`(A^TA + sI)^{-1}b = b/(1+s)`."""

    name = "Denoising"

    def __init__(self, image_size: ImageSize):
        super().__init__(image_size)

    def __repr__(self) -> str:
        return f"Denoising(image_size={self.image_size})"

    def _forward(self, x):
        return x.clone()

    _adjoint = _forward

    def norm(self, **kwargs) -> float:
        """:math:`\\|I\\| = 1`."""
        return 1.0

    def solve_shifted_normal(self, b, shift):
        s = self._check_rhs(b, shift)
        return b / (1.0 + s)
