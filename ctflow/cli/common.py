"""What the commands of ``ctflow`` share: errors, argument helpers, global options, seeding.

* :class:`CLIError` -- an error the user can fix (one line, exit status 2);
* :func:`parse_slices`, :func:`parse_options` -- ``START:STOP`` and ``KEY=VALUE`` arguments;
* :func:`add_solver_arguments`, :func:`default_prior` -- ``--method`` (choices from the method
  registry, :mod:`ctflow.solvers.registry`), ``--prior`` and the measurement options;
* :func:`add_noise_arguments`, :func:`noise_from_args` -- ``--sigma`` / ``--noise-rel`` /
  ``--dose`` (transmission Poisson noise with I0 photons per detector bin);
* :func:`add_ray_arguments`, :func:`ray_settings` -- ``--ray [ADDRESS]`` and its options;
* :func:`add_command` -- a sub-command with the shared formatter and the global options;
* :func:`set_threads`, :func:`seed_everything`, :func:`echo`.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch

from ctflow.data import sample_path
from ctflow.distributed import RAY_ARGUMENTS, RayOptions, ray_options_from
from ctflow.operators.noise import GaussianNoise, PoissonNoise
from ctflow.solvers.registry import method, method_names
from ctflow.tasks import check_noise
from ctflow.tasks.problem import geometry_names

__all__ = ["CLIError", "parse_slices", "parse_options", "method_key", "add_solver_arguments",
           "default_prior", "add_noise_arguments", "noise_from_args", "add_ray_arguments",
           "ray_settings", "add_command", "global_options", "Parser", "Formatter",
           "set_threads", "seed_everything", "echo", "DEFAULT_NOISE_REL"]

#: The relative noise level of simulated measurements when neither --sigma nor --noise-rel
#: is given (1 % of the RMS of the clean data).
DEFAULT_NOISE_REL = 0.01


class CLIError(Exception):
    """An error the user can fix; printed as one line, exit status 2."""


def echo(args, msg: str) -> None:
    """Informational message on stderr, silenced by --quiet."""
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- argument values
#: Prefix of an input path that names a bundled sample (``sample:chest-subset``,
#: ``sample:ct-heldout/A098752_19001231-32.dcm``), so examples run from any folder.
SAMPLE_PREFIX = "sample:"


def input_path(text: str) -> Path:
    """A command's input path; ``sample:NAME[/FILE]`` is the bundled sample ``NAME``
    (:func:`ctflow.data.sample_path`) or a file in it."""
    if not text.startswith(SAMPLE_PREFIX):
        return Path(text)
    name, _, rest = text[len(SAMPLE_PREFIX):].partition("/")
    try:
        root = sample_path(name)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    path = root / rest if rest else root
    if not path.exists():
        raise CLIError(f"{text}: no such file in the bundled sample {name!r} ({root})")
    return path


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


def method_key(name: str) -> str:
    """``--method`` as registered: lower case, ``-`` and ``_`` dropped (``MS-Flow`` →
    ``msflow``); argparse then checks it against :func:`ctflow.solvers.registry.method_names`."""
    return str(name).strip().lower().replace("-", "").replace("_", "")


def add_solver_arguments(p: argparse.ArgumentParser) -> None:
    """The measurement and solver options of ``reconstruct`` and ``reconstruct-dicom``:
    ``--method`` (choices: the method registry), ``--prior``, ``--views``, ``--geometry``,
    ``--sigma`` / ``--noise-rel``, ``--size``, ``--backend``, ``--option KEY=VALUE``."""
    no_prior = ", ".join(method_names(needs_prior=False))
    g = p.add_argument_group("measurement and solver")
    g.add_argument("--method", "-m", default="msflow", type=method_key,
                   choices=method_names(), metavar="METHOD",
                   help=f"one of {', '.join(method_names())}")
    g.add_argument("--prior", default=None,
                   help="a bundled prior name, a checkpoint path, or 'none' (default: 'ct64' "
                        f"for the methods that need a prior, none for {no_prior})")
    g.add_argument("--views", type=int, default=60,
                   help="number of projection angles (also for the presets: their full "
                        "counts are 1152 for clinical-fan and 1000 for lodopab-parallel)")
    g.add_argument("--geometry", choices=geometry_names(), default="parallel",
                   help="beam geometry: parallel, fan (unit half-width), or a preset in mm "
                        "(clinical-fan: SOMATOM Definition AS fan beam, 1152 views; "
                        "lodopab-parallel: LoDoPaB-CT parallel beam; see docs/lowdose.md)")
    add_noise_arguments(g)
    g.add_argument("--size", type=int, default=None,
                   help="working image size (default: the prior's image_size; without a "
                        "prior, an array image's own size or the size a sinogram's detector "
                        "count implies)")
    g.add_argument("--backend", default="torch", help="CT backend: torch, odl or tomosipo")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="solver option passed to ctflow.reconstruct (repeatable), "
                        "e.g. --option sweeps=20")


def default_prior(name: str, given: Optional[str]) -> Optional[str]:
    """The prior of ``--method name``: ``--prior`` if given (``none`` → no prior); otherwise
    ``ct64`` for a method that needs a prior, and no prior for one that does not."""
    if given is not None:
        return None if str(given).strip().lower() in ("none", "") else given
    return "ct64" if method(name).needs_prior else None


class _Removed(argparse.Action):
    """An option that was removed: using it is an argparse error naming its replacement."""

    def __init__(self, option_strings, dest, replacement: str = "", **kw):
        self.replacement = replacement
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was removed: use {self.replacement}")


def add_noise_arguments(g) -> None:
    """``--sigma S`` / ``--noise-rel ETA`` / ``--dose I0`` (mutually exclusive) on the group
    ``g``; the
    removed ``--noise-level`` is an error that names them."""
    g.add_argument("--noise-level", action=_Removed, default=argparse.SUPPRESS,
                   replacement="--noise-rel ETA (relative to the data RMS) or --sigma S "
                               "(absolute)")
    m = g.add_mutually_exclusive_group()
    m.add_argument("--sigma", type=float, default=None, metavar="S",
                   help="absolute noise standard deviation (units of the sinogram)")
    m.add_argument("--noise-rel", type=float, default=None, metavar="ETA",
                   help="relative noise level: sigma = ETA * RMS of the clean data when "
                        "simulating, of the measured sinogram otherwise (default: "
                        f"{DEFAULT_NOISE_REL}, i.e. 1%%)")
    m.add_argument("--dose", type=float, default=None, metavar="I0",
                   help="simulate a low-dose transmission scan instead of Gaussian noise: "
                        "Poisson photon counts with I0 incident photons per detector bin "
                        "(ctflow.operators.noise.PoissonNoise), physical units (HU -> mu in "
                        "mm^-1, see docs/lowdose.md) and statistically weighted data")


def noise_from_args(args, method_name: str):
    """The :class:`~ctflow.operators.noise.GaussianNoise` of ``--sigma`` / ``--noise-rel``
    (default ``relative=DEFAULT_NOISE_REL``), or the
    :class:`~ctflow.operators.noise.PoissonNoise` of ``--dose I0``, checked for
    ``method_name`` before any work starts (:func:`ctflow.tasks.check_noise`: zero only for
    methods that need no sigma)."""
    if getattr(args, "dose", None) is not None:
        try:
            return check_noise(method_name, PoissonNoise(args.dose))
        except ValueError as exc:
            raise CLIError(f"--dose: {exc}") from None
    if args.sigma is not None:
        flag, noise = "--sigma", dict(sigma=args.sigma)
    else:
        flag = "--noise-rel"
        noise = dict(relative=DEFAULT_NOISE_REL if args.noise_rel is None else args.noise_rel)
    try:
        return check_noise(method_name, GaussianNoise(**noise))
    except ValueError as exc:
        raise CLIError(f"{flag}: {exc}") from None


def add_ray_arguments(p: argparse.ArgumentParser, what: str) -> argparse._ArgumentGroup:
    """Add the scale-out group (:data:`ctflow.distributed.RAY_ARGUMENTS`: ``--ray
    [ADDRESS]``, ``--ray-retries``, ``--ray-threads``) to ``p``, its help naming ``what``
    runs as Ray tasks; returns the group."""
    g = p.add_argument_group("scale-out (optional extra ctflow[ray])")
    for flags, kw in RAY_ARGUMENTS:
        g.add_argument(*flags, **{**kw, "help": kw["help"].format(what=what)})
    return g


def ray_settings(args) -> Optional[RayOptions]:
    """``RayOptions`` from the command's --ray options, or ``None`` without --ray."""
    try:
        return ray_options_from(getattr(args, "ray", None), retries=args.ray_retries,
                                threads=args.ray_threads, quiet=bool(args.quiet))
    except ValueError as exc:
        raise CLIError(str(exc)) from None


# ---------------------------------------------------------------------- parsers
class Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr (exit status 2), like
    every other user error of ``ctflow``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the hand-made layout of descriptions/epilogs; show a default where there is a
    meaningful one (not None, False or empty) and the help text does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        d = action.default
        if (d is argparse.SUPPRESS or d is None or d is False or d == [] or d == ""
                or "default" in text or not action.option_strings):
            return text
        return text + " (default: %(default)s)"


def global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
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


def add_command(sub, name: str, help_: str, epilog: str,
                func: Optional[Callable[[Any], int]], **kw) -> argparse.ArgumentParser:
    """A sub-parser ``name`` of ``sub`` with the shared formatter, the global options (unless
    ``add_help=False``: a pass-through command) and ``func`` as its command (``None``: its own
    sub-commands set it)."""
    p = sub.add_parser(name, help=help_, description=help_, epilog=epilog,
                       formatter_class=Formatter, **kw)
    if kw.get("add_help", True):
        global_options(p, suppress=True)
    if func is not None:
        p.set_defaults(func=func)
    return p


# ---------------------------------------------------------------------- process settings
def set_threads(threads: Optional[int]) -> None:
    """``torch.set_num_threads(threads)``; ``None`` leaves torch's default (one thread per
    core). ``CLIError`` for a number below 1."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise CLIError(f"--threads must be an integer >= 1, got {threads!r}")
    torch.set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
