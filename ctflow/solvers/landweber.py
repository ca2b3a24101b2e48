r"""Landweber iteration
:math:`x \leftarrow P_C\big(x + \tfrac{\omega}{\|A\|^2} A^T(y - Ax)\big)` (:func:`landweber`,
:class:`Landweber`).

Works in the public image space and ignores the prior; ``sigma`` is not needed (0 allowed).
With statistical weights (``weights=w``, :mod:`ctflow.solvers.weights`) :class:`Landweber`
descends the weighted :math:`\tfrac12\sum_i w_i(Ax - y)_i^2`: the step is
:math:`\tfrac{\omega}{\|W^{1/2}A\|^2}A^TW(y - Ax)` (:func:`landweber` on :math:`W^{1/2}A`,
:math:`W^{1/2}y`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from ctflow.solvers.base import IterativeOptions, IterativeSolver
from ctflow.solvers.linalg import operator_norm
from ctflow.solvers.options import check_bool, check_float, check_int
from ctflow.solvers.progress import progress as progress_bar

__all__ = ["Landweber", "landweber"]


def landweber(operator, y: torch.Tensor, *, iterations: int = 100, relaxation: float = 1.0,
              nonneg: bool = False, tol: float = 0.0, x0: Optional[torch.Tensor] = None,
              progress: bool = False) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    r"""(Projected) Landweber iteration
    :math:`x \leftarrow P\big(x + \tfrac{\omega}{\|A\|^2}A^T(y - Ax)\big)` (unclipped).

    :math:`0 < \omega < 2` converges to a least-squares solution; ``nonneg`` projects onto
    :math:`x \ge 0`. Stops early when :math:`\|x_{k+1} - x_k\| \le \text{tol}\,\|x_{k+1}\|`.
    Returns ``(x, history)`` with ``iteration``, ``residual``, ``objective``
    (:math:`\tfrac12\|Ax-y\|^2`), ``change``.
    """
    step = relaxation / operator_norm("landweber", operator, y) ** 2
    x = torch.zeros((y.shape[0], y.shape[1], *operator.domain_shape), dtype=y.dtype,
                    device=y.device) if x0 is None else x0.clone()
    history: List[Dict[str, Any]] = []
    with torch.no_grad():
        r = y - operator.forward(x)
        for k in progress_bar(range(1, iterations + 1), enabled=progress, desc="landweber"):
            x_new = x + step * operator.adjoint(r)
            if nonneg:
                x_new = x_new.clamp_min(0.0)
            change = float(torch.linalg.vector_norm(x_new - x)) / max(
                float(torch.linalg.vector_norm(x_new)), 1e-30)
            x = x_new
            r = y - operator.forward(x)
            rn, yn = float(torch.linalg.vector_norm(r)), float(torch.linalg.vector_norm(y))
            history.append({"iteration": k, "residual": rn / yn if yn > 0 else rn,
                            "objective": 0.5 * rn ** 2, "change": change})
            if change <= tol:
                break
    return x, history


class Landweber(IterativeSolver):
    r"""Projected Landweber iteration (gradient descent on :math:`\tfrac12\|Ax-y\|^2`); the
    prior is unused. See :func:`landweber`; options: :class:`Landweber.Options`.
    """

    name = "landweber"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(IterativeOptions):
        """Options of :class:`Landweber` (and ``x_init``, ``seed``, ``progress``).

        Attributes:
            iterations: the number of steps (int >= 1).
            relaxation: :math:`\omega \in (0, 2)`, the step is :math:`\omega/\|A\|^2`.
            nonneg: project onto :math:`x \ge 0` after each step.
            tol: relative-change stopping tolerance (>= 0).
        """

        OWNER = "Landweber"
        iterations: int = 100
        relaxation: float = 1.0
        nonneg: bool = True
        tol: float = 0.0

        def check(self) -> None:
            super().check()
            o = self.OWNER
            self._set("iterations", check_int("iterations", self.iterations, owner=o))
            self._set("relaxation", check_float("relaxation", self.relaxation, owner=o,
                                                minimum=0.0, maximum=2.0, min_open=True,
                                                max_open=True))
            self._set("nonneg", check_bool("nonneg", self.nonneg, owner=o))
            self._set("tol", check_float("tol", self.tol, owner=o, minimum=0.0))

    def _run(self, operator, y, sigma, x0):
        opt = self.options
        x, history = landweber(operator, y, iterations=opt.iterations,
                               relaxation=opt.relaxation, nonneg=opt.nonneg, tol=opt.tol,
                               x0=x0, progress=opt.progress)
        return x, history, {}
