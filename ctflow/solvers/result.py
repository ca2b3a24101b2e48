r"""The one result type every solver returns, and how time, NFE and peak memory are measured.

Peak memory is measured the same way for every solver:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the memory
  allocated at the start of the solve (so the prior's weights are not counted);
* CPU (Linux): the process's resident-set high-water mark ``VmHWM`` from ``/proc/self/status``,
  reset at the start of the solve by writing ``5`` to ``/proc/self/clear_refs``, minus the
  resident set size at the start (freed heap pages are first returned to the OS with
  ``malloc_trim``, so an earlier, larger solve in the same process does not hide this one's
  peak). This counts every allocation the solve makes (tensors, autograd
  graph, workspace) at page granularity. Where ``/proc`` is unavailable the value is ``None``.
  For comparisons across settings, run each configuration in a fresh process (the allocator may
  keep freed pages mapped), as ``benchmarks/memory.py`` does.
"""
from __future__ import annotations

import ctypes
import gc
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch

__all__ = ["Reconstruction", "SolveMeter"]


@dataclass
class Reconstruction:
    """What a solver returns.

    Attributes:
        image: the reconstruction in the public range ``[0, 1]``, shape ``(B, C, H, W)``.
        history: one dict per outer iteration (for MS-Flow: ``data``, ``prior``, ``gaps`` (a
            list, one stitching gap per segment), ``objective``, ``residual``).
        nfe: velocity evaluations, ``{"forward": int, "backward": int}`` (backward counts
            vector-Jacobian products through the velocity field); a batched call counts
            once.
        nfe_per_image: the cost per image, ``{"forward": float, "backward": float}``: the
            batch items of every velocity call divided by the number of measurements (a call
            on ``b`` items counts ``b``; ``D`` averaged draws count ``D`` per call). The
            number to compare methods by.
        seconds: wall time of the solve.
        peak_memory_bytes: peak memory of the solve (see the module docstring), or ``None``.
        method: the method name.
        options: the options the solver ran with (after defaults).
        uncertainty: for solvers that average several independent draws (MS-Flow with
            ``draws > 1``), the pixel-wise standard deviation of the draws (same shape as
            ``image``); else ``None``.
    """

    image: torch.Tensor
    history: List[Dict[str, Any]] = field(default_factory=list)
    nfe: Dict[str, int] = field(default_factory=lambda: {"forward": 0, "backward": 0})
    seconds: float = 0.0
    peak_memory_bytes: Optional[int] = None
    method: str = ""
    options: Dict[str, Any] = field(default_factory=dict)
    uncertainty: Optional[torch.Tensor] = None
    nfe_per_image: Dict[str, float] = field(
        default_factory=lambda: {"forward": 0.0, "backward": 0.0})

    @property
    def nfe_total(self) -> int:
        return int(self.nfe.get("forward", 0)) + int(self.nfe.get("backward", 0))


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_freed_memory() -> None:
    """Return freed heap pages to the OS so the next resident-set baseline is honest."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_cpu_peak() -> bool:
    _release_freed_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class SolveMeter:
    """Context manager measuring wall time and peak memory of a solve on ``device``.

    >>> with SolveMeter(device) as meter:
    ...     run()
    >>> meter.seconds, meter.peak_memory_bytes
    """

    def __init__(self, device: Optional[torch.device] = None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seconds = 0.0
        self.peak_memory_bytes: Optional[int] = None

    def __enter__(self) -> "SolveMeter":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._cpu_ok = _reset_cpu_peak()
            self._base = _proc_status_kb("VmRSS")
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_memory_bytes = int(torch.cuda.max_memory_allocated(self.device) - self._base)
        else:
            peak = _proc_status_kb("VmHWM")
            if self._cpu_ok and peak is not None and self._base is not None:
                self.peak_memory_bytes = max(0, (peak - self._base) * 1024)
        self.seconds = time.perf_counter() - self._t0
