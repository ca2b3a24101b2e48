r"""The ``odl`` backend: ``odl.applications.tomo.RayTransform`` (ODL >= 1.0) behind our geometry.

Conversions (all in this module):

* **Orientation.** ODL indexes images as ``arr[i, j]`` at :math:`(x_i, y_j)` (axis 0 = x
  increasing, axis 1 = y increasing); ctflow images are ``img[r, c]`` with row 0 = +y and column
  0 = −x. Hence ``arr = rot90(img, -1)`` and ``img = rot90(arr, 1)``. ODL's default geometries use
  the same angle, detector-axis and source conventions as ctflow (see
  :mod:`ctflow.operators.ct.geometry`), and its detector partition
  :math:`[-n\Delta/2, n\Delta/2]` with ``n`` cells has the same bin centres.
* **Angles.** ODL needs sorted angles; the operator runs on the sorted unique angles and the rows
  are gathered back (the adjoint scatters and sums, so it stays the transpose).
* **Adjoint scaling.** ODL's ``RayTransform.adjoint`` is the adjoint for *weighted* inner
  products: it equals :math:`(w_{\text{proj}}/w_{\text{vol}})\,B` with :math:`B` the plain
  back-projection (:math:`w_{\text{vol}}` the pixel area, :math:`w_{\text{proj}}` the average
  sinogram cell size). ctflow uses plain (unweighted) inner products, so :meth:`adjoint`
  multiplies ODL's adjoint by :math:`w_{\text{vol}}/w_{\text{proj}}`, read from the operator's
  spaces; this is the only place where the weights are handled.
* **Precision.** ASTRA computes in float32: float64 input is converted to float32 and the result
  back to float64 (so float64 agrees with float32 to float32 accuracy). scikit-image runs in the
  input's precision. Data go through NumPy on the CPU; the result is moved back to the input's
  device.
* **Batches** loop over the items (ODL applies to one image at a time).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D

__all__ = ["OdlRayBackend", "default_impl", "IMPLS"]

#: ODL ray-transform implementations this backend accepts.
IMPLS = ("astra_cpu", "astra_cuda", "skimage")

_INSTALL = "install the ODL extra: pip install 'ctflow[odl]' (odl>=1.0 and astra-toolbox)"


def _import_odl():
    try:
        import odl
        from odl.applications import tomo
    except Exception as exc:
        raise RuntimeError(f"backend='odl' needs ODL >= 1.0 with odl.applications.tomo "
                           f"({type(exc).__name__}: {exc}); {_INSTALL}, or use "
                           f"backend='torch'") from exc
    return odl, tomo


def _astra():
    try:
        import astra
    except Exception:
        return None
    return astra


def _impl_status(impl: str) -> Optional[str]:
    """``None`` when ``impl`` is usable, else the reason (never calls ASTRA 3D functions)."""
    if impl in ("astra_cpu", "astra_cuda"):
        astra = _astra()
        if astra is None:
            return f"impl={impl!r} needs the ASTRA toolbox: pip install astra-toolbox"
        if impl == "astra_cuda" and not astra.use_cuda():
            return ("impl='astra_cuda' needs ASTRA with CUDA and a GPU (astra.use_cuda() is "
                    "False); use impl='astra_cpu' or backend='torch'")
        return None
    try:
        import skimage  # noqa: F401
    except Exception:
        return "impl='skimage' needs scikit-image: pip install scikit-image"
    return None


def default_impl() -> str:
    """Best available implementation: astra_cuda if ``astra.use_cuda()``, else astra_cpu, else
    skimage; ``RuntimeError`` naming what to install if none works."""
    for impl in IMPLS:
        if _impl_status(impl) is None:
            return impl
    raise RuntimeError(f"backend='odl' found no usable implementation (no ASTRA, no "
                       f"scikit-image); {_INSTALL}")


class OdlRayBackend:
    """Ray-transform backend on ``odl.applications.tomo.RayTransform``.

    Parameters
    ----------
    geometry:
        A :class:`ParallelBeam2D` or :class:`FanBeam2D` (fan beam needs an ASTRA impl).
    impl:
        ``"astra_cpu"``, ``"astra_cuda"`` or ``"skimage"``; default :func:`default_impl`.
    astra_proj_type:
        ASTRA projector for the ASTRA impls (default: ODL's choice, ``"linear"`` for parallel
        and ``"line_fanflat"`` for fan beams on the CPU). ``"strip"`` (parallel, CPU) integrates
        over the detector bin like the torch backend and agrees with it to ~1e-5.
    """

    name = "odl"

    def __init__(self, geometry: Geometry2D, impl: Optional[str] = None,
                 astra_proj_type: Optional[str] = None):
        odl, tomo = _import_odl()
        if impl is None:
            impl = default_impl()
        if not isinstance(impl, str) or impl.lower() not in IMPLS:
            raise ValueError(f"backend='odl': `impl` must be one of {', '.join(IMPLS)}, "
                             f"got {impl!r}")
        impl = impl.lower()
        reason = _impl_status(impl)
        if reason is not None:
            raise RuntimeError(f"backend='odl': {reason}")
        if impl == "skimage" and not isinstance(geometry, ParallelBeam2D):
            raise ValueError("backend='odl' with impl='skimage' supports ParallelBeam2D only; "
                             "use impl='astra_cpu' for fan beams")
        if astra_proj_type is not None and not impl.startswith("astra"):
            raise ValueError(f"backend='odl': `astra_proj_type` needs an ASTRA impl, got "
                             f"impl={impl!r}")
        self.geometry = geometry
        self.impl = impl
        self._call_kwargs = {} if astra_proj_type is None else {"astra_proj_type": astra_proj_type}
        # astra: float32 inside; skimage: the input's precision
        self.exact_adjoint = impl != "skimage"
        angles = geometry.angles.numpy()
        uniq, inverse = np.unique(angles, return_inverse=True)
        self._gather = torch.from_numpy(inverse.reshape(-1).astype(np.int64))
        self._num_unique = len(uniq)
        if len(uniq) == 1:
            apart = odl.nonuniform_partition(uniq, min_pt=uniq[0] - 0.5, max_pt=uniq[0] + 0.5)
        else:
            apart = odl.nonuniform_partition(uniq)
        nd, ds = geometry.detectors, geometry.detector_spacing
        dpart = odl.uniform_partition(-0.5 * nd * ds, 0.5 * nd * ds, nd)
        if isinstance(geometry, ParallelBeam2D):
            odl_geom = tomo.Parallel2dGeometry(apart, dpart)
        elif isinstance(geometry, FanBeam2D):
            odl_geom = tomo.FanBeamGeometry(apart, dpart, src_radius=geometry.source_origin,
                                            det_radius=geometry.origin_detector)
        else:
            raise ValueError(f"backend='odl': unsupported geometry {type(geometry).__name__}")
        self._odl, self._tomo, self._odl_geom = odl, tomo, odl_geom
        self._ops = {}

    def odl_operator(self, dtype=torch.float32):
        """The wrapped ODL ``RayTransform`` for ``dtype`` (float32 for ASTRA impls)."""
        np_dtype = "float32" if (dtype == torch.float32 or self.impl != "skimage") else "float64"
        if np_dtype not in self._ops:
            e, n = self.geometry.extent, self.geometry.image_size
            space = self._odl.uniform_discr([-e, -e], [e, e], (n, n), dtype=np_dtype)
            op = self._tomo.RayTransform(space, self._odl_geom, impl=self.impl)
            # plain transpose = ODL's weighted adjoint × w_vol / w_proj (see module docstring)
            scale = float(op.domain.weighting.const) / float(op.range.weighting.const)
            self._ops[np_dtype] = (op, scale)
        return self._ops[np_dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op, _ = self.odl_operator(x.dtype)
        arr = np.ascontiguousarray(x.detach().to("cpu").numpy(), dtype=op.domain.dtype)
        out = np.empty((x.shape[0], self._num_unique, self.geometry.detectors), op.range.dtype)
        for k in range(x.shape[0]):
            vol = op.domain.element(np.ascontiguousarray(np.rot90(arr[k], -1)))
            out[k] = op(vol, **self._call_kwargs).asarray()
        y = torch.from_numpy(out).to(device=x.device, dtype=x.dtype)
        return y.index_select(1, self._gather.to(x.device))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        op, scale = self.odl_operator(y.dtype)
        k = y.shape[0]
        ys = torch.zeros(k, self._num_unique, self.geometry.detectors, dtype=torch.float64)
        ys.index_add_(1, self._gather, y.detach().to("cpu", torch.float64))
        arr = ys.numpy().astype(op.range.dtype)
        n = self.geometry.image_size
        out = np.empty((k, n, n), op.domain.dtype)
        for i in range(k):
            back = op.adjoint(op.range.element(arr[i]), **self._call_kwargs).asarray()
            out[i] = np.rot90(back, 1)
        x = torch.from_numpy(out * np.asarray(scale, dtype=out.dtype))
        return x.to(device=y.device, dtype=y.dtype)
