"""Super-resolution (:class:`SuperResolution`): average pooling or decimation by an integer
factor, and the identity (:class:`Denoising`), the two image operators with
:math:`AA^T = cI`."""
from __future__ import annotations

import math

from ctflow.operators.restoration.image import ImageOperator, ImageSize, parse_image_size

__all__ = ["SuperResolution", "Denoising"]


class SuperResolution(ImageOperator):
    r"""Down-sampling by an integer ``factor`` :math:`k`: ``(H, W) -> (H/k, W/k)``.

    ``mode="average"``: :math:`k \times k` average pooling; the adjoint spreads each low-res
    pixel over its block divided by :math:`k^2`; :math:`AA^T = I/k^2`, :math:`\|A\| = 1/k`.
    ``mode="decimate"``: keep pixel ``(k i, k j)``; the adjoint zero-fills; :math:`AA^T = I`.

    With :math:`AA^T = cI`, Woodbury gives the exact shifted normal solve
    :math:`(A^TA + sI)^{-1} b = \big(b - A^T A b/(s + c)\big)/s` for :math:`s > 0`.
    """

    name = "SuperResolution"

    def __init__(self, image_size: ImageSize, *, factor: int, mode: str = "average"):
        size = parse_image_size(image_size, "SuperResolution")
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


class Denoising(ImageOperator):
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
