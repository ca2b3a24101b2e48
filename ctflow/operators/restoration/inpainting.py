"""Inpainting (:class:`Inpainting`): masking with a 0/1 mask
(:mod:`ctflow.operators.restoration.masks`)."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import torch

from ctflow.operators.restoration.image import ImageOperator, ImageSize
from ctflow.operators.restoration.masks import box_mask, freeform_mask, random_mask

__all__ = ["Inpainting"]


class Inpainting(ImageOperator):
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
