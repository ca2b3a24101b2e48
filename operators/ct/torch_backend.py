r"""The native torch backend: a sparse system matrix with an exactly matched adjoint.

Model
-----
Entry :math:`A_{(\theta, j), p}` is the exact average over detector bin ``j``
(:math:`[s_j - \Delta/2, s_j + \Delta/2]`) of the line integral through pixel ``p`` (value 1),
i.e. :math:`A_{(\theta,j),p} = \frac1\Delta\int_{\text{bin } j} P_{p,\theta}(s)\,ds` with
:math:`P_{p,\theta}(s)` the pixel's footprint. The footprint is a trapezoid whose break points
:math:`\tau_0 \le \tau_1 \le \tau_2 \le \tau_3` are the projections of the four pixel corners
onto the detector and whose plateau is the chord of the ray through the pixel centre,
:math:`h / \max(|\cos\psi|, |\sin\psi|)` (:math:`\psi` the ray direction). For parallel beams
this is exact (the projection of a square is the convolution of two boxes of widths
:math:`h|\cos\theta|` and :math:`h|\sin\theta|`); for fan beams it is the separable-footprint
(SF-TR) approximation, accurate to second order in :math:`h/R_s`. The bin integral uses the
antiderivative of the trapezoid (piecewise quadratic), so a sinogram ``A x`` is the exact
bin-averaged line integral of the pixelised image ``x`` (parallel beam).

Symmetry
--------
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

The forward is ``A @ X`` with ``X`` the flattened images as an ``(N², G·B·C)`` matrix; the
adjoint is a second CSR matrix holding :math:`A^T` (bit-identical values), so
:math:`\langle Ax, y\rangle = \langle x, A^Ty\rangle` up to rounding. Matrices are cached in a
module-level dict per (geometry, kind, device, dtype); :func:`clear_cache` empties it.
"""
from __future__ import annotations

import math
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from .geometry import FanBeam2D, Geometry2D, ParallelBeam2D

__all__ = ["SystemMatrix", "system_matrix", "clear_cache", "cache_info", "symmetry_plan",
           "TorchRayBackend"]

_ANGLE_TOL = 1e-9
# entries (angles × pixels × bins) computed per chunk while building
_CHUNK_ENTRIES = 1 << 21

_CACHE: Dict[tuple, "SystemMatrix"] = {}
_CACHE_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------
# symmetry reduction
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SymmetryPlan:
    """How the requested angles map to canonical angles and image transforms.

    ``canonical``: float64 array of canonical angles (the matrix rows are built for these);
    ``groups``: list of ``(m, mirror)`` image transforms :math:`f \\mapsto f\\circ R^m\\circ M^{mirror}`;
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
    arithmetic (canonical angles × transforms) stays within 10 % of the plain matrix.
    """
    angles = geometry.angles.numpy()
    nd = geometry.detectors
    if mode not in ("auto", "dihedral", "rotation", "none"):
        raise ValueError(f"symmetry mode must be 'auto', 'dihedral', 'rotation' or 'none', "
                         f"got {mode!r}")
    candidates = ["dihedral", "rotation", "none"] if mode == "auto" else [mode]
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


def _transform(x: torch.Tensor, group: Tuple[int, bool]) -> torch.Tensor:
    m, mirror = group
    y = torch.rot90(x, -m, dims=(-2, -1)) if m else x
    return y.flip(-1) if mirror else y


def _inverse_transform(x: torch.Tensor, group: Tuple[int, bool]) -> torch.Tensor:
    m, mirror = group
    y = x.flip(-1) if mirror else x
    return torch.rot90(y, m, dims=(-2, -1)) if m else y


# ---------------------------------------------------------------------------------------------
# footprints and bin integrals
# ---------------------------------------------------------------------------------------------
def _footprint(geometry: Geometry2D, cos_a: torch.Tensor, sin_a: torch.Tensor,
               px: torch.Tensor, py: torch.Tensor, weighted: bool):
    """Trapezoid break points (sorted) and plateau height for angles × pixels.

    ``cos_a``, ``sin_a`` have shape ``(A, 1)``, ``px``, ``py`` shape ``(P,)``; the outputs are
    ``(A, P)``. ``weighted`` multiplies the height by :math:`R_s / L` (fan beam only), ``L`` the
    distance of the pixel centre from the source along the central ray.
    """
    h = geometry.pixel_size
    if isinstance(geometry, ParallelBeam2D):
        sc = px * cos_a + py * sin_a
        a = h * cos_a.abs()
        b = h * sin_a.abs()
        outer = 0.5 * (a + b)
        inner = 0.5 * (a - b).abs()
        t = [sc - outer, sc - inner, sc + inner, sc + outer]
        height = (h / torch.maximum(cos_a.abs(), sin_a.abs())).expand_as(sc)
        return t, height
    rs, rd = geometry.source_origin, geometry.origin_detector
    corners = []
    for dx in (-0.5 * h, 0.5 * h):
        for dy in (-0.5 * h, 0.5 * h):
            xx = px + dx
            yy = py + dy
            along = rs + (yy * cos_a - xx * sin_a)  # distance from the source along e(θ)
            across = xx * cos_a + yy * sin_a
            corners.append((rs + rd) * across / along)
    t = torch.stack(corners, 0).sort(dim=0).values
    vx = px + rs * sin_a  # pixel centre minus source position
    vy = py - rs * cos_a
    height = h * torch.sqrt(vx * vx + vy * vy) / torch.maximum(vx.abs(), vy.abs())
    if weighted:
        centre_along = rs + (py * cos_a - px * sin_a)
        height = height * (rs / centre_along)
    return [t[0], t[1], t[2], t[3]], height


def _ramp2(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Antiderivative of the unit ramp rising linearly over ``[0, w]`` (``w`` may be 0)."""
    wsafe = torch.clamp(w, min=1e-300)
    inside = z * z / (2.0 * wsafe)
    above = z - 0.5 * w
    return torch.where(z <= 0, torch.zeros_like(z), torch.where(z >= w, above, inside))


def _bin_value(t, height, edge: torch.Tensor, ds: float) -> torch.Tensor:
    """Average of the trapezoid over ``[edge, edge + ds]``."""
    t0, t1, t2, t3 = t
    w01 = t1 - t0
    w23 = t3 - t2
    hi = edge + ds

    def phi(s):
        return _ramp2(s - t0, w01) - _ramp2(s - t2, w23)

    return height * (phi(hi) - phi(edge)) / ds


def _bin_range(t, e0: float, ds: float, nd: int):
    lo = torch.floor((t[0] - e0) / ds)
    hi = torch.ceil((t[3] - e0) / ds) - 1
    lo = torch.clamp(lo, min=0)
    hi = torch.clamp(hi, max=nd - 1)
    count = torch.clamp(hi - lo + 1, min=0)
    return lo, count


# ---------------------------------------------------------------------------------------------
# building
# ---------------------------------------------------------------------------------------------
def _csr(crow, col, val, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=shape)


def _build(geometry: Geometry2D, canonical: np.ndarray, *, weighted: bool, dtype: torch.dtype):
    """Return ``(crow, col, val)`` of :math:`A` and of :math:`A^T` (rows: canonical angle ×
    detector, columns: pixels in row-major order), values in ``dtype``."""
    n = geometry.image_size
    npix = n * n
    nd, ds = geometry.detectors, geometry.detector_spacing
    e0 = float(geometry.detector_positions()[0]) - 0.5 * ds
    na = len(canonical)
    ang = torch.from_numpy(np.asarray(canonical, np.float64))
    cos_all = torch.cos(ang).view(-1, 1)
    sin_all = torch.sin(ang).view(-1, 1)
    # snap tiny cosines/sines (e.g. cos(pi/2)) to exact zeros: the footprints are then exact boxes
    cos_all = torch.where(cos_all.abs() < 1e-15, torch.zeros_like(cos_all), cos_all)
    sin_all = torch.where(sin_all.abs() < 1e-15, torch.zeros_like(sin_all), sin_all)
    xg, yg = geometry.pixel_centres()
    px_all = xg.reshape(-1).contiguous()
    py_all = yg.reshape(-1).contiguous()
    index_dtype = torch.int32

    counts = torch.empty((na, npix), dtype=torch.int16)

    # pass 1: A in CSR, rows (angle, detector) sorted, columns ascending within a row
    rows_per_angle = []
    cols_chunks: List[torch.Tensor] = []
    vals_chunks: List[torch.Tensor] = []
    a_step = max(1, _CHUNK_ENTRIES // (3 * npix))
    for a0 in range(0, na, a_step):
        a1 = min(na, a0 + a_step)
        t, height = _footprint(geometry, cos_all[a0:a1], sin_all[a0:a1], px_all, py_all,
                               weighted)
        lo, cnt = _bin_range(t, e0, ds, nd)
        counts[a0:a1] = cnt.to(torch.int16)
        kmax = int(cnt.max()) if cnt.numel() else 0
        if kmax == 0:
            rows_per_angle.append(torch.zeros((a1 - a0) * nd, dtype=torch.int64))
            continue
        ks = torch.arange(kmax, dtype=torch.float64)
        jj = lo.unsqueeze(-1) + ks  # (A, P, K)
        edges = e0 + jj * ds
        vals = _bin_value([ti.unsqueeze(-1) for ti in t], height.unsqueeze(-1), edges, ds)
        valid = ks < cnt.unsqueeze(-1)
        pix = torch.arange(npix, dtype=torch.int32).view(1, npix, 1).expand_as(valid)
        for ai in range(a1 - a0):
            v_ok = valid[ai]
            j_a = jj[ai][v_ok].to(torch.int16).numpy()
            order = torch.from_numpy(np.argsort(j_a, kind="stable"))
            cols_chunks.append(pix[ai][v_ok][order].to(index_dtype))
            vals_chunks.append(vals[ai][v_ok][order].to(dtype))
            rows_per_angle.append(torch.bincount(torch.from_numpy(j_a.astype(np.int64)),
                                                 minlength=nd))
        del t, height, lo, cnt, jj, edges, vals, valid
    row_counts = torch.cat(rows_per_angle) if rows_per_angle else torch.zeros(0, torch.int64)
    nnz = int(row_counts.sum())
    if nnz >= 2 ** 31 - 1:
        raise ValueError(f"system matrix for {geometry!r} has {nnz} non-zeros, more than int32 "
                         f"indices allow; use fewer angles/pixels or backend='odl'")
    crow = torch.zeros(na * nd + 1, dtype=torch.int64)
    torch.cumsum(row_counts, 0, out=crow[1:])
    col = torch.cat(cols_chunks) if cols_chunks else torch.zeros(0, dtype=index_dtype)
    del cols_chunks
    val = torch.cat(vals_chunks) if vals_chunks else torch.zeros(0, dtype=dtype)
    del vals_chunks
    a_mat = (crow.to(index_dtype), col, val)

    # pass 2: A^T in CSR, rows = pixels, columns (angle, detector) ascending
    pix_counts = counts.to(torch.int64).sum(0)
    crow_t = torch.zeros(npix + 1, dtype=torch.int64)
    torch.cumsum(pix_counts, 0, out=crow_t[1:])
    col_t = torch.empty(nnz, dtype=index_dtype)
    val_t = torch.empty(nnz, dtype=dtype)
    p_step = max(1, _CHUNK_ENTRIES // (3 * na))
    for p0 in range(0, npix, p_step):
        p1 = min(npix, p0 + p_step)
        t, height = _footprint(geometry, cos_all, sin_all, px_all[p0:p1], py_all[p0:p1],
                               weighted)
        lo, _ = _bin_range(t, e0, ds, nd)
        cnt = counts[:, p0:p1].to(torch.int64)
        kmax = int(cnt.max()) if cnt.numel() else 0
        if kmax == 0:
            continue
        ks = torch.arange(kmax, dtype=torch.float64)
        jj = lo.unsqueeze(-1) + ks
        edges = e0 + jj * ds
        vals = _bin_value([ti.unsqueeze(-1) for ti in t], height.unsqueeze(-1), edges, ds)
        valid = (torch.arange(kmax).view(1, 1, -1) < cnt.unsqueeze(-1))
        rowid = (torch.arange(na, dtype=torch.int64) * nd).view(-1, 1, 1) + jj.to(torch.int64)
        valid = valid.permute(1, 0, 2)
        o0, o1 = int(crow_t[p0]), int(crow_t[p1])
        col_t[o0:o1] = rowid.permute(1, 0, 2)[valid].to(index_dtype)
        val_t[o0:o1] = vals.permute(1, 0, 2)[valid].to(dtype)
        del t, height, lo, jj, edges, vals, valid, rowid
    at_mat = (crow_t.to(index_dtype), col_t, val_t)
    return a_mat, at_mat


class SystemMatrix:
    """The sparse matrices of one geometry on one device/dtype, with the symmetry plan.

    ``forward(x)`` maps ``(K, N, N)`` images to ``(K, angles, detectors)`` sinograms and
    ``adjoint(y)`` back; both run under whatever grad mode the caller chose (the ray transform
    wraps them in :class:`~ctflow.operators.base.AdjointFunction`).
    """

    def __init__(self, geometry: Geometry2D, *, kind: str = "ray", device="cpu",
                 dtype=torch.float32, symmetry: str = "auto"):
        if kind not in ("ray", "fan_fbp"):
            raise ValueError(f"kind must be 'ray' or 'fan_fbp', got {kind!r}")
        if kind == "fan_fbp" and not isinstance(geometry, FanBeam2D):
            raise ValueError("kind='fan_fbp' needs a FanBeam2D geometry")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"system matrix dtype must be float32 or float64, got {dtype}")
        t0 = time.perf_counter()
        self.geometry = geometry
        self.kind = kind
        self.plan = symmetry_plan(geometry, mode=symmetry)
        (crow, col, val), (crow_t, col_t, val_t) = _build(
            geometry, self.plan.canonical, weighted=(kind == "fan_fbp"), dtype=dtype)
        device = torch.device(device)
        n = geometry.image_size
        rows = len(self.plan.canonical) * geometry.detectors
        self.matrix = _csr(crow.to(device), col.to(device), val.to(device), (rows, n * n))
        self.matrix_t = _csr(crow_t.to(device), col_t.to(device), val_t.to(device),
                             (n * n, rows))
        self.row_index = torch.from_numpy(self.plan.row_index).to(device)
        self.groups = self.plan.groups
        self.device, self.dtype = device, dtype
        self.nnz = int(val.numel())
        self.build_seconds = time.perf_counter() - t0

    @property
    def nbytes(self) -> int:
        """Bytes held by both CSR matrices and the row index."""
        total = 0
        for m in (self.matrix, self.matrix_t):
            for t in (m.crow_indices(), m.col_indices(), m.values()):
                total += t.numel() * t.element_size()
        return total + self.row_index.numel() * self.row_index.element_size()

    def _stack(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        if len(self.groups) == 1 and self.groups[0] == (0, False):
            return x.reshape(k, -1).t().contiguous()
        parts = [_transform(x, g) for g in self.groups]
        return torch.cat(parts, 0).reshape(len(self.groups) * k, -1).t().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        g = self.geometry
        y = self.matrix @ self._stack(x)  # (canonical rows, G*k)
        y = y.reshape(-1, k).index_select(0, self.row_index)  # (angles*detectors, k)
        return y.t().reshape(k, g.num_angles, g.detectors)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        k = y.shape[0]
        n = self.geometry.image_size
        ng = len(self.groups)
        rows = len(self.plan.canonical) * self.geometry.detectors
        z = torch.zeros(rows * ng, k, dtype=y.dtype, device=y.device)
        z.index_add_(0, self.row_index, y.reshape(k, -1).t())
        x = self.matrix_t @ z.reshape(rows, ng * k)  # (N², G*k)
        x = x.t().reshape(ng, k, n, n)
        out = _inverse_transform(x[0], self.groups[0])
        for i in range(1, ng):
            out = out + _inverse_transform(x[i], self.groups[i])
        return out.contiguous()


def system_matrix(geometry: Geometry2D, *, device="cpu", dtype=torch.float32,
                  kind: str = "ray") -> SystemMatrix:
    """The cached :class:`SystemMatrix` for ``geometry`` on ``device``/``dtype`` (built once)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (geometry, kind, str(device), dtype)
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
    if hit is not None:
        return hit
    mat = SystemMatrix(geometry, kind=kind, device=device, dtype=dtype)
    with _CACHE_LOCK:
        return _CACHE.setdefault(key, mat)


def clear_cache() -> None:
    """Drop every cached system matrix (frees their memory)."""
    with _CACHE_LOCK:
        _CACHE.clear()


def cache_info() -> List[dict]:
    """One dict per cached matrix: geometry, kind, device, dtype, nnz, bytes, build seconds."""
    with _CACHE_LOCK:
        items = list(_CACHE.items())
    return [dict(geometry=repr(k[0]), kind=k[1], device=k[2], dtype=str(k[3]), nnz=m.nnz,
                 bytes=m.nbytes, build_seconds=m.build_seconds, symmetry=m.plan.mode)
            for k, m in items]


class TorchRayBackend:
    """Ray-transform backend on the cached sparse matrices (CPU and CUDA, float32/float64).

    ``forward``/``adjoint`` take ``(K, N, N)`` / ``(K, angles, detectors)`` tensors; the matrix
    follows the input's device and dtype.
    """

    name = "torch"
    exact_adjoint = True

    def __init__(self, geometry: Geometry2D, *, kind: str = "ray"):
        self.geometry = geometry
        self.kind = kind

    def matrix_for(self, t: torch.Tensor) -> SystemMatrix:
        return system_matrix(self.geometry, device=t.device, dtype=t.dtype, kind=self.kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matrix_for(x).forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self.matrix_for(y).adjoint(y)
