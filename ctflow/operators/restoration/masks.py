"""Inpainting masks: ``(H, W)`` float32 tensors, 1 = observed, 0 = missing; every random choice
is seeded (:func:`random_mask`, :func:`box_mask`, :func:`freeform_mask`)."""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch

__all__ = ["random_mask", "box_mask", "freeform_mask"]


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
