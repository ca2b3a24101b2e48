r"""CGLS: conjugate gradients on the normal equations of
:math:`\min_x \tfrac12\|Ax - y\|^2 + \tfrac{\lambda}{2}\|x\|^2` (:func:`cgls`, :class:`CGLS`).

Works in the public image space (images in :math:`[0, 1]`, the space the operator acts on)
and ignores the prior; ``sigma`` is not needed (0 allowed). The data residual in the history
is the batch-aggregate relative residual :math:`\|Ax - y\| / \|y\|`.

With statistical weights (``CGLS().solve(A, y, weights=w)``, :mod:`ctflow.solvers.weights`)
:class:`CGLS` is weighted least squares
:math:`\min_x \tfrac12\sum_i w_i(Ax - y)_i^2 + \tfrac\lambda2\|x\|^2`: :func:`cgls` on
:math:`W^{1/2}A` and :math:`W^{1/2}y`, i.e. CG on :math:`(A^TWA + \lambda I)x = A^TWy`; the
history's residual and objective are then the weighted ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

import torch

from ctflow.solvers.base import IterativeOptions, IterativeSolver
from ctflow.solvers.linalg import broadcast_items, per_item_dot
from ctflow.solvers.options import check_float, check_int
from ctflow.solvers.progress import progress as progress_bar

__all__ = ["CGLS", "cgls"]


def cgls(operator, y: torch.Tensor, *, iterations: int = 50, tol: float = 1e-6,
         tikhonov: float = 0.0, x0: Optional[torch.Tensor] = None,
         progress: bool = False) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    r"""CGLS for :math:`\min_x \tfrac12\|Ax - y\|^2 + \tfrac{\lambda}{2}\|x\|^2` (unclipped).

    Conjugate gradients on the normal equations :math:`(A^TA + \lambda I)x = A^Ty` without
    forming them (Hestenes–Stiefel / Paige–Saunders CGLS), per batch item:

    .. math::

        r = y - Ax,\ s = A^Tr - \lambda x,\ p = s;\quad
        \alpha = \frac{\|s\|^2}{\|Ap\|^2 + \lambda\|p\|^2},\ x \mathrel{+}= \alpha p,\
        r \mathrel{-}= \alpha Ap,\ s' = A^Tr - \lambda x,\ p = s' + \frac{\|s'\|^2}{\|s\|^2} p.

    Stops after ``iterations`` steps or when :math:`\|s\| \le \text{tol}\,\|s_0\|` for every
    item. Returns ``(x, history)``; each history entry has ``iteration``, ``residual``
    (:math:`\|Ax-y\|/\|y\|`), ``objective`` and ``normal_residual`` (:math:`\|s\|/\|s_0\|`).
    """
    x = torch.zeros((y.shape[0], y.shape[1], *operator.domain_shape), dtype=y.dtype,
                    device=y.device) if x0 is None else x0.clone()
    lam = float(tikhonov)
    with torch.no_grad():
        r = y - operator.forward(x) if x0 is not None else y.clone()
        s = operator.adjoint(r) - lam * x
        p = s.clone()
        gamma = per_item_dot(s, s)
        s0 = torch.sqrt(gamma)
        s0_safe = torch.where(s0 > 0, s0, torch.ones_like(s0))
        history: List[Dict[str, Any]] = []
        for k in progress_bar(range(1, iterations + 1), enabled=progress, desc="cgls"):
            if bool((torch.sqrt(gamma) <= tol * s0).all()):
                break
            q = operator.forward(p)
            delta = per_item_dot(q, q) + lam * per_item_dot(p, p)
            alpha = torch.where(delta > 0, gamma / torch.where(delta > 0, delta,
                                                                torch.ones_like(delta)),
                                torch.zeros_like(delta))
            x = x + broadcast_items(alpha, x) * p
            r = r - broadcast_items(alpha, r) * q
            s = operator.adjoint(r) - lam * x
            gamma_new = per_item_dot(s, s)
            beta = torch.where(gamma > 0, gamma_new / torch.where(gamma > 0, gamma,
                                                                   torch.ones_like(gamma)),
                               torch.zeros_like(gamma))
            p = s + broadcast_items(beta, p) * p
            gamma = gamma_new
            rn = float(torch.linalg.vector_norm(r))
            yn = float(torch.linalg.vector_norm(y))
            history.append({
                "iteration": k,
                "residual": rn / yn if yn > 0 else rn,
                "objective": 0.5 * rn ** 2 + 0.5 * lam * float(per_item_dot(x, x).sum()),
                "normal_residual": float((torch.sqrt(gamma) / s0_safe).max()),
            })
    return x, history


class CGLS(IterativeSolver):
    r"""Least squares by conjugate gradients (CGLS); the prior is unused.

    Solves :math:`\min_x \tfrac12\|Ax - y\|^2 + \tfrac{\lambda}{2}\|x\|^2` in the public image
    space (see :func:`cgls`); few iterations act as regularisation (semi-convergence).
    Options: :class:`CGLS.Options`.
    """

    name = "cgls"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(IterativeOptions):
        """Options of :class:`CGLS` (and ``x_init``, ``seed``, ``progress``).

        Attributes:
            iterations: maximum CG iterations (int >= 1).
            tol: stop when the normal-equation residual has dropped by this factor for
                every item (>= 0).
            tikhonov: the Tikhonov weight :math:`\lambda` (>= 0).
        """

        OWNER = "CGLS"
        iterations: int = 30
        tol: float = 1e-6
        tikhonov: float = 0.0

        def check(self) -> None:
            super().check()
            o = self.OWNER
            self._set("iterations", check_int("iterations", self.iterations, owner=o))
            self._set("tol", check_float("tol", self.tol, owner=o, minimum=0.0))
            self._set("tikhonov", check_float("tikhonov", self.tikhonov, owner=o, minimum=0.0))

    def _run(self, operator, y, sigma, x0):
        opt = self.options
        x, history = cgls(operator, y, iterations=opt.iterations, tol=opt.tol,
                          tikhonov=opt.tikhonov, x0=x0, progress=opt.progress)
        return x, history, {}
