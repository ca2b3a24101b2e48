"""``ctflow info`` (versions, CUDA, CT backends, bundled priors) and ``ctflow demo`` (the
offline demo, :func:`ctflow.tasks.run_demo`)."""
from __future__ import annotations

import json

import torch

from ctflow.cli.common import CLIError, add_command
from ctflow.tasks import DEMO_METHODS, format_info, info, resolve_device, run_demo

__all__ = ["register_demo", "register_info", "cmd_info", "cmd_demo"]

INFO_EPILOG = """\
examples:
  ctflow info
  ctflow info --json > env.json
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


def register_demo(sub) -> None:
    """Add ``demo`` to the sub-parsers ``sub``."""
    p = add_command(sub, "demo", "the offline demo: FBP, TV, D-Flow and MS-Flow on a held-out "
                    "CT slice", DEMO_EPILOG, cmd_demo)
    p.add_argument("--out", "-o", default="ctflow-demo.png", help="figure to write")
    p.add_argument("--quick", action="store_true",
                   help="few iterations only (a smoke test, not representative numbers)")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated subset of {','.join(DEMO_METHODS)} "
                        "(default: all usable)")


def register_info(sub) -> None:
    """Add ``info`` to the sub-parsers ``sub``."""
    p = add_command(sub, "info", "versions, CUDA, CT backends usable here and why not, "
                    "bundled priors", INFO_EPILOG, cmd_info)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_info(args) -> int:
    """Print :func:`ctflow.tasks.info` (text or ``--json``)."""
    data = info()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def cmd_demo(args) -> int:
    """Run the offline demo."""
    methods = None
    if args.methods:
        methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
        bad = [m for m in methods if m not in DEMO_METHODS]
        if bad:
            raise CLIError(f"--methods: unknown demo method(s) {bad}; choose from "
                           f"{', '.join(DEMO_METHODS)}")
    if args.threads is None and resolve_device(args.device).type == "cpu":
        # the demo's 64x64 solves are fastest single-threaded, and a torch thread pool on a
        # small CPU shared with other jobs made them up to ~100x slower (--threads overrides)
        torch.set_num_threads(1)
    run_demo(out=args.out, device=args.device, quick=args.quick, progress=not args.quiet,
             seed=args.seed, methods=methods, verbose=True)
    return 0
