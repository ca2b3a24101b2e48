r"""The data term of latent priors for MS-Flow and D-Flow: measurements seen through a decoder.

With a latent prior (:class:`ctflow.priors.latent.LatentFlowPrior`, decoder :math:`D`) the
solvers' states are latents :math:`z` and the data misfit is

.. math:: d(z) = \frac1{2\sigma^2}\,\|A\,D(z) - y\|^2 \qquad\text{(per batch item)}.

:class:`LatentDataProblem` is the latent counterpart of
:class:`~ctflow.solvers.problem.ModelSpaceProblem` (``data``, ``residual``,
``relative_residual``), and :func:`ctflow.solvers.problem.data_step` hands MS-Flow's data
block to its :meth:`LatentDataProblem.solve_data_step`:

.. math:: \min_z\; f(z) = \frac1{2\sigma^2}\|A D(z) - y\|^2 + \frac\rho2\|z - p\|^2,
          \qquad p = \Phi_{K-1}(s_{K-1}),

by ``iterations`` gradient steps through the decoder (MS-Flow's option ``decoder_steps``;
the relative gradient tolerance is ``decoder_tol``), warm-started at the current
:math:`s_K`. Each step is :math:`z^+ = z - \tau\nabla f(z)` with a Barzilai–Borwein trial
step :math:`\tau = \langle\Delta z, \Delta z\rangle / \langle\Delta z, \Delta g\rangle`
(the previous accepted step when the curvature estimate is not positive; :math:`1/\rho` at
the very first call, twice the last accepted step at later calls) and Armijo backtracking
:math:`f(z^+) \le f(z) - 10^{-4}\tau\|\nabla f(z)\|^2` (halving :math:`\tau`, one step
size per batch item). A step that fails ``max_backtracks`` halvings is not taken,
so the block objective never increases and
MS-Flow's Gauss–Seidel sweeps keep their monotone descent. The step sizes are kept between
calls. The memory of a data step is that of one decoder forward and backward pass: it does
not depend on the number of ODE steps.

D-Flow back-propagates :math:`d(\Phi_{0\to1}(z_0))` through the latent ODE and the decoder.

Statistical weights (:mod:`ctflow.solvers.weights`): :func:`ctflow.solvers.problem.make_problem`
builds :class:`LatentDataProblem` on :math:`W^{1/2}A` and :math:`W^{1/2}y`, so :math:`d(z) =
\tfrac1{2\sigma^2}\sum_i w_i(A D(z) - y)_i^2` and every gradient above is the weighted one.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ctflow.solvers.linalg import broadcast_items, per_item_norm, per_item_sq, relative_residual

__all__ = ["LatentDataProblem", "ARMIJO_C"]

#: Sufficient-decrease constant of the Armijo condition.
ARMIJO_C = 1e-4


class LatentDataProblem:
    r"""The data term :math:`\tfrac1{2\sigma^2}\|A D(z) - y\|^2` of a latent prior.

    Args:
        operator: the linear operator on public images.
        y: batched measurement ``(B, C, *range_shape)``.
        prior: a latent prior (``from_model`` is the decoder :math:`D`).
        sigma: the noise standard deviation :math:`\sigma`.
        max_backtracks: halvings of the step size per gradient step before giving up.
    """

    is_latent = True

    def __init__(self, operator, y: torch.Tensor, prior, sigma: float, *,
                 max_backtracks: int = 30):
        self.operator = operator
        self.y = y
        self.prior = prior
        self.sigma = float(sigma)
        self.scale, self.shift = 1.0, 0.0
        self.y_norm = float(y.norm())
        self.max_backtracks = int(max_backtracks)
        self.tau: Optional[torch.Tensor] = None      # per-item step sizes, kept between calls
        self.steps_taken = 0
        self.decoder_evals = 0

    # -- the data term --------------------------------------------------------------------
    def image(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`D(z)`, the public image of a latent (not clipped)."""
        self.decoder_evals += 1
        return self.prior.from_model(z)

    def residual(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`A D(z) - y`."""
        return self.operator.forward(self.image(z)) - self.y

    def data(self, z: torch.Tensor) -> torch.Tensor:
        """:math:`\\tfrac1{2\\sigma^2}\\|A D(z) - y\\|^2` per item, shape ``(B,)``."""
        return per_item_sq(self.residual(z)) / (2.0 * self.sigma ** 2)

    def relative_residual(self, z: torch.Tensor) -> float:
        """:math:`\\|A D(z) - y\\| / \\|y\\|` over the whole batch."""
        return relative_residual(self.residual(z), y_norm=self.y_norm)

    # -- MS-Flow's data block ---------------------------------------------------------------
    def _objective(self, z: torch.Tensor, p: torch.Tensor, rho: float) -> torch.Tensor:
        return self.data(z) + 0.5 * rho * per_item_sq(z - p)

    def _value_and_grad(self, z: torch.Tensor, p: torch.Tensor, rho: float):
        zg = z.detach().requires_grad_(True)
        with torch.enable_grad():
            f = self._objective(zg, p, rho)
            g, = torch.autograd.grad(f.sum(), zg)
        return f.detach(), g

    def solve_data_step(self, p: torch.Tensor, rho: float, x0: torch.Tensor, *,
                        iterations: int = 10, tol: float = 1e-6) -> Tuple[torch.Tensor, str]:
        r"""``iterations`` monotone gradient steps on
        :math:`\tfrac1{2\sigma^2}\|AD(z)-y\|^2 + \tfrac\rho2\|z-p\|^2` from ``x0`` (see the
        module docstring). Stops early per item when
        :math:`\|\nabla f\| \le \text{tol}\,\|\nabla f(x_0)\|`. Returns
        ``(z, "gradient")``."""
        rho = float(rho)
        z = x0.detach().clone()
        B = z.shape[0]
        f, g = self._value_and_grad(z, p, rho)
        g0 = per_item_norm(g)
        if self.tau is None or self.tau.shape[0] != B:
            tau = torch.full((B,), 1.0 / max(rho, 1e-12), dtype=z.dtype, device=z.device)
        else:       # start from twice the last accepted step, so step sizes can grow again
            tau = 2.0 * self.tau.to(device=z.device, dtype=z.dtype)
        active = torch.ones(B, dtype=torch.bool, device=z.device)
        z_prev = g_prev = None
        n_it = int(iterations)
        for it in range(n_it):
            gn2 = per_item_sq(g)
            active &= gn2.sqrt() > tol * g0
            if not bool(active.any()):
                break
            if z_prev is not None:       # Barzilai-Borwein trial step from the last move
                dz, dg = z - z_prev, g - g_prev
                num, den = per_item_sq(dz), (dz * dg).reshape(B, -1).sum(1)
                ok = (den > 0) & (num > 0)
                tau = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), tau)
            trial_tau = tau.clone()
            pending = active.clone()
            z_new, f_new = z.clone(), f.clone()
            with torch.no_grad():
                for _bt in range(self.max_backtracks + 1):
                    zt = z - broadcast_items(trial_tau, z) * g
                    ft = self._objective(zt, p, rho)
                    ok = pending & (ft <= f - ARMIJO_C * trial_tau * gn2) & torch.isfinite(ft)
                    z_new = torch.where(broadcast_items(ok, z), zt, z_new)
                    f_new = torch.where(ok, ft, f_new)
                    tau = torch.where(ok, trial_tau, tau)
                    pending &= ~ok
                    if not bool(pending.any()):
                        break
                    trial_tau = torch.where(pending, 0.5 * trial_tau, trial_tau)
            # items whose step failed every halving keep their state (no increase of f)
            active &= ~pending
            if not bool(active.any()):
                break
            z_prev, g_prev = z, g
            z, f = z_new, f_new
            self.steps_taken += 1
            if it + 1 < n_it:
                f, g = self._value_and_grad(z, p, rho)
        self.tau = tau.detach()
        return z.detach(), "gradient"
