r"""Total variation and the Chambolle–Pock primal–dual hybrid gradient (PDHG) solver of
:math:`\min_x \tfrac12\|Ax - y\|^2 + \lambda\,\mathrm{TV}(x) + \iota_C(x)`.

Isotropic TV with forward differences (:func:`gradient`) and the exact adjoint
:math:`\nabla^T = -\operatorname{div}` (:func:`divergence`). Used by the TV baseline
(:class:`ctflow.solvers.tv.TV`) and by the ``init="tv"`` start of the flow solvers
(:func:`ctflow.solvers.init.initial_image`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from ctflow.solvers.linalg import operator_norm, per_item_dot
from ctflow.solvers.progress import progress as progress_bar

__all__ = ["gradient", "divergence", "tv_iso", "pdhg_tv"]


def gradient(x: torch.Tensor) -> torch.Tensor:
    r"""Forward-difference gradient over the spatial axes of ``x`` ``(B, C, *S)``.

    Returns ``(B, C, d, *S)`` with :math:`(\nabla x)_{j,i} = x_{i + e_j} - x_i` and zero on the
    last slice along axis :math:`j` (Neumann boundary). :math:`\|\nabla\|^2 < 4d`.
    """
    d = x.ndim - 2
    parts = []
    for j in range(d):
        ax = 2 + j
        g = torch.zeros_like(x)
        n = x.shape[ax]
        if n > 1:
            g.narrow(ax, 0, n - 1).copy_(x.narrow(ax, 1, n - 1) - x.narrow(ax, 0, n - 1))
        parts.append(g)
    return torch.stack(parts, dim=2)


def divergence(q: torch.Tensor) -> torch.Tensor:
    r"""The negative adjoint of :func:`gradient`: ``divergence(q) = -gradient^T q``.

    For ``q`` of shape ``(B, C, d, *S)``, per axis :math:`j` (backward differences):
    :math:`(\operatorname{div} q)_i = q_{j,i}\,[i < n-1] - q_{j,i-e_j}\,[i > 0]`, so that
    :math:`\langle \nabla x, q\rangle = -\langle x, \operatorname{div} q\rangle` exactly.
    """
    d = q.shape[2]
    out = torch.zeros_like(q[:, :, 0])
    for j in range(d):
        ax = 2 + j
        qj = q[:, :, j]
        n = qj.shape[ax]
        if n == 1:
            continue
        out.narrow(ax, 0, n - 1).add_(qj.narrow(ax, 0, n - 1))
        out.narrow(ax, 1, n - 1).sub_(qj.narrow(ax, 0, n - 1))
    return out


def tv_iso(x: torch.Tensor) -> torch.Tensor:
    r"""Isotropic total variation per item, :math:`\sum_i \|(\nabla x)_i\|_2`, shape ``(B,)``
    (summed over channels)."""
    return torch.linalg.vector_norm(gradient(x), dim=2).flatten(1).sum(1)


def _balance_steps(tau: float, s: float, rate: float, r_primal: float,
                   r_dual: float) -> Tuple[float, float, float]:
    """One adaptive step-balancing decision (see :func:`pdhg_tv`)."""
    if r_primal > 1.5 * r_dual:
        return tau / (1.0 - rate), s * (1.0 - rate), rate * 0.95
    if r_primal < r_dual / 1.5:
        return tau * (1.0 - rate), s / (1.0 - rate), rate * 0.95
    return tau, s, rate


def _diagonal_steps(operator, x: torch.Tensor, y: torch.Tensor, d: int):
    """Pock–Chambolle steps (alpha = 1) of ``K = [A; grad]``: per-pixel primal steps, per-ray
    data dual steps and the TV dual step (see :func:`pdhg_tv`)."""
    rows = operator.forward(torch.ones_like(x))
    cols = operator.adjoint(torch.ones_like(y))
    for name, v in (("A 1", rows), ("A^T 1", cols)):
        low, high = float(v.min()), float(v.max())
        if low < -1e-6 * max(high, 1e-30) or not math.isfinite(low + high):
            raise ValueError(f"TV: precondition=True needs an operator with nonnegative "
                             f"entries (a ray transform), but {name} has the value {low:.3g}")
    s_data = 1.0 / rows.clamp_min(1e-12 * max(float(rows.max()), 1e-30))
    tau = 0.99 / (cols.clamp_min(0.0) + 2.0 * d)
    return tau, s_data, 0.5


def pdhg_tv(operator, y: torch.Tensor, *, weight: float, iterations: int = 300,
            nonneg: bool = True, box: bool = False, tol: float = 0.0,
            x0: Optional[torch.Tensor] = None, scale: float = 1.0, adaptive: bool = True,
            precondition: bool = False,
            progress: bool = False) -> Tuple[torch.Tensor, List[Dict[str, Any]]]:
    r"""Chambolle–Pock PDHG for :math:`P(x) = \tfrac12\|Ax - y\|^2 + \lambda\,\mathrm{TV}(x) +
    \iota_C(x)` (unclipped), :math:`\lambda` = ``weight``.

    Splitting :math:`P(x) = f_1(\tilde A x) + f_2(\nabla x) + g(x)` with the balanced
    :math:`K = [\tilde A; \nabla]`, :math:`\tilde A = A/c`, :math:`c = \|A\|/\sqrt{4d}` (so
    both blocks have norm at most :math:`\sqrt{4d}`, :math:`d` the number of spatial axes and
    :math:`\|\nabla\|^2 < 4d`), :math:`f_1(z) = \tfrac12\|cz - y\|^2`,
    :math:`f_2 = \lambda\|\cdot\|_{2,1}`, :math:`g = \iota_C`, with
    :math:`C = [0, 1]` (``box``), :math:`[0, \infty)` (``nonneg``) or everything. Steps
    :math:`\tau = s = 0.99/\|K\|`, :math:`\|K\|^2 \le 8d`:

    .. math::

        p &\leftarrow \frac{p + s(\tilde A\bar x - y/c)}{1 + s/c^2}, \qquad
        q \leftarrow \frac{q + s\nabla\bar x}{\max(1, |q + s\nabla\bar x| / \lambda)},\\
        x^+ &\leftarrow P_C\big(x - \tau(\tilde A^T p - \operatorname{div} q)\big), \qquad
        \bar x \leftarrow 2x^+ - x.

    ``adaptive`` (default) balances the two steps as Goldstein, Li & Yuan (2015, "Adaptive
    primal–dual splitting methods"): with the primal and dual residuals

    .. math::

        r_P = \|x - x^+\| / \tau, \qquad
        r_D = \big\|(y - y^+)/s + K(x^+ - \bar x)\big\|, \quad y = (p, q),

    :math:`\tau \leftarrow \tau/(1-a)`, :math:`s \leftarrow s(1-a)` when
    :math:`r_P > 1.5\,r_D` (the reverse when :math:`r_P < r_D/1.5`), and :math:`a \leftarrow
    0.95a` after each change (:math:`a_0 = 0.5`): :math:`\tau s` never changes, so the step
    condition :math:`\tau s\|K\|^2 < 1` holds throughout, and the changes die out, so the
    iteration converges as the fixed-step one. Without it a small :math:`\lambda` (low noise)
    leaves the dual TV variable in a ball of radius :math:`\lambda` and the image moves by at
    most :math:`4\tau\lambda` a step where the data say nothing (inpainting holes): hundreds of
    iterations then barely start.

    ``precondition``: diagonal preconditioning (Pock & Chambolle, "Diagonal preconditioning for
    first order primal-dual algorithms in convex optimization", ICCV 2011, :math:`\alpha = 1`)
    for operators with nonnegative entries (ray transforms, also whitened by statistical
    weights): no balancing constant (:math:`c = 1`), per-ray dual steps
    :math:`s_i = 1/(A\mathbf 1)_i`, TV dual step :math:`1/2`, per-pixel primal steps
    :math:`\tau_j = 0.99/((A^T\mathbf 1)_j + 2d)`, so :math:`\|S^{1/2}KT^{1/2}\| < 1`; the
    adaptive balancing scales all primal steps by one factor and all dual steps by its
    inverse. Statistical weights spanning orders of magnitude (low-dose post-log data) make
    :math:`W^{1/2}A` badly scaled for one global step: rays through the body, with few counts,
    then barely move; the per-ray steps remove that scaling. An operator with a negative
    entry that shows in :math:`A\mathbf 1` or :math:`A^T\mathbf 1` is refused.

    ``scale`` divides the reported objective and gap (``1/σ²`` form: pass :math:`\sigma^2`).
    History per iteration: ``iteration``, ``residual``, ``data`` (:math:`\tfrac12\|Ax-y\|^2` /
    scale), ``tv``, ``objective`` (:math:`P(x)` / scale), ``gap`` (primal–dual gap / scale,
    finite for the box constraint only, else ``None``), ``change``. Stops early when the
    relative change :math:`\|x^+ - x\|/\|x^+\|` falls to ``tol``.
    """
    lam = float(weight)
    d = len(operator.domain_shape)
    x = torch.zeros((y.shape[0], y.shape[1], *operator.domain_shape), dtype=y.dtype,
                    device=y.device) if x0 is None else x0.clone()
    if precondition:
        c = 1.0
        tau_0, s_data, s_grad = _diagonal_steps(operator, x, y, d)
    else:
        c = operator_norm("TV", operator, y) / math.sqrt(4.0 * d)
        tau_0 = s_data = s_grad = 0.99 / math.sqrt(8.0 * d)
    tau = s = 1.0                     # the adaptive factors of the primal and the dual steps
    rate = 0.5 if adaptive else 0.0

    def project(v):
        if box:
            return v.clamp(0.0, 1.0)
        if nonneg:
            return v.clamp_min(0.0)
        return v

    history: List[Dict[str, Any]] = []
    with torch.no_grad():
        x = project(x)
        ax = operator.forward(x)
        ax_bar = ax
        x_bar = x
        p = torch.zeros_like(y)
        q = torch.zeros((*x.shape[:2], d, *x.shape[2:]), dtype=x.dtype, device=x.device)
        yn = float(torch.linalg.vector_norm(y))
        for k in progress_bar(range(1, iterations + 1), enabled=progress, desc="tv"):
            p_old, q_old = p, q
            sd = s * s_data
            p = (p + sd * (ax_bar / c - y / c)) / (1.0 + sd / (c * c))
            q = q + (s * s_grad) * gradient(x_bar)
            if lam > 0:
                qn = torch.linalg.vector_norm(q, dim=2, keepdim=True)
                q = q / torch.clamp(qn / lam, min=1.0)
            else:
                q = torch.zeros_like(q)
            kt = operator.adjoint(p) / c - divergence(q)
            x_new = project(x - (tau * tau_0) * kt)
            ax_new = operator.forward(x_new)
            change = float(torch.linalg.vector_norm(x_new - x)) / max(
                float(torch.linalg.vector_norm(x_new)), 1e-30)
            if rate > 1e-3:
                tau, s, rate = _balance_steps(
                    tau, s, rate, float(torch.linalg.vector_norm((x - x_new) / (tau * tau_0))),
                    math.hypot(float(torch.linalg.vector_norm((p_old - p) / (s * s_data)
                                                              + (ax_new - ax_bar) / c)),
                               float(torch.linalg.vector_norm((q_old - q) / (s * s_grad)
                                                              + gradient(x_new - x_bar)))))
            x_bar = 2.0 * x_new - x
            ax_bar = 2.0 * ax_new - ax
            x, ax = x_new, ax_new
            rn = float(torch.linalg.vector_norm(ax - y))
            tv = float(tv_iso(x).sum())
            primal = 0.5 * rn ** 2 + lam * tv
            gap = None
            if box:
                # dual value D(p, q) = -f1*(p) - g*(-K^T [p; q]) with q feasible (f2* = 0)
                f1s = (float(per_item_dot(p, p).sum()) / (2 * c * c)
                       + float(per_item_dot(p, y).sum()) / c)
                gs = float((-kt).clamp_min(0.0).sum())
                gap = (primal - (-f1s - gs)) / scale
            history.append({
                "iteration": k,
                "residual": rn / yn if yn > 0 else rn,
                "data": 0.5 * rn ** 2 / scale,
                "tv": tv,
                "objective": primal / scale,
                "gap": gap,
                "change": change,
            })
            if change <= tol:
                break
    return x, history
