r"""The FBP baseline: filtered back-projection for CT ray transforms (operators with a
``geometry``), through ``ctflow.operators.ct.FBP``; the prior and ``sigma`` are unused."""
from __future__ import annotations

import dataclasses

import torch

from ctflow.solvers.base import Solver, finish
from ctflow.solvers.inputs import check_problem
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

    def solve(self, operator, y: torch.Tensor, prior=None, sigma: float = 0.0) -> Reconstruction:
        """Filtered back-projection of ``y`` (the prior and ``sigma`` are unused)."""
        o = type(self).__name__
        check_problem(operator, y, sigma, owner=o)
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
