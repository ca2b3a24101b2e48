"""Analytic phantoms in torch: Shepp–Logan and a seeded, unbounded random-ellipses dataset.

Image convention (shared with the CT geometries): an ``n × n`` image covers the square
``[-1, 1]²``; pixel ``(i, j)`` (row, column) has its centre at

    x_j = −1 + (2j + 1)/n,        y_i = 1 − (2i + 1)/n,

so row 0 is the top (``y`` near +1) and column 0 the left (``x`` near −1). An ellipse with value
``v``, centre ``(x0, y0)``, semi-axes ``(a, b)`` and counter-clockwise rotation ``φ`` adds ``v``
at every pixel centre with

    ((x−x0)cos φ + (y−y0) sin φ)² / a²  +  (−(x−x0) sin φ + (y−y0) cos φ)² / b²  ≤  1.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["shepp_logan", "ellipse_image", "EllipsesDataset", "SHEPP_LOGAN_ELLIPSES",
           "MODIFIED_SHEPP_LOGAN_ELLIPSES"]

# (value, a, b, x0, y0, phi in degrees): Shepp & Logan (1974); the geometry is shared by both.
_GEOMETRY = (
    (0.69, 0.92, 0.0, 0.0, 0.0),
    (0.6624, 0.8740, 0.0, -0.0184, 0.0),
    (0.1100, 0.3100, 0.22, 0.0, -18.0),
    (0.1600, 0.4100, -0.22, 0.0, 18.0),
    (0.2100, 0.2500, 0.0, 0.35, 0.0),
    (0.0460, 0.0460, 0.0, 0.1, 0.0),
    (0.0460, 0.0460, 0.0, -0.1, 0.0),
    (0.0460, 0.0230, -0.08, -0.605, 0.0),
    (0.0230, 0.0230, 0.0, -0.606, 0.0),
    (0.0230, 0.0460, 0.06, -0.605, 0.0),
)
_ORIGINAL_VALUES = (2.0, -0.98, -0.02, -0.02, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01)
# Toft's modified values: higher contrast, image in [0, 1].
_MODIFIED_VALUES = (1.0, -0.8, -0.2, -0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1)

#: ``(value, a, b, x0, y0, phi_degrees)`` of the original Shepp–Logan phantom (range [0, 2]).
SHEPP_LOGAN_ELLIPSES = tuple((v,) + g for v, g in zip(_ORIGINAL_VALUES, _GEOMETRY))
#: ``(value, a, b, x0, y0, phi_degrees)`` of the modified (Toft) phantom (range [0, 1]).
MODIFIED_SHEPP_LOGAN_ELLIPSES = tuple((v,) + g for v, g in zip(_MODIFIED_VALUES, _GEOMETRY))


def _grid(n: int, dtype: torch.dtype, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    c = (2.0 * torch.arange(n, dtype=torch.float64, device=device) + 1.0) / n - 1.0
    y, x = torch.meshgrid(-c, c, indexing="ij")  # row i -> y = -c_i (top is +1)
    return x.to(dtype), y.to(dtype)


def ellipse_image(n: int, ellipses, *, dtype: torch.dtype = torch.float32,
                  device=None) -> torch.Tensor:
    """Sum of ellipse indicators on an ``n × n`` grid over ``[-1, 1]²`` (module convention).

    ``ellipses`` is a sequence (or ``(E, 6)`` array/tensor) of rows
    ``(value, a, b, x0, y0, phi_degrees)``. Returns an ``(n, n)`` tensor.
    """
    if int(n) != n or n < 1:
        raise ValueError(f"image size must be a positive integer; got {n!r}")
    n = int(n)
    e = torch.as_tensor(np.asarray(ellipses, dtype=np.float64), dtype=torch.float64,
                        device=device).reshape(-1, 6)
    x, y = _grid(n, torch.float64, device)
    v, a, b, x0, y0, phi = (e[:, k, None, None] for k in range(6))
    if torch.any(a <= 0) or torch.any(b <= 0):
        raise ValueError("ellipse semi-axes must be positive")
    phi = phi * (math.pi / 180.0)
    dx, dy = x[None] - x0, y[None] - y0
    u = dx * torch.cos(phi) + dy * torch.sin(phi)
    w = -dx * torch.sin(phi) + dy * torch.cos(phi)
    inside = (u / a) ** 2 + (w / b) ** 2 <= 1.0
    return (inside.to(torch.float64) * v).sum(0).to(dtype)


def shepp_logan(n: int, *, modified: bool = True, dtype: torch.dtype = torch.float32,
                device=None) -> torch.Tensor:
    """The Shepp–Logan head phantom as an ``(n, n)`` tensor with values in ``[0, 1]``.

    ``modified=True`` (default) gives Toft's modified phantom (values 0, 0.1, 0.2, 0.3, 0.4 and 1
    for the skull). ``modified=False`` gives the original low-contrast phantom (skull 2, brain
    1.02 …) divided by 2 so that it too lies in ``[0, 1]``. Geometry and orientation follow the
    module convention: the three small ellipses near ``y = −0.6`` are at the bottom, the larger
    of the two tilted ellipses (centre ``x = −0.22``) is on the left.
    """
    table = MODIFIED_SHEPP_LOGAN_ELLIPSES if modified else SHEPP_LOGAN_ELLIPSES
    img = ellipse_image(n, table, dtype=torch.float64, device=device)
    if not modified:
        img = img / 2.0
    return img.clamp_(0.0, 1.0).to(dtype)


class EllipsesDataset(Dataset):
    """Random-ellipse images, seeded and unbounded: item ``i`` depends only on ``(seed, i)``.

    Each image draws ``E = 1 + Poisson(mean_ellipses − 1)`` ellipses (at most
    ``max_ellipses``) with values ``v ~ U(−0.4, 1)`` (the first one ``U(0.2, 1)``, so the image
    is never empty), semi-axes ``0.2·Exp(1)`` clipped to ``[min_axis, 0.9]``, centres uniform in
    the disk of radius ``0.8`` and rotations ``U(0°, 180°)``; the sum is clipped at 0 and
    divided by its maximum, so every image lies in ``[0, 1]`` with maximum 1.

    Parameters
    ----------
    image_size : ``N``; items are ``(1, N, N)`` tensors.
    seed : the dataset seed; ``numpy.random.default_rng([seed, i])`` generates item ``i``.
    length : what ``len()`` reports (for samplers and DataLoaders), default 1,000,000. Any
        index ``i >= 0`` is valid whatever the length.
    """

    def __init__(self, image_size: int, *, seed: int = 0, length: int | None = None,
                 mean_ellipses: float = 20.0, max_ellipses: int = 70, min_axis: float = 0.02,
                 dtype: torch.dtype = torch.float32) -> None:
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive integer; got {image_size!r}")
        if length is not None and (int(length) != length or length < 1):
            raise ValueError(f"length must be a positive integer or None; got {length!r}")
        if mean_ellipses < 1 or max_ellipses < 1:
            raise ValueError("mean_ellipses and max_ellipses must be at least 1")
        if not 0 < min_axis < 0.9:
            raise ValueError(f"min_axis must lie in (0, 0.9); got {min_axis}")
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.length = 1_000_000 if length is None else int(length)
        self.mean_ellipses = float(mean_ellipses)
        self.max_ellipses = int(max_ellipses)
        self.min_axis = float(min_axis)
        self.dtype = dtype

    def __len__(self) -> int:
        return self.length

    def parameters(self, index: int) -> np.ndarray:
        """The ``(E, 6)`` ellipse table ``(value, a, b, x0, y0, phi_degrees)`` of item ``index``."""
        if int(index) != index or index < 0:
            raise IndexError(f"EllipsesDataset index must be a non-negative integer; got {index!r}")
        rng = np.random.default_rng([self.seed, int(index)])
        e = min(1 + int(rng.poisson(self.mean_ellipses - 1.0)), self.max_ellipses)
        v = rng.uniform(-0.4, 1.0, e)
        v[0] = rng.uniform(0.2, 1.0)
        axes = np.clip(0.2 * rng.exponential(1.0, (e, 2)), self.min_axis, 0.9)
        r = 0.8 * np.sqrt(rng.uniform(0.0, 1.0, e))
        t = rng.uniform(0.0, 2.0 * np.pi, e)
        phi = rng.uniform(0.0, 180.0, e)
        return np.stack([v, axes[:, 0], axes[:, 1], r * np.cos(t), r * np.sin(t), phi], axis=1)

    def __getitem__(self, index: int) -> torch.Tensor:
        img = ellipse_image(self.image_size, self.parameters(index), dtype=torch.float64)
        img = img.clamp_(min=0.0)
        peak = float(img.max())
        if peak <= 0.0:
            # The first ellipse may fall between pixel centres on a very coarse grid.
            return torch.zeros(1, self.image_size, self.image_size, dtype=self.dtype)
        return (img / peak).to(self.dtype).unsqueeze(0)
