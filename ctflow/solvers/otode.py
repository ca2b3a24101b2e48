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
:math:`(r_t^2 AA^T/a^2 + \sigma^2 I)u = y - A\hat x`. When ``noise_level`` is 0 a floor of
:math:`10^{-6} r_t^2\|A\|^2/a^2` on :math:`\sigma^2` keeps that system definite.

Initialisation (as in the paper): start at :math:`t_0 > 0` from
:math:`x_{t_0} = t_0\,\mathrm{to\_model}(x_{\text{init}}) + (1 - t_0)\varepsilon`, with
:math:`x_{\text{init}}` = ``x_init`` if given, else the image ``init`` names (default
``"auto"``: FBP for CT operators, else the least-squares scaled :math:`A^Ty`; see
:func:`ctflow.solvers.common.initial_image`), clipped to [0, 1]. Then ``steps`` Euler steps of size
:math:`h = (1 - t_0)/\text{steps}` reach :math:`t = 1`.

Cost: ``steps`` forward and ``steps`` backward (VJP) velocity evaluations.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, List, Optional, Union

import torch

from ctflow.solvers.classical import _cg, _finish, _operator_norm, _progress, _rel_residual
from ctflow.solvers.common import TV_START_WEIGHT, check_choice, check_float, check_int
from ctflow.solvers.flow_baseline import begin_solve, randn_like, start_image, start_options, times
from ctflow.solvers.result import Reconstruction, SolveMeter

__all__ = ["OTODE"]

GAMMA_CHOICES = ("gamma_t", "constant")


def _gamma_weight(gamma: Union[str, float], t: float) -> float:
    if gamma == "gamma_t":
        return (t / (t * t + (1.0 - t) ** 2)) ** 0.5
    if gamma == "constant":
        return 1.0
    return float(gamma)


class OTODE:
    r"""OT-ODE (Pokle et al., TMLR 2024); see the module docstring for the method.

    Options (keyword-only):
        steps (int >= 1, default 50): Euler steps from ``t0`` to 1.
        t0 (float in (0, 1), default 0.2): start time.
        gamma ("gamma_t" | "constant" | float > 0, default "gamma_t"): guidance weight
            :math:`\gamma_t`.
        cg_iters (int >= 1, default 10): CG iterations for the ΠGDM inverse when the operator
            has no closed form.
        cg_tol (float >= 0, default 1e-6): relative CG tolerance.
        init ("auto" | "fbp" | "adjoint" | "cgls" | "zeros" | tensor | callable, default
            "auto"): ``x_init`` when none is given, through
            :func:`ctflow.solvers.common.initial_image` ("auto": FBP for CT operators, else
            the least-squares scaled :math:`A^Ty`; "zeros" is mid-grey 0.5).
        init_iterations (int >= 1, default 10): CGLS iterations for ``init="cgls"``.
        tv_weight (float >= 0, default 0.1): relative TV weight for ``init="tv"``.
        x_init (tensor or None, default None): explicit public starting image (wins over
            ``init``).
        seed (int >= 0, default 0): seeds the initial noise :math:`\varepsilon`.
        progress (bool, default False): show a tqdm bar.

    History: one entry per step with ``step``, ``t``, ``residual`` and ``objective`` (the data
    term :math:`\tfrac{1}{2\sigma^2}\|A\hat x_1 - y\|^2`, or :math:`\tfrac12\|\cdot\|^2` when
    :math:`\sigma = 0`) of the denoised estimate :math:`\hat x_1` at ``t``, ``guidance``
    (:math:`\|g\|`) and ``cg_iterations`` (0 for the closed form); then a final entry
    (``t = 1``) with the ``residual`` and ``objective`` of the returned image.
    """

    method = "otode"

    def __init__(self, *, steps: int = 50, t0: float = 0.2,
                 gamma: Union[str, float] = "gamma_t", cg_iters: int = 10,
                 cg_tol: float = 1e-6, init: Any = "auto", init_iterations: int = 10,
                 tv_weight: float = TV_START_WEIGHT,
                 x_init: Optional[torch.Tensor] = None, seed: int = 0,
                 progress: bool = False):
        o = type(self).__name__
        if isinstance(gamma, str):
            gamma = check_choice("gamma", gamma, GAMMA_CHOICES, owner=o)
        elif isinstance(gamma, numbers.Real) and not isinstance(gamma, bool):
            gamma = check_float("gamma", gamma, owner=o, minimum=0.0, min_open=True)
        else:
            raise ValueError(f"{o}: option gamma must be 'gamma_t', 'constant' or a number "
                             f"> 0, got {gamma!r}")
        self.options: Dict[str, Any] = {
            "steps": check_int("steps", steps, owner=o, minimum=1),
            "t0": check_float("t0", t0, owner=o, minimum=0.0, maximum=1.0, min_open=True,
                              max_open=True),
            "gamma": gamma,
            "cg_iters": check_int("cg_iters", cg_iters, owner=o, minimum=1),
            "cg_tol": check_float("cg_tol", cg_tol, owner=o, minimum=0.0),
            **start_options(o, init=init, init_iterations=init_iterations, tv_weight=tv_weight,
                            x_init=x_init,
                            seed=seed, progress=progress),
        }

    def solve(self, operator, y: torch.Tensor, prior,
              noise_level: float = 0.0) -> Reconstruction:
        """Run OT-ODE on ``y = A x + noise`` (``noise_level`` = noise std in y)."""
        o, opt = type(self).__name__, self.options
        run = begin_solve(o, operator, y, prior, noise_level, opt["seed"])
        vel, a, sigma, data_scale = run.velocity, run.scale, run.sigma, run.data_scale
        steps, t0 = opt["steps"], opt["t0"]
        h = (1.0 - t0) / steps
        history: List[Dict[str, Any]] = []
        with SolveMeter(y.device) as meter:
            with torch.no_grad():
                x_pub = start_image(o, operator, y, opt, run.sigma)
                norm2 = _operator_norm(o, operator, y) ** 2
                x = t0 * prior.to_model(x_pub) + (1.0 - t0) * randn_like(x_pub, run.generator)
            for k in _progress(range(steps), opt["progress"], "ot-ode"):
                t = t0 + k * h
                tt = times(t, x)
                xr = x.detach().requires_grad_(True)
                with torch.enable_grad():
                    v = vel(xr, tt)
                with torch.no_grad():
                    vd = v.detach()
                    x1 = x + (1.0 - t) * vd
                    ax1 = operator.forward(prior.from_model(x1))
                    d = y - ax1
                    r2 = (1.0 - t) ** 2 / (t * t + (1.0 - t) ** 2)
                    s2 = max(sigma * sigma, 1e-6 * r2 * norm2 / (a * a))
                    w, cg_its = self._pigdm(operator, d, r2, s2, a)
                # g = (I + (1 - t) dv/dx)^T w : one VJP through the velocity field
                jtw = None
                if v.requires_grad:
                    (jtw,) = torch.autograd.grad(v, xr, grad_outputs=w, allow_unused=True)
                if jtw is None:  # a velocity that does not depend on x: dv/dx = 0
                    jtw = torch.zeros_like(w)
                with torch.no_grad():
                    g = w + (1.0 - t) * jtw
                    weight = _gamma_weight(opt["gamma"], t) * (1.0 - t) / t
                    x = x + h * (vd + weight * g)
                    rn = float(torch.linalg.vector_norm(d))
                    history.append({"step": k + 1, "t": t, "residual": _rel_residual(ax1, y),
                                    "objective": 0.5 * rn * rn * data_scale,
                                    "guidance": float(torch.linalg.vector_norm(g)),
                                    "cg_iterations": cg_its})
                del v, xr
            with torch.no_grad():
                x_pub = prior.from_model(x.detach())
                ax = operator.forward(x_pub)
                rn = float(torch.linalg.vector_norm(ax - y))
                history.append({"step": steps + 1, "t": 1.0, "residual": _rel_residual(ax, y),
                                "objective": 0.5 * rn * rn * data_scale})
        return _finish(o, self.method, x_pub, history, meter, opt, run.nfe)

    def _pigdm(self, operator, d: torch.Tensor, r2: float, s2: float, a: float):
        r""":math:`A_m^T (r^2 A_m A_m^T + s^2 I)^{-1} d` with :math:`A_m = A/a`; returns the
        model-space vector and the CG iterations used (0 for the closed form)."""
        shift = s2 * a * a / r2
        closed = operator.solve_shifted_normal(operator.adjoint(d), shift)
        if closed is not None:
            return (a / r2) * closed, 0
        u, its = _cg(lambda z: (r2 / (a * a)) * operator.forward(operator.adjoint(z)) + s2 * z,
                     d, iterations=self.options["cg_iters"], tol=self.options["cg_tol"])
        return operator.adjoint(u) / a, its
