r"""OT-ODE: training-free linear inverses with ΠGDM-style guidance on the flow ODE.

Pokle, Muckley, Chen, Karrer, "Training-free linear image inverses via flows", TMLR 2024.
Rectified-flow convention (:math:`t = 0` noise, :math:`t = 1` data,
:math:`x_t = t x_1 + (1-t) x_0`). For this path the velocity and the score are related by
:math:`v(x, t) = x/t + \tfrac{1-t}{t}\nabla\log p_t(x)`, so conditioning on :math:`y` adds
:math:`\tfrac{1-t}{t}\nabla_{x_t}\log p(y \mid x_t)` to the velocity. ΠGDM approximates
:math:`p(x_1 \mid x_t) \approx N(\hat x_1, r_t^2 I)` around the denoised estimate

.. math::

    \hat x_1 = x_t + (1 - t)\,v(x_t, t), \qquad r_t^2 = \frac{(1-t)^2}{t^2 + (1-t)^2},

which gives the guidance

.. math::

    g = \Big(\frac{\partial \hat x_1}{\partial x_t}\Big)^T A_m^T
        \big(r_t^2 A_m A_m^T + \sigma^2 I\big)^{-1}\big(y - A_m\hat x_1\big),
    \qquad \frac{\partial \hat x_1}{\partial x_t} = I + (1 - t)\frac{\partial v}{\partial x},

(one vector–Jacobian product through the network per step) and the Euler update

.. math::

    x_{t+h} = x_t + h\Big(v(x_t, t) + \gamma_t\,\frac{1-t}{t}\,g\Big),

with :math:`\gamma_t = \sqrt{t/(t^2 + (1-t)^2)}` (``gamma="gamma_t"``, the paper's adaptive
weight, default), :math:`\gamma_t = 1` (``"constant"``) or a fixed number. This follows the
paper and the OT-ODE baseline of the PnP-Flow reference code.

Spaces. The ODE runs in the prior's model space :math:`x_m = a x + b`; the operator acts on
public images, so :math:`A_m = A/a` and the residual is :math:`y - A\,\mathrm{from\_model}
(\hat x_1)`; :math:`r_t^2 I` is the model-space posterior covariance. The inverse is applied
in closed form where the operator solves shifted normal equations, through the push-through
identity :math:`A^T(r^2AA^T/a^2 + \sigma^2)^{-1} = (a^2/r^2)(A^TA + \sigma^2a^2/r^2\,I)^{-1}A^T`,
and otherwise by ``cg_iters`` conjugate-gradient steps on
:math:`(r_t^2 AA^T/a^2 + \sigma^2 I)u = y - A\hat x`. When ``sigma`` is 0 a floor of
:math:`10^{-6} r_t^2\|A\|^2/a^2` on :math:`\sigma^2` keeps that system definite.

Initialisation (as in the paper): start at :math:`t_0 > 0` from
:math:`x_{t_0} = t_0\,\mathrm{to\_model}(x_{\text{init}}) + (1 - t_0)\varepsilon`, with
:math:`x_{\text{init}}` = ``x_init`` if given, else the image ``init`` names (default
``"auto"``: FBP for CT operators, else the least-squares scaled :math:`A^Ty`; see
:func:`ctflow.solvers.init.initial_image`), clipped to [0, 1]. Then ``steps`` Euler steps of size
:math:`h = (1 - t_0)/\text{steps}` reach :math:`t = 1`.

Weights (``solve(..., weights=w)``, :mod:`ctflow.solvers.weights`): the likelihood
:math:`\exp(-\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2)` is a Gaussian of covariance
:math:`\sigma^2W^{-1}`, and
:math:`A^T(r^2AA^T + \sigma^2W^{-1})^{-1} = (W^{1/2}A)^T(r^2\,W^{1/2}AA^TW^{1/2} +
\sigma^2I)^{-1}W^{1/2}` (no inverse weights, so zero weights are fine): the guidance is that
of the whitened operator :math:`W^{1/2}A` and data :math:`W^{1/2}y`, by CG (the closed form
holds for :math:`W = cI` only); the reported residual and objective are the weighted ones.

Cost: ``steps`` forward and ``steps`` backward (VJP) velocity evaluations.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Union

import torch

from ctflow.solvers.base import Solver, finish
from ctflow.solvers.flow_baseline import StartOptions, begin_solve, start_image, times
from ctflow.solvers.linalg import conjugate_gradient, operator_norm, relative_residual
from ctflow.solvers.options import check_choice, check_float, check_int, is_number
from ctflow.solvers.progress import progress
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.rng import randn

__all__ = ["OTODE", "GAMMA_CHOICES"]

#: The named guidance weights of OT-ODE (``gamma`` may also be a number > 0).
GAMMA_CHOICES = ("gamma_t", "constant")


def _gamma_weight(gamma: Union[str, float], t: float) -> float:
    if gamma == "gamma_t":
        return (t / (t * t + (1.0 - t) ** 2)) ** 0.5
    if gamma == "constant":
        return 1.0
    return float(gamma)


class OTODE(Solver):
    r"""OT-ODE (Pokle et al., TMLR 2024); see the module docstring for the method.
    Options: :class:`OTODE.Options`.

    History: one entry per step with ``step``, ``t``, ``residual`` and ``objective`` (the data
    term :math:`\tfrac{1}{2\sigma^2}\|A\hat x_1 - y\|^2`, or :math:`\tfrac12\|\cdot\|^2` when
    :math:`\sigma = 0`) of the denoised estimate :math:`\hat x_1` at ``t``, ``guidance``
    (:math:`\|g\|`) and ``cg_iterations`` (0 for the closed form); then a final entry
    (``t = 1``) with the ``residual`` and ``objective`` of the returned image.
    """

    name = "otode"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(StartOptions):
        r"""Options of :class:`OTODE` (and the start options ``init`` -- default
        ``"auto"``: FBP for CT operators, else the least-squares scaled :math:`A^Ty` --,
        ``init_iterations``, ``tv_weight``, ``x_init``, and ``seed``, which seeds the initial
        noise :math:`\varepsilon`, and ``progress``).

        Attributes:
            steps: Euler steps from ``t0`` to 1 (int >= 1).
            t0: start time in (0, 1).
            gamma: guidance weight :math:`\gamma_t`: ``"gamma_t"``, ``"constant"`` or a
                number > 0.
            cg_iters: CG iterations for the ΠGDM inverse when the operator has no closed
                form (int >= 1).
            cg_tol: relative CG tolerance (>= 0).
        """

        OWNER = "OTODE"
        steps: int = 50
        t0: float = 0.2
        gamma: Union[str, float] = "gamma_t"
        cg_iters: int = 10
        cg_tol: float = 1e-6

        def check(self) -> None:
            o = self.OWNER
            if isinstance(self.gamma, str):
                check_choice("gamma", self.gamma, GAMMA_CHOICES, owner=o)
            elif is_number(self.gamma):
                self._set("gamma", check_float("gamma", self.gamma, owner=o, minimum=0.0,
                                               min_open=True))
            else:
                raise ValueError(f"{o}: option gamma must be 'gamma_t', 'constant' or a "
                                 f"number > 0, got {self.gamma!r}")
            self._set("steps", check_int("steps", self.steps, owner=o))
            self._set("t0", check_float("t0", self.t0, owner=o, minimum=0.0, maximum=1.0,
                                        min_open=True, max_open=True))
            self._set("cg_iters", check_int("cg_iters", self.cg_iters, owner=o))
            self._set("cg_tol", check_float("cg_tol", self.cg_tol, owner=o, minimum=0.0))
            super().check()

    def solve(self, operator, y: torch.Tensor, prior, sigma: float = 0.0, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        """Run OT-ODE on ``y = A x + noise`` (``sigma`` = absolute noise std of y;
        ``weights``: the statistical weights of the data term, ``None`` for all ones)."""
        o, opt = type(self).__name__, self.options
        run = begin_solve(o, operator, y, prior, sigma, opt.seed, weights)
        vel, a, sigma, data_scale = run.velocity, run.scale, run.sigma, run.data_scale
        A, yw = run.operator, run.y       # W^(1/2) A and W^(1/2) y with weights
        steps, t0 = opt.steps, opt.t0
        h = (1.0 - t0) / steps
        history: List[Dict[str, Any]] = []
        with SolveMeter(y.device) as meter:
            with torch.no_grad():
                x_pub = start_image(o, operator, y, opt, run.sigma, run.weights)
                norm2 = operator_norm(o, A, yw) ** 2
                eps = randn(x_pub.shape, run.generator, x_pub)
                x = t0 * prior.to_model(x_pub) + (1.0 - t0) * eps
            for k in progress(range(steps), enabled=opt.progress, desc="ot-ode"):
                t = t0 + k * h
                tt = times(t, x)
                xr = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    v = vel(xr, tt)
                with torch.no_grad():
                    vd = v.detach()
                    x1 = x + (1.0 - t) * vd
                    ax1 = A.forward(prior.from_model(x1))
                    d = yw - ax1
                    r2 = (1.0 - t) ** 2 / (t * t + (1.0 - t) ** 2)
                    s2 = max(sigma * sigma, 1e-6 * r2 * norm2 / (a * a))
                    w, cg_its = self._pigdm(A, d, r2, s2, a)
                # g = (I + (1 - t) dv/dx)^T w : one VJP through the velocity field
                jtw = None
                if v.requires_grad:
                    (jtw,) = torch.autograd.grad(v, xr, grad_outputs=w, allow_unused=True)
                if jtw is None:  # a velocity that does not depend on x: dv/dx = 0
                    jtw = torch.zeros_like(w)
                with torch.no_grad():
                    g = w + (1.0 - t) * jtw
                    weight = _gamma_weight(opt.gamma, t) * (1.0 - t) / t
                    x = x + h * (vd + weight * g)
                    rn = float(torch.linalg.vector_norm(d))
                    history.append({"step": k + 1, "t": t,
                                    "residual": relative_residual(ax1 - yw, yw),
                                    "objective": 0.5 * rn * rn * data_scale,
                                    "guidance": float(torch.linalg.vector_norm(g)),
                                    "cg_iterations": cg_its})
                del v, xr
            with torch.no_grad():
                x_pub = prior.from_model(x.detach())
                ax = A.forward(x_pub)
                rn = float(torch.linalg.vector_norm(ax - yw))
                history.append({"step": steps + 1, "t": 1.0,
                                "residual": relative_residual(ax - yw, yw),
                                "objective": 0.5 * rn * rn * data_scale})
        return finish(self, x_pub, history, meter, run.nfe,
                      nfe_per_image=run.velocity.nfe_per_image(y.shape[0]))

    def _pigdm(self, operator, d: torch.Tensor, r2: float, s2: float, a: float):
        r""":math:`A_m^T (r^2 A_m A_m^T + s^2 I)^{-1} d` with :math:`A_m = A/a`; returns the
        model-space vector and the CG iterations used (0 for the closed form)."""
        shift = s2 * a * a / r2
        closed = operator.solve_shifted_normal(operator.adjoint(d), shift)
        if closed is not None:
            return (a / r2) * closed, 0
        u, its = conjugate_gradient(
            lambda z: (r2 / (a * a)) * operator.forward(operator.adjoint(z)) + s2 * z, d,
            iterations=self.options.cg_iters, tol=self.options.cg_tol, stop="batch",
            count=True)
        return operator.adjoint(u) / a, its
