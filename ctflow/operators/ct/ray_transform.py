r"""The ray transform :math:`A` as a :class:`~ctflow.operators.base.LinearOperator`.

:math:`(Af)(\theta, s)` is the line integral of the image :math:`f` along the ray of angle
:math:`\theta` hitting detector position ``s`` (averaged over the detector bin for the torch
backend), in the length units of the geometry; see :mod:`ctflow.operators.ct.geometry` for the
orientation and angle conventions. Domain ``(N, N)``, range ``(angles, detectors)``.
"""
from __future__ import annotations

import torch

from ctflow.operators.base import AdjointFunction, LinearOperator
from ctflow.operators.ct.backends import make_backend
from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D

__all__ = ["RayTransform", "check_float"]


def check_float(t: torch.Tensor, owner: str, what: str) -> None:
    """Raise ``ValueError`` unless ``t`` is float32 or float64."""
    if t.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{owner}: {what} dtype mismatch: expected torch.float32 or "
                         f"torch.float64, got {t.dtype}")


class RayTransform(LinearOperator):
    r"""Ray (X-ray / Radon) transform for a :class:`ParallelBeam2D` or :class:`FanBeam2D`.

    Parameters
    ----------
    geometry:
        The acquisition geometry.
    backend:
        ``"torch"`` (default; CPU and CUDA, sparse system matrix with an exactly matched
        adjoint), ``"odl"`` (wraps ``odl.applications.tomo.RayTransform``; pass ``impl=`` among
        ``"astra_cpu"``, ``"astra_cuda"``, ``"skimage"``) or ``"tomosipo"`` (ASTRA 3D on CUDA
        through tomosipo, zero-copy on CUDA tensors; optional install, see
        :mod:`ctflow.operators.ct.tomosipo_backend`).
    **options:
        Passed to the backend (e.g. ``impl`` for ODL; ``cpu_inputs``, ``stack`` for tomosipo).

    Inputs are ``(B, C, N, N)`` float32/float64 tensors; outputs follow the input's device and
    dtype. Autograd works through :meth:`forward` and :meth:`adjoint` (backward = the other one).
    """

    name = "RayTransform"

    def __init__(self, geometry: Geometry2D, backend: str = "torch", **options):
        if not isinstance(geometry, (ParallelBeam2D, FanBeam2D)):
            raise ValueError(f"RayTransform: `geometry` must be a ParallelBeam2D or FanBeam2D, "
                             f"got {type(geometry).__name__}")
        super().__init__(geometry.image_shape, geometry.sinogram_shape)
        self.geometry = geometry
        self.backend = make_backend(backend, geometry, **options)
        self.backend_name = str(backend).lower()

    @property
    def exact_adjoint(self) -> bool:
        """Whether the backend's adjoint is the exact transpose of its forward."""
        return bool(getattr(self.backend, "exact_adjoint", False))

    def _apply(self, t: torch.Tensor, fwd, adj, out_shape, what: str) -> torch.Tensor:
        check_float(t, self._label(), what)
        b, c = t.shape[:2]
        flat = t.reshape(b * c, *t.shape[2:])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        out = AdjointFunction.apply(flat, fwd, adj)
        return out.reshape(b, c, *out_shape)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply(x, self.backend.forward, self.backend.adjoint, self.range_shape,
                           "input")

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply(y, self.backend.adjoint, self.backend.forward, self.domain_shape,
                           "adjoint input")

    def __repr__(self) -> str:
        return f"RayTransform({self.geometry!r}, backend={self.backend_name!r})"
