"""The ``ctflow`` command line: the parser, the global options and the error handling.

::

    ctflow [--device D] [--seed N] [--threads N] [--quiet] [--debug] COMMAND ...

    demo               the offline demo (FBP, TV, D-Flow, MS-Flow on a held-out CT slice)
    reconstruct        reconstruct a sinogram or image file (.npy, .h5, DICOM)
    reconstruct-dicom  reconstruct a DICOM series slice by slice into a derived series
    train              train a flow-matching prior or a latent prior, or bundle one
    evaluate-prior     compare a prior's samples with held-out CT slices
    bench              run the benchmark suite (delegates to benchmarks/, run from the repo root)
    tune               search solver hyper-parameters with Ray Tune on the validation split
    throughput         reconstruct-dicom slices per second in-process and on Ray
    info               versions, CUDA, CT backends usable here and why not, bundled priors

Each command lives in its own module of :mod:`ctflow.cli` (``register(sub)`` adds its parser,
``cmd_*`` runs it). ``reconstruct-dicom --ray [ADDRESS]`` and ``bench ... --ray [ADDRESS]`` run
slices / benchmark cases as Ray tasks (optional extra ``ctflow[ray]``; Ray is imported only
then).

Global options may be given before or after the command. ``--threads N`` sets torch's CPU
threads (``torch.set_num_threads``) for every command; by default torch chooses (one per
core), and on a small, busy machine fewer threads are often much faster. Errors a user can
cause (a bad argument, a missing file, an unreadable DICOM, CUDA requested but absent, a prior
that is not found, a CT backend that cannot run here) print one line ``ctflow ...: error: ...`` to stderr and exit with status
2; ``--debug`` prints the traceback as well. Unexpected failures exit with status 1.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import List, Optional, Sequence

from pydicom.errors import InvalidDicomError

from ctflow.cli import bench, dicom, evaluate, info, reconstruct, throughput, train
from ctflow.cli.common import (CLIError, Formatter, Parser, global_options, seed_everything,
                               set_threads)
from ctflow.tasks import resolve_device

__all__ = ["main", "build_parser", "EXIT_USER_ERROR", "EXIT_INTERNAL_ERROR"]

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1

#: Exceptions a user can cause: one line, exit status 2.
USER_ERRORS = (CLIError, ValueError, KeyError, OSError, ImportError, LookupError,
               InvalidDicomError)

#: Commands that pass --device on unresolved (the benchmark runner checks it; on Ray the
#: tasks pick their device on their own node, which may have GPUs that this machine lacks).
_DEVICE_UNRESOLVED = ("bench", "info", "tune")

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
  ctflow evaluate-prior ct64                    # a prior's samples vs held-out slices

Run 'ctflow COMMAND --help' for the options of one command.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``ctflow`` command."""
    parser = Parser(prog="ctflow", formatter_class=Formatter, epilog=MAIN_EPILOG,
                    description="CT reconstruction with flow-matching priors (MS-Flow).")
    global_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    info.register_demo(sub)
    reconstruct.register(sub)
    dicom.register(sub)
    train.register(sub)
    evaluate.register(sub)
    bench.register(sub)
    throughput.register(sub)
    info.register_info(sub)
    return parser


#: The largest --seed (torch's generators take 64-bit seeds; solvers take signed 64-bit).
MAX_SEED = 2 ** 63 - 1


def _backend_unavailable(exc: BaseException) -> bool:
    """A CT backend the user chose cannot run here (``RuntimeError("backend='...': ...")``
    from :mod:`ctflow.operators.ct`, naming what to install): a user error, not a bug."""
    return isinstance(exc, RuntimeError) and str(exc).startswith("backend=")


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


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``ctflow`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit
    status (0 success, 2 a user error, 1 an unexpected failure). ``--help`` exits through
    ``SystemExit(0)``."""
    argv: List[str] = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:   # a usage error (one line, see Parser.error) or --help
        if exc.code in (0, None):
            raise
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_USER_ERROR
    for key, default in (("device", "auto"), ("seed", 0), ("threads", None), ("quiet", False),
                         ("debug", False)):
        if not hasattr(args, key):
            setattr(args, key, default)
    args.argv = argv
    try:
        args.device_requested = args.device
        if args.command not in _DEVICE_UNRESOLVED and getattr(args, "ray", None) is None:
            args.device = str(resolve_device(args.device))
        set_threads(args.threads)
        if not 0 <= int(args.seed) <= MAX_SEED:
            raise CLIError(f"--seed {args.seed}: must be an integer from 0 to 2**63 - 1")
        seed_everything(args.seed)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("ctflow: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, USER_ERRORS) and not _backend_unavailable(exc):
            if args.debug:
                traceback.print_exc()
            print(f"ctflow {args.command}: internal error ({type(exc).__name__}): "
                  f"{_one_line(exc)} (rerun with --debug for the traceback)", file=sys.stderr)
            return EXIT_INTERNAL_ERROR
        if args.debug:
            traceback.print_exc()
        print(f"ctflow {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
