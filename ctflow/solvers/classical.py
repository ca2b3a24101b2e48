r"""Classical reconstruction baselines: filtered back-projection, CGLS, Landweber and TV (PDHG).

All solvers work in the public image space (images in :math:`[0, 1]`, the space the operator
acts on) and ignore the prior. Every ``solve`` returns a
:class:`~ctflow.solvers.result.Reconstruction` whose ``image`` is clipped to :math:`[0, 1]`,
measured with :class:`~ctflow.solvers.result.SolveMeter`.

``noise_level`` :math:`\sigma` is the standard deviation of the Gaussian noise in ``y`` (in the
units of ``y``). The data residual in every history is the batch-aggregate relative residual
:math:`\|Ax - y\| / \|y\|`.

* :class:`CGLS` — conjugate gradients on the normal equations of
  :math:`\min_x \tfrac12\|Ax - y\|^2 + \tfrac{\lambda}{2}\|x\|^2` (:func:`cgls`).
* :class:`Landweber` — :math:`x \leftarrow P_C\big(x + \tfrac{\omega}{\|A\|^2} A^T(y - Ax)\big)`.
* :class:`TV` — Chambolle–Pock primal–dual hybrid gradient for
  :math:`\min_x \tfrac{1}{2\sigma^2}\|Ax - y\|^2 + \mu\,\mathrm{TV}(x) + \iota_C(x)`
  (:func:`pdhg_tv`), isotropic TV with forward differences (:func:`gradient`) and the exact
  adjoint :math:`\nabla^T = -\operatorname{div}` (:func:`divergence`).
* :class:`FBPSolver` — filtered back-projection for CT ray transforms (operators with a
  ``geometry``), through ``ctflow.operators.ct.FBP``.

Options are validated by the checks of :mod:`ctflow.solvers.common` (every error a
``ValueError`` naming the solver, the option and the allowed values). The small linear-algebra
and result helpers at the top of this module are shared with the flow baselines
(:mod:`ctflow.solvers.pnpflow`, :mod:`ctflow.solvers.otode`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ctflow.solvers.common import (check_bool, check_choice, check_float, check_int, check_problem,
                     check_seed, check_x_init)
from ctflow.solvers.result import Reconstruction, SolveMeter

__all__ = ["CGLS", "Landweber", "TV", "FBPSolver", "cgls", "landweber", "pdhg_tv",
           "gradient", "divergence", "tv_iso", "FBP_FILTERS"]

#: Filters accepted by :class:`FBPSolver`.
FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hann")


# ---------------------------------------------------------------------------------------------
# options, results
# ---------------------------------------------------------------------------------------------
def _record_options(options: Dict[str, Any]) -> Dict[str, Any]:
    """The options as plain values (a tensor is recorded by its shape, a callable by name)."""
    out = {}
    for k, v in options.items():
        if isinstance(v, torch.Tensor):
            out[k] = f"tensor{tuple(v.shape)}"
        elif callable(v) and not isinstance(v, (str, numbers.Number)):
            out[k] = getattr(v, "__name__", type(v).__name__)
        else:
            out[k] = v
    return out


def _initial_image(owner: str, operator, y: torch.Tensor,
                   x_init: Optional[torch.Tensor]) -> torch.Tensor:
    """``x_init`` checked against the domain (moved to y's device/dtype), or zeros."""
    shape = (y.shape[0], y.shape[1], *operator.domain_shape)
    if x_init is None:
        return torch.zeros(shape, dtype=y.dtype, device=y.device)
    if tuple(x_init.shape) != shape:
        raise ValueError(f"{owner}: option x_init shape mismatch: expected {shape}, "
                         f"got {tuple(x_init.shape)}")
    if not bool(torch.isfinite(x_init).all()):
        raise ValueError(f"{owner}: option x_init contains NaN or infinite values")
    return x_init.detach().to(device=y.device, dtype=y.dtype).clone()


# ---------------------------------------------------------------------------------------------
# batched linear algebra
# ---------------------------------------------------------------------------------------------
def _bdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-item inner products, shape ``(B,)``."""
    return (a * b).flatten(1).sum(1)


def _bview(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


def _rel_residual(ax: torch.Tensor, y: torch.Tensor) -> float:
    """Batch-aggregate relative residual ``||Ax - y|| / ||y||`` (``||Ax - y||`` if y = 0)."""
    num = float(torch.linalg.vector_norm(ax - y))
    den = float(torch.linalg.vector_norm(y))
    return num / den if den > 0 else num


def _cg(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
        x0: Optional[torch.Tensor] = None, iterations: int = 10,
        tol: float = 0.0) -> Tuple[torch.Tensor, int]:
    """Conjugate gradients for ``apply(x) = b`` (symmetric positive semi-definite), run
    independently per batch item (per-item step lengths). Stops when every item's residual
    satisfies ``||r|| <= tol * ||b||``. Returns ``(x, iterations run)``."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = _bdot(r, r)
    bnorm = torch.sqrt(_bdot(b, b))
    k = 0
    for k in range(1, iterations + 1):
        if bool((torch.sqrt(rr) <= tol * bnorm).all()):
            k -= 1
            break
        ap = apply(p)
        pap = _bdot(p, ap)
        alpha = torch.where(pap > 0, rr / torch.where(pap > 0, pap, torch.ones_like(pap)),
                            torch.zeros_like(pap))
        x = x + _bview(alpha, x) * p
        r = r - _bview(alpha, r) * ap
        rr_new = _bdot(r, r)
        beta = torch.where(rr > 0, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)),
                           torch.zeros_like(rr))
        p = r + _bview(beta, p) * p
        rr = rr_new
    return x, k


def _progress(iterable, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False)


def _operator_norm(owner: str, operator, like: torch.Tensor) -> float:
    try:
        n = float(operator.norm(device=like.device))
    except TypeError:  # an operator whose norm() takes no keyword arguments
        n = float(operator.norm())
    if not (math.isfinite(n) and n > 0):
        raise ValueError(f"{owner}: the operator norm must be positive and finite, got {n}")
    return n


def _finish(owner: str, method: str, x: torch.Tensor, history: List[Dict[str, Any]],
            meter: SolveMeter, options: Dict[str, Any],
            nfe: Optional[Dict[str, int]] = None) -> Reconstruction:
    return Reconstruction(image=x.detach().clamp(0.0, 1.0), history=history,
                          nfe=dict(nfe or {"forward": 0, "backward": 0}),
                          seconds=meter.seconds, peak_memory_bytes=meter.peak_memory_bytes,
                          method=method, options=_record_options(options))


def _common_options(owner: str, x_init: Optional[torch.Tensor], seed: int,
                    progress: bool) -> Dict[str, Any]:
    """The options every baseline takes: ``x_init``, ``seed`` and ``progress``, checked."""
    return {"x_init": check_x_init(x_init, owner=owner),
            "seed": check_seed(seed, owner=owner),
            "progress": check_bool("progress", progress, owner=owner)}


class _ClassicalSolver:
    """``solve`` of the iterative classical baselines: check the problem, take the start image
    (``x_init``, or ``None`` for zeros), run the subclass's ``_run(operator, y, sigma, x0)``
    → ``(x, history, options to record)`` under a :class:`SolveMeter`, clip and record."""

    method = ""
    options: Dict[str, Any]

    def solve(self, operator, y: torch.Tensor, prior=None,
              noise_level: float = 0.0) -> Reconstruction:
        """Reconstruct from ``y = A x + noise`` (the prior is unused; ``noise_level`` is the
        noise standard deviation in ``y``, 0 allowed)."""
        o, opt = type(self).__name__, self.options
        sigma = check_problem(operator, y, noise_level, owner=o)
        x_init = opt.get("x_init")
        x0 = None if x_init is None else _initial_image(o, operator, y, x_init)
        with SolveMeter(y.device) as meter:
            x, history, recorded = self._run(operator, y, sigma, x0)
        return _finish(o, self.method, x, history, meter, recorded)


# ---------------------------------------------------------------------------------------------
# CGLS and Landweber
# ---------------------------------------------------------------------------------------------
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
        gamma = _bdot(s, s)
        s0 = torch.sqrt(gamma)
        s0_safe = torch.where(s0 > 0, s0, torch.ones_like(s0))
        history: List[Dict[str, Any]] = []
        for k in _progress(range(1, iterations + 1), progress, "cgls"):
            if bool((torch.sqrt(gamma) <= tol * s0).all()):
                break
            q = operator.forward(p)
            delta = _bdot(q, q) + lam * _bdot(p, p)
            alpha = torch.where(delta > 0, gamma / torch.where(delta > 0, delta,
                                                                torch.ones_like(delta)),
                                torch.zeros_like(delta))
            x = x + _bview(alpha, x) * p
            r = r - _bview(alpha, r) * q
            s = operator.adjoint(r) - lam * x
            gamma_new = _bdot(s, s)
            beta = torch.where(gamma > 0, gamma_new / torch.where(gamma > 0, gamma,
                                                                   torch.ones_like(gamma)),
                               torch.zeros_like(gamma))
            p = s + _bview(beta, p) * p
            gamma = gamma_new
            rn = float(torch.linalg.vector_norm(r))
            yn = float(torch.linalg.vector_norm(y))
            history.append({
                "iteration": k,
                "residual": rn / yn if yn > 0 else rn,
                "objective": 0.5 * rn ** 2 + 0.5 * lam * float(_bdot(x, x).sum()),
                "normal_residual": float((torch.sqrt(gamma) / s0_safe).max()),
            })
    return x, history


class CGLS(_ClassicalSolver):
    r"""Least squares by conjugate gradients (CGLS); the prior is unused.

    Solves :math:`\min_x \tfrac12\|Ax - y\|^2 + \tfrac{\lambda}{2}\|x\|^2` in the public image
    space (see :func:`cgls`); few iterations act as regularisation (semi-convergence).

    Options (keyword-only):
        iterations (int >= 1, default 30): maximum CG iterations.
        tol (float >= 0, default 1e-6): stop when the normal-equation residual has dropped by
            this factor for every item.
        tikhonov (float >= 0, default 0.0): the Tikhonov weight :math:`\lambda`.
        x_init (tensor or None, default None = zeros): the starting image.
        seed (int >= 0, default 0): accepted for a uniform interface (``reconstruct`` passes
            one to every method); the method is deterministic.
        progress (bool, default False): show a tqdm bar.
    """

    method = "cgls"

    def __init__(self, *, iterations: int = 30, tol: float = 1e-6, tikhonov: float = 0.0,
                 x_init: Optional[torch.Tensor] = None, seed: int = 0,
                 progress: bool = False):
        o = type(self).__name__
        self.options = {
            "iterations": check_int("iterations", iterations, owner=o, minimum=1),
            "tol": check_float("tol", tol, owner=o, minimum=0.0),
            "tikhonov": check_float("tikhonov", tikhonov, owner=o, minimum=0.0),
            **_common_options(o, x_init, seed, progress),
        }

    def _run(self, operator, y, sigma, x0):
        opt = self.options
        x, history = cgls(operator, y, iterations=opt["iterations"], tol=opt["tol"],
                          tikhonov=opt["tikhonov"], x0=x0, progress=opt["progress"])
        return x, history, opt


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
    step = relaxation / _operator_norm("landweber", operator, y) ** 2
    x = torch.zeros((y.shape[0], y.shape[1], *operator.domain_shape), dtype=y.dtype,
                    device=y.device) if x0 is None else x0.clone()
    history: List[Dict[str, Any]] = []
    with torch.no_grad():
        r = y - operator.forward(x)
        for k in _progress(range(1, iterations + 1), progress, "landweber"):
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


class Landweber(_ClassicalSolver):
    r"""Projected Landweber iteration (gradient descent on :math:`\tfrac12\|Ax-y\|^2`); the
    prior is unused. See :func:`landweber`.

    Options (keyword-only):
        iterations (int >= 1, default 100).
        relaxation (float in (0, 2), default 1.0): step :math:`\omega/\|A\|^2`.
        nonneg (bool, default True): project onto :math:`x \ge 0` after each step.
        tol (float >= 0, default 0.0): relative-change stopping tolerance.
        x_init (tensor or None, default None = zeros).
        seed (int >= 0, default 0): accepted for a uniform interface (``reconstruct`` passes
            one to every method); the method is deterministic.
        progress (bool, default False).
    """

    method = "landweber"

    def __init__(self, *, iterations: int = 100, relaxation: float = 1.0, nonneg: bool = True,
                 tol: float = 0.0, x_init: Optional[torch.Tensor] = None, seed: int = 0,
                 progress: bool = False):
        o = type(self).__name__
        self.options = {
            "iterations": check_int("iterations", iterations, owner=o, minimum=1),
            "relaxation": check_float("relaxation", relaxation, owner=o, minimum=0.0,
                                      maximum=2.0, min_open=True, max_open=True),
            "nonneg": check_bool("nonneg", nonneg, owner=o),
            "tol": check_float("tol", tol, owner=o, minimum=0.0),
            **_common_options(o, x_init, seed, progress),
        }

    def _run(self, operator, y, sigma, x0):
        opt = self.options
        x, history = landweber(operator, y, iterations=opt["iterations"],
                               relaxation=opt["relaxation"], nonneg=opt["nonneg"],
                               tol=opt["tol"], x0=x0, progress=opt["progress"])
        return x, history, opt


# ---------------------------------------------------------------------------------------------
# total variation
# ---------------------------------------------------------------------------------------------
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


def pdhg_tv(operator, y: torch.Tensor, *, weight: float, iterations: int = 300,
            nonneg: bool = True, box: bool = False, tol: float = 0.0,
            x0: Optional[torch.Tensor] = None, scale: float = 1.0, adaptive: bool = True,
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

    ``scale`` divides the reported objective and gap (``1/σ²`` form: pass :math:`\sigma^2`).
    History per iteration: ``iteration``, ``residual``, ``data`` (:math:`\tfrac12\|Ax-y\|^2` /
    scale), ``tv``, ``objective`` (:math:`P(x)` / scale), ``gap`` (primal–dual gap / scale,
    finite for the box constraint only, else ``None``), ``change``. Stops early when the
    relative change :math:`\|x^+ - x\|/\|x^+\|` falls to ``tol``.
    """
    lam = float(weight)
    d = len(operator.domain_shape)
    c = _operator_norm("TV", operator, y) / math.sqrt(4.0 * d)
    step = 0.99 / math.sqrt(8.0 * d)
    tau = s = step
    rate = 0.5 if adaptive else 0.0
    x = torch.zeros((y.shape[0], y.shape[1], *operator.domain_shape), dtype=y.dtype,
                    device=y.device) if x0 is None else x0.clone()

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
        for k in _progress(range(1, iterations + 1), progress, "tv"):
            p_old, q_old = p, q
            p = (p + s * (ax_bar / c - y / c)) / (1.0 + s / (c * c))
            q = q + s * gradient(x_bar)
            if lam > 0:
                qn = torch.linalg.vector_norm(q, dim=2, keepdim=True)
                q = q / torch.clamp(qn / lam, min=1.0)
            else:
                q = torch.zeros_like(q)
            kt = operator.adjoint(p) / c - divergence(q)
            x_new = project(x - tau * kt)
            ax_new = operator.forward(x_new)
            change = float(torch.linalg.vector_norm(x_new - x)) / max(
                float(torch.linalg.vector_norm(x_new)), 1e-30)
            if rate > 1e-3:
                tau, s, rate = _balance_steps(
                    tau, s, rate, float(torch.linalg.vector_norm(x - x_new)) / tau,
                    math.hypot(float(torch.linalg.vector_norm((p_old - p) / s
                                                              + (ax_new - ax_bar) / c)),
                               float(torch.linalg.vector_norm((q_old - q) / s
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
                f1s = float(_bdot(p, p).sum()) / (2 * c * c) + float(_bdot(p, y).sum()) / c
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


class TV(_ClassicalSolver):
    r"""Total-variation regularised reconstruction by Chambolle–Pock PDHG; the prior is unused.

    .. math::

        \min_x\ \frac{1}{2\sigma^2}\|Ax - y\|^2 + \mu\,\mathrm{TV}_{\mathrm{iso}}(x)
        + \iota_C(x),

    :math:`\sigma` = ``noise_level``. Internally the equivalent
    :math:`\tfrac12\|Ax-y\|^2 + \lambda\,\mathrm{TV}(x)`, :math:`\lambda = \sigma^2\mu`, is
    solved (:func:`pdhg_tv`), so :math:`\sigma = 0` is allowed; the reported ``objective`` and
    ``gap`` are in the :math:`1/(2\sigma^2)` form when :math:`\sigma > 0`.

    Options (keyword-only):
        weight (float >= 0, default 1.0): the TV weight, read per ``weight_mode``.
        weight_mode ("relative" | "absolute", default "relative"): ``"absolute"``:
            :math:`\mu` = ``weight``; ``"relative"``: :math:`\mu` = ``weight``/:math:`\sigma`,
            i.e. :math:`\lambda = \text{weight}\cdot\sigma` (the TV weight scales with the
            noise level).
        iterations (int >= 1, default 300).
        nonneg (bool, default True): constrain :math:`x \ge 0`.
        box (bool, default False): constrain :math:`0 \le x \le 1` (overrides ``nonneg``;
            makes the primal–dual gap finite, reported in the history).
        tol (float >= 0, default 1e-6): stop when the relative change of x falls below it.
        adaptive (bool, default True): balance the primal and dual steps as the iteration
            goes (see :func:`pdhg_tv`); ``False``: fixed equal steps.
        x_init (tensor or None, default None = zeros).
        seed (int >= 0, default 0): accepted for a uniform interface (``reconstruct`` passes
            one to every method); the method is deterministic.
        progress (bool, default False).
    """

    method = "tv"

    def __init__(self, *, weight: float = 1.0, weight_mode: str = "relative",
                 iterations: int = 300, nonneg: bool = True, box: bool = False,
                 tol: float = 1e-6, adaptive: bool = True,
                 x_init: Optional[torch.Tensor] = None, seed: int = 0, progress: bool = False):
        o = type(self).__name__
        self.options = {
            "weight": check_float("weight", weight, owner=o, minimum=0.0),
            "weight_mode": check_choice("weight_mode", weight_mode, ("relative", "absolute"),
                                        owner=o),
            "iterations": check_int("iterations", iterations, owner=o, minimum=1),
            "nonneg": check_bool("nonneg", nonneg, owner=o),
            "box": check_bool("box", box, owner=o),
            "tol": check_float("tol", tol, owner=o, minimum=0.0),
            "adaptive": check_bool("adaptive", adaptive, owner=o),
            **_common_options(o, x_init, seed, progress),
        }

    def effective_weight(self, noise_level: float) -> float:
        r""":math:`\lambda` of the unscaled problem :math:`\tfrac12\|Ax-y\|^2 + \lambda TV`."""
        w, sigma = self.options["weight"], float(noise_level)
        return w * sigma if self.options["weight_mode"] == "relative" else w * sigma * sigma

    def _run(self, operator, y, sigma, x0):
        opt = self.options
        lam = self.effective_weight(sigma)
        x, history = pdhg_tv(operator, y, weight=lam, iterations=opt["iterations"],
                             nonneg=opt["nonneg"], box=opt["box"], tol=opt["tol"], x0=x0,
                             adaptive=opt["adaptive"],
                             scale=sigma * sigma if sigma > 0 else 1.0,
                             progress=opt["progress"])
        return x, history, dict(opt, effective_weight=lam)


# ---------------------------------------------------------------------------------------------
# filtered back-projection
# ---------------------------------------------------------------------------------------------
class FBPSolver:
    r"""Filtered back-projection for CT ray transforms; the prior is unused.

    Needs an operator with a ``geometry`` attribute (``ctflow.operators.RayTransform``) and
    applies ``ctflow.operators.ct.FBP(geometry, filter=...)`` to the sinogram.

    Options (keyword-only):
        filter ("ramp" | "shepp-logan" | "cosine" | "hann", default "ramp").
        seed (int >= 0, default 0): accepted for a uniform interface (``reconstruct`` passes
            one to every method); the method is deterministic.
        progress (bool, default False): accepted for a uniform interface (FBP is one step).
    """

    method = "fbp"

    def __init__(self, *, filter: str = "ramp", seed: int = 0,  # noqa: A002 - option name
                 progress: bool = False):
        o = type(self).__name__
        self.options = {"filter": check_choice("filter", filter, FBP_FILTERS, owner=o),
                        "seed": check_seed(seed, owner=o),
                        "progress": check_bool("progress", progress, owner=o)}

    def solve(self, operator, y: torch.Tensor, prior=None,
              noise_level: float = 0.0) -> Reconstruction:
        """Filtered back-projection of ``y`` (the prior and ``noise_level`` are unused)."""
        o, opt = type(self).__name__, self.options
        check_problem(operator, y, noise_level, owner=o)
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
                x = FBP(geometry, filter=opt["filter"])(y)
                res = _rel_residual(operator.forward(x), y)
        history = [{"iteration": 1, "residual": res}]
        return _finish(o, self.method, x, history, meter, opt)
