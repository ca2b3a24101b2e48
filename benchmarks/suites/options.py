r"""The solver options of a case: the config's options, the ``--quick`` overrides, and N.

Method names, their labels and their solver classes come from the registry
(``ctflow.solvers.METHODS`` / ``ctflow.solvers.method``); what a method accepts is read from its
solver (:func:`option_names`), so nothing here lists methods of its own beyond the quick
overrides of :data:`QUICK_OPTIONS`.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Dict, FrozenSet, Iterable, List, Optional

from ctflow.solvers import METHODS, method

__all__ = ["QUICK_OPTIONS", "label", "option_names", "accepts_seed", "takes_steps",
           "run_order", "method_options"]

#: ``--quick`` overrides: tiny iteration counts, the same code path.
QUICK_OPTIONS = {
    "msflow": {"sweeps": 2},
    "dflow": {"iterations": 1, "max_iter": 2},
    "pnpflow": {"steps": 3, "draws": 1},
    "otode": {"steps": 3},
    "tv": {"iterations": 10},
    "cgls": {"iterations": 5},
}

_NAMES: Dict[str, FrozenSet[str]] = {}


def label(name: str) -> str:
    """The registry's display label of method ``name`` (the report's ``variant``); a name
    that is not a registered method is its own label."""
    return METHODS[name].label if name in METHODS else str(name)


def option_names(name: str) -> FrozenSet[str]:
    """The options the solver of method ``name`` accepts: the fields of its ``Options``
    dataclass (or its ``DEFAULTS``, or its constructor's keyword parameters)."""
    if name not in _NAMES:
        cls = method(name).solver_class()
        opts = getattr(cls, "Options", None)
        if opts is not None and dataclasses.is_dataclass(opts):
            names = {f.name for f in dataclasses.fields(opts)}
        elif isinstance(getattr(cls, "DEFAULTS", None), dict):
            names = set(cls.DEFAULTS)
        else:
            names = set(inspect.signature(cls.__init__).parameters) - {"self"}
        _NAMES[name] = frozenset(names)
    return _NAMES[name]


def accepts_seed(name: str) -> bool:
    """Whether the solver behind ``name`` takes a ``seed`` option."""
    return "seed" in option_names(name)


def takes_steps(name: str) -> bool:
    """Whether method ``name`` integrates the flow ODE with a step count ``N`` (D-Flow: ``N``;
    MS-Flow: ``K`` segments of ``M`` steps)."""
    names = option_names(name)
    return "N" in names or {"K", "M"} <= names


def run_order(names: Iterable[str]) -> List[str]:
    """``names`` (registered methods) cheap first: the methods without a prior, then the flow
    methods without N, then those with N, each group in registry order."""
    order = list(METHODS)
    names = [method(n).name for n in names]
    return sorted(names, key=lambda n: (METHODS[n].needs_prior, takes_steps(n),
                                        order.index(n)))


def method_options(name: str, base: Dict[str, Any], *, quick: bool,
                   steps: Optional[int] = None) -> Dict[str, Any]:
    """The solver options of one case: ``base`` (from the config), the quick overrides, and
    the step count ``N`` for the flow-ODE methods (D-Flow ``N``; MS-Flow ``K = min(K, N)``
    segments of ``M = N/K`` steps; ``N`` must be divisible by ``K``)."""
    opts = dict(base)
    if quick:
        opts.update(QUICK_OPTIONS.get(name, {}))
    if steps is not None:
        n = int(steps)
        names = option_names(name)
        if {"K", "M"} <= names:
            K = min(int(opts.get("K", 8)), n)
            if n % K:
                raise ValueError(f"{label(name)}: N = {n} steps is not divisible by K = {K} "
                                 f"segments")
            opts["K"], opts["M"] = K, n // K
        elif "N" in names:
            opts["N"] = n
        else:
            raise ValueError(f"method {name!r} takes no ODE step count N")
    return opts
