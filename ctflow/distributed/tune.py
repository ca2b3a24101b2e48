r"""Hyper-parameter search with Ray Tune: search spaces from JSON and a seeded search.

A search space is a JSON object ``{option: distribution}``; each distribution is an object
with one key:

===================  ===============================================  ====================
key                  value                                            Ray Tune
===================  ===============================================  ====================
``uniform``          ``[lo, hi]``: uniform on :math:`[lo, hi]`          ``tune.uniform``
``loguniform``       ``[lo, hi]``: :math:`\exp U[\log lo, \log hi]`     ``tune.loguniform``
``quniform``         ``[lo, hi, q]``: uniform, rounded to multiples     ``tune.quniform``
``randint``          ``[lo, hi]``: integers :math:`lo \le k < hi`       ``tune.randint``
``lograndint``       ``[lo, hi]``: integers, log-uniform                ``tune.lograndint``
``choice``           ``[v1, v2, ...]``: one at random                   ``tune.choice``
``grid``             ``[v1, v2, ...]``: every value (times the samples) ``tune.grid_search``
``value``            any JSON value: fixed                              the value itself
===================  ===============================================  ====================

A plain JSON value is fixed as well. With ``grid`` entries the number of trials is
``num_samples`` times the size of the grid (Ray Tune's semantics).

:func:`run_search` runs ``num_samples`` trials of ``module:function`` (:func:`trial_task`)
with Ray Tune's random/grid search (``BasicVariantGenerator``) seeded by ``seed``, so the
same seed draws the same configurations; each trial requests one CPU (and one GPU when the
cluster has GPUs and the device is not the CPU) and reports the metrics the function returns.
It returns every trial's configuration and metrics in trial order; picking the best is left to
the caller (the benchmarks choose by mean validation PSNR with their own tie rule).
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from ctflow.distributed.cluster import RayOptions, connect, task_resources, worker_setup

__all__ = ["DISTRIBUTIONS", "check_space", "search_space", "run_search", "trial_task"]

#: The distribution keys of a JSON search space.
DISTRIBUTIONS = ("uniform", "loguniform", "quniform", "randint", "lograndint", "choice",
                 "grid", "value")


def _number(x, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ValueError(f"{what}: expected a finite number, got {x!r}")
    return x


def check_space(space: Dict[str, Any]) -> Dict[str, Any]:
    """Validate a JSON search space (``ValueError`` naming the option); returns it."""
    if not isinstance(space, dict) or not space:
        raise ValueError("the search space must be a non-empty object {option: distribution}")
    for name, dist in space.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"search space: {name!r} is not a valid option name")
        if not isinstance(dist, dict):
            continue                                         # a fixed value
        if len(dist) != 1 or next(iter(dist)) not in DISTRIBUTIONS:
            raise ValueError(f"search space {name!r}: give exactly one of "
                             f"{', '.join(DISTRIBUTIONS)}, got {sorted(dist)}")
        kind, arg = next(iter(dist.items()))
        if kind == "value":
            continue
        if kind in ("choice", "grid"):
            if not isinstance(arg, list) or not arg:
                raise ValueError(f"search space {name!r}: {kind} needs a non-empty list")
            continue
        need = 3 if kind == "quniform" else 2
        if not isinstance(arg, list) or len(arg) != need:
            raise ValueError(f"search space {name!r}: {kind} needs [lo, hi"
                             f"{', q' if need == 3 else ''}], got {arg!r}")
        lo, hi = (_number(v, f"search space {name!r}") for v in arg[:2])
        if not lo < hi:
            raise ValueError(f"search space {name!r}: {kind} needs lo < hi, got {arg!r}")
        if kind in ("loguniform", "lograndint") and lo <= 0:
            raise ValueError(f"search space {name!r}: {kind} needs lo > 0, got {lo!r}")
        if kind in ("randint", "lograndint") and not all(isinstance(v, int) for v in arg):
            raise ValueError(f"search space {name!r}: {kind} needs integer bounds, got {arg!r}")
        if kind == "quniform" and not _number(arg[2], f"search space {name!r}") > 0:
            raise ValueError(f"search space {name!r}: quniform needs q > 0, got {arg[2]!r}")
    return space


def search_space(space: Dict[str, Any]) -> Dict[str, Any]:
    """A JSON search space (see the module docstring) as Ray Tune's ``param_space``."""
    from ray import tune

    check_space(space)
    out: Dict[str, Any] = {}
    for name, dist in space.items():
        if not isinstance(dist, dict):
            out[name] = dist
            continue
        kind, arg = next(iter(dist.items()))
        if kind == "value":
            out[name] = arg
        elif kind == "choice":
            out[name] = tune.choice(list(arg))
        elif kind == "grid":
            out[name] = tune.grid_search(list(arg))
        elif kind == "uniform":
            out[name] = tune.uniform(float(arg[0]), float(arg[1]))
        elif kind == "loguniform":
            out[name] = tune.loguniform(float(arg[0]), float(arg[1]))
        elif kind == "quniform":
            out[name] = tune.quniform(float(arg[0]), float(arg[1]), float(arg[2]))
        elif kind == "randint":
            out[name] = tune.randint(int(arg[0]), int(arg[1]))
        elif kind == "lograndint":
            out[name] = tune.lograndint(int(arg[0]), int(arg[1]))
    return out


def _plain(v: Any) -> Any:
    """A sampled value as plain JSON (numpy scalars → Python numbers)."""
    item = getattr(v, "item", None)
    return item() if callable(item) else v


def trial_task(config: Dict[str, Any], target: str = "", paths: Sequence[str] = (),
               payload: Any = None, threads: Optional[int] = 1) -> None:
    """The Ray Tune trainable: ``metrics = module.function(payload, config)``, reported once.
    ``payload`` is shared by all trials (put into the object store once)."""
    from ray import tune

    from ctflow.distributed.cases import resolve_target

    worker_setup(threads)
    config = {k: _plain(v) for k, v in config.items()}
    metrics = resolve_target(target, paths)(payload, config)
    if not isinstance(metrics, dict):
        raise TypeError(f"{target} must return a dict of metrics, got {type(metrics).__name__}")
    tune.report(dict(metrics))


def run_search(target: str, payload: Any, space: Dict[str, Any], *, num_samples: int,
               seed: int, metric: str, mode: str = "max", options: Optional[RayOptions] = None,
               paths: Sequence[str] = (), device: str = "auto",
               storage: Optional[Path] = None, name: Optional[str] = None,
               on_result: Optional[Callable[[Dict[str, Any], Dict[str, Any]], None]] = None
               ) -> List[Dict[str, Any]]:
    """Run a seeded Ray Tune search and return its trials in order.

    Args:
        target: ``"module:function"`` evaluated per trial as ``function(payload, config)``,
            returning a dict of metrics (it must contain ``metric``).
        payload: data shared by all trials.
        space: a JSON search space (module docstring).
        num_samples: samples drawn (times the size of any ``grid``).
        seed: seed of the search's random draws (same seed, same configurations).
        metric, mode: the metric Ray Tune records as the objective (``"max"``/``"min"``).
        options: Ray connection, retries (a failed trial is re-run up to ``max_retries``
            times), threads per trial.
        paths: folders each trial puts on ``sys.path`` before importing ``target``.
        device: ``"cpu"`` keeps trials off GPUs; otherwise a GPU each when the cluster has
            GPUs.
        storage: folder for Ray Tune's experiment records (default: Ray's).
        name: the experiment's name (default ``ctflow-tune-<time>``).
        on_result: called in this process as ``on_result(config, metrics)`` when a trial
            reports (in completion order), e.g. to store its rows right away.

    Returns:
        ``[{"trial": i, "config": {...}, "metrics": {...} or None, "error": str or None}]``
        in the order the search generated the trials.
    """
    options = options or RayOptions()
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    check_space(space)
    with connect(options):
        from ray import tune
        from ray.tune.search.basic_variant import BasicVariantGenerator

        res = task_resources(options, device)
        trainable = tune.with_resources(
            tune.with_parameters(trial_task, target=target, paths=list(paths),
                                 payload=payload, threads=options.threads),
            {"cpu": res["num_cpus"], "gpu": res["num_gpus"]})

        callbacks = []
        if on_result is not None:
            class _Forward(tune.Callback):
                def on_trial_result(self, iteration, trials, trial, result, **info):
                    on_result({k: _plain(v) for k, v in trial.config.items()}, dict(result))
            callbacks.append(_Forward())

        run_config = tune.RunConfig(
            name=name or time.strftime("ctflow-tune-%Y%m%d-%H%M%S"),
            storage_path=str(Path(storage).resolve()) if storage is not None else None,
            verbose=0, callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=options.max_retries))
        tuner = tune.Tuner(
            trainable, param_space=search_space(space), run_config=run_config,
            tune_config=tune.TuneConfig(
                metric=metric, mode=mode, num_samples=int(num_samples),
                search_alg=BasicVariantGenerator(random_state=int(seed)),
                reuse_actors=True))
        # quiet: Ray's older reporter, which prints nothing at verbose=0 (the newer one
        # still prints the experiment's heading)
        saved = os.environ.get("RAY_AIR_NEW_OUTPUT")
        if options.quiet:
            os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
        try:
            grid = tuner.fit()
        finally:
            if options.quiet:
                if saved is None:
                    os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
                else:
                    os.environ["RAY_AIR_NEW_OUTPUT"] = saved
        trials = []
        for result in grid:
            metrics = dict(result.metrics or {})
            trial_id = str(metrics.get("trial_id") or getattr(result, "path", ""))
            trials.append({"order": _trial_index(trial_id, len(trials)),
                           "config": {k: _plain(v) for k, v in (result.config or {}).items()},
                           "metrics": ({k: _plain(v) for k, v in metrics.items()
                                        if _jsonable(v)} if result.error is None else None),
                           "error": None if result.error is None else
                           _error_text(result.error)})
    trials.sort(key=lambda t: t["order"])
    for i, t in enumerate(trials):
        t.pop("order")
        t["trial"] = i
    return trials


def _error_text(err: BaseException) -> str:
    """A trial's error in one line: its type and the last line of its message (Ray's
    colour codes and remote traceback removed)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(err).__name__}: {lines[-1] if lines else ''}"


def _trial_index(trial_id: str, fallback: int) -> int:
    """The generation index of a trial: Ray Tune names trials ``<hex>_<index>``."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else fallback


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(_plain(v))
        return True
    except (TypeError, ValueError):
        return False
