"""Scale-out of ctflow work (slices, series, benchmark cases, tuning) on Ray.

Optional extra ``ctflow[ray]``.

The in-process path stays the default everywhere; Ray is used only when asked for
(``--ray [ADDRESS]`` on ``ctflow reconstruct-dicom`` and ``ctflow bench``, ``ctflow tune``, or
``ray=...`` in Python). Importing this package does not import Ray.

* :mod:`ctflow.distributed.cluster` -- :class:`RayOptions`, :func:`connect` (a private
  loopback-only instance or a cluster address), per-task resources (a GPU each when the
  cluster has GPUs), ``torch`` threads inside tasks;
* :mod:`ctflow.distributed.slices` -- the slices of ``reconstruct-dicom`` as tasks (the driver
  writes each finished slice atomically, keyed by its SOPInstanceUID);
* :mod:`ctflow.distributed.cases` -- generic "call ``module:function``" tasks used by the
  benchmark runner to fan its cases out (the ``benchmarks/`` folder is not installed, so the
  tasks import it from the checkout's path);
* :mod:`ctflow.distributed.tune` -- search spaces from JSON and a seeded Ray Tune search.

See ``docs/scaling.md`` for measured throughput and the arithmetic for large series.
"""
from ctflow.distributed.cluster import RayOptions, as_ray_options, connect, require_ray

__all__ = ["RayOptions", "as_ray_options", "connect", "require_ray"]
