r"""The data term of the flow solvers and MS-Flow's data step.

With the prior's normalisation :math:`s = a x + b` (``scale`` :math:`a`, ``shift`` :math:`b`),
the data misfit of a public image :math:`x = (s - b)/a` is

.. math:: A x - y = \tfrac1a A s - \big(y + \tfrac ba A\mathbf 1\big) = A_m s - y_m,

so the solvers work with the linear operator :math:`A_m = A/a` and the shifted data
:math:`y_m` (exact for any linear :math:`A`; :class:`ModelSpaceProblem`); a penalty
:math:`\tfrac\rho2\|s-p\|^2` equals :math:`\tfrac{\rho a^2}2\|x - x_p\|^2` in public units.
Latent priors see the data through their decoder
(:class:`ctflow.solvers.latent.LatentDataProblem`); :func:`make_problem` picks the one that
fits the prior. The data step :math:`(A_m^TA_m/\sigma^2 + \rho I)s = A_m^Ty_m/\sigma^2 + \rho p`
(:func:`data_step`) is solved in closed form when the operator's ``solve_shifted_normal``
hook provides one, else by conjugate gradients.

Statistical weights :math:`w` (:mod:`ctflow.solvers.weights`) enter by whitening:
:func:`make_problem` builds either problem on :math:`W^{1/2}A` and :math:`W^{1/2}y`, so the
data term is :math:`\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2` and the data step solves
:math:`(A_m^TWA_m + \rho\sigma^2 I)s = A_m^TWy_m + \rho\sigma^2 p` -- in closed form only
for :math:`W = cI`, else by the same warm-started CG, preconditioned by the diagonal
:math:`A_m^TWA_m\mathbf 1 + \rho\sigma^2` (:func:`data_step`).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ctflow.solvers.latent import LatentDataProblem
from ctflow.solvers.linalg import conjugate_gradient, per_item_sq, relative_residual
from ctflow.solvers.weights import whiten

__all__ = ["ModelSpaceProblem", "make_problem", "data_step"]


class ModelSpaceProblem:
    r"""The data term in the prior's model space.

    With the prior's normalisation :math:`s = a x + b`: :math:`A x - y = A_m s - y_m`,
    :math:`A_m = A/a`, :math:`y_m = y + (b/a)\,A\mathbf 1`. ``data(s)`` is
    :math:`\tfrac{1}{2\sigma^2}\|A_m s - y_m\|^2` per item; ``residual(s)`` is
    :math:`A_m s - y_m`.
    """

    def __init__(self, operator, y: torch.Tensor, scale: float, shift: float, sigma: float):
        self.operator = operator
        self.scale, self.shift, self.sigma = float(scale), float(shift), float(sigma)
        self.A = operator if self.scale == 1.0 else operator * (1.0 / self.scale)
        self.y = y
        if self.shift != 0.0:
            ones = torch.ones((1, y.shape[1], *operator.domain_shape), dtype=y.dtype,
                              device=y.device)
            with torch.no_grad():
                self.y_m = y + (self.shift / self.scale) * operator.forward(ones)
        else:
            self.y_m = y
        self.y_norm = float(y.norm())

    def residual(self, s: torch.Tensor) -> torch.Tensor:
        """:math:`A_m s - y_m` (= :math:`A x - y` for the public image :math:`x`)."""
        return self.A.forward(s) - self.y_m

    def data(self, s: torch.Tensor) -> torch.Tensor:
        """:math:`\\tfrac1{2\\sigma^2}\\|A_m s - y_m\\|^2` per item, shape ``(B,)``."""
        return per_item_sq(self.residual(s)) / (2.0 * self.sigma ** 2)

    def relative_residual(self, s: torch.Tensor) -> float:
        """:math:`\\|A x - y\\| / \\|y\\|` over the whole batch."""
        return relative_residual(self.residual(s), y_norm=self.y_norm)

    def normal_rhs(self) -> torch.Tensor:
        """:math:`A_m^T y_m`."""
        return self.A.adjoint(self.y_m)


def make_problem(operator, y: torch.Tensor, prior, sigma: float, weights=None):
    """The data term the flow solvers use: :class:`ModelSpaceProblem` for image-space priors,
    :class:`~ctflow.solvers.latent.LatentDataProblem` (data seen through the decoder) for
    latent priors; with checked statistical ``weights``, on the whitened operator and data
    (:func:`~ctflow.solvers.weights.whiten`: the residuals, data terms and data steps are
    then the weighted ones)."""
    operator, y = whiten(operator, y, weights)
    if getattr(prior, "is_latent", False):
        return LatentDataProblem(operator, y, prior, sigma)
    problem = ModelSpaceProblem(operator, y, prior.scale, prior.shift, sigma)
    # non-uniform weights only: with W = cI the data step is the unweighted one, solved alike
    problem.weighted = weights is not None and bool((weights != weights.flatten()[0]).any())
    return problem


def data_step(problem, p: torch.Tensor, rho: float, x0: torch.Tensor, *,
              iterations: int = 10, tol: float = 1e-6) -> Tuple[torch.Tensor, str]:
    r"""The minimiser of :math:`\tfrac1{2\sigma^2}\|A_m s - y_m\|^2 + \tfrac\rho2\|s - p\|^2`:

    .. math:: (A_m^TA_m + \rho\sigma^2 I)\, s = A_m^T y_m + \rho\sigma^2 p.

    Uses ``operator.solve_shifted_normal`` when it returns a closed form (masks, identity,
    circular blur), else ``iterations`` CG steps (relative tolerance ``tol``) started at
    ``x0``. Returns ``(s, "closed-form" | "cg")``.

    A problem with its own ``solve_data_step`` (latent priors,
    :class:`~ctflow.solvers.latent.LatentDataProblem`: ``iterations`` gradient steps through
    the decoder) solves the block itself.
    """
    own_solver = getattr(problem, "solve_data_step", None)
    if own_solver is not None:
        return own_solver(p, rho, x0, iterations=iterations, tol=tol)
    shift = float(rho) * problem.sigma ** 2
    b = problem.normal_rhs() + shift * p
    if shift > 0:
        sol = problem.A.solve_shifted_normal(b, shift)
        if sol is not None:
            return sol, "closed-form"

    def apply(v):
        return problem.A.adjoint(problem.A.forward(v)) + shift * v

    return conjugate_gradient(apply, b, x0, iterations=iterations, tol=tol,
                              preconditioner=_preconditioner(problem, x0, shift)), "cg"


def _preconditioner(problem, like: torch.Tensor, shift: float):
    r"""With non-uniform statistical weights: :math:`M^{-1}` of the diagonal (separable-quadratic-surrogate)
    preconditioner :math:`M = \operatorname{diag}(A_m^TWA_m\mathbf 1) + \rho\sigma^2 I`
    (cached on the problem; ``None`` without weights, or where the diagonal is not positive,
    i.e. an operator with negative entries). Weights spanning orders of magnitude (low-dose
    data) make plain CG crawl on the rays through the body; the diagonal rescales them."""
    if not getattr(problem, "weighted", False):
        return None
    cache = getattr(problem, "_sqs_diagonal", None)
    if cache is None or cache.shape != like.shape:
        with torch.no_grad():
            cache = problem.A.adjoint(problem.A.forward(torch.ones_like(like)))
        problem._sqs_diagonal = cache
    diag = cache + shift
    if not bool((diag > 0).all()):
        return None
    inv = 1.0 / diag
    return lambda v: v * inv
