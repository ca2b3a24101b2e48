r"""Measure ``reconstruct-dicom`` throughput in-process and on Ray (``docs/scaling.md``).

::

    python -m ctflow.distributed.throughput IN_DIR [--workers 1 2] [--slices 0:6]
        [--method msflow] [--prior ct64] [--views 60] [--option KEY=VALUE ...] [--json FILE]

For each configuration the same slices are reconstructed into a fresh temporary folder and
the wall time of the whole :func:`ctflow.tasks.series.reconstruct_dicom` call is taken
(reading the series, every solve, every write, the summary and the montage):

* in-process with torch's default thread count and with one thread;
* on a private local Ray instance with ``W`` CPUs for each ``W`` of ``--workers`` (``W``
  tasks at a time, one torch thread each). The instance is started before the clock starts
  (its start-up time is reported apart); the first task on each worker pays the worker's
  imports and the prior's loading, which *is* in the wall time.

Throughput is slices / wall seconds. The default options are the demo's MS-Flow settings
(``ctflow.tasks.demo.DEMO_SETTINGS["msflow"]``) on the demo problem (``ct64``, 64 x 64, 60 views,
1 % noise).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

__all__ = ["measure", "main"]


def _run(in_dir, out_dir, *, ray, kw) -> Dict[str, Any]:
    from ctflow.tasks.series import reconstruct_dicom

    t0 = time.perf_counter()
    s = reconstruct_dicom(in_dir, out_dir, ray=ray, progress=False, **kw)
    wall = time.perf_counter() - t0
    n = int(s["slices_reconstructed"])
    return {"slices": n, "wall_s": wall, "slices_per_s": n / wall,
            "solve_s_per_slice": s["mean"]["seconds_per_slice"],
            "psnr": s["mean"]["psnr"]}


def measure(in_dir, *, workers: Sequence[int] = (1, 2), slices=None, method: str = "msflow",
            prior: Any = "ct64", views: int = 60, noise_level: float = 0.01, seed: int = 0,
            in_process: bool = True, options: Optional[Dict[str, Any]] = None,
            device: str = "cpu", in_process_threads: Optional[Sequence[int]] = None
            ) -> List[Dict[str, Any]]:
    """The rows of the table (module docstring): ``mode``, ``slices``, ``wall_s``,
    ``slices_per_s``, ``solve_s_per_slice`` (mean solver time per slice inside the run),
    ``psnr`` and, for Ray, ``ray_start_s``. ``in_process_threads``: the torch thread counts
    of the in-process runs (default: torch's default, then 1)."""
    import torch

    from ctflow.distributed.cluster import RayOptions, connect

    if options is None:
        from ctflow.tasks.demo import DEMO_SETTINGS
        options = dict(DEMO_SETTINGS.get(method, {}))
    kw = dict(views=views, method=method, prior=prior, noise_level=noise_level, seed=seed,
              slices=slices, device=device, **options)
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="ctflow-throughput-") as tmp:
        if in_process:
            default = torch.get_num_threads()
            counts = list(in_process_threads) if in_process_threads else \
                ([default, 1] if default != 1 else [1])
            for threads in counts:
                torch.set_num_threads(threads)
                try:
                    row = _run(in_dir, Path(tmp) / f"here-{threads}", ray=None, kw=kw)
                finally:
                    torch.set_num_threads(default)
                rows.append(dict(row, mode=f"in-process, {threads} torch thread(s)"))
        for w in workers:
            opts = RayOptions(num_cpus=int(w), quiet=True)
            t0 = time.perf_counter()
            with connect(opts):
                start = time.perf_counter() - t0
                row = _run(in_dir, Path(tmp) / f"ray-{w}", ray=opts, kw=kw)
            rows.append(dict(row, mode=f"Ray, {w} worker(s), 1 torch thread each",
                             ray_start_s=start))
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ctflow.cli import parse_options, parse_slices

    p = argparse.ArgumentParser(prog="python -m ctflow.distributed.throughput",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("in_dir", help="a DICOM series folder")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--slices", default=None, metavar="START:STOP")
    p.add_argument("--method", default="msflow")
    p.add_argument("--prior", default="ct64")
    p.add_argument("--views", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--no-in-process", action="store_true")
    p.add_argument("--in-process-threads", type=int, nargs="+", default=None, metavar="T",
                   help="torch thread counts of the in-process runs (default: torch's, 1)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    options = parse_options(args.option) or None
    rows = measure(args.in_dir, workers=args.workers, slices=parse_slices(args.slices),
                   method=args.method, prior=None if args.prior == "none" else args.prior,
                   views=args.views, seed=args.seed, in_process=not args.no_in_process,
                   options=options, device=args.device,
                   in_process_threads=args.in_process_threads)
    print(f"{'mode':<44}{'slices':>7}{'wall s':>9}{'slices/s':>10}{'solve s/slice':>15}")
    for r in rows:
        print(f"{r['mode']:<44}{r['slices']:>7}{r['wall_s']:>9.1f}{r['slices_per_s']:>10.3f}"
              f"{r['solve_s_per_slice']:>15.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"rows": rows, "cpu_count": os.cpu_count(), "platform": platform.platform(),
             "argv": list(sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
