r"""The entries of the torch system matrix (:mod:`ctflow.operators.ct.torch_backend`): pixel
footprints, their bin integrals, and the CSR arrays of :math:`A` and :math:`A^T`.

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
bin-averaged line integral of the pixelised image ``x`` (parallel beam; it agrees with ASTRA's
``strip`` kernel to float32 accuracy). ``kind="fan_fbp"`` builds the same matrix with every
entry weighted by :math:`R_s/L` (``L`` the source distance of the pixel centre along the central
ray) for the distance-weighted fan-beam back-projection of :class:`~ctflow.operators.ct.FBP`.
"""
from __future__ import annotations

import numpy as np
import torch

from ctflow.operators.ct.geometry import Geometry2D, ParallelBeam2D

__all__ = ["build_matrices"]

# entries (angles × pixels × bins) computed per chunk while building
_CHUNK_ENTRIES = 1 << 16


def _trapezoids(geometry: Geometry2D, cos_a, sin_a, px, py, weighted: bool, e0: float,
                ds: float):
    """Pixel footprints on the detector for angles × pixels, in detector-bin units.

    ``cos_a``/``sin_a`` broadcast against ``px``/``py``. Returns ``(u0, u3, w01, d2, w23,
    height)``: the trapezoid rises over ``[u0, u0 + w01]``, falls over ``[u0 + d2, u0 + d2 +
    w23] = [.., u3]`` (positions in bins from the first bin edge ``e0``), and its plateau is
    ``height`` (the chord through the pixel centre; times :math:`R_s/L` if ``weighted``).
    """
    h = geometry.pixel_size
    if isinstance(geometry, ParallelBeam2D):
        sc = px * cos_a + py * sin_a
        a = h * cos_a.abs()
        b = h * sin_a.abs()
        outer = 0.5 * (a + b)
        u0 = (sc - outer - e0) / ds
        u3 = u0 + (a + b) / ds
        w = torch.minimum(a, b) / ds
        d2 = torch.maximum(a, b) / ds
        height = h / torch.maximum(cos_a.abs(), sin_a.abs())
        return u0, u3, w, d2, w, height
    rs, rd = geometry.source_origin, geometry.origin_detector
    corners = []
    for dx in (-0.5 * h, 0.5 * h):
        for dy in (-0.5 * h, 0.5 * h):
            xx = px + dx
            yy = py + dy
            along = rs + (yy * cos_a - xx * sin_a)  # distance from the source along e(θ)
            across = xx * cos_a + yy * sin_a
            corners.append(((rs + rd) * across / along - e0) / ds)
    t = torch.stack(corners, 0).sort(dim=0).values
    vx = px - rs * sin_a  # pixel centre minus the source position R_s (sin, -cos)
    vy = py + rs * cos_a
    height = h * torch.sqrt(vx * vx + vy * vy) / torch.maximum(vx.abs(), vy.abs())
    if weighted:
        centre_along = rs + (py * cos_a - px * sin_a)
        height = height * (rs / centre_along)
    return t[0], t[3], t[1] - t[0], t[2] - t[0], t[3] - t[2], height


def _ramp2(z: torch.Tensor, w: torch.Tensor, inv2w: torch.Tensor) -> torch.Tensor:
    """Antiderivative of the unit ramp rising linearly over ``[0, w]`` (``w`` may be 0).

    Equals 0 for ``z <= 0``, :math:`z^2/(2w)` on ``[0, w]`` and ``z - w/2`` beyond;
    ``inv2w`` is :math:`1/(2w)` (any finite value when ``w = 0``).
    """
    zc = torch.minimum(torch.clamp(z, min=0.0), w)
    return zc * zc * inv2w + torch.clamp(z - w, min=0.0)


def _bin_range(u0: torch.Tensor, u3: torch.Tensor, nd: int):
    """First overlapped bin and number of overlapped bins (clipped to the detector)."""
    lo = torch.clamp(torch.floor(u0), min=0)
    hi = torch.clamp(torch.ceil(u3) - 1, max=nd - 1)
    return lo, torch.clamp(hi - lo + 1, min=0)


def _bin_values(trap, lo: torch.Tensor, kmax: int) -> torch.Tensor:
    """Averages of the trapezoids over the ``kmax`` bins starting at ``lo`` (trailing axis)."""
    u0, _, w01, d2, w23, height = trap
    w01 = w01.unsqueeze(-1)
    w23 = w23.unsqueeze(-1)
    i01 = 0.5 / torch.clamp(w01, min=1e-300)
    i23 = 0.5 / torch.clamp(w23, min=1e-300)
    ks = torch.arange(kmax + 1, dtype=torch.float64)
    z = (lo - u0).unsqueeze(-1) + ks  # bin edges relative to the footprint start
    phi = _ramp2(z, w01, i01) - _ramp2(z - d2.unsqueeze(-1), w23, i23)
    return (phi[..., 1:] - phi[..., :-1]) * height.unsqueeze(-1)


def _stable_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of non-negative integer keys below ``bound`` (radix sort when 16-bit)."""
    if bound <= 65535:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys.astype(np.int64), kind="stable")


def build_matrices(geometry: Geometry2D, canonical: np.ndarray, *, weighted: bool, dtype: torch.dtype):
    """Return ``(crow, col, val)`` of :math:`A` and of :math:`A^T` (rows: canonical angle ×
    detector, columns: pixels in row-major order), values in ``dtype``.

    Pass 0 counts the bins each (angle, pixel) footprint overlaps (fixing the CSR layout of
    :math:`A^T`); pass 1 computes the values once per angle and writes them to both matrices,
    so :math:`A^T` holds exactly the values of :math:`A`.
    """
    n = geometry.image_size
    npix = n * n
    nd, ds = geometry.detectors, geometry.detector_spacing
    e0 = float(geometry.detector_positions()[0]) - 0.5 * ds
    na = len(canonical)
    ang = torch.from_numpy(np.asarray(canonical, np.float64))
    cos_all = torch.cos(ang)
    sin_all = torch.sin(ang)
    # snap tiny cosines/sines (e.g. cos(pi/2)) to exact zeros: the footprints are then exact boxes
    cos_all = torch.where(cos_all.abs() < 1e-15, torch.zeros_like(cos_all), cos_all)
    sin_all = torch.where(sin_all.abs() < 1e-15, torch.zeros_like(sin_all), sin_all)
    xg, yg = geometry.pixel_centres()
    px_all = xg.reshape(-1).contiguous()
    py_all = yg.reshape(-1).contiguous()
    index_dtype = torch.int32
    p_step = max(1, _CHUNK_ENTRIES // 4)
    blocks = [(p0, min(npix, p0 + p_step)) for p0 in range(0, npix, p_step)]

    # pass 0: bins per (angle, pixel)
    counts = torch.empty((na, npix), dtype=torch.int16)
    for a in range(na):
        c, s = cos_all[a:a + 1], sin_all[a:a + 1]
        for p0, p1 in blocks:
            trap = _trapezoids(geometry, c, s, px_all[p0:p1], py_all[p0:p1], weighted, e0, ds)
            counts[a, p0:p1] = _bin_range(trap[0], trap[1], nd)[1].to(torch.int16)
    pix_counts = counts.sum(0, dtype=torch.int64)
    nnz = int(pix_counts.sum())
    if nnz >= 2 ** 31 - 1:
        raise ValueError(f"system matrix for {geometry!r} has {nnz} non-zeros, more than int32 "
                         f"indices allow; use fewer angles/pixels or backend='odl'")
    crow_t = torch.zeros(npix + 1, dtype=torch.int64)
    torch.cumsum(pix_counts, 0, out=crow_t[1:])
    col_t = torch.empty(nnz, dtype=index_dtype)
    val_t = torch.empty(nnz, dtype=dtype)
    col = torch.empty(nnz, dtype=index_dtype)
    val = torch.empty(nnz, dtype=dtype)
    row_counts = torch.zeros(na * nd, dtype=torch.int64)
    run = crow_t[:-1].clone()  # next free slot of each A^T row
    offset = 0

    # pass 1: values, written to A (rows sorted by (angle, detector)) and A^T (rows = pixels)
    for a in range(na):
        c, s = cos_all[a:a + 1], sin_all[a:a + 1]
        js, ps, vs, pos = [], [], [], []
        for p0, p1 in blocks:
            cnt = counts[a, p0:p1].to(torch.int64)
            kmax = int(cnt.max()) if cnt.numel() else 0
            if kmax == 0:
                continue
            trap = _trapezoids(geometry, c, s, px_all[p0:p1], py_all[p0:p1], weighted, e0, ds)
            lo = _bin_range(trap[0], trap[1], nd)[0]
            vals = _bin_values(trap, lo, kmax)  # (P, K)
            valid = torch.arange(kmax).view(1, -1) < cnt.unsqueeze(-1)
            flat = torch.nonzero(valid.reshape(-1)).squeeze(1)
            pl = torch.div(flat, kmax, rounding_mode="floor")
            k = flat - pl * kmax
            js.append(torch.index_select(lo.to(torch.int64), 0, pl) + k)
            p_glob = pl + p0
            ps.append(p_glob)
            pos.append(torch.index_select(run, 0, p_glob) + k)
            vs.append(torch.index_select(vals.reshape(-1), 0, flat).to(dtype))
        if not js:
            continue
        j_a = torch.cat(js)
        v_a = torch.cat(vs)
        pos_a = torch.cat(pos)
        col_t.index_copy_(0, pos_a, (j_a + a * nd).to(index_dtype))
        val_t.index_copy_(0, pos_a, v_a)
        run += counts[a].to(torch.int64)
        order = torch.from_numpy(_stable_order(j_a.numpy(), nd))
        m = len(order)
        col[offset:offset + m] = torch.index_select(torch.cat(ps), 0, order).to(index_dtype)
        val[offset:offset + m] = torch.index_select(v_a, 0, order)
        offset += m
        row_counts[a * nd:(a + 1) * nd] = torch.bincount(j_a, minlength=nd)
    crow = torch.zeros(na * nd + 1, dtype=torch.int64)
    torch.cumsum(row_counts, 0, out=crow[1:])
    return (crow.to(index_dtype), col, val), (crow_t.to(index_dtype), col_t, val_t)
