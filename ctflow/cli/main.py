"""The ``ctflow`` command line.

::

    ctflow [--device D] [--seed N] [--threads N] [--quiet] [--debug] COMMAND ...

    demo               the offline demo (FBP, TV, D-Flow, MS-Flow on a held-out CT slice)
    reconstruct        reconstruct a sinogram or image file (.npy, .h5, DICOM)
    reconstruct-dicom  reconstruct a DICOM series slice by slice into a derived series
    train              train a flow-matching prior (delegates to ctflow.training.prior)
    bench              run the benchmark suite (delegates to benchmarks/, run from the repo root)
    tune               search solver hyper-parameters with Ray Tune on the validation split
    info               versions, CUDA, CT backends usable here and why not, bundled priors

``reconstruct-dicom --ray [ADDRESS]`` and ``bench ... --ray [ADDRESS]`` run slices / benchmark
cases as Ray tasks (optional extra ``ctflow[ray]``; Ray is imported only then).

Global options may be given before or after the command. ``--threads N`` sets torch's CPU
threads (``torch.set_num_threads``) for every command; by default torch chooses (one per
core), and on a small, busy machine fewer threads are often much faster. Errors a user can cause (a missing
file, an unreadable DICOM, an unknown method, CUDA requested but absent, a prior that is not
found) print one line ``ctflow: error: ...`` to stderr and exit with status 2; ``--debug``
prints the traceback as well. Unexpected failures exit with status 1.
"""
from __future__ import annotations

import argparse
import importlib
import json
import random
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

__all__ = ["main", "build_parser", "CLIError", "parse_slices", "parse_options", "METHODS",
           "add_ray_arguments", "set_threads"]

#: Methods ``reconstruct`` accepts (``ctflow.solvers.api`` may know more; it is asked first).
METHODS = ("msflow", "dflow", "pnpflow", "otode", "fbp", "tv", "cgls")
#: Methods that need no prior.
CLASSICAL_METHODS = ("fbp", "tv", "cgls")

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


# ---------------------------------------------------------------------- small helpers
def _echo(args, msg: str) -> None:
    """Informational message on stderr, silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    """The exception as one line (multi-line messages are joined with ' | ')."""
    if isinstance(exc, KeyError) and exc.args:
        msg = str(exc.args[0])
    else:
        msg = str(exc)
    parts = [p.strip() for p in msg.splitlines() if p.strip()]
    msg = " | ".join(parts) if parts else type(exc).__name__
    if isinstance(exc, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                        PermissionError, FileExistsError)) and exc.filename and \
            str(exc.filename) not in msg:
        msg = f"{msg}: {exc.filename}"
    return msg


def _user_error_types() -> tuple:
    types: List[type] = [CLIError, ValueError, KeyError, OSError, ImportError, LookupError]
    try:
        from pydicom.errors import InvalidDicomError
        types.append(InvalidDicomError)
    except ImportError:  # pragma: no cover - pydicom is a core dependency
        pass
    return tuple(types)


def parse_slices(text: Optional[str]) -> Optional[slice]:
    """``"START:STOP"`` (either may be empty; Python slice semantics, 0-based, STOP exclusive)
    or a single index ``"K"`` → :class:`slice`; ``None`` → ``None``."""
    if text is None:
        return None
    s = str(text).strip()
    try:
        if ":" in s:
            a, b = s.split(":", 1)
            start = int(a) if a.strip() else None
            stop = int(b) if b.strip() else None
            return slice(start, stop)
        k = int(s)
    except ValueError:
        raise CLIError(f"--slices {text!r}: expected START:STOP (e.g. 10:20) or one index") \
            from None
    return slice(k, k + 1 if k != -1 else None)


def parse_options(items: Optional[Sequence[str]]) -> Dict[str, Any]:
    """``["key=value", ...]`` → dict; values are parsed as JSON when they parse
    (numbers, true/false, lists), otherwise kept as strings."""
    out: Dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise CLIError(f"--option {item!r}: expected KEY=VALUE (e.g. --option sweeps=20)")
        key, value = item.split("=", 1)
        key = key.strip().replace("-", "_")
        if not key.isidentifier():
            raise CLIError(f"--option {item!r}: {key!r} is not a valid option name")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _known_methods() -> tuple:
    try:
        api = importlib.import_module("ctflow.solvers.api")
    except ImportError:
        return METHODS
    for name in ("METHODS", "methods", "available_methods", "list_methods"):
        val = getattr(api, name, None)
        if val is None:
            continue
        val = val() if callable(val) else val
        try:
            names = tuple(str(m) for m in val)
        except TypeError:
            continue
        if names:
            return names
    return METHODS


def check_method(method: str) -> str:
    """Lower-case ``method`` and check it is one ``reconstruct`` knows (CLIError otherwise)."""
    m = str(method).strip().lower().replace("-", "").replace("_", "")
    known = _known_methods()
    if m not in known:
        raise CLIError(f"unknown method {method!r}; choose one of: {', '.join(known)}")
    return m


def set_threads(threads: Optional[int]) -> None:
    """``torch.set_num_threads(threads)``; ``None`` leaves torch's default (one thread per
    core). ``CLIError`` for a number below 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CLIError(f"--threads must be an integer >= 1, got {threads!r}")
    import torch

    torch.set_num_threads(threads)


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------- parser
class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made layout of descriptions/epilogs; show a default where there is a
    meaningful one (not None, False or empty) and the help text does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (d is argparse.SUPPRESS or d is None or d is False or d == [] or d == ""
                or "default" in text or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The global options. On sub-commands their defaults are suppressed so that a value
    given before the command is not overwritten by the sub-command's default."""
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = parser.add_argument_group("global options")
    g.add_argument("--device", default=d("auto"),
                   help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    g.add_argument("--seed", type=int, default=d(0), help="random seed (noise, initialisation)")
    g.add_argument("--threads", type=int, default=d(None), metavar="N",
                   help="torch CPU threads (torch.set_num_threads) for every command, "
                        "passed on to the benchmark runner's worker processes (Ray tasks: "
                        "--ray-threads); default: torch's choice, one per core. On a small "
                        "machine shared with other jobs 1 is often much faster")
    g.add_argument("--quiet", "-q", action="store_true", default=d(False),
                   help="no progress bars or informational messages")
    g.add_argument("--debug", action="store_true", default=d(False),
                   help="print the full traceback on errors")


MAIN_EPILOG = """\
examples:
  ctflow demo                                   # the offline demo -> ctflow-demo.png
  ctflow info                                   # what is usable on this machine
  ctflow reconstruct sino.npy -o recon.png --method tv
  ctflow reconstruct-dicom series/ out/ --views 60 --method msflow --slices 10:20
  ctflow reconstruct-dicom series/ out/ --ray   # slices as Ray tasks (ctflow[ray])
  ctflow --device cpu bench --help              # the benchmark suite (from the repo root)
  ctflow --threads 1 reconstruct-dicom series/ out/   # one torch thread (busy machines)
  ctflow tune search.json --quick               # Ray Tune search (from the repo root)
  ctflow train --help                           # train a prior

Run 'ctflow COMMAND --help' for the options of one command.
"""

DEMO_EPILOG = """\
The demo is offline: it uses the bundled prior 'ct64' and a bundled held-out CT slice
(COVID-19-NY-SBU, test split; the citation is printed). Parallel beam, 60 views, 1% noise,
64x64; FBP, TV, D-Flow and MS-Flow. It prints a table (PSNR, SSIM, seconds, NFE, peak memory)
and writes a figure.

examples:
  ctflow demo
  ctflow demo --out figures/demo.png --device cuda
  ctflow demo --quick                      # a few iterations only (smoke test)
"""

RECON_EPILOG = """\
Input kinds:
  sinogram   a 2-D array (views, detectors) or a stack (Z, views, detectors) of line
             integrals of an image in [0, 1] (the geometry convention of ctflow.operators.ct:
             the image covers [-1, 1]^2); views = the array's row count
  image      a 2-D array (H, W) in [0, 1] (or a stack (Z, H, W)), or DICOM (a file or a
             series folder, windowed with the prior's HU window): the sparse-view measurement
             is simulated (--views, --noise-level) and PSNR/SSIM against it are reported
  auto       DICOM -> image; arrays: square last two axes -> image, otherwise sinogram

Output by extension: .npy (float32 reconstruction in [0, 1]), .h5/.hdf5 (datasets
'reconstruction', 'measurement' and, for image inputs, 'ground_truth', plus attributes
with the settings and metrics), .png (8-bit grayscale; stacks side by side).

examples:
  ctflow reconstruct sino.npy -o recon.npy --method fbp
  ctflow reconstruct phantom.npy -o recon.png --views 30 --noise-level 0.02 --method tv
  ctflow reconstruct scan.h5 --dataset sinogram -o recon.h5 --method msflow --prior ct64
  ctflow reconstruct slice.dcm -o slice.png --method msflow --option sweeps=20
"""

DICOM_EPILOG = """\
For each slice of the series in IN_DIR: clip HU to [-1024, 3071], window with the prior's HU
window into [0, 1] (HU outside the window are clipped and do not come back), resize to the
working size, simulate a sparse-view measurement (seeded per slice) or take it from
--sinogram, reconstruct, map back to HU at the original matrix size and write a derived DICOM
slice to OUT_DIR. OUT_DIR also receives summary.json (settings, per-slice PSNR/SSIM against
the windowed, resized input, means, versions, timing) and montage.png. Inputs are never
modified; OUT_DIR must differ from IN_DIR; existing outputs are never overwritten.

examples:
  ctflow reconstruct-dicom chest/ chest-msflow/ --slices 20:30 --views 60 --size 64
  ctflow reconstruct-dicom chest/ chest-fbp/ --method fbp --prior none --size 128
  ctflow reconstruct-dicom chest/ chest-msflow/ --resume      # continue after a stop
  ctflow reconstruct-dicom chest/ out/ --sinogram measured.npy --method tv
  ctflow reconstruct-dicom chest/ out/ --ray              # a private local Ray instance
  ctflow reconstruct-dicom chest/ out/ --ray auto --resume   # the cluster of 'ray start'

With --ray each slice is a Ray task (one CPU; one GPU when the cluster has GPUs and --device
is not cpu; one torch thread). This process writes every finished slice, atomically and keyed
by its SOPInstanceUID, so a task re-run after its worker died is written once, and --resume
works as without Ray. The reconstructions equal the in-process ones (same seeds).
"""

TRAIN_EPILOG = """\
All arguments after 'train' are passed to the trainer (ctflow.training.prior); run
'ctflow train --help' for its options.
"""

BENCH_EPILOG = """\
All arguments after 'bench' are passed to the benchmark runner (the benchmarks/ folder of
the repository, which is not installed: run from the repository root). Global options given
before 'bench' (--device, --seed, --threads, --quiet) are passed on too. Run 'ctflow bench --help' for
the suites and their options.

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

INFO_EPILOG = """\
examples:
  ctflow info
  ctflow info --json > env.json
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ctflow`` command."""
    parser = argparse.ArgumentParser(
        prog="ctflow", formatter_class=_Formatter, epilog=MAIN_EPILOG,
        description="CT reconstruction with flow-matching priors (MS-Flow: trajectory "
                    "stitching).")
    try:
        from ctflow._version import __version__
    except ImportError:  # pragma: no cover
        __version__ = "unknown"
    parser.add_argument("--version", action="version", version=f"ctflow {__version__}")
    _global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, epilog: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                           formatter_class=_Formatter, **kw)
        if kw.get("add_help", True):
            _global_options(p, suppress=True)
        return p

    # demo
    p = add("demo", "the offline demo: FBP, TV, D-Flow and MS-Flow on a held-out CT slice",
            DEMO_EPILOG)
    p.add_argument("--out", "-o", default="ctflow-demo.png", help="figure to write")
    p.add_argument("--quick", action="store_true",
                   help="few iterations only (a smoke test, not representative numbers)")
    p.add_argument("--methods", default=None,
                   help="comma-separated subset of fbp,tv,dflow,msflow (default: all usable)")
    p.set_defaults(func=cmd_demo)

    # reconstruct
    p = add("reconstruct", "reconstruct a sinogram or image file (.npy, .h5, DICOM)",
            RECON_EPILOG)
    p.add_argument("input", help="a .npy, .h5/.hdf5 file, a DICOM file or a DICOM series folder")
    p.add_argument("--output", "-o", required=True, help="output file: .npy, .h5/.hdf5 or .png")
    p.add_argument("--kind", choices=("auto", "sinogram", "image"), default="auto",
                   help="what the input holds")
    p.add_argument("--dataset", default=None,
                   help="HDF5 dataset name (default: the only dataset, or 'sinogram'/'image')")
    _solver_options(p)
    p.add_argument("--slice", type=int, default=None,
                   help="DICOM series input: reconstruct only this slice index (0-based, "
                        "in anatomical order); default: every slice")
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="window HU inputs with this range (default: the prior's hu_window)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.set_defaults(func=cmd_reconstruct)

    # reconstruct-dicom
    p = add("reconstruct-dicom", "reconstruct a DICOM series slice by slice into a derived "
            "DICOM series", DICOM_EPILOG)
    p.add_argument("in_dir", metavar="IN_DIR", help="folder holding one CT series")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder for the derived series "
                   "(created; must differ from IN_DIR)")
    _solver_options(p)
    p.add_argument("--slices", default=None, metavar="START:STOP",
                   help="slice range, 0-based in anatomical order, STOP exclusive (e.g. 10:20)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: skip slices whose output exists")
    p.add_argument("--sinogram", default=None, metavar="FILE",
                   help="measured sinograms (.npy/.h5, shape (Z, views, detectors)) instead "
                        "of simulating them")
    add_ray_arguments(p, "slices")
    p.set_defaults(func=cmd_reconstruct_dicom)

    # train / bench: pass everything through
    p = add("train", "train a flow-matching prior (delegates to ctflow.training.prior)",
            TRAIN_EPILOG, add_help=False, prefix_chars="\x00")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)
    p = add("bench", "run the benchmark suite (from the repository root)", BENCH_EPILOG,
            add_help=False, prefix_chars="\x00")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    # tune
    p = add("tune", "search solver hyper-parameters with Ray Tune on the validation split "
            "(from the repository root)", TUNE_EPILOG)
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
                   help="result folder (default: benchmarks/results, or .../quick)")
    p.add_argument("--settings-out", default=None, metavar="FILE",
                   help="write the best settings here instead of the suite's config")
    add_ray_arguments(p, "trials")
    p.set_defaults(func=cmd_tune)

    # info
    p = add("info", "versions, CUDA, CT backends usable here and why not, bundled priors",
            INFO_EPILOG)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)
    return parser


def _solver_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("measurement and solver")
    g.add_argument("--method", "-m", default="msflow",
                   help="msflow, dflow, pnpflow, otode, fbp, tv or cgls")
    g.add_argument("--prior", default=None,
                   help="a bundled prior name, a checkpoint path, or 'none' (default: 'ct64'; "
                        "for fbp/tv/cgls 'ct64' if bundled, for its HU window and size)")
    g.add_argument("--views", type=int, default=60, help="number of projection angles")
    g.add_argument("--geometry", choices=("parallel", "fan"), default="parallel",
                   help="beam geometry")
    g.add_argument("--noise-level", type=float, default=0.01,
                   help="relative Gaussian noise: sigma = level * RMS(Ax) (0.01 = 1%%)")
    g.add_argument("--size", type=int, default=None,
                   help="working image size (default: the prior's image_size; for fbp/tv/cgls "
                        "without a prior, an array image's own size or the size a sinogram's "
                        "detector count implies)")
    g.add_argument("--backend", default="torch", help="CT backend: torch, odl or tomosipo")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option passed to ctflow.reconstruct (repeatable), "
                        "e.g. --option sweeps=20")


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    """Add the scale-out group (``--ray [ADDRESS]``, ``--ray-retries``, ``--ray-threads``) to
    ``p``, its help naming ``what`` runs as Ray tasks; returns the group (the benchmark
    runner adds its own options to it)."""
    g = p.add_argument_group("scale-out (optional extra ctflow[ray])")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help=f"run the {what} as Ray tasks: without ADDRESS on a private local "
                        "instance (loopback only, every core); 'auto' joins the cluster of "
                        "'ray start' on this machine; HOST:PORT or ray://HOST:PORT a remote one")
    g.add_argument("--ray-retries", type=int, default=3, metavar="N",
                   help="re-runs of a task whose worker process died")
    g.add_argument("--ray-threads", type=int, default=1, metavar="T",
                   help="torch threads inside each task")
    return g


def _ray_settings(args):
    """``RayOptions`` from the command's --ray options, or ``None`` without --ray."""
    if getattr(args, "ray", None) is None:
        return None
    from ctflow.distributed.cluster import RayOptions

    if args.ray_retries < 0:
        raise CLIError(f"--ray-retries must be >= 0, got {args.ray_retries}")
    if args.ray_threads < 1:
        raise CLIError(f"--ray-threads must be >= 1, got {args.ray_threads}")
    return RayOptions(address=None if args.ray == "local" else args.ray,
                      max_retries=args.ray_retries, threads=args.ray_threads,
                      quiet=bool(args.quiet))


# ---------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    from ctflow.tasks.info import format_info, info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        print(format_info(data))
    return 0


def cmd_demo(args) -> int:
    from ctflow.tasks.demo import DEMO_METHODS, run_demo

    methods = None
    if args.methods:
        methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in DEMO_METHODS]
        if bad:
            raise CLIError(f"--methods: unknown demo method(s) {bad}; choose from "
                           f"{', '.join(DEMO_METHODS)}")
    if getattr(args, "threads", None) is None:
        from ctflow.tasks.info import resolve_device
        if torch_device_type(resolve_device(args.device)) == "cpu":
            # the demo's 64x64 solves are fastest single-threaded, and a torch thread pool on a
            # small CPU shared with other jobs made them up to ~100x slower (--threads overrides)
            import torch
            torch.set_num_threads(1)
    run_demo(out=args.out, device=args.device, quick=args.quick, progress=not args.quiet,
             seed=args.seed, methods=methods, verbose=True)
    return 0


def torch_device_type(device) -> str:
    """``"cpu"``/``"cuda"`` of a device given as a ``torch.device`` or a string."""
    return getattr(device, "type", None) or str(device).split(":")[0]


def cmd_reconstruct_dicom(args) -> int:
    from ctflow.tasks.series import reconstruct_dicom

    method = check_method(args.method)
    options = parse_options(args.option)
    import inspect
    own = set(inspect.signature(reconstruct_dicom).parameters) - {"options"}
    clash = sorted(set(options) & own)
    if clash:
        raise CLIError(f"--option {clash[0]}=...: set it with the command's own option "
                       f"--{clash[0].replace('_', '-')}")
    ray = _ray_settings(args)
    summary = reconstruct_dicom(
        args.in_dir, args.out_dir, views=args.views, geometry=args.geometry,
        noise_level=args.noise_level, method=method, prior=_default_prior(method, args.prior),
        size=args.size, slices=parse_slices(args.slices),
        device=args.device if ray is None else getattr(args, "device_requested", args.device),
        resume=args.resume, seed=args.seed, progress=not args.quiet, sinogram=args.sinogram,
        backend=args.backend, ray=ray, **options)
    m = summary.get("mean", {})
    done, skipped = summary.get("slices_reconstructed", 0), summary.get("slices_skipped", 0)
    line = f"{done} slice(s) reconstructed, {skipped} skipped (resume) -> {args.out_dir}"
    if m.get("psnr") is not None:
        line += f"; mean PSNR {m['psnr']:.2f} dB, SSIM {m['ssim']:.3f}"
    print(line)
    return 0


def _prior_arg(text: Optional[str]):
    if text is None or str(text).strip().lower() in ("none", ""):
        return None
    return text


def _default_prior(method: str, given: Optional[str]) -> Optional[str]:
    """The prior to use: ``--prior`` if given ('none' → no prior); otherwise 'ct64' for the
    flow methods, and for the classical ones 'ct64' when it is bundled here (its HU window and
    size keep results comparable across methods), else none."""
    if given is not None:
        return _prior_arg(given)
    if method not in CLASSICAL_METHODS:
        return "ct64"
    try:
        from ctflow.priors.registry import list_priors
        return "ct64" if "ct64" in list_priors() else None
    except Exception:  # noqa: BLE001 - no registry: the classical methods need no prior
        return None


OUTPUT_SUFFIXES = (".npy", ".h5", ".hdf5", ".png")


def _load_reconstruct_input(args, path: Path):
    """→ (kind, float32 array (Z, a, b), hu_source) for ``ctflow reconstruct``."""
    import numpy as np

    from ctflow.tasks.series import read_h5_array, slice_stack

    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise CLIError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") \
                from None
        source = "array"
    elif suffix in (".h5", ".hdf5"):
        arr = read_h5_array(path, args.dataset,
                            preferred=("sinogram", "observation", "image", "ground_truth",
                                       "data"))
        source = "array"
    else:
        from ctflow.data import read_dicom_series, read_dicom_slices

        if path.is_dir():
            vol = read_dicom_series(path)
            arr = vol.numpy()
            if args.slice is not None:
                if not -len(vol) <= args.slice < len(vol):
                    raise CLIError(f"--slice {args.slice}: the series has {len(vol)} slices")
                arr = arr[args.slice:args.slice + 1] if args.slice != -1 else arr[-1:]
        else:
            arr = np.stack([s.hu for s in read_dicom_slices([path])])
        source = "dicom"
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise CLIError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    arr = slice_stack(arr, path, what="input array", axes="rows, columns")
    kind = args.kind
    if source == "dicom":
        if kind == "sinogram":
            raise CLIError(f"{path}: a DICOM input is an image, not a sinogram")
        kind = "image"
    elif kind == "auto":
        kind = "image" if arr.shape[-1] == arr.shape[-2] else "sinogram"
    return kind, arr, source


def _atomic_save(out: Path, writer: Callable[[Path], None]) -> None:
    """``writer(tmp)`` on a temporary file with ``out``'s extension, renamed to ``out``."""
    from ctflow.data.atomic import atomic_save

    atomic_save(out, writer, suffix=out.suffix)


def _save_reconstruction(out: Path, recon, *, measurement, truth, attrs: Dict[str, Any]) -> None:
    import numpy as np

    suffix = out.suffix.lower()
    img = recon[0] if recon.shape[0] == 1 else recon
    if suffix == ".npy":
        _atomic_save(out, lambda p: np.save(p, img.astype(np.float32)))
    elif suffix in (".h5", ".hdf5"):
        import h5py

        def write(p: Path) -> None:
            with h5py.File(p, "w") as f:
                f.create_dataset("reconstruction", data=img.astype(np.float32))
                f.create_dataset("measurement", data=np.squeeze(measurement, 0)
                                 if measurement.shape[0] == 1 else measurement)
                if truth is not None:
                    f.create_dataset("ground_truth", data=truth[0] if truth.shape[0] == 1
                                     else truth)
                for k, v in attrs.items():
                    f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else \
                        ("" if v is None else v)
        _atomic_save(out, write)
    else:  # .png
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.image as mpimg

        tiles = [np.clip(r, 0, 1) for r in recon]
        gap = np.ones((tiles[0].shape[0], 2), dtype=np.float32)
        row = tiles[0]
        for t in tiles[1:]:
            row = np.concatenate([row, gap, t], axis=1)
        _atomic_save(out, lambda p: mpimg.imsave(p, row, cmap="gray", vmin=0.0, vmax=1.0,
                                                 format="png"))


def cmd_reconstruct(args) -> int:
    import numpy as np
    import torch

    from ctflow.tasks.series import (DEFAULT_HU_WINDOW, infer_size, make_ct_operator, relative_sigma,
                              resolve_prior, run_solver, simulate_measurement, slice_seed,
                              to_working_size)
    from ctflow.metrics import psnr, ssim

    method = check_method(args.method)
    path = Path(args.input)
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    out = Path(args.output)
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CLIError(f"--output {out}: the extension must be one of "
                       f"{', '.join(OUTPUT_SUFFIXES)}")
    if out.exists() and not args.overwrite:
        raise CLIError(f"--output {out} exists; pass --overwrite to replace it")
    if out.resolve() == path.resolve():
        raise CLIError(f"--output {out} is the input file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {out.parent}")
    prior_name = _default_prior(method, args.prior)
    if prior_name is None and method not in CLASSICAL_METHODS:
        raise CLIError(f"method {method!r} needs a prior; pass --prior NAME or PATH")
    kind, arr, source = _load_reconstruct_input(args, path)
    device = torch.device(args.device)
    prior = resolve_prior(prior_name, device=device) if prior_name else None
    options = parse_options(args.option)

    window = args.hu_window
    if source == "dicom" and window is None:
        window = getattr(prior, "hu_window", None) or DEFAULT_HU_WINDOW
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not lo < hi:
            raise CLIError(f"--hu-window {lo} {hi}: needs LO < HI")
        if kind == "sinogram":
            raise CLIError("--hu-window applies to image inputs, not sinograms")
        window = (lo, hi)
        arr = np.clip(arr, -1024.0, 3071.0)  # scanner padding -> air; windowed per slice below
    elif kind == "image" and (arr.min() < -0.05 or arr.max() > 1.05):
        raise CLIError(f"{path}: image values span [{arr.min():.4g}, {arr.max():.4g}], but "
                       "images must lie in [0, 1]; pass --hu-window LO HI for HU images")

    flow = method not in CLASSICAL_METHODS
    if args.size is not None:
        n = int(args.size)
    elif flow and prior is not None:
        n = int(prior.image_size)
    elif kind == "sinogram":
        n = infer_size(arr.shape[-2], arr.shape[-1], geometry=args.geometry)
    elif source == "dicom" and prior is not None:
        n = int(prior.image_size)  # as reconstruct-dicom: the prior's working size
    else:
        n = int(max(arr.shape[-2:]))
    if flow and prior is not None and n != prior.image_size:
        raise CLIError(f"working size {n} differs from the prior's image_size "
                       f"{prior.image_size}; flow priors reconstruct at their own size")
    views = int(arr.shape[-2]) if kind == "sinogram" else int(args.views)
    A = make_ct_operator(n, views, geometry=args.geometry, backend=args.backend, device=device)
    if kind == "sinogram" and tuple(arr.shape[-2:]) != tuple(A.range_shape[-2:]):
        raise CLIError(f"{path}: sinogram shape {tuple(arr.shape[-2:])} does not match the "
                       f"{args.geometry} geometry at size {n} with {views} views, which "
                       f"expects {tuple(A.range_shape[-2:])}; set --size or --geometry")

    recons, meas, truths, rows = [], [], [], []
    for z in range(arr.shape[0]):
        if kind == "image":
            # HU images: prepared exactly as the prior's training data (window, pad, resize).
            x = to_working_size(arr[z], n, hu_window=window).to(device).reshape(1, 1, n, n)
            gen = torch.Generator().manual_seed(slice_seed(args.seed, f"{path.name}:{z}"))
            y, sigma = simulate_measurement(A, x, args.noise_level, generator=gen)
            truths.append(x.reshape(n, n).cpu().numpy())
        else:
            y = torch.from_numpy(arr[z]).to(device).reshape(1, 1, *arr.shape[-2:])
            sigma = relative_sigma(y, args.noise_level)
            x = None
        opts = dict(options)
        solve_seed = int(opts.pop("seed", slice_seed(args.seed, f"solve:{z}") % 2**31))
        show = bool(opts.pop("progress", not args.quiet))
        torch.manual_seed(solve_seed)
        res = run_solver(y, A, prior, method=method, noise_level=float(sigma[0]),
                         seed=solve_seed, progress=show, **opts)
        img = res.image.detach().to("cpu", torch.float32).reshape(n, n).clamp(0, 1)
        row = {"index": z, "seconds": round(res.seconds, 3), "nfe": dict(res.nfe)}
        if x is not None:
            ref = x.reshape(n, n).cpu()
            row.update(psnr=float(psnr(img, ref)), ssim=float(ssim(img, ref)))
        rows.append(row)
        recons.append(img.numpy())
        meas.append(y.reshape(*y.shape[-2:]).cpu().numpy())
        if not args.quiet:
            extra = f", PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}" if "psnr" in row else ""
            _echo(args, f"[{z + 1}/{arr.shape[0]}] {method}: {row['seconds']:.2f} s{extra}")

    attrs = {"method": method, "prior": prior_name, "kind": kind, "views": views,
             "geometry": args.geometry, "noise_level": args.noise_level, "size": n,
             "seed": args.seed, "backend": args.backend, "options": options,
             "hu_window": list(window) if window is not None else None,
             "input": str(path), "metrics": rows}
    _save_reconstruction(out, np.stack(recons), measurement=np.stack(meas),
                         truth=np.stack(truths) if truths else None, attrs=attrs)
    line = f"wrote {out} ({len(recons)} image(s), {n}x{n}, {method})"
    if truths:
        line += (f"; PSNR {np.mean([r['psnr'] for r in rows]):.2f} dB, "
                 f"SSIM {np.mean([r['ssim'] for r in rows]):.3f}")
    print(line)
    return 0


def _call_entry(mod_names: Sequence[str], fn_names: Sequence[str], argv: List[str],
                what: str, hint: str) -> int:
    """Import the first module of ``mod_names`` that exists and call its entry point with
    ``argv``; ``SystemExit`` codes (argparse's --help) are returned as exit codes."""
    errors = []
    for mod_name in mod_names:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and (mod_name == exc.name or mod_name.startswith(exc.name + ".")):
                errors.append(f"{mod_name} not found")
                continue
            raise
        for fn_name in fn_names:
            fn = getattr(mod, fn_name, None)
            if callable(fn):
                try:
                    rc = fn(argv)
                except SystemExit as exc:
                    code = exc.code
                    return code if isinstance(code, int) else (0 if code is None else 1)
                return int(rc) if isinstance(rc, int) else 0
        errors.append(f"{mod_name} has no {'/'.join(fn_names)}(argv)")
    raise CLIError(f"{what} is not available here ({'; '.join(errors)}){hint}")


def _check_passed_device(rest: Sequence[str]) -> None:
    """Validate a ``--device`` given to a delegated runner (train, bench) before it starts, so
    that CUDA requested but absent is a one-line error there too."""
    from ctflow.tasks.info import resolve_device

    for i, a in enumerate(rest):
        value = None
        if a == "--device" and i + 1 < len(rest):
            value = rest[i + 1]
        elif a.startswith("--device="):
            value = a.split("=", 1)[1]
        if value is not None:
            resolve_device(value)


def cmd_train(args) -> int:
    _check_passed_device(args.rest)
    return _call_entry(["ctflow.training.prior", "ctflow.priors.train"],
                       ["train_main", "main", "cli"], list(args.rest), "ctflow train", "")


def _find_benchmarks_root() -> Optional[Path]:
    """The folder holding ``benchmarks/`` (the current directory or the source checkout
    an editable install points to), or ``None``."""
    candidates = [Path.cwd(), Path(__file__).resolve().parents[1]]
    for root in candidates:
        if any((root / "benchmarks" / f).is_file()
               for f in ("__init__.py", "__main__.py", "runner.py")):
            return root
    return None


def cmd_bench(args) -> int:
    root = _find_benchmarks_root()
    if root is None:
        raise CLIError("ctflow bench runs the benchmarks/ folder of the ctflow repository, "
                       "which is not installed: cd into a clone of the repository and rerun")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    rest = list(args.rest)
    _check_passed_device(rest)
    # Global options given before 'bench' go on to the runner unless given after it too.
    help_only = any(a in ("-h", "--help") for a in rest)
    if not help_only and rest:
        if args.device not in (None, "auto") and "--device" not in rest:
            from ctflow.tasks.info import resolve_device
            rest += ["--device", str(resolve_device(args.device))]
        if args.seed and "--seed" not in rest:
            rest += ["--seed", str(args.seed)]
        if args.threads is not None and "--threads" not in rest:
            rest += ["--threads", str(args.threads)]     # its worker processes too
        if args.quiet and "--no-progress" not in rest:
            rest.append("--no-progress")
    return _call_entry(["benchmarks.__main__", "benchmarks.runner", "benchmarks"],
                       ["main", "run_cli"], rest, "the benchmark runner",
                       f" (looked in {root / 'benchmarks'})")


def cmd_tune(args) -> int:
    """``ctflow tune``: the benchmark runner's Ray Tune search (``tune --search``)."""
    root = _find_benchmarks_root()
    if root is None:
        raise CLIError("ctflow tune runs the benchmarks/ folder of the ctflow repository, "
                       "which is not installed: cd into a clone of the repository and rerun")
    if not Path(args.search).is_file():
        raise FileNotFoundError(f"search file not found: {args.search}")
    if args.num_samples is not None and args.num_samples < 1:
        raise CLIError(f"--num-samples must be >= 1, got {args.num_samples}")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
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
    device = getattr(args, "device_requested", args.device)
    if device not in (None, "auto"):
        argv += ["--device", str(device)]
    if args.seed:
        argv += ["--seed", str(args.seed)]
    if args.threads is not None:
        argv += ["--threads", str(args.threads)]
    if args.quiet:
        argv.append("--no-progress")
    return _call_entry(["benchmarks.runner"], ["main"], argv, "the benchmark runner",
                       f" (looked in {root / 'benchmarks'})")


# ---------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ctflow`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (0 success, 2 a user error, 1 an unexpected failure)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    for key, default in (("device", "auto"), ("seed", 0), ("threads", None), ("quiet", False),
                         ("debug", False)):
        if not hasattr(args, key):
            setattr(args, key, default)
    try:
        args.device_requested = args.device
        # On Ray the tasks pick their device on their own node (which may have GPUs that
        # this machine lacks); every other command checks the device here.
        if args.command not in ("train", "bench", "info", "tune") and \
                getattr(args, "ray", None) is None:
            from ctflow.tasks.info import resolve_device
            args.device = str(resolve_device(args.device))
        set_threads(args.threads)
        _seed_everything(args.seed)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ctflow: interrupted", file=sys.stderr)
        return 130
    except _user_error_types() as exc:
        if args.debug:
            traceback.print_exc()
        print(f"ctflow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # an unexpected failure: one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"ctflow {args.command}: internal error ({type(exc).__name__}): {_one_line(exc)}"
              " (rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
