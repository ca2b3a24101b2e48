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
step is :math:`\sigma^2`-scaled, so :math:`\sigma` cancels (and :math:`\sigma = 0` is fine):
:math:`z = x_m - \eta_n\, a^{-1} A^T(A x - y)` with

.. math::

    \eta_n = \frac{\gamma\,(1 - t_n)^{\alpha}}{\|A_m\|^2}, \qquad \|A_m\| = \|A\|/|a|,

i.e. :math:`\gamma` is relative to :math:`1/\|A_m\|^2` (the Lipschitz constant of the
:math:`\sigma^2`-scaled data gradient). This step is the same as a public-space step
:math:`x \leftarrow x - \gamma(1-t_n)^\alpha/\|A\|^2\, A^T(Ax - y)`, so it does not depend on
the prior's normalisation. :math:`\alpha = 0` gives a constant step.

Initialisation: with ``t_start = 0`` the first re-noising discards the starting image
(:math:`\tilde z = \varepsilon`), so the start only matters for ``t_start > 0``. It is an
explicit ``x_init`` image, or ``init`` as in :func:`ctflow.solvers.common.initial_image`
(clipped to [0, 1]).

Cost: :math:`N \cdot D` forward velocity evaluations, no backward ones.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ctflow.solvers.classical import _finish, _operator_norm, _progress, _rel_residual
from ctflow.solvers.common import TV_START_WEIGHT, check_float, check_int
from ctflow.solvers.flow_baseline import begin_solve, randn_like, start_image, start_options, times
from ctflow.solvers.result import Reconstruction, SolveMeter

__all__ = ["PnPFlow"]


# ---------------------------------------------------------------------------------------------
class PnPFlow:
    r"""PnP-Flow (Martin et al., ICLR 2025); see the module docstring for the iteration.

    Options (keyword-only):
        steps (int >= 1, default 100): :math:`N` iterations.
        gamma (float > 0, default 1.0): step size in units of :math:`1/\|A_m\|^2`.
        alpha (float >= 0, default 0.0): step schedule :math:`\gamma_n = \gamma(1-t_n)^\alpha`
            (the paper tunes :math:`\alpha \in [0, 1]` per task; 0 is a constant step, which
            keeps the final iterate closest to the data).
        draws (int >= 1, default 2): noise draws :math:`D` averaged by the denoiser.
        t_start (float in [0, 1), default 0.0): the first time :math:`t_0`.
        init ("auto" | "fbp" | "adjoint" | "cgls" | "zeros" | tensor | callable, default
            "zeros"): the starting image when ``x_init`` is None (see
            :func:`ctflow.solvers.common.initial_image`; "zeros" is mid-grey 0.5).
        init_iterations (int >= 1, default 10): CGLS iterations for ``init="cgls"``.
        tv_weight (float >= 0, default 0.1): relative TV weight for ``init="tv"``.
        x_init (tensor or None, default None): explicit public starting image (wins over
            ``init``).
        seed (int >= 0, default 0): seeds the re-noising draws.
        progress (bool, default False): show a tqdm bar.

    History per step: ``step``, ``t``, ``step_size`` (:math:`\eta_n`, model space),
    ``residual`` (:math:`\|Ax - y\|/\|y\|` of the new iterate), ``objective`` (the data term
    :math:`\tfrac{1}{2\sigma^2}\|Ax - y\|^2`, or :math:`\tfrac12\|Ax-y\|^2` when
    :math:`\sigma = 0`).
    """

    method = "pnpflow"

    def __init__(self, *, steps: int = 100, gamma: float = 1.0, alpha: float = 0.0,
                 draws: int = 2, t_start: float = 0.0, init: Any = "zeros",
                 init_iterations: int = 10, tv_weight: float = TV_START_WEIGHT,
                 x_init: Optional[torch.Tensor] = None,
                 seed: int = 0, progress: bool = False):
        o = type(self).__name__
        self.options: Dict[str, Any] = {
            "steps": check_int("steps", steps, owner=o, minimum=1),
            "gamma": check_float("gamma", gamma, owner=o, minimum=0.0, min_open=True),
            "alpha": check_float("alpha", alpha, owner=o, minimum=0.0),
            "draws": check_int("draws", draws, owner=o, minimum=1),
            "t_start": check_float("t_start", t_start, owner=o, minimum=0.0, maximum=1.0,
                                   max_open=True),
            **start_options(o, init=init, init_iterations=init_iterations, tv_weight=tv_weight,
                            x_init=x_init,
                            seed=seed, progress=progress),
        }

    def solve(self, operator, y: torch.Tensor, prior,
              noise_level: float = 0.0) -> Reconstruction:
        """Run PnP-Flow on ``y = A x + noise`` (``noise_level`` = noise std in y)."""
        o, opt = type(self).__name__, self.options
        run = begin_solve(o, operator, y, prior, noise_level, opt["seed"])
        vel, gen, a = run.velocity, run.generator, run.scale
        n_steps, draws, ts = opt["steps"], opt["draws"], opt["t_start"]
        history: List[Dict[str, Any]] = []
        with SolveMeter(y.device) as meter:
            with torch.no_grad():
                x_pub = start_image(o, operator, y, opt, run.sigma)
                lip = (_operator_norm(o, operator, y) / abs(a)) ** 2  # ||A_m||^2
                x = prior.to_model(x_pub)
                ax = operator.forward(prior.from_model(x))
                for n in _progress(range(n_steps), opt["progress"], "pnp-flow"):
                    t = ts + (1.0 - ts) * n / n_steps
                    eta = opt["gamma"] * (1.0 - t) ** opt["alpha"] / lip
                    z = x - (eta / a) * operator.adjoint(ax - y)
                    acc = torch.zeros_like(z)
                    tt = times(t, z)
                    for _ in range(draws):
                        zt = t * z + (1.0 - t) * randn_like(z, gen)
                        acc = acc + zt + (1.0 - t) * vel(zt, tt)
                    x = acc / draws
                    ax = operator.forward(prior.from_model(x))
                    rn = float(torch.linalg.vector_norm(ax - y))
                    history.append({"step": n + 1, "t": t, "step_size": eta,
                                    "residual": _rel_residual(ax, y),
                                    "objective": 0.5 * rn * rn * run.data_scale})
                x_pub = prior.from_model(x)
        return _finish(o, self.method, x_pub, history, meter, opt, run.nfe)
