"""Whether the ``tomosipo`` backend (:mod:`ctflow.operators.ct.tomosipo_backend`) can run here.

Requirements and checks
-----------------------
tomosipo is not on PyPI (see :data:`INSTALL`) and runs only on CUDA (ASTRA 3D). Every check
happens before any tomosipo or ASTRA 3D call, because ASTRA 3D called without CUDA kills the
Python process without an exception:

1. ``import tomosipo`` fails: ``RuntimeError`` "tomosipo is not installed" (or "failed to
   import", with the cause) naming ``backend='torch'`` / ``backend='odl'``;
2. ``torch.cuda.is_available()`` is False, or ``astra.use_cuda()`` is False: ``RuntimeError``
   saying which, and which backend to use instead;
3. NumPy >= 2 with tomosipo < 0.7 (0.6 uses ``np.array(..., copy=False)``, an error under
   NumPy 2 as soon as a copy is needed: building any geometry fails), or a failing geometry
   probe (pure NumPy, no ASTRA): ``RuntimeError`` explaining the NumPy incompatibility and the
   alternatives.

:func:`status` runs the same checks and returns ``(usable, reason)`` for
:func:`~ctflow.operators.ct.available_backends`.
"""
from __future__ import annotations

import importlib
import re
from typing import Optional, Tuple

import numpy as np
import torch

__all__ = ["status", "check_usable", "INSTALL", "ALTERNATIVES", "MIN_NUMPY2_VERSION"]

#: How to install tomosipo (it is not on PyPI).
INSTALL = ("tomosipo is not on PyPI: pip install git+https://github.com/cicwi/tomosipo "
           "(tomosipo >= 0.7, works with NumPy 2), or conda install -c astra-toolbox "
           "-c aahendriksen tomosipo (0.6, needs NumPy < 2); it needs astra-toolbox built with "
           "CUDA and an NVIDIA GPU")

#: What to use instead.
ALTERNATIVES = ("use backend='torch' (CPU and CUDA, no extra install) or backend='odl' "
                "(pip install 'ctflow[odl]'; impl='astra_cuda' on a GPU, 'astra_cpu' otherwise)")

#: First tomosipo release that works under NumPy 2.
MIN_NUMPY2_VERSION = (0, 7)


# nothing here calls an ASTRA 3D function
def _numpy_version() -> str:
    return np.__version__


def _version_tuple(text) -> Tuple[int, ...]:
    parts = []
    for piece in str(text).split(".")[:3]:
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
    return tuple(parts)


def _numpy_note() -> str:
    major = _version_tuple(_numpy_version())[:1]
    if major and major[0] >= 2:
        return (f" NumPy {_numpy_version()} is installed: tomosipo 0.6 (the last conda release) "
                f"fails under NumPy 2; install tomosipo >= 0.7 from "
                f"https://github.com/cicwi/tomosipo or use an environment with NumPy < 2.")
    return ""


def _import_tomosipo():
    """``import tomosipo`` or ``RuntimeError`` saying why not (no ASTRA 3D call)."""
    try:
        import tomosipo as ts
    except ModuleNotFoundError as exc:
        if exc.name in (None, "tomosipo") or str(exc.name).startswith("tomosipo."):
            no_cuda = "" if torch.cuda.is_available() else (
                " (this machine has no CUDA either, which tomosipo needs)")
            raise RuntimeError(f"backend='tomosipo': tomosipo is not installed{no_cuda} "
                               f"({INSTALL}); {ALTERNATIVES}") from exc
        raise RuntimeError(f"backend='tomosipo': tomosipo failed to import because "
                           f"{exc.name!r} is missing ({exc}).{_numpy_note()} {INSTALL}; "
                           f"{ALTERNATIVES}") from exc
    except Exception as exc:  # ImportError from astra, NumPy ABI errors, AttributeError ...
        raise RuntimeError(f"backend='tomosipo': tomosipo is installed but failed to import "
                           f"({type(exc).__name__}: {exc}).{_numpy_note()} {ALTERNATIVES}") \
            from exc
    return ts


def _cuda_problem() -> Optional[str]:
    """Why CUDA cannot be used by ASTRA here (``None`` when it can)."""
    if not torch.cuda.is_available():
        return ("backend='tomosipo' needs CUDA (ASTRA 3D runs on the GPU only) but "
                "torch.cuda.is_available() is False (no GPU, or a CPU-only torch build); use "
                "backend='torch' (CPU and CUDA, no extra install) or backend='odl' with "
                "impl='astra_cpu' (pip install 'ctflow[odl]')")
    try:
        import astra
    except Exception as exc:
        return (f"backend='tomosipo' needs the ASTRA toolbox with CUDA, which failed to import "
                f"({type(exc).__name__}: {exc}); {ALTERNATIVES}")
    try:
        ok = bool(astra.use_cuda())
    except Exception as exc:
        return (f"backend='tomosipo': astra.use_cuda() failed ({type(exc).__name__}: {exc}); "
                f"{ALTERNATIVES}")
    if not ok:
        return ("backend='tomosipo' needs ASTRA built with CUDA, but astra.use_cuda() is False "
                "(a CPU-only astra-toolbox build, or ASTRA cannot see the GPU); calling ASTRA 3D "
                "without CUDA would kill the Python process. Use backend='torch' (runs on "
                "CUDA too) or backend='odl' with impl='astra_cpu'")
    return None


def _numpy_problem(ts) -> Optional[str]:
    """Why this tomosipo cannot run under the installed NumPy (``None`` when it can).

    Checks the version pair first, then builds a tiny tomosipo geometry (pure NumPy, no ASTRA):
    under NumPy 2, tomosipo 0.6 fails there (its ``np.array(..., copy=False)`` raises, which
    tomosipo reports as a ``TypeError`` "Could not convert ... to np.array").
    """
    np_major = (_version_tuple(_numpy_version()) or (0,))[0]
    ts_version = _version_tuple(getattr(ts, "__version__", ""))
    if np_major >= 2 and ts_version and ts_version[:2] < MIN_NUMPY2_VERSION:
        return (f"backend='tomosipo': tomosipo {ts.__version__} does not work with NumPy "
                f"{_numpy_version()} (it needs NumPy < 2; tomosipo >= 0.7 from "
                f"https://github.com/cicwi/tomosipo supports NumPy 2). Note that ODL >= 1.0 "
                f"needs NumPy >= 2, so the odl and astra extras are alternatives; "
                f"{ALTERNATIVES}")
    try:
        ts.volume(shape=(1, 2, 2), size=(1.0, 2.0, 2.0), pos=(0.0, 0.0, 0.0))
        ts.parallel_vec(shape=(1, 2), ray_dir=np.array([[0.0, -1.0, 0.0]]),
                        det_pos=np.zeros((1, 3)), det_v=np.array([[1.0, 0.0, 0.0]]),
                        det_u=np.array([[0.0, 0.0, 1.0]]))
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        if np_major >= 2:
            return (f"backend='tomosipo': tomosipo {getattr(ts, '__version__', '?')} fails "
                    f"under NumPy {_numpy_version()} ({why}); install tomosipo >= 0.7 from "
                    f"https://github.com/cicwi/tomosipo or use NumPy < 2; {ALTERNATIVES}")
        return (f"backend='tomosipo': building a tomosipo geometry failed ({why}); "
                f"{ALTERNATIVES}")
    return None


def check_usable():
    """Run every check (import, CUDA, ``astra.use_cuda()``, NumPy) and return the tomosipo
    module; ``RuntimeError`` with the reason and the alternatives otherwise. Never calls an
    ASTRA 3D function."""
    ts = _import_tomosipo()
    reason = _cuda_problem()
    if reason is None:
        reason = _numpy_problem(ts)
    if reason is not None:
        raise RuntimeError(reason)
    try:  # tomosipo's torch support: registers the torch link (zero-copy CUDA tensors)
        importlib.import_module("tomosipo.torch_support")
    except Exception as exc:
        raise RuntimeError(f"backend='tomosipo': tomosipo.torch_support failed to import "
                           f"({type(exc).__name__}: {exc}); {ALTERNATIVES}") from exc
    return ts


def status() -> Tuple[bool, str]:
    """``(usable, reason)`` for :func:`~ctflow.operators.ct.available_backends`; safe on any
    machine (no ASTRA 3D call)."""
    try:
        ts = check_usable()
    except RuntimeError as exc:
        return False, str(exc)
    import astra

    return True, (f"tomosipo {getattr(ts, '__version__', '?')}, ASTRA "
                  f"{getattr(astra, '__version__', '?')} with CUDA; the GPU back-projector is "
                  f"an approximate adjoint")
