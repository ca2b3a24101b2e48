r"""Ray Tune search of a case suite's hyper-parameters on the VALIDATION split.

**Ray Tune search** (``python -m benchmarks tune [<suite>] --search FILE``, ``ctflow tune
FILE``): instead of a grid, a seeded Ray Tune search over the ranges in ``FILE`` (a JSON
object)::

    {"suite": "ct-sparse", "method": "msflow", "metric": "psnr", "num_samples": 16,
     "seed": 0,
     "space": {"rho": {"loguniform": [10, 10000]}, "lam": {"uniform": [0.1, 2.0]},
               "K": {"choice": [4, 8]}, "M": {"choice": [1, 2]},
               "schedule": {"choice": ["constant", "continuation"]}},
     "fixed": {"sweeps": 10}}

(distributions: :mod:`ctflow.distributed.tune`). Each trial solves the method with the
suite's tuning options (``methods.<method>`` of the config at the reference ``N``, the quick
overrides with ``--quick``), then ``fixed``, then the sampled values, on the same validation
slices and problems as the grid (``"problems"`` in ``FILE`` overrides them), and reports the
mean PSNR and SSIM. Every solve is one row of ``<out>/tune-<suite>.jsonl`` (labels ``tuned``,
``point``, ``search: "ray-tune"``), appended by this process as the trial reports (a case id
at most once; cases already stored are not solved again). The best trial is chosen from the
stored rows by :func:`choose` (mean ``metric`` over its cases, ties to the earlier trial); its
sampled values (not ``fixed``, which is only recorded) are written like the grid's choice:
into ``configs/<suite>.json`` (``methods.<method>`` and ``tuning.result.<method>`` with the
space, the trials and the seed), or with ``--quick`` into
``<out>/tune-<suite>.chosen.json`` (``--settings-out FILE`` picks another file). A suite run
with ``--settings <that file>`` uses the chosen values.

The grid search (``python -m benchmarks tune <suite>``) is :mod:`benchmarks.suites.grid`.
"""
from __future__ import annotations

import json
import math
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from benchmarks.cases import Case, canonical, case_to_dict
from benchmarks.catalog import CASE_SUITES, import_suite
from benchmarks.execution import environment, now
from benchmarks.settings import REPO_ROOT, check_device
from benchmarks.store import ResultStore, read_json_object
from benchmarks.suites.common import SuiteContext
from benchmarks.suites.grid import QUICK_IMAGES, choose, write_choice
from benchmarks.suites.options import label
from benchmarks.suites.problems import image_ids
from benchmarks.suites.remote import task_context

__all__ = ["SEARCH_KEYS", "load_search", "evaluate_trial", "ray_tune_suite", "ray_tune_main",
           "TRIAL"]

#: The Ray Tune trial (``module:function``, imported by the worker from the checkout).
TRIAL = "benchmarks.suites.tuning:evaluate_trial"

SEARCH_KEYS = ("suite", "method", "metric", "num_samples", "seed", "space", "fixed", "problems",
               "about")


def load_search(path) -> Dict[str, Any]:
    """A search file (module docstring), checked: ``FileNotFoundError``/``ValueError`` name the
    file and the bad entry."""
    from ctflow.distributed import check_space

    path = Path(path)
    spec = read_json_object(path, "search")
    unknown = sorted(set(spec) - set(SEARCH_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {', '.join(SEARCH_KEYS)}")
    for key in ("method", "space"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    if spec.get("metric", "psnr") not in ("psnr", "ssim"):
        raise ValueError(f"{path}: metric must be 'psnr' or 'ssim', got {spec['metric']!r}")
    n = spec.get("num_samples", 8)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"{path}: num_samples must be an integer >= 1, got {n!r}")
    if not isinstance(spec.get("fixed", {}), dict):
        raise ValueError(f"{path}: 'fixed' must be an object of options")
    problems = spec.get("problems")
    if problems is not None and (not isinstance(problems, list) or not problems
                                 or not all(isinstance(p, dict) for p in problems)):
        raise ValueError(f"{path}: 'problems' must be a non-empty list of problem objects")
    try:
        check_space(spec["space"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    return spec


def _trial_cases(payload: Dict[str, Any], config: Dict[str, Any]) -> List[Case]:
    opts = dict(payload["base"], **config)
    cases = []
    for prob, plabels in zip(payload["problems"], payload["problem_labels"]):
        for img in payload["images"]:
            cases.append(Case(payload["tune_suite"], payload["method"], opts, prob, img,
                              payload["seed"], payload["prior_name"],
                              labels=dict(plabels, tuned=payload["key"],
                                          variant=label(payload["key"]),
                                          point=canonical(config), search="ray-tune")))
    return cases


def evaluate_trial(payload: Dict[str, Any], config: Dict[str, Any]) -> Dict[str, Any]:
    """One Ray Tune trial (runs in a Ray worker): solve every validation case of ``config``
    with ``SuiteContext.execute`` and return the mean ``psnr``/``ssim`` (NaN if a case failed)
    and the cases' rows (``rows_json``). Cases already stored (``payload["done"]``) are not
    solved again."""
    ctx = task_context(payload)
    rows = []
    for case in _trial_cases(payload, config):
        row = dict(case_to_dict(case), id=case.id)
        row.pop("trace", None)
        if case.id in payload["done"]:
            rows.append(dict(payload["done"][case.id], reused=True))
            continue
        try:
            row.update(ctx.execute(case))
            row["status"] = "ok"
        except Exception as exc:  # a failing point must not end the search
            row.update(status="error", error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc(limit=6))
        rows.append(row)
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    failed = len(rows) - len(ok)

    def mean(key):
        vals = [float(r["metrics"][key]) for r in ok]
        return sum(vals) / len(vals) if vals and not failed else float("nan")
    return {"psnr": mean("psnr"), "ssim": mean("ssim"), "cases": len(rows), "failed": failed,
            "rows_json": json.dumps(rows, default=str)}


def ray_tune_suite(module, ctx, *, search: Dict[str, Any], out: Path, options=None,
                   num_samples: Optional[int] = None, settings_out: Optional[Path] = None,
                   seed: Optional[int] = None) -> Dict[str, Any]:
    """Run the Ray Tune search ``search`` (:func:`load_search`) for the case suite ``module``
    and write the best setting (:func:`write_choice`). Returns ``{"result": <the choice
    record>, "path": <written file>, "trials": [...], "stored": <rows appended>}``;
    ``result`` is ``None`` (nothing written) when no trial finished all its cases."""
    from ctflow.distributed import RayOptions, run_search

    options = options or RayOptions()
    spec = module.tuning_spec(ctx)
    key = search["method"]
    if key not in spec["methods"]:
        raise ValueError(f"suite {ctx.suite!r} tunes {', '.join(spec['methods'])}; the search "
                         f"names method {key!r}")
    m = spec["methods"][key]
    base = dict(m["base"], **search.get("fixed", {}))
    images = image_ids("validation", QUICK_IMAGES if ctx.quick else None)
    problems = search.get("problems") or (spec["problems"][:1] if ctx.quick
                                          else spec["problems"])
    labels_of = spec.get("labels") or (lambda p: {})
    metric = search.get("metric", "psnr")
    n = int(num_samples if num_samples is not None else search.get("num_samples", 8))
    search_seed = int(search.get("seed", ctx.seed) if seed is None else seed)
    suite = f"tune-{ctx.suite}"
    store = ResultStore(Path(out) / f"{suite}.jsonl")
    done_rows = {r["id"]: r for r in store.ok_rows()}
    payload = {"token": uuid.uuid4().hex, "suite": ctx.suite, "tune_suite": suite,
               "quick": ctx.quick, "device": str(ctx.device), "seed": ctx.seed,
               "prior": ctx._prior_arg, "prior_name": ctx.prior_name, "method": m["method"],
               "key": key, "base": base, "images": images, "problems": problems,
               "problem_labels": [labels_of(p) for p in problems], "done": done_rows}
    env = environment(str(ctx.device))
    extra = {"quick": ctx.quick, "config": ctx.config_label(),
             "search": {"space": search["space"], "num_samples": n, "seed": search_seed}}
    written = set(done_rows)
    stored = 0

    def on_result(config: Dict[str, Any], metrics: Dict[str, Any]) -> None:
        nonlocal stored
        for row in json.loads(metrics.get("rows_json") or "[]"):
            if row.pop("reused", False) or row["id"] in written:
                continue
            written.add(row["id"])
            row.update(env)
            row.update(extra)
            row["timestamp"] = now()
            store.append(row)
            stored += 1

    with store.locked():
        trials = run_search(TRIAL, payload, search["space"],
                            num_samples=n, seed=search_seed, metric=metric, mode="max",
                            options=options, paths=[str(REPO_ROOT)], device=str(ctx.device),
                            storage=Path(out) / "ray-tune", on_result=on_result)
    points = [t["config"] for t in trials]
    all_cases = {c.id: c for p in points for c in _trial_cases(payload, p)}
    by_id = {r["id"]: r for r in store.ok_rows() if r["id"] in all_cases}
    expanded = [dict(by_id[i], labels=c.labels) for i, c in all_cases.items() if i in by_id]
    for r in expanded:           # choose() ranks by "psnr"; rank by the search's metric
        r["metrics"] = dict(r["metrics"], psnr=r["metrics"][metric])
    best = choose(expanded, points, key)
    table = [{"trial": t["trial"], "config": t["config"],
              "psnr": (t["metrics"] or {}).get("psnr"), "ssim": (t["metrics"] or {}).get("ssim"),
              "error": t["error"]} for t in trials]
    if best is None:
        return {"result": None, "path": None, "trials": table, "stored": stored}
    chosen_rows = [by_id[c.id] for c in _trial_cases(payload, best["chosen"])]
    result = {"chosen": best["chosen"], metric: best["psnr"],
              "psnr": sum(r["metrics"]["psnr"] for r in chosen_rows) / len(chosen_rows),
              "ssim": sum(r["metrics"]["ssim"] for r in chosen_rows) / len(chosen_rows),
              "cases": best["cases"], "metric": metric, "search": "ray-tune",
              "space": search["space"], "fixed": search.get("fixed", {}), "num_samples": n,
              "search_seed": search_seed, "trials": table, "images": images,
              "problems": problems,
              "date": now(),
              "prior": ctx.prior_name, "seed": ctx.seed}
    path = write_choice(ctx, key, result, out=Path(out), settings_out=settings_out)
    return {"result": result, "path": path, "trials": table, "stored": stored}


def ray_tune_main(args, out: Path, options) -> int:
    """``python -m benchmarks tune [<suite>] --search FILE ...`` (also ``ctflow tune``)."""
    from ctflow.distributed import check_installed

    check_installed()
    search = load_search(args.search)
    suite = args.target or search.get("suite")
    if suite is None:
        print(f"tune: name the suite ('tune <suite> --search ...' or \"suite\" in "
              f"{args.search})", file=sys.stderr)
        return 2
    if search.get("suite") not in (None, suite):
        print(f"tune: the search file is for suite {search['suite']!r}, not {suite!r}",
              file=sys.stderr)
        return 2
    if suite not in CASE_SUITES:
        print(f"tune: give a case suite, one of {', '.join(CASE_SUITES)} (got {suite!r})",
              file=sys.stderr)
        return 2
    if options is None:
        from ctflow.distributed import RayOptions
        options = RayOptions(quiet=not args.progress)
    check_device(args.device, on_ray=True)
    ctx = SuiteContext(suite=suite, quick=args.quick, device=args.device, seed=args.seed,
                       prior=args.prior, progress=False, load_prior=False)
    res = ray_tune_suite(import_suite(suite), ctx, search=search, out=out, options=options,
                         num_samples=args.num_samples,
                         settings_out=Path(args.settings_out) if args.settings_out else None)
    for t in res["trials"]:
        score = "failed" if t["psnr"] is None or not math.isfinite(t["psnr"]) \
            else f"PSNR {t['psnr']:.2f} dB, SSIM {t['ssim']:.3f}"
        print(f"trial {t['trial']}: {canonical(t['config'])}: {score}")
    if res["result"] is None:
        print(f"tune-{suite}: no trial finished all its cases; nothing written",
              file=sys.stderr)
        return 1
    r = res["result"]
    print(f"best {search['method']}: {canonical(r['chosen'])} (validation PSNR "
          f"{r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}, {r['cases']} cases) -> {res['path']}")
    return 0
