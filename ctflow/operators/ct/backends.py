"""Ray-transform backends: the one place that maps a backend name to an implementation.

A backend is an object with ``forward(x)`` (``(K, N, N)`` images to ``(K, angles, detectors)``
sinograms, same device and dtype out as in), ``adjoint(y)``, a ``name`` and an
``exact_adjoint`` flag. :class:`~ctflow.operators.ct.RayTransform` wraps it in an autograd
function whose backward is the adjoint. New backends plug in with :func:`register_backend`.

:func:`available_backends` reports which backend/implementation pairs work here and, if not,
why (``ctflow info`` prints it). It never calls ASTRA 3D functions (they kill the process without
CUDA); CUDA support of ASTRA is checked with ``astra.use_cuda()`` only.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from ctflow.operators.ct.geometry import Geometry2D

__all__ = ["BackendInfo", "available_backends", "format_backends", "make_backend",
           "register_backend", "backend_names"]


@dataclass(frozen=True)
class BackendInfo:
    """Whether one backend/implementation is usable here (``reason`` says why not)."""

    name: str
    backend: str
    impl: str
    available: bool
    reason: str = ""


def _torch_factory(geometry: Geometry2D, **options):
    from ctflow.operators.ct.torch_backend import TorchRayBackend

    return TorchRayBackend(geometry, **options)


def _odl_factory(geometry: Geometry2D, **options):
    from ctflow.operators.ct.odl_backend import OdlRayBackend

    return OdlRayBackend(geometry, **options)


def _tomosipo_factory(geometry: Geometry2D, **options):
    from ctflow.operators.ct.tomosipo_backend import TomosipoRayBackend

    return TomosipoRayBackend(geometry, **options)


_FACTORIES: Dict[str, Callable] = {
    "torch": _torch_factory,
    "odl": _odl_factory,
    "tomosipo": _tomosipo_factory,
}


def register_backend(name: str, factory: Callable) -> None:
    """Register (or replace) ``factory(geometry, **options)`` as ray-transform backend ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"backend name must be a non-empty string, got {name!r}")
    _FACTORIES[name.lower()] = factory


def backend_names() -> List[str]:
    """Names accepted by ``RayTransform(..., backend=...)``."""
    return list(_FACTORIES)


def make_backend(name: str, geometry: Geometry2D, **options):
    """Instantiate backend ``name`` for ``geometry`` (``options`` go to the backend)."""
    if not isinstance(name, str) or name.lower() not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; choose one of "
                         f"{', '.join(repr(n) for n in _FACTORIES)}")
    return _FACTORIES[name.lower()](geometry, **options)


def _module_status(module: str, install: str):
    try:
        return importlib.import_module(module), ""
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return None, f"cannot import {module} ({type(exc).__name__}: {exc}); {install}"


def available_backends() -> List[BackendInfo]:
    """Usability of every backend/implementation here: torch-cpu, torch-cuda, odl/astra_cpu,
    odl/astra_cuda, odl/skimage and tomosipo, each with the reason when unusable."""
    out = [BackendInfo("torch-cpu", "torch", "cpu", True, "")]
    if torch.cuda.is_available():
        out.append(BackendInfo("torch-cuda", "torch", "cuda", True, ""))
    else:
        out.append(BackendInfo("torch-cuda", "torch", "cuda", False,
                               "torch.cuda.is_available() is False (no CUDA device, or a "
                               "CPU-only torch build)"))
    odl_install = "install the extra: pip install 'ctflow[odl]' (odl>=1.0, astra-toolbox)"
    odl, odl_reason = _module_status("odl", odl_install)
    tomo = None
    if odl is not None:
        tomo, odl_reason = _module_status("odl.applications.tomo",
                                          "ODL >= 1.0 is needed (odl.applications.tomo)")
    astra, astra_reason = _module_status("astra", "pip install astra-toolbox")
    skimage, skimage_reason = _module_status("skimage", "pip install scikit-image")
    # odl/astra_cpu
    if tomo is None:
        out.append(BackendInfo("odl/astra_cpu", "odl", "astra_cpu", False, odl_reason))
    elif astra is None:
        out.append(BackendInfo("odl/astra_cpu", "odl", "astra_cpu", False, astra_reason))
    else:
        out.append(BackendInfo("odl/astra_cpu", "odl", "astra_cpu", True, ""))
    # odl/astra_cuda
    if tomo is None:
        out.append(BackendInfo("odl/astra_cuda", "odl", "astra_cuda", False, odl_reason))
    elif astra is None:
        out.append(BackendInfo("odl/astra_cuda", "odl", "astra_cuda", False, astra_reason))
    else:
        try:
            cuda_ok = bool(astra.use_cuda())
        except Exception as exc:  # pragma: no cover - depends on the astra build
            cuda_ok, why = False, f"astra.use_cuda() failed: {exc}"
        else:
            why = ("astra.use_cuda() is False (ASTRA built without CUDA, or no GPU); use "
                   "odl/astra_cpu or backend='torch'")
        out.append(BackendInfo("odl/astra_cuda", "odl", "astra_cuda", cuda_ok,
                               "" if cuda_ok else why))
    # odl/skimage
    if tomo is None:
        out.append(BackendInfo("odl/skimage", "odl", "skimage", False, odl_reason))
    elif skimage is None:
        out.append(BackendInfo("odl/skimage", "odl", "skimage", False, skimage_reason))
    else:
        out.append(BackendInfo("odl/skimage", "odl", "skimage", True,
                               "parallel beam only; adjoint is approximate"))
    from ctflow.operators.ct.tomosipo_checks import status as tomosipo_status

    ok, why = tomosipo_status()  # import, CUDA and NumPy checks only; no ASTRA 3D call
    out.append(BackendInfo("tomosipo", "tomosipo", "astra_cuda", ok, why))
    return out


def format_backends(infos: List[BackendInfo] = None) -> str:
    """A human-readable table of :func:`available_backends`."""
    infos = available_backends() if infos is None else infos
    width = max(len(i.name) for i in infos)
    lines = []
    for i in infos:
        mark = "yes" if i.available else "no "
        lines.append(f"{i.name:<{width}}  {mark}  {i.reason}".rstrip())
    return "\n".join(lines)
