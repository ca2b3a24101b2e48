r"""The native torch backend: a sparse system matrix with an exactly matched adjoint.

The matrix entries (the pixel-footprint model) are computed in
:mod:`ctflow.operators.ct.footprints`, the symmetry reduction (at most 8 times fewer rows) in
:mod:`ctflow.operators.ct.symmetry`; this module holds the matrices, their cache and the
backend.

The forward is ``A @ X`` with ``X`` the flattened images as an ``(N², G·B·C)`` matrix; the
adjoint is a second CSR matrix holding :math:`A^T` (bit-identical values), so
:math:`\langle Ax, y\rangle = \langle x, A^Ty\rangle` up to rounding. Matrices are cached in a
module-level dict per (geometry, kind, device, dtype); :func:`clear_cache` empties it. Sizes
(float32, both matrices): 105 MB at 256² × 180 angles (built in ~3 s), 1.6 GB at 512² × 720
angles (~20 s of CPU time, 2.1 GB peak).
"""
from __future__ import annotations

import threading
import time
import warnings
from typing import Dict, List

import torch

from ctflow.operators.ct.footprints import build_matrices
from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D
from ctflow.operators.ct.symmetry import (SymmetryPlan, inverse_transform_image, symmetry_plan,
                                         transform_image)

__all__ = ["SystemMatrix", "system_matrix", "clear_cache", "cache_info", "symmetry_plan",
           "SymmetryPlan", "TorchRayBackend"]

_CACHE: Dict[tuple, "SystemMatrix"] = {}
_CACHE_LOCK = threading.Lock()


def _csr(crow, col, val, shape):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, val, size=shape)


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
        # The build works on small blocks: extra intra-op threads only add overhead (and spin
        # badly on a loaded machine), so it runs single-threaded and restores the setting.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            (crow, col, val), (crow_t, col_t, val_t) = build_matrices(
                geometry, self.plan.canonical, weighted=(kind == "fan_fbp"), dtype=dtype)
        finally:
            torch.set_num_threads(threads)
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
        """``(k, N, N)`` images -> ``(N², G·k)`` columns, column ``g·k + i`` = group ``g`` of
        image ``i`` (one strided copy per group)."""
        k, n = x.shape[0], x.shape[-1]
        xt = x.permute(1, 2, 0).contiguous()  # (N, N, k): pixels major, batch minor
        if len(self.groups) == 1 and self.groups[0] == (0, False):
            return xt.reshape(n * n, k)
        buf = torch.empty(n, n, len(self.groups), k, dtype=x.dtype, device=x.device)
        for i, g in enumerate(self.groups):
            buf[:, :, i, :] = transform_image(xt, g, dims=(0, 1))
        return buf.reshape(n * n, len(self.groups) * k)

    def _unstack(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Adjoint of :meth:`_stack`: ``(N², G·k)`` -> ``(k, N, N)``."""
        n = self.geometry.image_size
        ng = len(self.groups)
        x = x.reshape(n, n, ng, k)
        out = inverse_transform_image(x[:, :, 0, :], self.groups[0], dims=(0, 1))
        for i in range(1, ng):
            out = out + inverse_transform_image(x[:, :, i, :], self.groups[i], dims=(0, 1))
        return out.permute(2, 0, 1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = x.shape[0]
        g = self.geometry
        y = self.matrix @ self._stack(x)  # (canonical rows, G*k)
        y = y.reshape(-1, k).index_select(0, self.row_index)  # (angles*detectors, k)
        return y.t().reshape(k, g.num_angles, g.detectors)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        k = y.shape[0]
        ng = len(self.groups)
        rows = len(self.plan.canonical) * self.geometry.detectors
        z = torch.zeros(rows * ng, k, dtype=y.dtype, device=y.device)
        z.index_add_(0, self.row_index, y.reshape(k, -1).t())
        return self._unstack(self.matrix_t @ z.reshape(rows, ng * k), k)


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
