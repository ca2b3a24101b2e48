r"""Benchmark cases and tuning trials as Ray tasks (``--ray [ADDRESS]``).

The pending cases run as Ray tasks (``ctflow.distributed.map_on_ray``; one CPU each, a GPU each
when the cluster has GPUs and ``--device`` is not ``cpu``, one torch thread per task). The
driver stays the only writer of the store: it appends each case's row as its task finishes
(completion order), so the store holds every case exactly once, with the same fields and
numbers as an in-process run (same seeds, the same :meth:`SuiteContext.execute`); a task whose
worker dies is re-run by Ray. Importing this module imports neither Ray nor
``ctflow.distributed``.
"""
from __future__ import annotations

import uuid
from typing import Any, Callable, Dict, Iterator, Sequence

from benchmarks.cases import Case, case_from_dict, case_to_dict
from benchmarks.execution import Outcome
from benchmarks.settings import REPO_ROOT
from benchmarks.suites.common import SuiteContext

__all__ = ["task_context", "execute_case_task", "ray_outcomes"]


#: The Ray task of one case (``module:function``, imported by the worker from the checkout).
TASK = "benchmarks.suites.remote:execute_case_task"
#: Per Ray worker process: the suite contexts of the runs and searches it serves (each
#: prior loaded once), by token; the oldest goes beyond four.
_TASK_CONTEXTS: Dict[str, Any] = {}


def task_context(spec: Dict[str, Any]):
    """Inside a Ray task (a case or a tuning trial): the ``SuiteContext`` of ``spec``
    (``token``, ``suite``, ``quick``, ``device``, ``seed``, ``prior``), made once per worker
    process and token; ``device="auto"`` is resolved on the worker's own node."""
    token = spec["token"]
    if token not in _TASK_CONTEXTS:
        while len(_TASK_CONTEXTS) >= 4:
            _TASK_CONTEXTS.pop(next(iter(_TASK_CONTEXTS)))
        device = spec["device"]
        if device == "auto":
            import torch
            device = "cuda" if torch.cuda.is_available() else "cpu"
        _TASK_CONTEXTS[token] = SuiteContext(suite=spec["suite"], quick=spec["quick"],
                                             device=device, seed=spec["seed"],
                                             prior=spec["prior"], progress=False)
    return _TASK_CONTEXTS[token]


def execute_case_task(spec: Dict[str, Any], case: Dict[str, Any]) -> dict:
    """Inside a Ray task: execute one case with the (cached) suite context of ``spec``
    (``token``, ``suite``, ``quick``, ``device``, ``seed``, ``prior``) -- the same
    ``SuiteContext.execute`` as in-process, hence the same numbers."""
    return task_context(spec).execute(case_from_dict(case))


def ray_outcomes(spec: Dict[str, Any], options) -> Callable[[Sequence[Case]], Iterator[Outcome]]:
    """``outcomes`` for :func:`run_cases` that runs the pending cases as Ray tasks
    (:func:`ctflow.distributed.map_on_ray`), yielding them as they finish. ``spec``:
    the suite context's settings (``suite``, ``quick``, ``device``, ``seed``, ``prior``: a
    name/path or a ``FlowPrior``); ``options``: a ``ctflow.distributed.RayOptions``."""
    from ctflow.distributed import map_on_ray

    spec = dict(spec, token=uuid.uuid4().hex)

    def outcomes(pending: Sequence[Case]) -> Iterator[Outcome]:
        if not pending:
            return
        by_id = {c.id: c for c in pending}
        items = [(c.id, case_to_dict(c)) for c in pending]
        for key, value, error, tb in map_on_ray(TASK, items, spec, options,
                                                paths=[str(REPO_ROOT)],
                                                device=str(spec["device"])):
            yield by_id[key], value, error, tb
    return outcomes
