r"""The slices of ``reconstruct-dicom`` as Ray tasks (``ctflow reconstruct-dicom ... --ray``).

One task per slice. A task receives the prepared working-size slice ``x`` (``n × n``, a few
kB; the driver has read and windowed the series), its SOPInstanceUID ``key`` and, for measured
data, its sinogram; it builds (once per worker process, then cached) the operator and the prior
and runs :func:`ctflow.tasks.solve_slice` -- the same function the in-process path runs, so
the results are the same. The task returns the reconstruction and the HU slice; it writes
nothing. The driver (:func:`ctflow.tasks.reconstruct_dicom`, given
``map_slices=ray_slice_mapper(options)``) writes every result as it arrives, atomically and
keyed by the SOPInstanceUID, so:

* a task whose worker dies (killed, out of memory, a lost node) is re-run by Ray up to
  ``max_retries`` times and only its one successful result is written;
* a slice is never written twice and never half-written; a killed driver leaves only whole
  slices, and ``--resume`` skips them.

Per task: one CPU, one GPU when the cluster has GPUs and the device is not the CPU, and
``torch.set_num_threads(threads)`` (default 1). The work of one slice is serial (a chain of
solver sweeps), so slices are the unit of parallelism.
"""
from __future__ import annotations

import hashlib
import os
import uuid
from typing import Any, Dict, Iterator, List, Sequence, Tuple

import torch

from ctflow.distributed.cluster import (RayOptions, as_completed, as_ray_options, cancel,
                                        check_installed, connect, require_ray, task_resources,
                                        worker_setup)
from ctflow.tasks import make_ct_operator, resolve_device, resolve_prior, solve_slice

__all__ = ["ray_slice_mapper", "RaySliceMapper", "solve_slices_on_ray", "slice_task"]

#: Per worker process: loaded priors and built operators, so that a worker that solves many
#: slices loads the prior's weights once.
_CACHE: Dict[Tuple, Any] = {}


def _cached(key: Tuple, build):
    if key not in _CACHE:
        if len(_CACHE) > 16:                    # runs with other settings: drop the oldest
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build()
    return _CACHE[key]


def slice_task(job: Dict[str, Any], spec: Dict[str, Any], prior_box: List[Any],
               token: str, threads, hook) -> Dict[str, Any]:
    """The body of one Ray task (also callable directly): solve ``job`` with ``spec``.

    ``prior_box`` holds the prior as a bundled name / checkpoint path, an object reference to
    a :class:`~ctflow.priors.base.FlowPrior` put once by the driver, or ``None``; it is
    loaded once per worker process and run token (``token``)."""
    worker_setup(threads)
    if hook is not None:
        hook(job["key"])
    dev = resolve_device(spec["device"])

    def load_prior():
        p = prior_box[0]
        if p is None:
            return None
        if not isinstance(p, str):
            ray = require_ray()
            if isinstance(p, ray.ObjectRef):
                p = ray.get(p)
        return resolve_prior(p, device=dev)

    prior = _cached(("prior", token, str(dev)), load_prior)
    op = _cached(("op", spec["size"], spec["views"], spec["geometry"], spec["backend"],
                  spec.get("pixel_mm"), str(dev)),
                 lambda: make_ct_operator(spec["size"], spec["views"],
                                          geometry=spec["geometry"], backend=spec["backend"],
                                          pixel_mm=spec.get("pixel_mm"), device=dev))
    x = torch.as_tensor(job["x"])
    return solve_slice(x, operator=op, prior=prior, method=spec["method"],
                       noise=spec["noise"], seed=spec["seed"], key=job["key"],
                       hu_shape=tuple(job["hu_shape"]), window=tuple(spec["window"]),
                       device=dev, measured=job.get("measured"), **spec["options"])


def solve_slices_on_ray(jobs: Sequence[Dict[str, Any]], spec: Dict[str, Any], prior: Any,
                        options: RayOptions) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """Submit one task per job and yield ``(key, result)`` as tasks finish (any order).

    ``jobs``: dicts with ``key`` (the SOPInstanceUID), ``x`` (the working-size slice),
    ``hu_shape`` and ``measured`` (a sinogram or ``None``). ``spec``: ``method``,
    ``noise`` (a ``GaussianNoise``), ``seed``, ``size``, ``views``, ``geometry``, ``backend``, ``device``,
    ``window``, ``options``. ``prior``: a name/path, a ``FlowPrior`` or ``None``.

    A task that raises stops the run: the other tasks are cancelled and the task's own
    exception is raised here (with the slice's key in a note); a worker that died more than
    ``max_retries`` times raises ``RuntimeError``. Results yielded before stay valid.
    """
    keys = [j["key"] for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("two slices of the series share a SOPInstanceUID; a Ray run keys its "
                         "outputs by it and cannot tell them apart")
    with connect(options) as ray:
        if prior is None or isinstance(prior, (str, os.PathLike)):
            box = [None if prior is None else str(prior)]
            token = hashlib.sha1(f"{box[0]}".encode()).hexdigest()[:12]
        else:
            box = [ray.put(prior)]
            token = uuid.uuid4().hex[:12]
        res = task_resources(options, spec.get("device", "auto"))
        remote = ray.remote(slice_task).options(
            num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=options.max_retries,
            retry_exceptions=False, name="ctflow.reconstruct_dicom.slice")
        refs = {}
        for job in jobs:
            payload = {"key": job["key"], "x": job["x"].numpy() if hasattr(job["x"], "numpy")
                       else job["x"], "hu_shape": list(job["hu_shape"]),
                       "measured": job.get("measured")}
            refs[remote.remote(payload, spec, box, token, options.threads,
                               options.task_hook)] = job["key"]
        remaining = set(refs)
        try:
            for ref in as_completed(list(refs)):
                remaining.discard(ref)
                key = refs[ref]
                yield key, _get(ray, ref, key, options)
        except BaseException:
            cancel(remaining)
            raise


def _get(ray, ref, key: str, options: RayOptions) -> Dict[str, Any]:
    """``ray.get(ref)`` with the task's own exception (not Ray's wrapper) re-raised."""
    from ray import exceptions as rex

    try:
        return ray.get(ref)
    except rex.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            if hasattr(cause, "add_note"):
                cause.add_note(f"(in the Ray task of slice {key})")
            raise cause from None
        raise
    except (rex.WorkerCrashedError, rex.NodeDiedError) as exc:
        raise RuntimeError(f"slice {key}: its Ray worker died {options.max_retries + 1} time(s) "
                           f"(max_retries={options.max_retries}); last error: "
                           f"{type(exc).__name__}") from None


class RaySliceMapper:
    """The ``map_slices`` of :func:`ctflow.tasks.reconstruct_dicom` on Ray: calling it as
    ``mapper(jobs, spec, prior)`` is :func:`solve_slices_on_ray` with these options;
    :meth:`describe` is what the summary records as its ``executor``."""

    def __init__(self, options: RayOptions):
        self.options = options

    def __call__(self, jobs: Sequence[Dict[str, Any]], spec: Dict[str, Any], prior: Any
                 ) -> Iterator[Tuple[str, Dict[str, Any]]]:
        return solve_slices_on_ray(jobs, spec, prior, self.options)

    def describe(self) -> Dict[str, Any]:
        """``{"ray": address, "max_retries", "threads_per_task", "gpus_per_task"}``."""
        return {"ray": self.options.label, "max_retries": self.options.max_retries,
                "threads_per_task": self.options.threads,
                "gpus_per_task": self.options.gpus_per_task}


def ray_slice_mapper(ray_options: Any = True) -> RaySliceMapper:
    """A ``map_slices`` function for :func:`ctflow.tasks.reconstruct_dicom` that solves every
    slice as a Ray task (``ctflow reconstruct-dicom --ray``).

    ``ray_options``: a :class:`~ctflow.distributed.cluster.RayOptions`, an address
    (``"local"`` starts a private loopback-only instance, ``"auto"``, ``"HOST:PORT"``,
    ``"ray://HOST:PORT"``), ``True`` (``"local"``) or a dict of ``RayOptions`` fields. Checks
    here, before any work, that Ray is installed (``ImportError`` naming the extra
    ``ctflow[ray]``); Ray itself is imported when the first slices are submitted. Each task
    solves one slice (a GPU each when the cluster has GPUs and the device is not ``"cpu"``);
    results equal the in-process ones (same seeds; one torch thread per task by default).
    """
    options = as_ray_options(ray_options)
    if options is None:
        raise ValueError("ray_slice_mapper: ray_options is None/False; pass map_slices=None "
                         "to solve the slices in this process")
    check_installed()
    return RaySliceMapper(options)
