r"""The ``tomosipo`` backend: ASTRA's 3D CUDA projectors through tomosipo, on CUDA tensors.

A 2D geometry becomes a 3D problem whose volume has one slice per image: the ``K`` images of a
flattened batch (``K = B·C``) form a volume of shape ``(K, N, N)`` (tomosipo's ``(z, y, x)``
order) and the sinograms a projection stack of shape ``(K, angles, detectors)`` (tomosipo's
``(v, angle, u)`` order), which is exactly the memory layout of ctflow's flattened tensors. CUDA
float32 tensors are handed to ASTRA through tomosipo's torch link (``astra.data3d.GPULink`` on
the tensor's memory), so no data passes through the host.

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

Coordinates (ctflow → tomosipo)
-------------------------------
tomosipo points are ``(z, y', x)``; voxel ``(k, r, c)`` of a volume centred on the origin has
its centre at ``z_k = (k + ½ - K/2) h_z``, ``y'_r = -e + (r + ½) h``, ``x_c = -e + (c + ½) h``
(indices increase with the coordinate). ctflow's pixel ``(r, c)`` sits at
``(x_c, y_r = e - (r + ½) h)`` (row 0 on top), so with the reflection :math:`y' = -y` ctflow's
image tensor is tomosipo's volume slice as it is, without a flip. A reflection is an isometry,
so line integrals are unchanged when the rays are mapped the same way. With
:math:`u(\theta) = (\cos\theta, \sin\theta)` and :math:`e(\theta) = (-\sin\theta, \cos\theta)`
in ctflow's ``(x, y)`` plane (see :mod:`ctflow.operators.ct.geometry`), in ``(z, y', x)``:

* parallel beam (``ts.parallel_vec``, one detector row per slice):
  ``ray_dir = (0, -cos θ, -sin θ)``, ``det_pos = 0``, ``det_u = Δ (0, -sin θ, cos θ)``,
  ``det_v = (h_z, 0, 0)``; row ``k`` lies in slice ``k``'s mid-plane, so each row integrates
  its own slice only (the sampling height is the slice centre, where ASTRA's interpolation in z
  has weight one);
* fan beam (``ts.cone_vec``, one slice and one row; a batch loops over its images):
  ``src_pos = R_s (0, cos θ, sin θ)`` (:math:`S = -R_s e(\theta)`),
  ``det_pos = R_d (0, -cos θ, -sin θ)`` (:math:`R_d e(\theta)`), ``det_u`` as above,
  ``det_v = (Δ, 0, 0)``.

Detector pixel ``j`` of ``n`` lies at ``det_pos + (j - (n-1)/2) det_u``, i.e. at ctflow's
:math:`s_j`. The volume is ``ts.volume(shape=(K, N, N), size=(K h, 2e, 2e))`` (cubic voxels of
side :math:`h = 2e/N`). :func:`tomosipo_vectors` and :func:`volume_spec` return these numbers
without importing tomosipo (the tests check them against the geometry on any machine);
:func:`tomosipo_geometries` turns them into tomosipo objects.

Scaling and accuracy
--------------------
ASTRA (>= 1.9.9) returns line integrals in world units and its back-projector is the transpose
of that forward model in the same units, so no factor is applied (the same convention ODL's
``astra_cuda`` implementation relies on). ASTRA samples one ray through each detector-bin
centre with (hardware) linear interpolation, whereas the ``torch`` backend averages over the
bin exactly: sinograms of smooth images agree to about 1 %. ASTRA's GPU back-projector is a
voxel-driven approximation of the transpose (``exact_adjoint = False``): the dot test is of the
order 1e-3 for non-negative images and can be much worse for signed white noise.

Dtypes and devices
------------------
ASTRA computes in float32: float64 input is converted to float32 and the result back to
float64. CUDA float32 contiguous input is used in place (zero copy). CPU input is, by default
(``cpu_inputs="move"``), copied to ``device`` (default: the current CUDA device) and the result
copied back to the CPU, so that code which probes operators on the CPU (``norm()``,
``dot_test()``) works; ``cpu_inputs="error"`` raises ``ValueError`` instead. Calls are
serialised by a lock (ASTRA is not re-entrant) and synchronised with torch's current CUDA
stream before and after each ASTRA call.
"""
from __future__ import annotations

import importlib
import re
import threading
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D

__all__ = ["TomosipoRayBackend", "status", "check_usable", "tomosipo_vectors", "volume_spec",
           "tomosipo_geometries", "INSTALL", "ALTERNATIVES", "MIN_NUMPY2_VERSION"]

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

_ASTRA_LOCK = threading.RLock()


# ---------------------------------------------------------------------------------------------
# checks (nothing here calls an ASTRA 3D function)
# ---------------------------------------------------------------------------------------------
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
                f"needs NumPy >= 2, so the odl and tomosipo extras are alternatives; "
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


# ---------------------------------------------------------------------------------------------
# geometry conversion (pure NumPy; no tomosipo needed)
# ---------------------------------------------------------------------------------------------
def volume_spec(geometry: Geometry2D, slices: int = 1) -> Dict[str, tuple]:
    """``shape``, ``size`` and ``pos`` of the tomosipo volume holding ``slices`` images, in
    tomosipo's ``(z, y, x)`` order: cubic voxels of side :math:`h = 2e/N`, centred on 0."""
    if not isinstance(geometry, (ParallelBeam2D, FanBeam2D)):
        raise ValueError(f"backend='tomosipo': unsupported geometry {type(geometry).__name__}")
    n, e, h = geometry.image_size, geometry.extent, geometry.pixel_size
    return {"shape": (int(slices), n, n), "size": (int(slices) * h, 2.0 * e, 2.0 * e),
            "pos": (0.0, 0.0, 0.0)}


def tomosipo_vectors(geometry: Geometry2D, slices: int = 1) -> Dict[str, np.ndarray]:
    """The tomosipo vector geometry of ``geometry`` in ``(z, y', x)`` coordinates (module
    docstring), as float64 arrays of shape ``(angles, 3)``.

    Returns ``kind`` (``"parallel_vec"`` or ``"cone_vec"``), ``shape`` (detector rows, columns)
    and ``ray_dir`` (parallel) or ``src_pos`` (fan), ``det_pos``, ``det_v``, ``det_u``.
    A fan beam takes one slice only (``slices=1``).
    """
    slices = int(slices)
    if slices < 1:
        raise ValueError(f"backend='tomosipo': `slices` must be >= 1, got {slices}")
    theta = geometry.angles.numpy()
    c, s = np.cos(theta), np.sin(theta)
    zero = np.zeros_like(theta)
    ds = geometry.detector_spacing
    det_u = np.stack([zero, -s * ds, c * ds], axis=1)
    if isinstance(geometry, ParallelBeam2D):
        hz = geometry.pixel_size
        return {"kind": "parallel_vec", "shape": (slices, geometry.detectors),
                "ray_dir": np.stack([zero, -c, -s], axis=1),
                "det_pos": np.zeros((len(theta), 3)),
                "det_v": np.stack([zero + hz, zero, zero], axis=1),
                "det_u": det_u}
    if isinstance(geometry, FanBeam2D):
        if slices != 1:
            raise ValueError("backend='tomosipo': a fan-beam geometry takes one slice per "
                             f"operator, got slices={slices}")
        rs, rd = geometry.source_origin, geometry.origin_detector
        return {"kind": "cone_vec", "shape": (1, geometry.detectors),
                "src_pos": np.stack([zero, rs * c, rs * s], axis=1),
                "det_pos": np.stack([zero, -rd * c, -rd * s], axis=1),
                "det_v": np.stack([zero + ds, zero, zero], axis=1),
                "det_u": det_u}
    raise ValueError(f"backend='tomosipo': unsupported geometry {type(geometry).__name__}")


def tomosipo_geometries(ts, geometry: Geometry2D, slices: int = 1):
    """``(volume geometry, projection geometry)`` as tomosipo objects (``ts`` the tomosipo
    module) for ``slices`` stacked images; pure geometry, no ASTRA call. The projection data
    shape is ``(slices, angles, detectors)`` (tomosipo's ``(v, angle, u)``)."""
    spec = volume_spec(geometry, slices)
    vg = ts.volume(shape=spec["shape"], size=spec["size"], pos=spec["pos"])
    vec = tomosipo_vectors(geometry, slices)
    if vec["kind"] == "parallel_vec":
        pg = ts.parallel_vec(shape=vec["shape"], ray_dir=vec["ray_dir"], det_pos=vec["det_pos"],
                             det_v=vec["det_v"], det_u=vec["det_u"])
    else:
        pg = ts.cone_vec(shape=vec["shape"], src_pos=vec["src_pos"], det_pos=vec["det_pos"],
                         det_v=vec["det_v"], det_u=vec["det_u"])
    return vg, pg


# ---------------------------------------------------------------------------------------------
# the backend
# ---------------------------------------------------------------------------------------------
class TomosipoRayBackend:
    """Ray-transform backend on ``ts.operator`` (ASTRA 3D CUDA), see the module docstring.

    Parameters
    ----------
    geometry:
        A :class:`ParallelBeam2D` or :class:`FanBeam2D`.
    device:
        CUDA device for CPU inputs and for the construction probe (default: the current CUDA
        device). CUDA inputs run on their own device.
    cpu_inputs:
        ``"move"`` (default): CPU tensors are copied to ``device`` and the result back;
        ``"error"``: CPU tensors raise ``ValueError``.
    stack:
        Parallel beam only: project all images of a call as slices of one volume (default
        ``True``); ``False`` loops over them (one ASTRA call per image, as for fan beams).
    max_slices:
        Largest number of slices per ASTRA call when stacking (default 64); larger batches are
        processed in chunks. One tomosipo operator is kept per slice count used.

    ``RuntimeError`` (before any ASTRA 3D call) when tomosipo, CUDA or NumPy compatibility is
    missing; ``ValueError`` for bad options.
    """

    name = "tomosipo"
    exact_adjoint = False

    def __init__(self, geometry: Geometry2D, *, device=None, cpu_inputs: str = "move",
                 stack: bool = True, max_slices: int = 64):
        if not isinstance(geometry, (ParallelBeam2D, FanBeam2D)):
            raise ValueError(f"backend='tomosipo': `geometry` must be a ParallelBeam2D or "
                             f"FanBeam2D, got {type(geometry).__name__}")
        if cpu_inputs not in ("move", "error"):
            raise ValueError(f"backend='tomosipo': `cpu_inputs` must be 'move' or 'error', "
                             f"got {cpu_inputs!r}")
        if isinstance(max_slices, bool) or not isinstance(max_slices, int) or max_slices < 1:
            raise ValueError(f"backend='tomosipo': `max_slices` must be an int >= 1, "
                             f"got {max_slices!r}")
        self._ts = check_usable()  # RuntimeError here, before any ASTRA 3D call
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None \
            else torch.device(device)
        if dev.type != "cuda":
            raise ValueError(f"backend='tomosipo': `device` must be a CUDA device, got {dev}")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.geometry = geometry
        self.device = dev
        self.cpu_inputs = cpu_inputs
        self.stack = bool(stack) and isinstance(geometry, ParallelBeam2D)
        self.max_slices = int(max_slices)
        self._ops: "OrderedDict[int, object]" = OrderedDict()
        self._operator(1)  # build once now so that geometry errors surface at construction

    # -- tomosipo objects --------------------------------------------------------------------
    def _operator(self, slices: int):
        """The ``ts.operator`` for a volume of ``slices`` images (cached)."""
        with _ASTRA_LOCK:
            op = self._ops.get(slices)
            if op is not None:
                self._ops.move_to_end(slices)
                return op
            vg, pg = tomosipo_geometries(self._ts, self.geometry, slices)
            op = self._ts.operator(vg, pg)
            self._ops[slices] = op
            while len(self._ops) > 4:
                self._ops.popitem(last=False)
            return op

    def tomosipo_operator(self, slices: int = 1):
        """The underlying ``ts.operator`` for ``slices`` stacked images (``(slices, N, N)``
        volumes to ``(slices, angles, detectors)`` projection stacks)."""
        return self._operator(int(slices))

    # -- application ---------------------------------------------------------------------------
    def _work_tensor(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type == "cuda":
            work = t
        elif self.cpu_inputs == "error":
            raise ValueError(f"backend='tomosipo' needs CUDA tensors, got a tensor on {t.device} "
                             f"(cpu_inputs='error'); move it with .to('cuda') or build the "
                             f"operator with cpu_inputs='move'")
        else:
            work = t.to(self.device)
        if work.dtype != torch.float32:
            work = work.to(torch.float32)
        return work.contiguous()

    def _run(self, t: torch.Tensor, forward: bool) -> torch.Tensor:
        g = self.geometry
        out_item = g.sinogram_shape if forward else g.image_shape
        work = self._work_tensor(t)
        k = work.shape[0]
        out = torch.empty((k, *out_item), device=work.device, dtype=torch.float32)
        if k:
            with _ASTRA_LOCK, torch.cuda.device(work.device):
                self._select_gpu(work.device)
                torch.cuda.current_stream(work.device).synchronize()
                self._project(work, out, forward)
                torch.cuda.synchronize(work.device)
        return out.to(device=t.device, dtype=t.dtype)

    def _project(self, work: torch.Tensor, out: torch.Tensor, forward: bool) -> None:
        """Apply the tomosipo operator(s) to ``work`` (``(K, ...)`` float32, contiguous) and
        write into ``out``: chunks of up to ``max_slices`` stacked slices (parallel beam), or one
        image at a time. Each chunk is a contiguous view, handed to tomosipo as it is."""
        k = work.shape[0]
        step = self.max_slices if self.stack else 1
        for start in range(0, k, step):
            stop = min(start + step, k)
            op = self._operator(stop - start)
            if forward:
                op(work[start:stop], out=out[start:stop])
            else:
                op.T(work[start:stop], out=out[start:stop])

    @staticmethod
    def _select_gpu(device: torch.device) -> None:
        if torch.cuda.device_count() > 1:  # ASTRA keeps its own GPU index
            import astra

            astra.set_gpu_index(device.index)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, N, N)`` images to ``(K, angles, detectors)`` sinograms."""
        return self._run(x, forward=True)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """ASTRA's back-projection of ``(K, angles, detectors)`` sinograms (approximate
        transpose of :meth:`forward`)."""
        return self._run(y, forward=False)

    def __repr__(self) -> str:
        return (f"TomosipoRayBackend({self.geometry!r}, device={str(self.device)!r}, "
                f"stack={self.stack})")
