r"""Independent work items (benchmark cases) as Ray tasks: ``module:function`` per item.

The benchmark runner (``benchmarks/runner.py``, ``--ray``) fans its cases out with
:func:`map_on_ray`. The ``benchmarks/`` folder is part of the repository, not of the installed
package, so a task cannot import it by itself; each task therefore names its work as
``"module:function"`` plus the folders to put on ``sys.path`` first (the checkout's root, which
must exist at the same path on every node of a multi-node cluster), and only plain data
(dicts, lists, numbers, strings, ``FlowPrior`` objects) travels as arguments.

Each task calls ``function(payload, item)`` and returns its value; a task whose worker process
dies is re-run up to ``max_retries`` times, an exception raised by the function is returned to
the caller as the outcome of that item (not retried: it is deterministic). Results come back
in completion order; the caller stores each exactly once (the runner appends one JSON line per
case, keyed by the case id).
"""
from __future__ import annotations

import importlib
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from ctflow.distributed.cluster import RayOptions, as_completed, cancel, connect, task_resources, worker_setup

__all__ = ["map_on_ray", "call_task", "resolve_target"]


def resolve_target(target: str, paths: Sequence[str] = ()):
    """The callable ``"package.module:function"``, after prepending ``paths`` to
    ``sys.path`` (once each). ``ValueError`` for a malformed target."""
    if not isinstance(target, str) or target.count(":") != 1:
        raise ValueError(f"a task target must be 'module:function', got {target!r}")
    for p in reversed(list(paths)):
        if p and p not in sys.path:
            sys.path.insert(0, p)
    mod_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(mod_name), fn_name, None)
    if not callable(fn):
        raise ValueError(f"{target}: {mod_name} has no callable {fn_name}")
    return fn


def call_task(target: str, paths: List[str], payload: Any, key: str, item: Any,
              threads: Optional[int], hook) -> Any:
    """The body of one Ray task: set up the worker, run the hook, call the target."""
    worker_setup(threads)
    if hook is not None:
        hook(key)
    return resolve_target(target, paths)(payload, item)


def map_on_ray(target: str, items: Sequence[Tuple[str, Any]], payload: Any,
               options: RayOptions, *, paths: Sequence[str] = (), device: str = "auto",
               put_payload: bool = True
               ) -> Iterator[Tuple[str, Any, Optional[BaseException], Optional[str]]]:
    """Run ``target(payload, item)`` for every ``(key, item)`` of ``items`` as Ray tasks and
    yield ``(key, value, None, None)`` or ``(key, None, error, remote_traceback)`` as each task
    finishes (``error`` is the function's own exception where Ray could carry it back).

    ``payload`` (shared by all tasks, e.g. the suite context's settings and the prior) is put
    into the object store once. ``device`` decides whether tasks request a GPU
    (:func:`~ctflow.distributed.cluster.task_resources`). A worker that died more than
    ``max_retries`` times yields a ``RuntimeError``. If the consumer stops early (an exception
    or ``KeyboardInterrupt``), the unfinished tasks are cancelled.
    """
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("map_on_ray: the item keys must be unique")
    with connect(options) as ray:
        from ray import exceptions as rex

        shared = ray.put(payload) if put_payload else payload
        res = task_resources(options, device)
        remote = ray.remote(call_task).options(
            num_cpus=res["num_cpus"], num_gpus=res["num_gpus"], max_retries=options.max_retries,
            retry_exceptions=False, name=f"ctflow:{target}")
        refs: Dict[Any, str] = {}
        for key, item in items:
            refs[remote.remote(target, list(paths), shared, key, item, options.threads,
                               options.task_hook)] = key
        remaining = set(refs)
        try:
            for ref in as_completed(list(refs)):
                remaining.discard(ref)
                key = refs[ref]
                try:
                    value = ray.get(ref)
                except rex.RayTaskError as exc:
                    cause = getattr(exc, "cause", None)
                    yield (key, None, cause if isinstance(cause, Exception) else exc,
                           getattr(exc, "traceback_str", None))
                    continue
                except (rex.WorkerCrashedError, rex.NodeDiedError) as exc:
                    yield key, None, RuntimeError(
                        f"{key}: its Ray worker died {options.max_retries + 1} time(s) "
                        f"(max_retries={options.max_retries}): {type(exc).__name__}"), None
                    continue
                yield key, value, None, None
        except BaseException:
            cancel(remaining)
            raise
