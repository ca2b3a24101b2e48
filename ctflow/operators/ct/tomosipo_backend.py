r"""The ``tomosipo`` backend: ASTRA's 3D CUDA projectors through tomosipo, on CUDA tensors.

A 2D geometry becomes a 3D problem whose volume has one slice per image: the ``K`` images of a
flattened batch (``K = B·C``) form a volume of shape ``(K, N, N)`` (tomosipo's ``(z, y, x)``
order) and the sinograms a projection stack of shape ``(K, angles, detectors)`` (tomosipo's
``(v, angle, u)`` order), which is exactly the memory layout of ctflow's flattened tensors. CUDA
float32 tensors are handed to ASTRA through tomosipo's torch link (``astra.data3d.GPULink`` on
the tensor's memory), so no data passes through the host.

Whether the backend can run here is checked by :mod:`ctflow.operators.ct.tomosipo_checks`
(before any ASTRA 3D call: ASTRA 3D called without CUDA kills the Python process), and the
geometry is converted by :mod:`ctflow.operators.ct.tomosipo_geometry`; both are re-exported
here.

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

import threading
from collections import OrderedDict

import torch

from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D
from ctflow.operators.ct.tomosipo_checks import (ALTERNATIVES, INSTALL, MIN_NUMPY2_VERSION,
                                                 check_usable, status)
from ctflow.operators.ct.tomosipo_geometry import (tomosipo_geometries, tomosipo_vectors,
                                                   volume_spec)

__all__ = ["TomosipoRayBackend", "status", "check_usable", "tomosipo_vectors", "volume_spec",
           "tomosipo_geometries", "INSTALL", "ALTERNATIVES", "MIN_NUMPY2_VERSION"]

_ASTRA_LOCK = threading.RLock()


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
