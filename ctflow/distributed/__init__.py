"""Scale-out of ctflow work (slices, series, benchmark cases, tuning) on Ray.

Optional extra ``ctflow[ray]``.

The in-process path stays the default everywhere; Ray is used only when asked for
(``--ray [ADDRESS]`` on ``ctflow reconstruct-dicom`` and ``ctflow bench``, ``ctflow tune``; in
Python ``reconstruct_dicom(..., map_slices=ray_slice_mapper(...))`` or the benchmark runner's
``ray=...``). Importing this package does not import Ray.

* :mod:`ctflow.distributed.cluster` -- :class:`RayOptions`, :func:`connect` (a private
  loopback-only instance or a cluster address), per-task resources (a GPU each when the
  cluster has GPUs), ``torch`` threads inside tasks;
* :mod:`ctflow.distributed.slices` -- the slices of ``reconstruct-dicom`` as tasks:
  :func:`ray_slice_mapper` is the ``map_slices`` of :func:`ctflow.tasks.reconstruct_dicom`
  (the driver writes each finished slice atomically, keyed by its SOPInstanceUID);
* :mod:`ctflow.distributed.cases` -- generic "call ``module:function``" tasks used by the
  benchmark runner to fan its cases out (the ``benchmarks/`` folder is not installed, so the
  tasks import it from the checkout's path);
* :mod:`ctflow.distributed.tune` -- search spaces from JSON and a seeded Ray Tune search;
* :mod:`ctflow.distributed.throughput` -- :func:`measure`, slices per second in-process and on
  Ray (``ctflow throughput``).

See ``docs/scaling.md`` for measured throughput and the arithmetic for large series.
"""
from ctflow.distributed.cases import map_on_ray
from ctflow.distributed.cluster import (RAY_ARGUMENTS, RayOptions, as_ray_options,
                                        check_installed, connect, ray_options_from,
                                        require_ray)
from ctflow.distributed.slices import RaySliceMapper, ray_slice_mapper, solve_slices_on_ray
from ctflow.distributed.throughput import measure
from ctflow.distributed.tune import check_space, run_search

__all__ = ["RayOptions", "as_ray_options", "connect", "require_ray", "RaySliceMapper",
           "ray_slice_mapper", "solve_slices_on_ray", "measure", "RAY_ARGUMENTS",
           "ray_options_from", "check_installed", "map_on_ray", "check_space", "run_search"]
