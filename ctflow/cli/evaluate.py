"""``ctflow evaluate-prior``: a prior's samples against held-out CT slices
(:func:`ctflow.training.prior_report`: pixel-value 1-Wasserstein distances, a sample grid)."""
from __future__ import annotations

import json

from ctflow.cli.common import CLIError, add_command
from ctflow.data.atomic import atomic_write_json
from ctflow.flow import METHODS as ODE_METHODS
from ctflow.priors import load_prior
from ctflow.training import prior_report

__all__ = ["register", "cmd_evaluate_prior"]

EPILOG = """\
The score is the 1-Wasserstein distance between the pixel values of N prior samples and of the
held-out slices of --split (prepared as the training data); random ellipse phantoms give the
reference a CT prior must beat clearly.

examples:
  ctflow evaluate-prior ct64
  ctflow evaluate-prior runs/ct64/ckpt-00040000 --png docs/prior-samples.png --json w1.json
"""


def register(sub) -> None:
    """Add ``evaluate-prior`` to the sub-parsers ``sub``."""
    p = add_command(sub, "evaluate-prior", "compare a prior's samples with held-out CT slices",
                    EPILOG, cmd_evaluate_prior)
    p.add_argument("prior", help="bundled name or checkpoint path")
    p.add_argument("--n", type=int, default=64, help="number of prior samples")
    p.add_argument("--steps", type=int, default=50, help="ODE steps per sample")
    p.add_argument("--ode-method", default="midpoint", choices=sorted(ODE_METHODS),
                   help="ODE integrator of the samples")
    p.add_argument("--split", default="test", choices=("test", "validation"),
                   help="held-out slices to compare with")
    p.add_argument("--png", default=None, help="write the sample grid here")
    p.add_argument("--json", default=None, help="write the numbers here")


def cmd_evaluate_prior(args) -> int:
    """Print the numbers as JSON (and write ``--png`` / ``--json``); sampling runs on the
    CPU."""
    if args.device_requested not in ("auto", "cpu"):
        raise CLIError(f"--device {args.device_requested}: evaluate-prior samples on the CPU "
                       "(use --device cpu or leave it out)")
    prior = load_prior(args.prior)
    numbers = prior_report(prior, name=args.prior, n=args.n, steps=args.steps,
                           method=args.ode_method, seed=args.seed, split=args.split,
                           png=args.png)
    print(json.dumps(numbers, indent=2))
    if args.json:
        atomic_write_json(args.json, numbers)
    return 0
