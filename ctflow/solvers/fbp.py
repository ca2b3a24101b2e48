r"""The FBP baseline: filtered back-projection for CT ray transforms (operators with a
``geometry``), through ``ctflow.operators.ct.FBP``; the prior and ``sigma`` are unused.

FBP is unweighted: statistical weights (``weights=``, :mod:`ctflow.solvers.weights`) are
checked like for every solver and then not used, with a :class:`UserWarning` (a statistically
weighted FBP is out of scope; use ``"cgls"`` or ``"tv"`` for a weighted reconstruction). It
warns rather than refuses so that one call with the same weights runs every method of a
comparison (the unweighted FBP is the reference there).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from ctflow.solvers.base import Solver, finish
from ctflow.solvers.inputs import check_problem, check_weights
from ctflow.solvers.linalg import relative_residual
from ctflow.solvers.options import SolverOptions, check_choice
from ctflow.solvers.result import Reconstruction, SolveMeter

__all__ = ["FBPSolver", "FBP_FILTERS"]

#: Filters accepted by :class:`FBPSolver`.
FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hann")


class FBPSolver(Solver):
    r"""Filtered back-projection for CT ray transforms; the prior is unused.

    Needs an operator with a ``geometry`` attribute (``ctflow.operators.RayTransform``) and
    applies ``ctflow.operators.ct.FBP(geometry, filter=...)`` to the sinogram. Options:
    :class:`FBPSolver.Options` (``seed`` and ``progress`` are accepted for a uniform
    interface; FBP is one deterministic step).
    """

    name = "fbp"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(SolverOptions):
        """Options of :class:`FBPSolver` (and ``seed``, ``progress``).

        Attributes:
            filter: ``"ramp"``, ``"shepp-logan"``, ``"cosine"`` or ``"hann"``.
        """

        OWNER = "FBPSolver"
        filter: str = "ramp"  # noqa: A003 - the option's name

        def check(self) -> None:
            check_choice("filter", self.filter, FBP_FILTERS, owner=self.OWNER)

    def solve(self, operator, y: torch.Tensor, prior=None, sigma: float = 0.0, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        """Filtered back-projection of ``y`` (the prior and ``sigma`` are unused; checked
        ``weights`` are not used either, with a warning: see the module docstring)."""
        o = type(self).__name__
        check_problem(operator, y, sigma, owner=o)
        if check_weights(weights, y, owner=o) is not None:
            warnings.warn(f"{o}: filtered back-projection is unweighted: the statistical "
                          f"weights are not used (pass weights=None to silence this, or use "
                          f"method 'cgls' or 'tv' for a weighted reconstruction)",
                          UserWarning, stacklevel=2)
        geometry = getattr(operator, "geometry", None)
        if geometry is None:
            raise ValueError(f"{o}: filtered back-projection needs a CT ray transform (an "
                             f"operator with a .geometry, e.g. ctflow.operators.RayTransform), "
                             f"got {operator!r}; use method 'cgls' or 'tv' for other operators")
        try:
            from ctflow.operators.ct import FBP
        except ImportError as exc:  # pragma: no cover - depends on the installed operators
            raise ValueError(f"{o}: ctflow.operators.ct.FBP is unavailable ({exc}); "
                             f"use method 'cgls' or 'tv'") from exc
        with SolveMeter(y.device) as meter:
            with torch.no_grad():
                x = FBP(geometry, filter=self.options.filter)(y)
                res = relative_residual(operator.forward(x) - y, y)
        return finish(self, x, [{"iteration": 1, "residual": res}], meter)
