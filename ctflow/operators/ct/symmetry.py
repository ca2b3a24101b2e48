r"""Symmetry reduction of the torch system matrix (:mod:`ctflow.operators.ct.torch_backend`).

Rotating the image by 90° (an index permutation of the square pixel grid) shifts the angle by
:math:`\pi/2`, and mirroring it (:math:`x \to -x`) maps :math:`(\theta, s) \to (-\theta, -s)`:

.. math::  p_f(\theta + \tfrac\pi2, s) = p_{f\circ R}(\theta, s), \qquad
           p_f(-\theta, s) = p_{f\circ M}(\theta, -s),

with :math:`(f\circ R)(x, y) = f(-y, x)` and :math:`(f\circ M)(x, y) = f(-x, y)`. Every angle is
therefore the projection of one of at most 8 transformed images at a *canonical* angle in
:math:`[0, \pi/4]`. When the angle set is symmetric (uniform angles are), the matrix is built
only for the canonical angles (4–8 times less memory and build time) and applied to the
transformed images stacked as extra columns, which costs the same arithmetic. The row gather
that undoes the reduction is a permutation, so the adjoint stays exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

from ctflow.operators.ct.geometry import Geometry2D

__all__ = ["SymmetryPlan", "symmetry_plan", "transform_image", "inverse_transform_image"]

_ANGLE_TOL = 1e-9


@dataclass(frozen=True)
class SymmetryPlan:
    """How the requested angles map to canonical angles and image transforms.

    ``canonical``: float64 array of canonical angles (the matrix rows are built for these);
    ``groups``: list of ``(m, mirror)`` image transforms
    :math:`f \\mapsto f\\circ R^m\\circ M^{mirror}`;
    ``row_index``: for each requested (angle, detector), the row of the stacked product
    ``(canonical·detector, group)`` flattened as ``row * G + group``;
    ``mode``: ``"dihedral"``, ``"rotation"`` or ``"none"``.
    """

    canonical: np.ndarray
    groups: Tuple[Tuple[int, bool], ...]
    row_index: np.ndarray
    mode: str


def _reduce(angles: np.ndarray, mode: str):
    half_pi = 0.5 * math.pi
    if mode == "none":
        return angles.copy(), np.zeros(len(angles), np.int64), np.zeros(len(angles), bool)
    k = np.floor(angles / half_pi)
    beta = angles - k * half_pi
    wrap = beta > half_pi - _ANGLE_TOL
    beta = np.where(wrap, beta - half_pi, beta)
    k = k + wrap
    mirror = np.zeros(len(angles), bool)
    if mode == "dihedral":
        mirror = beta > 0.25 * math.pi + _ANGLE_TOL
        beta = np.where(mirror, half_pi - beta, beta)
        k = k + mirror
    m = np.mod(k, 4).astype(np.int64)
    return beta, m, mirror


def _cluster(values: np.ndarray):
    order = np.argsort(values, kind="stable")
    sv = values[order]
    new = np.ones(len(sv), bool)
    new[1:] = np.diff(sv) > _ANGLE_TOL
    labels_sorted = np.cumsum(new) - 1
    reps = sv[new]
    labels = np.empty(len(values), np.int64)
    labels[order] = labels_sorted
    return reps, labels


def symmetry_plan(geometry: Geometry2D, *, mode: str = "auto") -> SymmetryPlan:
    """Choose the reduction for ``geometry``'s angles (see the module docstring).

    ``mode="auto"`` takes the reduction with the fewest canonical angles among those whose
    arithmetic (canonical angles × transforms) stays within 10 % of the plain matrix (the
    plain matrix on ties).
    """
    angles = geometry.angles.numpy()
    nd = geometry.detectors
    if mode not in ("auto", "dihedral", "rotation", "none"):
        raise ValueError(f"symmetry mode must be 'auto', 'dihedral', 'rotation' or 'none', "
                         f"got {mode!r}")
    candidates = ["none", "rotation", "dihedral"] if mode == "auto" else [mode]
    best = None
    for cand in candidates:
        alpha, m, mirror = _reduce(angles, cand)
        reps, labels = _cluster(alpha)
        keys = sorted(set(zip(m.tolist(), mirror.tolist())))
        work = len(reps) * len(keys)
        if mode == "auto" and cand != "none" and work > 1.1 * len(angles):
            continue
        score = (len(reps), len(keys))
        if best is None or score < best[0]:
            best = (score, cand, reps, labels, m, mirror, keys)
    _, cand, reps, labels, m, mirror, keys = best
    gidx = {key: i for i, key in enumerate(keys)}
    g = np.array([gidx[(int(mi), bool(si))] for mi, si in zip(m, mirror)], np.int64)
    j = np.arange(nd, dtype=np.int64)
    jj = np.where(mirror[:, None], nd - 1 - j[None, :], j[None, :])
    rows = labels[:, None] * nd + jj
    row_index = (rows * len(keys) + g[:, None]).reshape(-1)
    return SymmetryPlan(canonical=reps, groups=tuple((int(a), bool(b)) for a, b in keys),
                        row_index=row_index, mode=cand)


def transform_image(x: torch.Tensor, group: Tuple[int, bool], dims=(-2, -1)) -> torch.Tensor:
    """Image of :math:`f \circ R^m \circ M^{mirror}` on the (row, column) axes ``dims``."""
    m, mirror = group
    y = torch.rot90(x, -m, dims=dims) if m else x
    return y.flip(dims[1]) if mirror else y


def inverse_transform_image(x: torch.Tensor, group: Tuple[int, bool], dims=(-2, -1)) -> torch.Tensor:
    """Inverse (= adjoint, a permutation) of :func:`transform_image`."""
    m, mirror = group
    y = x.flip(dims[1]) if mirror else x
    return torch.rot90(y, m, dims=dims) if m else y
