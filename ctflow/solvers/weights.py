r"""The statistically weighted data term of every solver, by whitening.

With statistical weights :math:`w \ge 0` (one per measurement bin, :math:`W = \operatorname
{diag}(w)`; for post-log transmission data :math:`w \approx` the detected counts, the inverse
variance of the log data up to :math:`\sigma^2`) the data term of every solver is

.. math::

    d(x) = \frac{1}{2\sigma^2}\sum_i w_i\,(Ax - y)_i^2
         = \frac{1}{2\sigma^2}\|\tilde A x - \tilde y\|^2, \qquad
    \tilde A = W^{1/2}A,\ \tilde y = W^{1/2}y,

so a weighted problem is the unweighted problem of the *whitened* operator and data
(:func:`whiten`; ``weights=None`` means :math:`W = I` and returns ``operator`` and ``y``
themselves, so the unweighted numerics are untouched). In whitened units the noise is white
with standard deviation :math:`\sigma`, so everything the solvers derive from :math:`\sigma`
(TV's relative weight, MS-Flow's penalty against the data curvature
:math:`\|\tilde A\|^2/\sigma^2 \le \max(w)\|A\|^2/\sigma^2`) keeps its meaning. The
gradient every gradient-based solver uses is
:math:`\nabla d = \sigma^{-2}\tilde A^T(\tilde Ax - \tilde y) = \sigma^{-2}A^TW(Ax - y)`;
CGLS solves :math:`A^TWAx = A^TWy`; the shifted normal equations of MS-Flow's data step and
OT-ODE's ΠGDM correction have a closed form only for :math:`W = cI`
(:meth:`WeightedOperator.solve_shifted_normal`), else the solvers use conjugate gradients.
The operator norm :math:`\|W^{1/2}A\|` (step sizes of Landweber, TV's PDHG and PnP-Flow) is
:math:`\sqrt c\,\|A\|` for :math:`W = cI`, else the largest per-item norm by power iteration.
CGLS, Landweber, PnP-Flow, OT-ODE, MS-Flow and D-Flow are invariant to a joint scaling of
:math:`w` and :math:`\sigma^2`; TV is not (PDHG and its noise-relative weight), so TV and the
``init="tv"`` start first normalise the weights to mean 1 (:func:`normalize_weights`).

Reported residuals of a weighted solve are the weighted ones,
:math:`\|W^{1/2}(Ax - y)\| / \|W^{1/2}y\|`. FBP does not use weights
(:class:`ctflow.solvers.fbp.FBPSolver` warns); the FBP start image of the flow solvers
(``init="auto"``/``"fbp"``) is the unweighted FBP of ``y`` (:func:`ctflow.solvers.init.
initial_image`).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ctflow.operators import LinearOperator

__all__ = ["WeightedOperator", "whiten", "repeat_items", "normalize_weights"]


class WeightedOperator(LinearOperator):
    r""":math:`W^{1/2}A`: the operator ``op`` followed by the square roots of the statistical
    weights ``weights`` (a validated non-negative tensor that broadcasts against
    ``(B, C, *op.range_shape)``, batch 1 or B, see
    :func:`ctflow.solvers.inputs.check_weights`).

    ``uniform`` is true when every weight is the same number :math:`c` (then
    :math:`W^{1/2}A = \sqrt c\,A` exactly: closed-form shifted normal solves of ``op`` are
    kept and the norm is :math:`\sqrt c\,\|A\|`). No ``geometry`` attribute: filtered
    back-projection of weighted data is not a weighted reconstruction.
    """

    def __init__(self, op: LinearOperator, weights: torch.Tensor):
        super().__init__(op.domain_shape, op.range_shape)
        self.op = op
        self.weights = weights.detach()
        lo, hi = float(self.weights.min()), float(self.weights.max())
        self.uniform = lo == hi
        self.root_uniform = math.sqrt(hi) if self.uniform else None
        self.root = self.weights.sqrt()
        self.name = f"W^(1/2) {op.name}"

    def apply_root(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`W^{1/2}v` for ``v`` of shape ``(B, C, *range_shape)`` (the weights' batch
        is 1 or B)."""
        if self.uniform:
            return self.root_uniform * v
        root = self.root
        if root.shape[0] not in (1, v.shape[0]) and v.shape[0] != 1:
            raise ValueError(f"{self.name}: the weights are given for {root.shape[0]} batch "
                             f"items but applied to a batch of {v.shape[0]}")
        return v * root.to(dtype=v.dtype, device=v.device)

    def _forward(self, x):
        return self.apply_root(self.op.forward(x))

    def _adjoint(self, y):
        return self.op.adjoint(self.apply_root(y))

    def solve_shifted_normal(self, b: torch.Tensor, shift: float) -> Optional[torch.Tensor]:
        r""":math:`(A^TWA + sI)x = b` in closed form for :math:`W = cI` (through ``op``'s,
        when it has one); ``None`` (use CG) for non-uniform weights."""
        if not self.uniform:
            return None
        c = self.root_uniform * self.root_uniform
        return self.op.solve_shifted_normal(b / c, shift / c)

    def norm(self, *, iterations: int = 1000, tol: float = 1e-10, seed: int = 0,
             dtype=torch.float64, device=None, recompute: bool = False) -> float:
        r""":math:`\|W^{1/2}A\|`: :math:`\sqrt c\,\|A\|` for :math:`W = cI`, else the largest
        per-item (batch item and channel of the weights) norm by power iteration on
        :math:`A^TWA` (cached; same arguments as :meth:`LinearOperator.norm`)."""
        if self.uniform:
            return self.root_uniform * self.op.norm(iterations=iterations, tol=tol, seed=seed,
                                                    dtype=dtype, device=device,
                                                    recompute=recompute)
        if self._norm_cache is not None and not recompute:
            return self._norm_cache
        g = torch.Generator(device="cpu").manual_seed(seed)
        items = tuple(self.root.shape[:2])
        x = torch.randn((*items, *self.domain_shape), dtype=dtype, generator=g)
        x = x.to(device or self.root.device)

        def per_item(v):        # one value per (batch item, channel), broadcastable to v
            return v.flatten(2).norm(dim=2).reshape(*items, *(1,) * len(self.domain_shape))

        x = x / per_item(x)
        lam = torch.zeros(items, dtype=dtype, device=x.device)
        with torch.no_grad():
            for _ in range(int(iterations)):
                z = self.normal(x)
                lam_new = (z * x).flatten(2).sum(2)
                nz = per_item(z)
                if bool((nz == 0).all()):
                    lam = torch.zeros_like(lam_new)
                    break
                x = torch.where(nz > 0, z / torch.where(nz > 0, nz, torch.ones_like(nz)), x)
                change = (lam_new - lam).abs() <= tol * lam_new.abs().clamp_min(1e-30)
                lam = lam_new
                if bool(change.all()):
                    break
        self._norm_cache = math.sqrt(max(float(lam.max()), 0.0))
        return self._norm_cache


def whiten(operator, y: torch.Tensor,
           weights: Optional[torch.Tensor]) -> Tuple[LinearOperator, torch.Tensor]:
    r"""The whitened problem :math:`(W^{1/2}A,\ W^{1/2}y)` of validated ``weights``
    (:func:`ctflow.solvers.inputs.check_weights`); ``(operator, y)`` unchanged when
    ``weights`` is ``None``."""
    if weights is None:
        return operator, y
    weighted = WeightedOperator(operator, weights)
    return weighted, weighted.apply_root(y)


def normalize_weights(weights: Optional[torch.Tensor], sigma: Optional[float]
                      ) -> Tuple[Optional[torch.Tensor], Optional[float]]:
    r"""The same data term with the weights normalised to mean 1:
    :math:`(w/\bar w,\ \sigma/\sqrt{\bar w})`, :math:`\bar w` the mean weight, since
    :math:`\tfrac1{2\sigma^2}\sum_i w_i r_i^2 = \tfrac{\bar w}{2\sigma^2}\sum_i
    (w_i/\bar w) r_i^2`. :math:`\sigma/\sqrt{\bar w}` is the equivalent white noise level
    (exact for :math:`W = cI`: weights :math:`cI` with :math:`\sigma` are no weights with
    :math:`\sigma/\sqrt c`). For the solvers that are not invariant to a scaling of the data
    term (TV's PDHG and its noise-relative weight); ``(None, sigma)`` unchanged (and a
    ``sigma`` of ``None`` stays ``None``)."""
    if weights is None:
        return None, sigma
    mean = float(weights.mean())
    return weights / mean, None if sigma is None else float(sigma) / math.sqrt(mean)


def repeat_items(weights: Optional[torch.Tensor], repeats: int) -> Optional[torch.Tensor]:
    """The weights of a batch whose items are each repeated ``repeats`` times in a row
    (``y.repeat_interleave(repeats, 0)``); weights of batch 1 (or ``None``) are kept."""
    if weights is None or weights.shape[0] == 1 or repeats == 1:
        return weights
    return weights.repeat_interleave(repeats, dim=0)
