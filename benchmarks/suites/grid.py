r"""Hyper-parameter tuning on the VALIDATION split (disjoint from the TEST slices).

``python -m benchmarks tune <suite>`` runs, for every method of the suite's tuning grid
(``configs/<suite>.json`` → ``tuning.grid``), every grid point (the Cartesian product of the
listed values, on top of the method's current options) on every validation slice and every
tuning problem (``tuning.problems``), with the same seeded noise draws for all methods. The
cases are stored like any suite (``<out>/tune-<suite>.jsonl``, resumable). The chosen point
of a method maximises the mean PSNR over all its (slice, problem) cases; ties go to the
earlier grid point. The choice is written back to ``configs/<suite>.json``:
``methods.<m>`` gets the chosen values, ``tuning.result.<m>`` records the grid, the chosen
point, its validation PSNR/SSIM, the number of cases and the date.

With ``--quick`` the grid is cut to two points per method (the first two values of the first
parameter), one validation slice and one problem, and the choice goes to
``<out>/tune-<suite>.chosen.json`` instead of the config. With ``--ray`` the grid's cases run
as Ray tasks (same rows, same choice).

:func:`write_choice` writes one method's choice (also of the Ray Tune search,
:mod:`benchmarks.suites.tuning`) where the suite reads it.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ctflow.data import atomic_write_json

from benchmarks.cases import Case, canonical
from benchmarks.execution import RunSummary, environment, now, run_cases
from benchmarks.settings import load_config, save_config
from benchmarks.store import ResultStore
from benchmarks.suites.options import label
from benchmarks.suites.problems import image_ids

__all__ = ["grid_points", "choose", "tune_suite", "write_choice", "QUICK_IMAGES"]

QUICK_IMAGES = 1


def grid_points(grid: Dict[str, List[Any]]) -> List[Dict[str, Any]]:
    """The Cartesian product of a grid ``{name: [values]}`` as a list of dicts (row-major in
    the order the names are listed)."""
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"tuning grid entry {name!r} must be a non-empty list, "
                             f"got {values!r}")
    names = list(grid)
    return [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]


def _quick_grid(grid: Dict[str, List[Any]]) -> Dict[str, List[Any]]:
    first = next(iter(grid))
    return {first: list(grid[first])[:2]}


def choose(rows: List[dict], points: List[Dict[str, Any]], method_key: str
           ) -> Optional[Dict[str, Any]]:
    """The grid point with the best mean PSNR among ``rows`` of ``method_key``; returns
    ``{"chosen", "psnr", "ssim", "cases", "table"}`` or ``None`` if nothing was measured."""
    table = []
    for i, p in enumerate(points):
        key = canonical(p)
        hits = [r for r in rows if r["labels"].get("tuned") == method_key
                and r["labels"].get("point") == key]
        if not hits:
            continue
        ps = [r["metrics"]["psnr"] for r in hits]
        ss = [r["metrics"]["ssim"] for r in hits]
        if not all(math.isfinite(v) for v in ps):
            continue
        table.append({"point": p, "psnr": sum(ps) / len(ps), "ssim": sum(ss) / len(ss),
                      "cases": len(hits), "order": i})
    if not table:
        return None
    best = max(table, key=lambda t: (t["psnr"], -t["order"]))
    return {"chosen": best["point"], "psnr": best["psnr"], "ssim": best["ssim"],
            "cases": best["cases"],
            "table": [{k: t[k] for k in ("point", "psnr", "ssim", "cases")} for t in table]}


def tune_suite(module, ctx, *, out: Path, after_case: Optional[Callable[[int], None]] = None,
               outcomes=None) -> RunSummary:
    """Run the tuning grid of ``module`` (a case suite) and record the choice. ``outcomes``
    (:func:`benchmarks.suites.remote.ray_outcomes`) runs the cases as Ray tasks."""
    spec = module.tuning_spec(ctx)
    images = image_ids("validation", QUICK_IMAGES if ctx.quick else None)
    problems = spec["problems"][:1] if ctx.quick else spec["problems"]
    labels_of = spec.get("labels") or (lambda p: {})
    suite = f"tune-{ctx.suite}"
    cases: List[Case] = []
    points_of: Dict[str, List[Dict[str, Any]]] = {}
    for key, m in spec["methods"].items():
        grid = _quick_grid(m["grid"]) if ctx.quick else m["grid"]
        points = grid_points(grid)
        points_of[key] = points
        for p in points:
            opts = dict(m["base"], **p)
            for prob in problems:
                for img in images:
                    cases.append(Case(suite, m["method"], opts, prob, img, ctx.seed,
                                      ctx.prior_name,
                                      labels=dict(labels_of(prob), tuned=key,
                                                  variant=label(key),
                                                  point=canonical(p))))
    # identical cases (a grid point equal to another method's) run once
    unique: Dict[str, Case] = {}
    for c in cases:
        unique.setdefault(c.id, c)
    store = ResultStore(out / f"{suite}.jsonl")
    summary = run_cases(list(unique.values()), ctx.execute, store,
                        env=environment(str(ctx.device)),
                        extra={"quick": ctx.quick, "config": ctx.config_label()},
                        progress=ctx.progress, after_case=after_case, outcomes=outcomes)
    ids = {c.id for c in cases}
    rows = [r for r in store.ok_rows() if r["id"] in ids]
    # a case shared between methods is stored once, under the first method's labels
    by_id = {r["id"]: r for r in rows}
    expanded = [dict(by_id[c.id], labels=c.labels) for c in cases if c.id in by_id]
    results = {}
    for key in spec["methods"]:
        res = choose(expanded, points_of[key], key)
        if res is not None:
            res.update(grid=(_quick_grid(spec["methods"][key]["grid"]) if ctx.quick
                             else spec["methods"][key]["grid"]),
                       images=images, problems=problems,
                       date=now(),
                       prior=ctx.prior_name, seed=ctx.seed)
            results[key] = res
    complete = len(by_id) == len(ids)
    if ctx.quick:
        path = out / f"{suite}.chosen.json"
        _write_json(path, results)
    elif results and complete:
        cfg = ctx.config()
        for key, res in results.items():
            cfg["methods"].setdefault(key, {}).update(res["chosen"])
        cfg.setdefault("tuning", {})["result"] = results
        date = results[next(iter(results))]["date"]
        cfg["tuning"]["status"] = (f"tuned on the validation split ({len(images)} slices) "
                                   f"on {date}")
        save_config(ctx.suite, cfg)
    elif not complete:
        print(f"{suite}: {len(ids) - len(by_id)} tuning case(s) failed or are missing; the "
              f"config was not changed (rerun to retry them)")
    return summary


def write_choice(ctx, key: str, result: Dict[str, Any], *, out: Path,
                 settings_out: Optional[Path] = None) -> Path:
    """Write a chosen setting where the suite reads it: ``settings_out`` if given, else with
    ``--quick`` ``<out>/tune-<suite>.chosen.json`` (merged with the file's other methods),
    else ``configs/<suite>.json`` (``methods.<key>`` updated, the record in
    ``tuning.result.<key>``). Returns the path written."""
    if settings_out is not None or ctx.quick:
        path = Path(settings_out) if settings_out is not None else \
            Path(out) / f"tune-{ctx.suite}.chosen.json"
        current: Dict[str, Any] = {}
        if path.is_file():
            try:
                current = json.loads(path.read_text())
            except json.JSONDecodeError:
                current = {}
            if not isinstance(current, dict):
                current = {}
        current[key] = result
        _write_json(path, current)
        return path
    cfg = load_config(ctx.suite)
    cfg["methods"].setdefault(key, {}).update(result["chosen"])
    cfg.setdefault("tuning", {}).setdefault("result", {})[key] = result
    cfg["tuning"]["status"] = (f"{key} tuned by a Ray Tune search on the validation split "
                               f"({len(result['images'])} slices) on {result['date']}")
    return save_config(ctx.suite, cfg)


def _write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, obj, default=None)
