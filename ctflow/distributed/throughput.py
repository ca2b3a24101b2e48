r"""Measure ``reconstruct-dicom`` throughput in-process and on Ray (``docs/scaling.md``).

:func:`measure` is the library function behind ``ctflow throughput`` (the command line's
parser lives in :mod:`ctflow.cli`). For each configuration the same slices are reconstructed
into a fresh temporary folder and the wall time of the whole
:func:`ctflow.tasks.reconstruct_dicom` call is taken
(reading the series, every solve, every write, the summary and the montage):

* in-process with torch's default thread count and with one thread;
* on a private local Ray instance with ``W`` CPUs for each ``W`` of ``workers`` (``W``
  tasks at a time, one torch thread each). The instance is started before the clock starts
  (its start-up time is reported apart); the first task on each worker pays the worker's
  imports and the prior's loading, which *is* in the wall time.

Throughput is slices / wall seconds. The default options are the demo's MS-Flow settings
(:data:`ctflow.tasks.DEMO_SETTINGS` ``["msflow"]``) on the demo problem (``ct64``, 64 x 64,
60 views, 1 % noise).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from ctflow.distributed.cluster import RayOptions, connect
from ctflow.distributed.slices import ray_slice_mapper
from ctflow.operators.noise import GaussianNoise
from ctflow.tasks import DEMO_SETTINGS, reconstruct_dicom

__all__ = ["measure", "format_rows"]


def _run(in_dir, out_dir, *, map_slices, kw) -> Dict[str, Any]:
    t0 = time.perf_counter()
    s = reconstruct_dicom(in_dir, out_dir, map_slices=map_slices, progress=False, **kw)
    wall = time.perf_counter() - t0
    n = int(s["slices_reconstructed"])
    return {"slices": n, "wall_s": wall, "slices_per_s": n / wall,
            "solve_s_per_slice": s["mean"]["seconds_per_slice"],
            "psnr": s["mean"]["psnr"]}


def measure(in_dir, *, workers: Sequence[int] = (1, 2), slices=None, method: str = "msflow",
            prior: Any = "ct64", views: int = 60,
            noise: GaussianNoise = GaussianNoise(relative=0.01), seed: int = 0,
            in_process: bool = True, options: Optional[Dict[str, Any]] = None,
            device: str = "cpu", in_process_threads: Optional[Sequence[int]] = None
            ) -> List[Dict[str, Any]]:
    """Time :func:`ctflow.tasks.reconstruct_dicom` on the series in ``in_dir`` in-process
    and on private local Ray instances; return the rows of the table (module docstring).

    Args:
        in_dir: a DICOM series folder (read, never written).
        workers: CPUs of each private Ray instance measured (``W`` tasks at a time); ``()``
            for none.
        slices: ``slice``/``(start, stop)`` of the series (default: every slice).
        method, prior, views, noise, seed, device: as :func:`ctflow.tasks.reconstruct_dicom`.
        in_process: also measure in this process.
        options: solver options (default: the demo's, ``DEMO_SETTINGS[method]``).
        in_process_threads: the torch thread counts of the in-process runs (default:
            torch's default, then 1).

    Returns:
        One dict per configuration: ``mode``, ``slices``, ``wall_s``, ``slices_per_s``,
        ``solve_s_per_slice`` (mean solver time per slice inside the run), ``psnr`` and, for
        Ray, ``ray_start_s`` (the instance's start-up, outside the clock).
    """
    if options is None:
        options = dict(DEMO_SETTINGS.get(method, {}))
    kw = dict(views=views, method=method, prior=prior, noise=noise, seed=seed,
              slices=slices, device=device, **options)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctflow-throughput-") as tmp:
        if in_process:
            default = torch.get_num_threads()
            counts = list(in_process_threads) if in_process_threads else \
                ([default, 1] if default != 1 else [1])
            for threads in counts:
                torch.set_num_threads(threads)
                try:
                    row = _run(in_dir, Path(tmp) / f"here-{threads}", map_slices=None, kw=kw)
                finally:
                    torch.set_num_threads(default)
                rows.append(dict(row, mode=f"in-process, {threads} torch thread(s)"))
        for w in workers:
            opts = RayOptions(num_cpus=int(w), quiet=True)
            t0 = time.perf_counter()
            with connect(opts):
                start = time.perf_counter() - t0
                row = _run(in_dir, Path(tmp) / f"ray-{w}", map_slices=ray_slice_mapper(opts),
                           kw=kw)
            rows.append(dict(row, mode=f"Ray, {w} worker(s), 1 torch thread each",
                             ray_start_s=start))
    return rows


def format_rows(rows: Sequence[Dict[str, Any]]) -> str:
    """The rows of :func:`measure` as an aligned text table."""
    lines = [f"{'mode':<44}{'slices':>7}{'wall s':>9}{'slices/s':>10}{'solve s/slice':>15}"]
    for r in rows:
        solve = r["solve_s_per_slice"]
        lines.append(f"{r['mode']:<44}{r['slices']:>7}{r['wall_s']:>9.1f}"
                     f"{r['slices_per_s']:>10.3f}"
                     f"{'-' if solve is None else format(solve, '.2f'):>15}")
    return "\n".join(lines)
