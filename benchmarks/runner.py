r"""The benchmark runner: ``python -m benchmarks`` (and ``ctflow bench``, which calls :func:`main`).

A case suite's cases (:mod:`benchmarks.cases`) run through the resumable JSON-lines store
(:mod:`benchmarks.store`, :func:`benchmarks.execution.run_cases`): a rerun skips every case
already stored with ``status == "ok"`` and retries failed ones. Where they run is chosen here:
in this process, each in a fresh worker process (``--isolate``,
:mod:`benchmarks.suites.worker`) or as Ray tasks (``--ray [ADDRESS]``,
:mod:`benchmarks.suites.remote`). ``--settings FILE`` lays tuned options over
``configs/<suite>.json`` for one run (:mod:`benchmarks.settings`).

Command line::

    python -m benchmarks <suite> [--quick] [--device cpu|cuda] [--out DIR] [--seed S]
                                 [--ray [ADDRESS]] [--settings FILE]
    python -m benchmarks tune <suite> [--quick] ...     # hyper-parameters on the VALIDATION split
    python -m benchmarks tune [<suite>] --search FILE [--ray [ADDRESS]] ...   # Ray Tune search
    python -m benchmarks report [--out DIR]

Suites (:mod:`benchmarks.catalog`): ``operators``, ``memory``, ``convergence``, ``jacobi``,
``latent`` (modules with ``run(quick, out, device)``), ``ct-sparse``, ``ablation``,
``restoration`` (case suites run here), and ``all``. Without ``--out`` results go to
:func:`benchmarks.settings.default_out`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from benchmarks.cases import Case, canonical, case_id
from benchmarks.catalog import CASE_SUITES, EXTERNAL_SUITES, SUITES, import_suite
from benchmarks.execution import RunSummary, environment, run_cases
from benchmarks.report import render
from benchmarks.settings import (apply_settings, check_device, default_out, load_settings,
                                 set_threads)
from benchmarks.store import ResultStore, StoreLockedError
from benchmarks.suites.common import SuiteContext
from benchmarks.suites.grid import tune_suite
from benchmarks.suites.remote import ray_outcomes
from benchmarks.suites.worker import isolated_execute
from ctflow.distributed import RAY_ARGUMENTS, ray_options_from

__all__ = ["run_suite", "main", "Case", "case_id", "ResultStore", "StoreLockedError",
           "run_cases", "load_settings", "apply_settings", "SUITES", "CASE_SUITES",
           "EXTERNAL_SUITES"]


def run_suite(name: str, *, quick: bool = False, out=None, device: str = "cpu", seed: int = 0,
              prior=None, progress: bool = False, tune: bool = False, limit: Optional[int] = None,
              after_case: Optional[Callable[[int], None]] = None,
              command: Optional[str] = None,
              isolate: Optional[bool] = None, ray=None,
              settings=None) -> Optional[RunSummary]:
    """Run one suite (a case suite through the store, or an external module's ``run``).

    ``prior`` is a ``FlowPrior``, a name/path for ``ctflow.load_prior``, or ``None`` for the
    suite's default (``"ct64"``). ``tune=True`` runs the suite's validation grid instead and
    writes the chosen hyper-parameters to ``benchmarks/configs/<suite>.json``
    (:mod:`benchmarks.suites.grid`).
    ``limit`` runs only the first ``limit`` cases (smoke runs). ``command`` (the command line
    that started the run) is recorded in every row. ``isolate`` runs every case in a fresh
    process (:mod:`benchmarks.suites.worker`) so that CPU peak-memory measurements do not
    depend on earlier cases; default: on for full CPU runs with a prior given by name/path,
    off for ``quick`` runs, CUDA (``max_memory_allocated`` is reset per solve) and tuning.
    ``ray`` (an address, ``True`` or a ``ctflow.distributed.RayOptions``) runs the cases as
    Ray tasks (default off; not with ``isolate``: a Ray worker serves many cases, so CPU peak
    memory then depends on earlier cases as with ``--no-isolate``). ``settings`` (a file
    written by ``tune``) overlays tuned options on the suite's config for this run.
    """
    out = Path(out) if out is not None else default_out(quick)
    out.mkdir(parents=True, exist_ok=True)
    ray_opts = None
    if ray is not None and ray is not False:
        from ctflow.distributed import as_ray_options, check_installed
        ray_opts = as_ray_options(ray)
        check_installed()
    check_device(device, on_ray=ray_opts is not None)
    module = import_suite(name)
    if name in EXTERNAL_SUITES:
        if tune:
            raise ValueError(f"suite {name!r} has no hyper-parameters to tune")
        if ray_opts is not None:
            raise ValueError(f"suite {name!r} measures timings and memory on this machine; "
                             f"--ray applies to the case suites ({', '.join(CASE_SUITES)})")
        if settings is not None:
            raise ValueError(f"suite {name!r} takes no tuned settings")
        if not hasattr(module, "run"):
            raise AttributeError(f"{module.__name__} has no run(quick, out, device)")
        module.run(quick=quick, out=out, device=device)
        return None

    by_name = prior is None or isinstance(prior, (str, Path))
    if isolate and ray_opts is not None:
        raise ValueError("--isolate and --ray exclude each other: Ray tasks run in long-lived "
                         "worker processes")
    if isolate is None:
        isolate = (not quick) and (not tune) and device == "cpu" and by_name \
            and ray_opts is None
    if isolate and not by_name:
        raise ValueError("isolate=True needs the prior as a bundled name or checkpoint path "
                         "(a worker process loads it), not a FlowPrior object")
    ctx = SuiteContext(suite=name, quick=quick, device=device, seed=seed, prior=prior,
                       progress=progress, load_prior=not isolate and ray_opts is None)
    if settings is not None:
        if tune:
            raise ValueError("tune starts from the suite's config; --settings applies to runs")
        apply_settings(ctx, settings)
    outcomes = None
    if ray_opts is not None:
        outcomes = ray_outcomes({"suite": name, "quick": bool(quick), "device": device,
                                 "seed": int(seed), "prior": prior}, ray_opts)
    if tune:
        return tune_suite(module, ctx, out=out, after_case=after_case, outcomes=outcomes)
    cases = module.cases(ctx)
    if limit is not None:
        cases = cases[:int(limit)]
    store = ResultStore(out / f"{name}.jsonl")
    if isolate:
        spec = {"suite": name, "quick": bool(quick), "device": device, "seed": int(seed),
                "prior": str(prior) if prior is not None else None}

        def execute(case: Case) -> dict:
            return isolated_execute(spec, case)
    else:
        execute = ctx.execute
    summary = run_cases(cases, execute, store, env=environment(device),
                        extra={"quick": bool(quick), "config": ctx.config_label(),
                               "command": command or _default_command(name, quick, device,
                                                                      seed, prior)},
                        progress=progress, after_case=after_case, outcomes=outcomes)
    return summary


def _default_command(name: str, quick: bool, device: str, seed: int, prior) -> str:
    parts = ["python -m benchmarks", name]
    if quick:
        parts.append("--quick")
    if device != "cpu":
        parts.append(f"--device {device}")
    if seed:
        parts.append(f"--seed {seed}")
    if isinstance(prior, (str, Path)):
        parts.append(f"--prior {prior}")
    elif prior is not None:
        parts.append(f"(prior object {getattr(prior, 'name', type(prior).__name__)!r})")
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# command line
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="ctflow benchmark suites (the MS-Flow paper's experiments). Results are "
                    "appended as JSON lines to <out>/<suite>.jsonl; reruns skip finished cases.")
    p.add_argument("suite", help="a suite (" + ", ".join(SUITES) + "), 'all', "
                   "'tune' (then the suite to tune follows) or 'report'")
    p.add_argument("target", nargs="?", default=None,
                   help="for 'tune': the suite whose hyper-parameters to tune")
    p.add_argument("--quick", action="store_true", help="tiny settings (minutes on a CPU)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--out", default=None, help="result folder (default: benchmarks/results "
                   "for a full run from the repository root, else ./bench-results; "
                   "<that>/quick with --quick)")
    p.add_argument("--seed", type=int, default=0, help="base seed of noise draws and solvers")
    p.add_argument("--prior", default=None, help="bundled prior name or checkpoint path "
                   "(default: ct64)")
    p.add_argument("--limit", type=int, default=None, help="run only the first LIMIT cases")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (also passed to worker processes); default: torch's")
    p.add_argument("--list", action="store_true", help="list the cases and whether each is "
                   "stored, run nothing")
    p.add_argument("--progress", dest="progress", action="store_true", default=True,
                   help="show a progress bar (default)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="run every case in a fresh process (default for full CPU runs: clean "
                        "peak-memory measurements)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="run every case in this process (faster; CPU peak memory then "
                        "depends on earlier cases)")
    p.add_argument("--no-report", action="store_true",
                   help="do not render the report after a suite finishes")
    g = p.add_argument_group("scale-out (optional extra ctflow[ray])")
    for flags, kw in RAY_ARGUMENTS:
        g.add_argument(*flags, **{**kw, "help": kw["help"].format(what="cases")})
    g.add_argument("--settings", default=None, metavar="FILE",
                   help="tuned options (a file written by 'tune') laid over the suite's "
                        "config for this run")
    g = p.add_argument_group("tune with Ray Tune ('tune [SUITE] --search FILE')")
    g.add_argument("--search", default=None, metavar="FILE",
                   help="search space (JSON: suite, method, space, num_samples, ...); see "
                        "docs/scaling.md")
    g.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="trials (default: the search file's num_samples)")
    g.add_argument("--settings-out", default=None, metavar="FILE",
                   help="where the best settings go (default: configs/<suite>.json, or "
                        "<out>/tune-<suite>.chosen.json with --quick)")
    return p


def _ray_options(args):
    """``RayOptions`` from ``--ray``/``--ray-retries``/``--ray-threads`` (``None`` without
    ``--ray``)."""
    return ray_options_from(args.ray, retries=args.ray_retries, threads=args.ray_threads,
                            quiet=not args.progress)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks`` and ``ctflow bench``; returns the exit code."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    args = _parser().parse_args(argv)
    command = "python -m benchmarks " + " ".join(argv)
    if args.threads is not None:
        try:
            set_threads(args.threads)
        except ValueError as exc:
            print(exc, file=sys.stderr)
            return 2
    out = Path(args.out) if args.out else default_out(args.quick)

    if args.suite == "report":
        written = render(out)
        for path in written:
            print(path)
        if not written:
            print(f"no results found in {out}", file=sys.stderr)
            return 1
        return 0

    if args.suite == "tune" and args.search is not None:
        from benchmarks.suites.tuning import ray_tune_main

        return ray_tune_main(args, out, _ray_options(args))

    if args.suite == "tune":
        if args.target not in CASE_SUITES:
            print(f"tune: give a suite to tune, one of {', '.join(CASE_SUITES)} "
                  f"(got {args.target!r})", file=sys.stderr)
            return 2
        summary = run_suite(args.target, quick=args.quick, out=out, device=args.device,
                            seed=args.seed, prior=args.prior, progress=args.progress, tune=True,
                            ray=_ray_options(args))
        print(summary.line(f"tune-{args.target}"))
        for path in render(out, suites=[args.target]):
            print(path)
        return 1 if summary.failed else 0

    if args.target is not None:
        print(f"unexpected argument {args.target!r}", file=sys.stderr)
        return 2
    names = SUITES if args.suite == "all" else (args.suite,)
    for n in names:
        if n not in SUITES:
            print(f"unknown suite {n!r}; choose one of {', '.join(SUITES)}, all, tune, report",
                  file=sys.stderr)
            return 2
    if args.settings is not None and args.suite not in CASE_SUITES:
        print(f"--settings applies to one case suite ({', '.join(CASE_SUITES)}), not "
              f"{args.suite!r}", file=sys.stderr)
        return 2

    if args.list:
        return _list_cases(names, args, out)

    failed = 0
    for n in names:
        t0 = time.perf_counter()
        summary = run_suite(n, quick=args.quick, out=out, device=args.device, seed=args.seed,
                            prior=args.prior, progress=args.progress, limit=args.limit,
                            command=command, isolate=args.isolate,
                            ray=_ray_options(args) if n in CASE_SUITES else None,
                            settings=args.settings)
        if summary is None:
            print(f"{n}: done in {time.perf_counter() - t0:.1f} s -> {out}")
        else:
            print(summary.line(n))
            failed += len(summary.failed)
    if not args.no_report:
        for path in render(out, suites=[n for n in names if n in CASE_SUITES]):
            print(path)
    if failed:
        print(f"{failed} case(s) failed; their rows carry status 'error' and the message "
              f"(rerun to retry them)", file=sys.stderr)
        return 1
    return 0


def _list_cases(names: Iterable[str], args, out: Path) -> int:
    for n in names:
        if n not in CASE_SUITES:
            print(f"{n}: external suite ({EXTERNAL_SUITES[n]}.run)")
            continue
        module = import_suite(n)
        ctx = SuiteContext(suite=n, quick=args.quick, device=args.device, seed=args.seed,
                           prior=args.prior, progress=False, load_prior=False)
        if args.settings is not None:
            apply_settings(ctx, args.settings)
        cases = module.cases(ctx)
        done = ResultStore(out / f"{n}.jsonl").done_ids()
        print(f"{n}: {len(cases)} cases, {sum(c.id in done for c in cases)} stored")
        for c in cases:
            mark = "done" if c.id in done else "pending"
            print(f"  {mark} {c.id} {c.method:8s} {c.image} {canonical(c.labels)}")
    return 0
