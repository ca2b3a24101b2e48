r"""PnP-Flow: plug-and-play restoration with a flow-matching denoiser.

Martin, Gagneux, Hagemann, Steidl, "PnP-Flow: Plug-and-play image restoration with
flow matching", ICLR 2025. Rectified-flow convention: :math:`t = 0` noise, :math:`t = 1` data,
:math:`x_t = t x_1 + (1 - t) x_0`. For :math:`n = 0, \dots, N-1` with
:math:`t_n = t_s + (1 - t_s)\,n/N` (:math:`t_s` = ``t_start``, 0 by default):

.. math::

    z &= x - \gamma_n \nabla F(x)                       && \text{gradient step on the data term}\\
    \tilde z^{(d)} &= t_n z + (1 - t_n)\varepsilon^{(d)},\quad \varepsilon^{(d)} \sim N(0, I)
                                                        && \text{re-noise to time } t_n\\
    x &= \frac1D \sum_{d=1}^{D} \tilde z^{(d)} + (1 - t_n)\,v(\tilde z^{(d)}, t_n)
                                                        && \text{one-step flow denoiser}

(:math:`D` = ``draws``). The denoiser :math:`D_t(z) = z + (1 - t)v(z, t)` is the flow's
estimate of :math:`E[x_1 \mid x_t = z]`.

Spaces and step size. The iteration runs in the prior's model space
:math:`x_m = a\,x + b`; the operator acts on public images, so the data term is
:math:`F(x_m) = \tfrac{1}{2\sigma^2}\|A((x_m - b)/a) - y\|^2`. As in the reference code the
step is :math:`\sigma^2`-scaled, so :math:`\sigma` cancels (and :math:`\sigma = 0` is fine
when the class is called directly; ``reconstruct``
asks for :math:`\sigma > 0`, as the registry says):
:math:`z = x_m - \eta_n\, a^{-1} A^T(A x - y)` with

.. math::

    \eta_n = \frac{\gamma\,(1 - t_n)^{\alpha}}{\|A_m\|^2}, \qquad \|A_m\| = \|A\|/|a|,

i.e. :math:`\gamma` is relative to :math:`1/\|A_m\|^2` (the Lipschitz constant of the
:math:`\sigma^2`-scaled data gradient). This step is the same as a public-space step
:math:`x \leftarrow x - \gamma(1-t_n)^\alpha/\|A\|^2\, A^T(Ax - y)`, so it does not depend on
the prior's normalisation. :math:`\alpha = 0` gives a constant step.

Initialisation: with ``t_start = 0`` the first re-noising discards the starting image
(:math:`\tilde z = \varepsilon`), so the start only matters for ``t_start > 0``. It is an
explicit ``x_init`` image, or ``init`` as in :func:`ctflow.solvers.init.initial_image`
(clipped to [0, 1]); with ``t_start = 0`` the start options are refused (no effect).

Weights (``solve(..., weights=w)``, :mod:`ctflow.solvers.weights`): the data term is
:math:`\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2`, its gradient step
:math:`a^{-1}A^TW(Ax - y)` and the step's Lipschitz constant :math:`\|W^{1/2}A_m\|^2`; the
reported residual and objective are the weighted ones.

Cost: :math:`N \cdot D` forward velocity evaluations, no backward ones.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import torch

from ctflow.solvers.base import Solver, finish
from ctflow.solvers.flow_baseline import StartOptions, begin_solve, start_image, times
from ctflow.solvers.linalg import operator_norm, relative_residual
from ctflow.solvers.options import check_float, check_int
from ctflow.solvers.progress import progress
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.rng import randn

__all__ = ["PnPFlow"]


class PnPFlow(Solver):
    r"""PnP-Flow (Martin et al., ICLR 2025); see the module docstring for the iteration.
    Options: :class:`PnPFlow.Options`.

    History per step: ``step``, ``t``, ``step_size`` (:math:`\eta_n`, model space),
    ``residual`` (:math:`\|Ax - y\|/\|y\|` of the new iterate), ``objective`` (the data term
    :math:`\tfrac{1}{2\sigma^2}\|Ax - y\|^2`, or :math:`\tfrac12\|Ax-y\|^2` when
    :math:`\sigma = 0`).
    """

    name = "pnpflow"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(StartOptions):
        r"""Options of :class:`PnPFlow` (and the start options ``init`` -- default
        ``"zeros"`` here --, ``init_iterations``, ``tv_weight``, ``x_init``, and ``seed``,
        which seeds the re-noising draws, and ``progress``). The start options are refused
        with ``t_start = 0``, where the first re-noising discards the start.

        Attributes:
            steps: :math:`N` iterations (int >= 1).
            gamma: step size in units of :math:`1/\|A_m\|^2` (> 0).
            alpha: step schedule :math:`\gamma_n = \gamma(1-t_n)^\alpha` (>= 0; the paper
                tunes :math:`\alpha \in [0, 1]` per task; 0 is a constant step, which keeps
                the final iterate closest to the data).
            draws: noise draws :math:`D` averaged by the denoiser (int >= 1).
            t_start: the first time :math:`t_0` in [0, 1).
        """

        OWNER = "PnPFlow"
        init: Any = "zeros"
        steps: int = 100
        gamma: float = 1.0
        alpha: float = 0.0
        draws: int = 2
        t_start: float = 0.0

        def check(self) -> None:
            o = self.OWNER
            self._set("steps", check_int("steps", self.steps, owner=o))
            self._set("gamma", check_float("gamma", self.gamma, owner=o, minimum=0.0,
                                           min_open=True))
            self._set("alpha", check_float("alpha", self.alpha, owner=o, minimum=0.0))
            self._set("draws", check_int("draws", self.draws, owner=o))
            self._set("t_start", check_float("t_start", self.t_start, owner=o, minimum=0.0,
                                             maximum=1.0, max_open=True))
            super().check()

        def start_unused(self) -> Optional[str]:
            if self.t_start == 0.0:
                return "with t_start=0 (the first re-noising discards the start image)"
            return None

    def solve(self, operator, y: torch.Tensor, prior, sigma: float = 0.0, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        """Run PnP-Flow on ``y = A x + noise`` (``sigma`` = absolute noise std of y;
        ``weights``: the statistical weights of the data term, ``None`` for all ones)."""
        o, opt = type(self).__name__, self.options
        run = begin_solve(o, operator, y, prior, sigma, opt.seed, weights)
        vel, gen, a = run.velocity, run.generator, run.scale
        A, yw = run.operator, run.y       # W^(1/2) A and W^(1/2) y with weights
        n_steps, draws, ts = opt.steps, opt.draws, opt.t_start
        history: List[Dict[str, Any]] = []
        with SolveMeter(y.device) as meter:
            with torch.no_grad():
                x_pub = start_image(o, operator, y, opt, run.sigma, run.weights)
                lip = (operator_norm(o, A, yw) / abs(a)) ** 2  # ||A_m||^2
                x = prior.to_model(x_pub)
                ax = A.forward(prior.from_model(x))
                for n in progress(range(n_steps), enabled=opt.progress, desc="pnp-flow"):
                    t = ts + (1.0 - ts) * n / n_steps
                    eta = opt.gamma * (1.0 - t) ** opt.alpha / lip
                    z = x - (eta / a) * A.adjoint(ax - yw)
                    acc = torch.zeros_like(z)
                    tt = times(t, z)
                    for _ in range(draws):
                        zt = t * z + (1.0 - t) * randn(z.shape, gen, z)
                        acc = acc + zt + (1.0 - t) * vel(zt, tt)
                    x = acc / draws
                    ax = A.forward(prior.from_model(x))
                    rn = float(torch.linalg.vector_norm(ax - yw))
                    history.append({"step": n + 1, "t": t, "step_size": eta,
                                    "residual": relative_residual(ax - yw, yw),
                                    "objective": 0.5 * rn * rn * run.data_scale})
                x_pub = prior.from_model(x)
        return finish(self, x_pub, history, meter, run.nfe,
                      nfe_per_image=run.velocity.nfe_per_image(y.shape[0]))
