r"""Batched linear algebra of the solvers: per-item reductions, the one per-item broadcast,
the one conjugate-gradient solver, residuals and the operator norm.

Every function works on batches ``(B, ...)`` and never mixes batch items.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple, Union

import torch

__all__ = ["per_item_sq", "per_item_norm", "per_item_dot", "broadcast_items",
           "conjugate_gradient", "relative_residual", "operator_norm"]


def per_item_sq(x: torch.Tensor) -> torch.Tensor:
    """:math:`\\|x_i\\|^2` per batch item, shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


def per_item_norm(x: torch.Tensor) -> torch.Tensor:
    """:math:`\\|x_i\\|` per batch item, shape ``(B,)``."""
    return per_item_sq(x).sqrt()


def per_item_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:math:`\\langle a_i, b_i\\rangle` per batch item, shape ``(B,)``."""
    return (a * b).reshape(a.shape[0], -1).sum(1)


def broadcast_items(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-item values ``v`` of shape ``(B,)`` reshaped to ``(B, 1, ..., 1)`` so that they
    broadcast against ``like`` (``(B, ...)``)."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: Optional[torch.Tensor] = None, *, iterations: int = 10,
                       tol: float = 0.0, stop: str = "item", count: bool = False,
                       preconditioner: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
                       ) -> Union[torch.Tensor, Tuple[torch.Tensor, int]]:
    r"""Solve :math:`H x = b` for a symmetric positive (semi)definite ``apply`` by CG.

    One independent CG per batch item (per-item step sizes), so items never mix. Warm start
    ``x0``. CG decreases the energy :math:`\tfrac12 x^THx - b^Tx` monotonically from ``x0``,
    so a warm-started data step never increases its block objective. At most ``iterations``
    steps; an item has converged when :math:`\|r\| \le \text{tol}\,\|b\|`:

    * ``stop="item"``: a converged item stops moving (its step is zero), the others go on;
    * ``stop="batch"``: every item keeps iterating until all have converged.

    ``preconditioner``: :math:`M^{-1}` of a symmetric positive definite :math:`M` (for
    example a positive diagonal): preconditioned CG, :math:`z = M^{-1}r`, steps
    :math:`\alpha = r^Tz/p^THp`, :math:`\beta = r_+^Tz_+/r^Tz` (same solution, fewer steps
    when :math:`M \approx H`; the energy still decreases monotonically).

    Returns ``x``, or ``(x, iterations run)`` with ``count``.
    """
    if stop not in ("item", "batch"):
        raise ValueError(f"conjugate_gradient: stop must be 'item' or 'batch', got {stop!r}")
    precond = preconditioner if preconditioner is not None else (lambda v: v)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    z = precond(r)
    p = z.clone()
    rz = per_item_dot(r, z)
    rr = per_item_sq(r)
    threshold = per_item_norm(b) * tol
    done = 0
    for _ in range(int(iterations)):
        active = rr.sqrt() > threshold
        if not bool(active.any()):
            break
        if stop == "batch":
            active = torch.ones_like(active)
        hp = apply(p)
        php = per_item_dot(p, hp)
        ok = active & (php > 0)
        alpha = torch.where(ok, rz / torch.where(ok, php, torch.ones_like(php)),
                            torch.zeros_like(rz))
        x = x + broadcast_items(alpha, x) * p
        r = r - broadcast_items(alpha, r) * hp
        z = precond(r)
        rz_new = per_item_dot(r, z)
        beta = torch.where(ok, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)),
                           torch.zeros_like(rz))
        p = z + broadcast_items(beta, p) * p
        rz = torch.where(ok, rz_new, rz)
        rr = torch.where(ok, per_item_sq(r), rr)
        done += 1
    return (x, done) if count else x


def relative_residual(residual: torch.Tensor, y: Optional[torch.Tensor] = None, *,
                      y_norm: Optional[float] = None) -> float:
    """Batch-aggregate relative residual :math:`\\|r\\| / \\|y\\|` (:math:`\\|r\\|` when
    :math:`y = 0`); ``y_norm`` may be given instead of ``y``."""
    num = float(torch.linalg.vector_norm(residual))
    den = float(torch.linalg.vector_norm(y)) if y_norm is None else float(y_norm)
    return num / den if den > 0 else num


def operator_norm(owner: str, operator, like: torch.Tensor) -> float:
    """:math:`\\|A\\|` (``operator.norm``, on ``like``'s device); refused unless positive and
    finite."""
    try:
        n = float(operator.norm(device=like.device))
    except TypeError:  # an operator whose norm() takes no keyword arguments
        n = float(operator.norm())
    if not (math.isfinite(n) and n > 0):
        raise ValueError(f"{owner}: the operator norm must be positive and finite, got {n}")
    return n
