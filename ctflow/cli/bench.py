"""``ctflow bench`` and ``ctflow tune``: the benchmark runner of the repository.

The ``benchmarks/`` folder is not installed: it is found in the current directory or in the
source checkout an editable install points to, and imported from there (``sys.path``).
Results go where the runner puts them without ``--out`` (``benchmarks.settings.default_out``):
``benchmarks/results`` for a full run from the repository root, else ``./bench-results``
(``.../quick`` with ``--quick``) under the current directory -- never into an installed
source tree.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from ctflow.cli.common import CLIError, add_command, add_ray_arguments
from ctflow.tasks import resolve_device

__all__ = ["register", "cmd_bench", "cmd_tune", "find_benchmarks_root"]

BENCH_EPILOG = """\
All arguments after 'bench' are passed to the benchmark runner (the benchmarks/ folder of
the repository, which is not installed: run from the repository root). Global options given
before 'bench' (--device, --seed, --threads, --quiet) are passed on too. Results go to
benchmarks/results for a full run from the repository root, else ./bench-results under the
current directory (.../quick with --quick), unless --out is given. Run 'ctflow bench --help' for the suites and their options.

examples:
  ctflow bench ct-sparse --quick
  ctflow --device cuda bench memory
  ctflow bench ct-sparse --ray auto                  # cases as tasks on a Ray cluster
  ctflow bench ct-sparse --settings tuned.json       # tuned options from 'ctflow tune'
  ctflow bench report
"""

TUNE_EPILOG = """\
SEARCH is a JSON file: the suite and the method to tune, the ranges to search and the number
of trials, e.g.

  {"suite": "ct-sparse", "method": "msflow", "metric": "psnr", "num_samples": 16,
   "space": {"rho": {"loguniform": [10, 10000]}, "lam": {"uniform": [0.1, 2.0]},
             "K": {"choice": [4, 8]}, "M": {"choice": [1, 2]},
             "schedule": {"choice": ["constant", "continuation"]}},
   "fixed": {"sweeps": 10}}

(distributions: uniform, loguniform, quniform, randint, lograndint, choice, grid, value).
Each trial solves the VALIDATION slices (never the TEST slices) with the suite's options plus
'fixed' plus the sampled values; the best mean PSNR wins. It is written where the benchmark
suite reads it: benchmarks/configs/<suite>.json, or with --quick <out>/tune-<suite>.chosen.json
(--settings-out FILE: that file; run the suite on it with 'ctflow bench <suite> --settings
FILE'). Every solve is stored in <out>/tune-<suite>.jsonl. Runs from the repository root;
without --ray a private local Ray instance is started.

examples:
  ctflow tune search.json --quick --settings-out tuned.json
  ctflow --device cuda tune search.json --ray auto --num-samples 64
"""


def register(sub) -> None:
    """Add ``bench`` (everything after it goes to the runner) and ``tune``."""
    p = add_command(sub, "bench", "run the benchmark suite (from the repository root)",
                    BENCH_EPILOG, cmd_bench, add_help=False, prefix_chars="\x00")
    p.add_argument("rest", nargs=argparse.REMAINDER)

    p = add_command(sub, "tune", "search solver hyper-parameters with Ray Tune on the "
                    "validation split (from the repository root)", TUNE_EPILOG, cmd_tune)
    p.add_argument("search", metavar="SEARCH", help="the search file (JSON, see below)")
    p.add_argument("--suite", default=None,
                   help="the case suite (default: the search file's 'suite')")
    p.add_argument("--quick", action="store_true",
                   help="one validation slice, one problem, the suite's quick iteration counts")
    p.add_argument("--num-samples", type=int, default=None, metavar="N",
                   help="trials (default: the search file's num_samples)")
    p.add_argument("--prior", default=None, help="bundled prior name or checkpoint path "
                   "(default: the suite's, ct64)")
    p.add_argument("--out", default=None,
                   help="result folder (default: benchmarks/results for a full run from the "
                        "repository root, else ./bench-results; .../quick with --quick)")
    p.add_argument("--settings-out", default=None, metavar="FILE",
                   help="write the best settings here instead of the suite's config")
    add_ray_arguments(p, "trials")


def find_benchmarks_root() -> Optional[Path]:
    """The folder holding ``benchmarks/`` (the current directory or the source checkout
    an editable install points to), or ``None``."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if any((root / "benchmarks" / f).is_file()
               for f in ("__init__.py", "__main__.py", "runner.py")):
            return root
    return None


def _runner(what: str) -> Callable[[List[str]], int]:
    """``benchmarks.runner.main`` of the checkout (put on ``sys.path``)."""
    root = find_benchmarks_root()
    if root is None:
        raise CLIError(f"ctflow {what} runs the benchmarks/ folder of the ctflow repository, "
                       "which is not installed: cd into a clone of the repository and rerun")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        mod = importlib.import_module("benchmarks.runner")
    except ModuleNotFoundError as exc:
        if exc.name in ("benchmarks", "benchmarks.runner"):
            raise CLIError(f"the benchmark runner is not available here ({exc.name} not "
                           f"found in {root / 'benchmarks'})") from None
        raise
    return mod.main


def _call(main: Callable[[List[str]], int], argv: List[str]) -> int:
    """``main(argv)``; ``SystemExit`` codes (argparse's --help) are returned as exit codes."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return int(rc) if isinstance(rc, int) else 0


def _given(rest: Sequence[str], flag: str) -> Optional[str]:
    """The value of ``flag`` in a pass-through argument list (``--flag V`` or ``--flag=V``)."""
    for i, a in enumerate(rest):
        if a == flag and i + 1 < len(rest):
            return rest[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def cmd_bench(args) -> int:
    """Run the benchmark runner with the arguments after ``bench`` (see :data:`BENCH_EPILOG`)."""
    main = _runner("bench")
    rest = list(args.rest)
    passed = _given(rest, "--device")
    if passed is not None:
        resolve_device(passed)   # CUDA requested but absent: a one-line error before it starts
    help_only = any(a in ("-h", "--help") for a in rest)
    if not help_only and rest:
        # Global options given before 'bench' go on to the runner unless given after it too.
        if args.device not in (None, "auto") and passed is None:
            rest += ["--device", str(resolve_device(args.device))]
        if args.seed and _given(rest, "--seed") is None:
            rest += ["--seed", str(args.seed)]
        if args.threads is not None and _given(rest, "--threads") is None:
            rest += ["--threads", str(args.threads)]     # its worker processes too
        if args.quiet and "--no-progress" not in rest:
            rest.append("--no-progress")
    return _call(main, rest)


def cmd_tune(args) -> int:
    """``ctflow tune``: the benchmark runner's Ray Tune search (``tune --search``)."""
    main = _runner("tune")
    if not Path(args.search).is_file():
        raise FileNotFoundError(f"search file not found: {args.search}")
    if args.num_samples is not None and args.num_samples < 1:
        raise CLIError(f"--num-samples must be >= 1, got {args.num_samples}")
    argv = ["tune"] + ([args.suite] if args.suite else []) + ["--search", str(args.search)]
    if args.quick:
        argv.append("--quick")
    for flag, value in (("--num-samples", args.num_samples), ("--prior", args.prior),
                        ("--out", args.out), ("--settings-out", args.settings_out)):
        if value is not None:
            argv += [flag, str(value)]
    if args.ray is not None:
        argv += ["--ray", args.ray, "--ray-retries", str(args.ray_retries),
                 "--ray-threads", str(args.ray_threads)]
    if args.device_requested not in (None, "auto"):
        argv += ["--device", str(args.device_requested)]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.quiet:
        argv.append("--no-progress")
    return _call(main, argv)
