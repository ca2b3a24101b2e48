r"""Flow-DP: a one-step flow denoiser alternated with an exact data projection.

The simple control of the MS-Flow study (issue 20), kept as a method because it is good: from
a start image :math:`x_0` (CGLS by default), for :math:`r = 1, \dots, R` (``rounds``)

.. math::

    z &= t\,s + (1 - t)\,\varepsilon, \quad \varepsilon \sim N(0, I)
        && \text{noise the current state to time } t \\
    d &= z + (1 - t)\,v(z, t)
        && \text{one-step flow denoiser } D_t(z) \approx E[x_1 \mid x_t = z] \\
    s &= \arg\min_s \tfrac{1}{2\sigma^2}\|A_m s - y_m\|^2 + \tfrac\rho2\|s - d\|^2
        && \text{exact data step (MS-Flow's)}

in the prior's model space (:math:`s = a x + b`; :func:`ctflow.solvers.problem.data_step`:
closed form where the operator has one, else warm-started CG). ``rho`` has the units of
MS-Flow's ``rho`` (the same data step), so the two compare at equal settings. With
``draws`` :math:`D > 1` the loop runs :math:`D` times with independent noise in one batch
and returns the mean (``Reconstruction.uncertainty``: the pixel-wise standard deviation).

It is PnP-Flow's idea (denoise, then enforce the data) with an exact data step instead of a
gradient step — which matters for ill-conditioned operators such as sparse-view CT, where a
gradient step of size :math:`1/\|A\|^2` barely moves the small singular directions — and a
fixed time :math:`t` near 1 instead of a schedule. Cost: :math:`R` velocity calls per draw.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Dict, List, Optional

import torch

from ctflow.solvers.base import FlowSolver
from ctflow.solvers.init import TV_START_WEIGHT, check_start
from ctflow.solvers.linalg import relative_residual
from ctflow.solvers.options import SolverOptions, check_float, check_int, check_probability
from ctflow.solvers.problem import data_step, make_problem
from ctflow.solvers.progress import progress
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.rng import make_generator, randn
from ctflow.solvers.velocity import SolverVelocity
from ctflow.solvers.weights import repeat_items

__all__ = ["FlowDP"]


class FlowDP(FlowSolver):
    r"""Flow-DP (denoise and project); see the module docstring. Options:
    :class:`FlowDP.Options`. History per round: ``round``, ``data``
    (:math:`\tfrac1{2\sigma^2}\|Ax - y\|^2`), ``residual`` (:math:`\|Ax-y\|/\|y\|`),
    ``data_step`` (``"closed-form"`` or ``"cg"``), cumulative ``nfe_forward`` and
    ``seconds`` (with weights, the weighted data term and residual)."""

    name = "flowdp"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(SolverOptions):
        r"""Options of :class:`FlowDP` (and ``seed``, which seeds the noise, and
        ``progress``).

        Attributes:
            t: the time the state is noised to before each denoising step, in (0, 1)
                (close to 1: a light denoiser).
            rounds: :math:`R` denoise-and-project rounds (int >= 1).
            rho: the data step's penalty (> 0; MS-Flow's units).
            draws: independent loops averaged (int >= 1).
            init: the start image, one of :data:`~ctflow.solvers.init.INIT_CHOICES`, a
                tensor or a callable ``y -> image`` (default ``"cgls"``).
            cgls_iters: CGLS steps of ``init="cgls"`` (refused otherwise).
            tv_weight: relative TV weight of ``init="tv"`` (refused otherwise).
            cg_iters, cg_tol: CG steps and relative tolerance of the data step where the
                operator has no closed form.
        """

        OWNER = "FlowDP"
        t: float = 0.98
        rounds: int = 3
        rho: float = 1000.0
        draws: int = 1
        init: Any = "cgls"
        cgls_iters: int = 10
        tv_weight: float = TV_START_WEIGHT
        cg_iters: int = 10
        cg_tol: float = 1e-6

        def check(self) -> None:
            o = self.OWNER
            self._set("t", check_probability("t", self.t, owner=o, open_low=True))
            if self.t >= 1.0:
                raise ValueError(f"{o}: option t must be < 1 (at t = 1 the denoiser is the "
                                 f"identity and the prior does nothing), got {self.t}")
            self._set("rounds", check_int("rounds", self.rounds, owner=o))
            self._set("rho", check_float("rho", self.rho, owner=o, minimum=0.0,
                                         min_open=True))
            self._set("draws", check_int("draws", self.draws, owner=o))
            self._set("cg_iters", check_int("cg_iters", self.cg_iters, owner=o))
            self._set("cg_tol", check_float("cg_tol", self.cg_tol, owner=o, minimum=0.0))
            check_start(self, iterations="cgls_iters", used=True, why="")

        def start_unused(self):
            return None

    def solve(self, operator, y: torch.Tensor, prior, sigma: float,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        """Reconstruct from ``y = A x + noise`` (``sigma``: absolute noise std of ``y``;
        ``weights``: statistical weights of a weighted data term, see
        :mod:`ctflow.solvers.weights`)."""
        o = self.options
        sigma, meas, weights = self.begin(operator, y, prior, sigma, weights)
        if getattr(prior, "is_latent", False):
            raise ValueError("FlowDP: latent priors are not supported (the denoiser and the "
                             "data step work on images)")
        yb, D = meas.y, o.draws
        gen = make_generator(o.seed)
        history: List[Dict[str, Any]] = []
        with SolveMeter(yb.device) as meter:
            v = SolverVelocity(prior, yb.device)
            with v.evaluation_mode(), torch.no_grad():
                t0 = time.perf_counter()
                yd = yb.repeat_interleave(D, dim=0)      # item i*D + d
                wd = repeat_items(weights, D)
                start, label = self.start_image(operator, yd, sigma, wd)
                problem = make_problem(operator, yd, prior, sigma, wd)
                s = prior.to_model(start)
                tt = torch.full((s.shape[0],), o.t, dtype=s.dtype, device=s.device)
                for r in progress(range(o.rounds), enabled=o.progress, desc="flow-dp"):
                    z = o.t * s + (1.0 - o.t) * randn(s.shape, gen, s)
                    d = z + (1.0 - o.t) * v(z, tt)
                    s, how = data_step(problem, d, o.rho, s, iterations=o.cg_iters,
                                       tol=o.cg_tol)
                    res = operator.forward(prior.from_model(s)) - yd
                    if wd is not None:
                        res = res * wd.sqrt()
                    rn = float(torch.linalg.vector_norm(res))
                    history.append({"round": r + 1, "data": 0.5 * rn * rn / sigma ** 2,
                                    "residual": relative_residual(
                                        res, yd if wd is None else yd * wd.sqrt()),
                                    "data_step": how,
                                    "nfe_forward": v.nfe["forward"],
                                    "seconds": time.perf_counter() - t0})
            images = prior.from_model(s).clamp(0.0, 1.0)
            images = images.reshape(yb.shape[0], D, *images.shape[1:])
            image, spread = images.mean(1), (images.std(1) if D > 1 else None)
        return Reconstruction(image=meas.restore(image), history=history, nfe=v.nfe,
                              nfe_per_image=v.nfe_per_image(yb.shape[0]),
                              seconds=meter.seconds, peak_memory_bytes=meter.peak_memory_bytes,
                              method=self.name, options=self.recorded_options(init=label),
                              uncertainty=None if spread is None else meas.restore(spread))
