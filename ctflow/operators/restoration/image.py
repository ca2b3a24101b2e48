"""The shared base of the image-restoration operators: image-size parsing, the check of a
shift, and :class:`ImageOperator` (per-(device, dtype) constants, right-hand-side checks)."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ctflow.operators.base import LinearOperator, check_batched

__all__ = ["ImageOperator", "ImageSize", "parse_image_size", "check_shift", "real_dtype"]

ImageSize = Union[int, Sequence[int]]


def parse_image_size(image_size: ImageSize, owner: str) -> Tuple[int, int]:
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


def check_shift(shift, owner: str) -> float:
    """``shift`` as a float, ``ValueError`` (naming ``owner``) unless finite and ``>= 0``."""
    s = float(shift)
    if not math.isfinite(s) or s < 0:
        raise ValueError(f"{owner}: shift must be a finite number >= 0, got {shift!r}")
    return s


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    """The real dtype of a complex one (other dtypes unchanged)."""
    return {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)


class ImageOperator(LinearOperator):
    """Base of the image operators: image size parsing, per-(device, dtype) constant cache, ``b`` checks."""

    def __init__(self, image_size: ImageSize, range_shape: Optional[Sequence[int]] = None):
        size = parse_image_size(image_size, type(self).__name__)
        super().__init__(size, size if range_shape is None else range_shape)
        self.image_size: Tuple[int, int] = size
        self._consts = {}

    def _const(self, key: str, value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``value`` on ``like``'s device, in ``like``'s real (or complex) precision."""
        if value.is_complex():
            dtype = torch.complex128 if real_dtype(like.dtype) == torch.float64 else torch.complex64
        else:
            dtype = real_dtype(like.dtype)
        k = (key, like.device, dtype)
        if k not in self._consts:
            self._consts[k] = value.to(device=like.device, dtype=dtype)
        return self._consts[k]

    def _check_rhs(self, b: torch.Tensor, shift) -> float:
        check_batched(b, self.domain_shape, what="right-hand side b", owner=self._label())
        return check_shift(shift, self._label())
