"""``ctflow throughput``: ``reconstruct-dicom`` slices per second in-process and on Ray
(:func:`ctflow.distributed.throughput.measure`; the numbers of ``docs/scaling.md``)."""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from ctflow.cli.common import (add_command, add_noise_arguments, default_prior, method_key,
                               noise_from_args, parse_options, parse_slices)
from ctflow.data.atomic import atomic_write_json
from ctflow.distributed import measure
from ctflow.solvers.registry import method_names

__all__ = ["register", "cmd_throughput"]

EPILOG = """\
For each configuration the same slices are reconstructed into a fresh temporary folder and
the wall time of the whole reconstruct-dicom run is taken: in-process with torch's default
thread count and with one thread, and on a private local Ray instance with W CPUs for each W
of --workers (one torch thread per task). The default options are the demo's settings of the
method.

examples:
  ctflow --device cpu throughput series/ --workers 1 2 4 --slices 0:6
  ctflow throughput series/ --no-in-process --workers 8 --json throughput.json
"""


def register(sub) -> None:
    """Add ``throughput`` to the sub-parsers ``sub``."""
    p = add_command(sub, "throughput", "measure reconstruct-dicom throughput in-process and on "
                    "Ray (optional extra ctflow[ray])", EPILOG, cmd_throughput)
    p.add_argument("in_dir", metavar="IN_DIR", help="a DICOM series folder")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], metavar="W",
                   help="Ray worker counts to measure")
    p.add_argument("--slices", default=None, metavar="START:STOP",
                   help="slice range (default: every slice)")
    p.add_argument("--method", default="msflow", type=method_key, choices=method_names(),
                   metavar="METHOD", help=f"one of {', '.join(method_names())}")
    p.add_argument("--prior", default=None,
                   help="bundled prior name, checkpoint path or 'none' (default: 'ct64' for "
                        "the methods that need a prior)")
    p.add_argument("--views", type=int, default=60, help="number of projection angles")
    add_noise_arguments(p)
    p.add_argument("--no-in-process", action="store_true", help="only the Ray runs")
    p.add_argument("--in-process-threads", type=int, nargs="+", default=None, metavar="T",
                   help="torch thread counts of the in-process runs (default: torch's, 1)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option (repeatable; default: the demo's settings)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the rows here")


def cmd_throughput(args) -> int:
    """Measure and print the table (and ``--json`` the rows)."""
    noise = noise_from_args(args, args.method)
    rows = measure(args.in_dir, workers=args.workers, slices=parse_slices(args.slices),
                   method=args.method, prior=default_prior(args.method, args.prior),
                   views=args.views, noise=noise, seed=args.seed,
                   in_process=not args.no_in_process,
                   options=parse_options(args.option) or None, device=args.device_requested,
                   in_process_threads=args.in_process_threads)
    print(f"{'mode':<44}{'slices':>7}{'wall s':>9}{'slices/s':>10}{'solve s/slice':>15}")
    for r in rows:
        print(f"{r['mode']:<44}{r['slices']:>7}{r['wall_s']:>9.1f}{r['slices_per_s']:>10.3f}"
              f"{r['solve_s_per_slice']:>15.2f}")
    if args.json:
        atomic_write_json(Path(args.json), {"rows": rows, "cpu_count": os.cpu_count(),
                                            "platform": platform.platform(),
                                            "argv": list(sys.argv)})
    return 0
