r"""D-Flow: the initial noise optimised through the whole generative ODE.

Ben-Hamu, Puny, Gat, Karrer, Singer, Lipman, "D-Flow: Differentiating through Flows for
Controlled Generation" (ICML 2024). With :math:`\Phi_{0\to1}` the flow map of the prior's ODE
(``N`` steps of ``method``, in the prior's model space) and :math:`x(s) =`
``prior.from_model(s)``, D-Flow minimises over the noise state :math:`s_0`

.. math:: F(s_0) = \frac{1}{2\sigma^2}\|A\,x(\Phi_{0\to1}(s_0)) - y\|^2 + \lambda R(s_0),

:math:`R(s) = \tfrac12\|s\|^2 - (n-1)\log\|s\|` the radial Gaussian prior (per batch item), by
``torch.optim.LBFGS`` with ``line_search_fn="strong_wolfe"``: ``iterations`` outer calls of
``step``, each with up to ``max_iter`` L-BFGS iterations; every function evaluation
back-propagates through all ``N`` steps (memory grows linearly in ``N``). The start is the
blend :math:`s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,\varepsilon` of
the reference implementation. :math:`F` is the :math:`\rho\to\infty` limit of the MS-Flow
objective with the same :math:`\sigma, \lambda` and :math:`N = KM` steps.

History: entry 0 is the start, then one entry per outer iteration with ``data``, ``prior``
(:math:`\lambda R(s_0)`), ``objective`` :math:`F`, ``residual`` :math:`\|Ax-y\|/\|y\|`,
``gaps`` (empty: D-Flow has no stitching gaps), cumulative ``nfe_forward``/``nfe_backward``
and ``seconds``. If an L-BFGS step leaves a non-finite state or end image (the line search
wandered where the discretised flow blows up), the last finite iterate is kept, the last
history entry gets ``diverged_at`` (the outer iteration) and the solve stops. The result image
is :math:`x(\Phi_{0\to1}(s_0))` clipped to :math:`[0,1]`.

With statistical weights (``solve(..., weights=w)``, :mod:`ctflow.solvers.weights`) the data
term is :math:`\tfrac1{2\sigma^2}\sum_i w_i(A\,x(\Phi_{0\to1}(s_0)) - y)_i^2` (its gradient
back-propagates :math:`A^TW(Ax - y)/\sigma^2`) and ``data``/``residual`` are the weighted ones.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import torch

from ctflow.flow.integrate import integrate
from ctflow.solvers.base import FlowOptions, FlowSolver
from ctflow.solvers.init import blend_init
from ctflow.solvers.options import check_int, check_positive
from ctflow.solvers.problem import make_problem
from ctflow.solvers.progress import progress
from ctflow.solvers.radial import radial_prior
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.rng import make_generator
from ctflow.solvers.velocity import SolverVelocity

__all__ = ["DFlow"]

#: The L-BFGS options, which have no effect with ``iterations=0``.
LBFGS_OPTIONS = ("max_iter", "history_size", "lr", "tolerance_grad", "tolerance_change")


class DFlow(FlowSolver):
    r"""D-Flow solver (see the module docstring); options: :class:`DFlow.Options`.

    ``DFlow(**options).solve(operator, y, prior, sigma)`` returns a
    :class:`~ctflow.solvers.result.Reconstruction`; ``sigma`` is the absolute noise standard
    deviation :math:`\sigma` of ``y``.
    """

    name = "dflow"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(FlowOptions):
        r"""Options of :class:`DFlow` (and the shared flow options ``method``,
        ``integrator``, ``lam``, ``alpha``, ``init``, ``cgls_iters``, ``tv_weight``, ``seed``,
        ``progress`` of :class:`~ctflow.solvers.base.FlowOptions`).

        Attributes:
            N: ODE steps of the flow map (int >= 1).
            iterations: outer L-BFGS steps (int >= 0; 0 returns the start).
            max_iter: L-BFGS iterations per step (int >= 1).
            history_size: L-BFGS memory (int >= 1).
            lr: L-BFGS initial step (> 0).
            tolerance_grad, tolerance_change: L-BFGS stopping tolerances (>= 0).
            invert_steps: ODE steps of the backward flow :math:`\Psi^{-1}` that maps the
                start image to its noise code (int >= 1; ``None``: ``N``, the optimisation
                grid). A fine inversion gives a start that does not depend on ``N``.
            discrepancy: the discrepancy principle :math:`\tau`: an item stops once its
                data term :math:`\tfrac1{2\sigma^2}\|Ax-y\|^2 \le \tau\,m/2` (``m`` its
                number of measurements; the expected value at the truth is :math:`m/2`);
                ``None``: run all ``iterations``.

        The L-BFGS options are refused with ``iterations=0``; the start options (``init``,
        ``cgls_iters``, ``tv_weight``) with ``alpha=0``.
        """

        OWNER = "DFlow"
        N: int = 32
        iterations: int = 10
        max_iter: int = 5
        history_size: int = 20
        lr: float = 1.0
        tolerance_grad: float = 1e-9
        tolerance_change: float = 1e-12
        invert_steps: Optional[int] = None
        discrepancy: Optional[float] = None

        def check(self) -> None:
            super().check()
            own = self.OWNER
            self._set("N", check_int("N", self.N, owner=own))
            self._set("iterations", check_int("iterations", self.iterations, owner=own,
                                              minimum=0))
            self._set("max_iter", check_int("max_iter", self.max_iter, owner=own))
            self._set("history_size", check_int("history_size", self.history_size, owner=own))
            self._set("lr", check_positive("lr", self.lr, owner=own))
            for name in ("tolerance_grad", "tolerance_change"):
                self._set(name, check_positive(name, getattr(self, name), owner=own,
                                               allow_zero=True))
            if self.invert_steps is not None:
                self._set("invert_steps", check_int("invert_steps", self.invert_steps,
                                                    owner=own))
            if self.discrepancy is not None:
                self._set("discrepancy", check_positive("discrepancy", self.discrepancy,
                                                        owner=own))
            self.refuse_unless(self.iterations > 0, LBFGS_OPTIONS + ("discrepancy",),
                               "with iterations=0")
            self.refuse_unless(self.alpha > 0, ("invert_steps",),
                               "with alpha=0 (the start is pure noise)")
            self.check_start()

    def solve(self, operator, y: torch.Tensor, prior, sigma: float, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        """Reconstruct from ``y`` (``sigma`` > 0: the absolute noise standard deviation;
        ``weights``: the statistical weights of the data term, ``None`` for all ones).

        Every batch item is solved on its own (its own L-BFGS, the start noise drawn from a
        generator seeded with ``seed``), so an item's result does not depend on its batch
        mates and equals the solve of that item alone. The history sums ``data``, ``prior``,
        ``objective`` and the NFE over the items (NFE per image: an item's calls count for
        it); ``residual`` is the batch's :math:`\|Ax-y\|/\|y\|`; an item that stopped
        early (divergence, the discrepancy principle) contributes its last entry."""
        sigma, meas, weights = self.begin(operator, y, prior, sigma, weights)
        yb = meas.y
        with SolveMeter(yb.device) as meter:
            runs = [self._solve_one(operator, yb[i:i + 1], prior, sigma,
                                    None if weights is None else
                                    weights[i:i + 1] if weights.shape[0] > 1 else weights)
                    for i in range(yb.shape[0])]
        image = torch.cat([r[0] for r in runs])
        history = _merge_histories([r[1] for r in runs],
                                   [float(torch.linalg.vector_norm(yb[i]))
                                    for i in range(yb.shape[0])])
        nfe = {k: sum(r[2][k] for r in runs) for k in runs[0][2]}
        per_image = {k: sum(r[4][k] for r in runs) / len(runs) for k in runs[0][4]}
        return Reconstruction(image=meas.restore(image.detach()), history=history, nfe=nfe,
                              nfe_per_image=per_image,
                              seconds=meter.seconds, peak_memory_bytes=meter.peak_memory_bytes,
                              method=self.name, options=self.recorded_options(init=runs[0][3]))

    def _solve_one(self, operator, yb, prior, sigma, weights):
        """One item: ``(image, history, nfe, init label, nfe per image)``."""
        o = self.options
        v = SolverVelocity(prior, yb.device)
        with v.evaluation_mode():
            t_start = time.perf_counter()
            # latent priors: via the decoder; weights: the whitened data term
            problem = make_problem(operator, yb, prior, sigma, weights)
            x0, init_label = self.start_image(operator, yb, sigma, weights)
            s0 = blend_init(v, prior, x0, alpha=o.alpha, steps=o.invert_steps or o.N,
                            method=o.method,
                            generator=make_generator(o.seed), like=yb.new_empty(
                                (yb.shape[0], yb.shape[1], *operator.domain_shape)))
            lam = o.lam

            def flow(s):
                return integrate(v, s, 0.0, 1.0, o.N, o.method, grad=True)

            def terms(s, x1):
                data = problem.data(x1).sum()
                pr = lam * radial_prior(s).sum() if lam else torch.zeros_like(data)
                return data, pr

            def record(it, s, x1):
                with torch.no_grad():
                    data, pr = terms(s, x1)
                    nfe = v.nfe
                    return {"iteration": it, "data": float(data), "prior": float(pr),
                            "gaps": [], "trajectory_loss": 0.0,
                            "objective": float(data + pr),
                            "residual": problem.relative_residual(x1),
                            "nfe_forward": nfe["forward"], "nfe_backward": nfe["backward"],
                            "seconds": time.perf_counter() - t_start}

            s = s0.detach().clone().requires_grad_(True)
            with torch.no_grad():
                x1 = integrate(v, s.detach(), 0.0, 1.0, o.N, o.method, grad=False)
            history = [record(0, s.detach(), x1)]
            opt = torch.optim.LBFGS([s], lr=o.lr, max_iter=o.max_iter,
                                    history_size=o.history_size,
                                    tolerance_grad=o.tolerance_grad,
                                    tolerance_change=o.tolerance_change,
                                    line_search_fn="strong_wolfe")

            last = {}

            def closure():
                opt.zero_grad(set_to_none=True)
                with torch.enable_grad():
                    x_end = flow(s)
                    data, pr = terms(s, x_end)
                    loss = data + pr
                    g, = torch.autograd.grad(loss, s)
                s.grad = g
                last["s"], last["x1"] = s.detach().clone(), x_end.detach()
                return loss.detach()

            def end_state():
                # reuse the last closure evaluation when L-BFGS stopped at that point
                if "s" in last and torch.equal(last["s"], s.detach()):
                    return last["x1"]
                with torch.no_grad():
                    return integrate(v, s.detach(), 0.0, 1.0, o.N, o.method,
                                     grad=False)

            bar = progress(total=o.iterations, enabled=o.progress, desc="D-Flow")
            try:
                for it in range(1, o.iterations + 1):
                    previous = s.detach().clone(), x1
                    opt.step(closure)
                    x1 = end_state()
                    if not (torch.isfinite(s).all() and torch.isfinite(x1).all()):
                        # L-BFGS diverged (a line search through a region where the
                        # flow blows up): keep the last finite iterate and stop.
                        with torch.no_grad():
                            s.copy_(previous[0])
                        x1 = previous[1]
                        history[-1]["diverged_at"] = it
                        break
                    history.append(record(it, s.detach(), x1))
                    bar.update(1)
                    bar.set_postfix(objective=f"{history[-1]['objective']:.4g}")
                    if o.discrepancy is not None and \
                            history[-1]["data"] <= o.discrepancy * yb.numel() / 2:
                        history[-1]["stopped"] = "discrepancy"
                        break
            finally:
                bar.close()
            image = prior.from_model(x1).clamp(0.0, 1.0)
        return image, history, v.nfe, init_label, v.nfe_per_image(1)


def _merge_histories(histories, y_norms):
    """One history of per-item histories: sums of the additive terms, the batch residual."""
    n = max(len(h) for h in histories)
    merged = []
    for k in range(n):
        rows = [h[min(k, len(h) - 1)] for h in histories]
        entry = dict(rows[0])
        for key in ("data", "prior", "objective", "nfe_forward", "nfe_backward"):
            entry[key] = sum(r[key] for r in rows)
        entry["seconds"] = max(r["seconds"] for r in rows)
        num = sum((r["residual"] * yn) ** 2 for r, yn in zip(rows, y_norms))
        den = sum(yn * yn for yn in y_norms)
        entry["residual"] = (num / den) ** 0.5 if den > 0 else 0.0
        entry["iteration"] = k
        stopped = [i for i, h in enumerate(histories) if len(h) - 1 < k]
        if stopped:
            entry["items_stopped"] = stopped
        merged.append(entry)
    return merged
