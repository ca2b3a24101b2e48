r"""MS-Flow: trajectory stitching (multiple shooting) for inverse problems with flow priors.

Denker, Eliasof, Kereta, Schönlieb, "Trajectory Stitching for Solving Inverse Problems with
Flow-Based Models". The generative ODE :math:`\dot s = v(s, t)` (noise at :math:`t=0`, data at
:math:`t=1`) is cut at nodes :math:`0 = t_0 < \dots < t_K = 1` (``nodes``: ``"uniform"``
:math:`t_k = k/K`; ``"power"`` :math:`t_k = 1 - (1 - k/K)^p` with ``node_power`` :math:`p`,
which shortens the segments near the data end; or an explicit increasing list); the states
:math:`s_0, \dots, s_K` at the nodes live in the prior's *model space* and are free variables.
:math:`\Phi_k` integrates from :math:`t_k` to :math:`t_{k+1}` with :math:`M` steps of the chosen
integrator (:math:`N = KM` steps in all). The objective is

.. math::

    J(s) = \frac{1}{2\sigma^2}\|A\,x(s_K) - y\|^2 + \lambda R(s_0)
           + \sum_{k=0}^{K-1} \frac{\rho_k}{2}\|s_{k+1} - \Phi_k(s_k)\|^2,

with :math:`x(s) =` ``prior.from_model(s)`` the public image and
:math:`R(s) = \tfrac12\|s\|^2 - (n-1)\log\|s\|` the radial Gaussian prior (per batch item).
Everything is summed over the batch; batch items never interact.

**Initialisation.** :math:`s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,
\varepsilon` (:math:`\Psi^{-1}` the backward ODE with :math:`N` steps, :math:`x_\text{init}`
from ``init``), then (``trajectory="rollout"``, the default) :math:`s_{k+1} = \Phi_k(s_k)`, so
every stitching gap starts at zero; ``trajectory="interpolate"`` instead puts the states on
the straight line :math:`s_k = (1-t_k)s_0 + t_k\,s_K` to :math:`s_K =` the model-space
:math:`x_\text{init}` (the rectified-flow training interpolant; the gaps start non-zero);
their flows :math:`\Phi_k(s_k)` are evaluated one segment at a time (Gauss–Seidel and the
other updates: peak memory that of one batch, independent of :math:`K`) or in one batched call
over all segments (Jacobi, as its sweeps).

**Block updates** (``update``), each involving one or two segments only:

* data block :math:`s_K` (every variant): the exact minimiser of
  :math:`\tfrac1{2\sigma^2}\|A_m s - y_m\|^2 + \tfrac{\rho_{K-1}}2\|s - \Phi_{K-1}(s_{K-1})\|^2`,
  i.e. :math:`(A_m^TA_m + \rho\sigma^2 I)s = A_m^Ty_m + \rho\sigma^2\Phi_{K-1}(s_{K-1})` in model
  space (:math:`A_m = A/a`, see :mod:`ctflow.solvers.problem`), in closed form through
  ``operator.solve_shifted_normal`` where available, else by ``cg_iters`` warm-started CG steps
  (for a latent prior: ``decoder_steps`` gradient steps through the decoder,
  :mod:`ctflow.solvers.latent`);
* block :math:`k < K` minimises :math:`c_k(s_k) + \tfrac{\rho_k}2\|s_{k+1} - \Phi_k(s_k)\|^2`
  with :math:`c_0 = \lambda R` and
  :math:`c_k = \tfrac{\rho_{k-1}}2\|\cdot - \Phi_{k-1}(s_{k-1})\|^2`.

  - ``"jacobian-free"``: the Jacobian of :math:`\Phi_k` is replaced by the identity, so the
    block problem becomes :math:`\min c_k(s) + \tfrac{\rho_k}2\|s - z\|^2` with
    :math:`z = s_{k+1} - \Phi_k(s_k^\text{old}) + s_k^\text{old}`, solved in closed form:
    :math:`s_k = [\rho_{k-1}\Phi_{k-1}(s_{k-1}) + \rho_k z]/(\rho_{k-1} + \rho_k)` for interior
    blocks and the radial proximal map (:func:`~ctflow.solvers.radial.radial_prox`) for
    :math:`s_0`. Forward evaluations only; ``relaxation`` :math:`\omega` damps the step,
    :math:`s_k \leftarrow s_k^\text{old} + \omega(s_k - s_k^\text{old})` (also applied after
    exact updates when :math:`\omega \ne 1`; the monotone-descent guarantee below is for
    :math:`\omega = 1`).
  - ``"exact"``: ``inner_iters`` proximal-gradient steps on the block problem with the exact
    vector-Jacobian product through the one segment :math:`\Phi_k`:
    :math:`s^+ = \operatorname{prox}_{c_k/L}\big(s - \tfrac1L\nabla_s\tfrac{\rho_k}2\|s_{k+1} -
    \Phi_k(s)\|^2\big)`, starting from :math:`L = \rho_k` (where the step equals the
    Jacobian-free update when the Jacobian is the identity) and doubling :math:`L` until the
    descent-lemma condition holds (then :math:`J` cannot increase; a step that fails
    ``max_backtracks`` times is not taken). Memory :math:`O(M)`, independent of :math:`K`.
    Every block update, and hence every sweep, never increases :math:`J` (Gauss–Seidel).
  - ``"joint"``: all states at once by gradient descent on :math:`J` with exact VJPs through
    every segment (``joint_optimizer="gd"``: steepest descent with Armijo backtracking, which
    is monotone; ``"adam"``: Adam with learning rate ``lr``). Memory :math:`O(N)`; for
    comparison only.

**Sweeps** (``sweep``): ``"gauss-seidel"`` updates :math:`s_0, \dots, s_K` in turn
(``order="backward"``: :math:`s_K, \dots, s_0`), each block seeing its neighbours' newest
values; ``"jacobi"`` updates every block from the previous sweep's states, evaluating all
:math:`K` segments in one batched velocity call (segments stacked along the batch dimension,
one time grid per item), so a sweep costs :math:`M` batched calls instead of :math:`KM`.
Undamped Jacobian-free Jacobi sweeps can diverge: for a linear flow with Jacobian :math:`j`
(a scalar mode), the alternating error mode :math:`e_k = (-1)^k e` is multiplied by
:math:`-j` per sweep, which grows wherever the flow expands (:math:`|j| > 1`, as U-Net
velocity fields do in places); with relaxation :math:`\omega` the factor is
:math:`1 - \omega(1 + j)`, stable for :math:`\omega < 2/(1+j)`, hence the Jacobi default
:math:`\omega = 0.5` (stable up to :math:`j = 3`). Gauss–Seidel needs no damping.
The flow :math:`\Phi_k(s_k)` of every current state is cached, so a Jacobian-free
Gauss–Seidel sweep costs exactly one segment evaluation per block (:math:`N` steps).

**Penalties** (``rho`` a number or one number per segment; ``schedule``):

* ``"constant"``;
* ``"continuation"``: after every sweep :math:`\rho_k \leftarrow \min(\rho_k\,g, \rho_{\max})`
  (``rho_growth`` :math:`g`, ``rho_max``), so the stitched problem tends to the D-Flow problem;
* ``"adaptive"`` (gap equidistribution, our design; the paper names adaptive penalties as
  future work): after every sweep, with the gap norms :math:`d_k = \|s_{k+1} - \Phi_k(s_k)\|`
  and their geometric mean :math:`\bar d`,
  :math:`\rho_k \leftarrow \operatorname{clip}\big(\rho_k\, g\,
  \operatorname{clip}((d_k/\bar d)^{1/2}, 1/\tau, \tau), \rho_{\min}, \rho_{\max}\big)`
  (``adapt_factor`` :math:`\tau`): the continuation growth, raised on segments whose gap is
  larger than typical and lowered where it is smaller, so that no segment lags behind.

**History** (``Reconstruction.history``): entry 0 is the initial trajectory, then one entry
per sweep with ``data`` :math:`\tfrac1{2\sigma^2}\|Ax-y\|^2`, ``prior`` :math:`\lambda R(s_0)`,
``gaps`` (per segment :math:`\tfrac12\|s_{k+1} - \Phi_k(s_k)\|^2`, without :math:`\rho_k`),
``gap_rel`` (per trajectory the relative stitching gap
:math:`\max_k\|s_{k+1} - \Phi_k(s_k)\|/\|s_{k+1}\|`: near 0 when the states lie on one ODE
trajectory), the last entry also ``consistency`` (per trajectory
:math:`\|s_K - \Phi_{0\to1}(s_0)\|/\|s_K\|`, the end state against the ODE run from
:math:`s_0` over the same grid; computed after the solve, not in its time or NFE),
``trajectory_loss`` (their sum), ``penalty`` :math:`\sum_k\rho_k\,\text{gaps}_k`, ``objective``
:math:`J`, ``residual`` :math:`\|Ax-y\|/\|y\|`, ``rho`` (the penalties the entry was computed
with), cumulative ``nfe_forward``/``nfe_backward`` and ``seconds``. All sums run over the batch.

**Defaults** (``K=8, M=4, rho=1000, alpha=1, sweeps=20``, Jacobian-free Gauss–Seidel) were
chosen on one validation CT slice with the bundled ``ct64`` prior (64×64, 30 parallel-beam
views, 1 % noise; FBP 31.4 dB). With its 1000-step checkpoint, PSNR after 20 sweeps is
33.4 dB at ``alpha=1`` (32.6 dB at 0.9, 31.8 dB at 0.5), 32.9 dB with Jacobi sweeps
(:math:`\omega = 0.5`) and 33.5 dB with the adaptive schedule without growth; ``rho`` between
100 and 1000 changes little (1000 keeps improving over the sweeps, 100 peaks early). An
earlier checkpoint mapped real slices to latents far inside the typical noise shell, where any
added noise dominated (19.5 dB at ``alpha=0.9`` against 33.0 dB at 1, where D-Flow with the
same N = 32 reached 33.1 dB in 9× the wall time): hence ``alpha=1``.

**Draws** (``draws`` :math:`D`): :math:`D` independent MS-Flow solves per measurement, run as
one batch (their initial states differ by the noise :math:`\varepsilon` of the blend
initialisation, so this needs ``alpha < 1``: ``draws > 1`` with ``alpha = 1`` is refused); the
result is the mean of their images and
``Reconstruction.uncertainty`` their pixel-wise standard deviation, a Monte-Carlo estimate of
the posterior mean and spread. One trajectory keeps its noise: the states near :math:`t = 1`
carry a fixed noise pattern that the last segment's one-step denoiser
:math:`\Phi_{K-1}(s) = s + (t_K - t_{K-1})\,v(s, t_{K-1})` cannot remove; averaging
independent draws does. On the four validation CT slices (64×64, 60 views, 1 % noise, the
bundled ``ct64``) the tuned setting ``K=8, M=1, sweeps=3, alpha=0, init="cgls",
trajectory="interpolate", nodes="power"`` (:math:`p = 2`) gives 35.9 dB with one draw,
36.5 dB with 4 and 36.6 dB with 8 (TV 36.6 dB, FBP 33.1 dB); with the uniform grid and the
rollout trajectory one draw gives 35.3 dB and 4 draws (``alpha=0.9``) 35.0 dB
(``benchmarks/configs/ct-sparse.json`` records the whole search).

**Weights** (``solve(..., weights=w)``, :mod:`ctflow.solvers.weights`): the data term is
:math:`\tfrac1{2\sigma^2}\sum_i w_i(A\,x(s_K) - y)_i^2` (Poisson post-log data: :math:`w` =
counts, :math:`\sigma = 1`); the data block solves :math:`(A_m^TWA_m + \rho\sigma^2 I)s =
A_m^TWy_m + \rho\sigma^2\Phi_{K-1}(s_{K-1})` by the same warm-started CG (closed form for
:math:`W = cI` only). :math:`\rho` compares with the data curvature, top eigenvalue
:math:`\|W^{1/2}A_m\|^2/\sigma^2 \le \max(w)\|A_m\|^2/\sigma^2` (for :math:`\|A_m\|^2/\sigma^2`
unweighted); counts with :math:`\sigma = 1` match :math:`1/\sigma^2` = 1/(post-log variance)
of the unweighted term, so the default ``rho`` (unchanged) transfers.

The result image is :math:`x(s_K)` clipped to :math:`[0, 1]` (averaged over the draws). NFE
counts every velocity call (a batched call counts once), the initialisation's included.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, List, Optional, Union

import torch

from ctflow.solvers.base import FlowOptions, FlowSolver
from ctflow.solvers.msflow_sweeps import Trajectory, node_grid
from ctflow.solvers.options import check_choice, check_int, check_positive, check_probability
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.velocity import SolverVelocity
from ctflow.solvers.weights import repeat_items

__all__ = ["MSFlow", "node_grid", "CPU_MAX_BATCH"]

UPDATES = ("jacobian-free", "exact", "joint")
SWEEPS = ("gauss-seidel", "jacobi")
ORDERS = ("forward", "backward")
SCHEDULES = ("constant", "continuation", "adaptive")
JOINT_OPTIMIZERS = ("gd", "adam")
TRAJECTORIES = ("rollout", "interpolate")
NODE_GRIDS = ("uniform", "power")

#: ``max_batch="auto"`` on a CPU. Per-image time of the bundled ``ct64`` velocity (64 x 64
#: U-Net) on the 2-core CI-class CPU, idle: 1 thread 25.7 / 24.2 / 31.8 / 34.7 / 40.0 ms and
#: 2 threads 16.7 / 17.8 / 16.0 / 19.5 / 23.4 ms at batch 8 / 16 / 32 / 64 / 128: past a few
#: dozen images the activations leave the caches and a larger batch only costs. On a GPU the
#: opposite holds (small batches leave it idle), hence no limit there.
CPU_MAX_BATCH = 16


def _check_nodes(nodes: Any, K: int, *, owner: str) -> Any:
    if isinstance(nodes, torch.Tensor):
        nodes = nodes.tolist()
    if isinstance(nodes, str):
        check_choice("nodes", nodes, NODE_GRIDS, owner=owner)
        return nodes
    if not isinstance(nodes, (list, tuple)) or len(nodes) != K + 1:
        raise ValueError(f"{owner}: option nodes must be one of {', '.join(NODE_GRIDS)} or a "
                         f"list of K+1={K + 1} increasing times from 0 to 1, got {nodes!r}")
    t = [float(v) for v in nodes]
    if t[0] != 0.0 or t[-1] != 1.0 or any(b <= a for a, b in zip(t, t[1:])):
        raise ValueError(f"{owner}: option nodes must increase strictly from 0 to 1, got {t}")
    return t


def _check_rho(rho: Any, K: int, *, owner: str) -> Union[float, List[float]]:
    if isinstance(rho, torch.Tensor):
        rho = rho.tolist()
    if isinstance(rho, (list, tuple)):
        if len(rho) != K:
            raise ValueError(f"{owner}: option rho must be a number or a list of K={K} "
                             f"numbers (one per segment), got {len(rho)} values")
        return [check_positive("rho", r, owner=owner) for r in rho]
    return check_positive("rho", rho, owner=owner)


class MSFlow(FlowSolver):
    r"""MS-Flow solver (see the module docstring for the mathematics); options:
    :class:`MSFlow.Options`.

    ``MSFlow(**options).solve(operator, y, prior, sigma)`` (or ``MSFlow(options)``) returns a
    :class:`~ctflow.solvers.result.Reconstruction`; the instance is also callable as
    ``solver(operator, y, prior, sigma, options=None)`` (``options`` a dict overriding some).
    ``sigma`` is the absolute standard deviation :math:`\sigma` of the Gaussian noise in ``y``.
    """

    name = "msflow"

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(FlowOptions):
        r"""Options of :class:`MSFlow`, besides the shared flow options ``method``
        (``integrator``), ``lam``, ``alpha``, ``init``, ``cgls_iters``, ``tv_weight``,
        ``seed`` and ``progress`` (:class:`~ctflow.solvers.base.FlowOptions`; the start
        options are refused with ``alpha=0`` and ``trajectory="rollout"``, which never look
        at the initial image).

        Attributes:
            K: segments (int >= 1).
            M: integrator steps per segment (int >= 1).
            rho: the penalty :math:`\rho` (> 0), or a list of K, one per segment.
            schedule: ``"constant"``, ``"continuation"`` or ``"adaptive"`` (module docstring).
            rho_growth: growth factor :math:`g` of continuation and adaptive (> 0).
            rho_max: upper bound of the penalties of continuation and adaptive (> 0).
            rho_min: lower bound of the adaptive penalties (> 0, <= ``rho_max``).
            adapt_factor: the adaptive clip :math:`\tau \ge 1`.
            sweeps: outer iterations (int >= 0; 0 returns the initial trajectory).
            update: ``"jacobian-free"``, ``"exact"`` or ``"joint"``.
            sweep: ``"gauss-seidel"`` or ``"jacobi"`` (refused with ``update="joint"``).
            order: ``"forward"`` or ``"backward"`` Gauss–Seidel order (refused with Jacobi
                and joint updates, which update every block at once).
            relaxation: :math:`\omega \in (0, 1]` damping the block updates; ``None``: 1
                for Gauss–Seidel, 0.5 for Jacobi (refused with ``update="joint"``).
            inner_iters: proximal-gradient steps per block of ``update="exact"`` (int >= 1).
            max_backtracks: step halvings of the exact and the joint ``"gd"`` updates
                (int >= 0).
            cg_iters, cg_tol: CG steps and relative tolerance of the data step of an image
                prior when the operator has no closed form (refused for latent priors).
            decoder_steps, decoder_tol: gradient steps through the decoder and relative
                gradient tolerance of the data step of a latent prior (refused for image
                priors).
            trajectory: the initial states, ``"rollout"`` or ``"interpolate"``.
            nodes: ``"uniform"``, ``"power"`` or a list of K+1 increasing times from 0 to 1.
            node_power: the exponent :math:`p > 0` of ``nodes="power"`` (refused otherwise).
            draws: independent solves averaged (int >= 1; ``Reconstruction.uncertainty`` is
                their spread); needs ``alpha < 1``.
            joint_optimizer: ``"gd"`` or ``"adam"`` (``update="joint"`` only).
            lr: Adam's learning rate (> 0; ``joint_optimizer="adam"`` only).
            max_batch: the most images per velocity call: ``None`` (no limit), an int >= 1,
                or ``"auto"`` (:data:`CPU_MAX_BATCH` on a CPU, no limit on a GPU); Jacobi and
                joint sweeps stack all K segments in one call, run in chunks of this size
                (the values and the NFE count are unchanged).
        """

        OWNER = "MSFlow"
        K: int = 8
        M: int = 4
        rho: Union[float, List[float]] = 1000.0
        schedule: str = "constant"
        rho_growth: float = 1.5
        rho_max: float = 1e8
        rho_min: float = 1e-8
        adapt_factor: float = 2.0
        sweeps: int = 20
        update: str = "jacobian-free"
        sweep: str = "gauss-seidel"
        order: str = "forward"
        relaxation: Optional[float] = None
        inner_iters: int = 3
        max_backtracks: int = 20
        cg_iters: int = 10
        cg_tol: float = 1e-6
        decoder_steps: int = 10
        decoder_tol: float = 1e-6
        trajectory: str = "rollout"
        nodes: Any = "uniform"
        node_power: float = 2.0
        draws: int = 1
        joint_optimizer: str = "gd"
        lr: float = 1e-2
        max_batch: Any = "auto"

        def check(self) -> None:
            super().check()
            own = self.OWNER
            for name in ("K", "M", "inner_iters", "cg_iters", "decoder_steps", "draws"):
                self._set(name, check_int(name, getattr(self, name), owner=own))
            for name in ("sweeps", "max_backtracks"):
                self._set(name, check_int(name, getattr(self, name), owner=own, minimum=0))
            self._set("rho", _check_rho(self.rho, self.K, owner=own))
            for name, choices in (("schedule", SCHEDULES), ("update", UPDATES),
                                  ("sweep", SWEEPS), ("order", ORDERS),
                                  ("trajectory", TRAJECTORIES),
                                  ("joint_optimizer", JOINT_OPTIMIZERS)):
                check_choice(name, getattr(self, name), choices, owner=own)
            for name in ("rho_growth", "rho_max", "rho_min", "adapt_factor", "node_power",
                         "lr"):
                self._set(name, check_positive(name, getattr(self, name), owner=own))
            for name in ("cg_tol", "decoder_tol"):
                self._set(name, check_positive(name, getattr(self, name), owner=own,
                                               allow_zero=True))
            if self.rho_min > self.rho_max:
                raise ValueError(f"{own}: option rho_min ({self.rho_min}) must not exceed "
                                 f"rho_max ({self.rho_max})")
            if self.adapt_factor < 1:
                raise ValueError(f"{own}: option adapt_factor must be >= 1, got "
                                 f"{self.adapt_factor}")
            self._set("nodes", _check_nodes(self.nodes, self.K, owner=own))
            if self.relaxation is not None:
                self._set("relaxation", check_probability("relaxation", self.relaxation,
                                                          owner=own, open_low=True))
            if self.max_batch not in (None, "auto"):
                self._set("max_batch", check_int("max_batch", self.max_batch, owner=own))
            self._refuse_idle()
            self.check_start()

        def _refuse_idle(self) -> None:
            """Refuse the options that have no effect in this combination."""
            joint, exact = self.update == "joint", self.update == "exact"
            self.refuse_unless(self.alpha < 1, ("draws",),
                               "with alpha=1 (every draw starts from the same state and "
                               "follows the same deterministic sweeps, so all draws are "
                               "identical); use alpha < 1")
            self.refuse_unless(not joint, ("sweep", "order", "relaxation"),
                               "with update='joint' (all states move at once)")
            self.refuse_unless(self.sweep == "gauss-seidel", ("order",),
                               "with sweep='jacobi' (every block is updated from the "
                               "previous sweep's states)")
            self.refuse_unless(exact, ("inner_iters",), "unless update='exact'")
            self.refuse_unless(exact or (joint and self.joint_optimizer == "gd"),
                               ("max_backtracks",),
                               "unless update='exact' or update='joint' with "
                               "joint_optimizer='gd'")
            self.refuse_unless(joint, ("joint_optimizer",), "unless update='joint'")
            self.refuse_unless(joint and self.joint_optimizer == "adam", ("lr",),
                               "unless update='joint' and joint_optimizer='adam'")
            self.refuse_unless(self.schedule != "constant", ("rho_growth", "rho_max"),
                               "with schedule='constant'")
            self.refuse_unless(self.schedule == "adaptive", ("rho_min", "adapt_factor"),
                               "unless schedule='adaptive'")
            self.refuse_unless(isinstance(self.nodes, str) and self.nodes == "power",
                               ("node_power",), "unless nodes='power'")

        def start_unused(self) -> Optional[str]:
            if self.alpha == 0 and self.trajectory == "rollout":
                return ("with alpha=0 and trajectory='rollout' (the states start from pure "
                        "noise and never see the initial image)")
            return None

        def resolved_relaxation(self) -> Optional[float]:
            """:math:`\omega`: ``relaxation``, or its default for the sweep (1 for
            Gauss–Seidel, 0.5 for Jacobi: see the module docstring); ``None`` for the joint
            update, which has none."""
            if self.update == "joint":
                return None
            if self.relaxation is not None:
                return self.relaxation
            return 0.5 if self.sweep == "jacobi" else 1.0

        def check_prior_kind(self, latent: bool) -> None:
            """Refuse the data-step options of the other kind of prior (before any work)."""
            if latent:
                self.refuse_unless(False, ("cg_iters", "cg_tol"),
                                   "for a latent prior (its data step takes decoder_steps "
                                   "gradient steps through the decoder)")
            else:
                self.refuse_unless(False, ("decoder_steps", "decoder_tol"),
                                   "for an image-space prior (its data step is CG, "
                                   "cg_iters and cg_tol)")

    # -------------------------------------------------------------------------------------
    def solve(self, operator, y: torch.Tensor, prior, sigma: float, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        """Reconstruct from ``y`` (``weights``: the module docstring's **Weights**)."""
        o = self.options
        sigma, meas, weights = self.begin(operator, y, prior, sigma, weights)
        o.check_prior_kind(bool(getattr(prior, "is_latent", False)))
        yb = meas.y
        D = o.draws
        with SolveMeter(yb.device) as meter:
            mb = o.max_batch
            if mb == "auto":
                mb = CPU_MAX_BATCH if yb.device.type == "cpu" else None
            v = SolverVelocity(prior, yb.device, max_batch=mb)
            with v.evaluation_mode():
                t_start = time.perf_counter()
                # D independent trajectories per measurement in one batch (item i*D + d)
                yd = yb.repeat_interleave(D, dim=0)
                wd = repeat_items(weights, D)
                start = self.start_image(operator, yd, sigma, wd)
                run = Trajectory(o, operator, yd, prior, sigma, v, start, t_start, wd)
                history = run.solve()
            images = prior.from_model(run.s[-1]).clamp(0.0, 1.0).detach()
            images = images.reshape(yb.shape[0], D, *images.shape[1:])
            image = images.mean(1)
            spread = images.std(1) if D > 1 else None
        with v.evaluation_mode():     # a diagnostic, outside the solve's time and NFE
            history[-1]["consistency"] = run.consistency()
        options = self.recorded_options(init=run.init_label,
                                        relaxation=o.resolved_relaxation())
        return Reconstruction(image=meas.restore(image), history=history,
                              nfe_per_image=run.v.nfe_per_image(yb.shape[0]),
                              nfe=run.v.nfe, seconds=meter.seconds,
                              peak_memory_bytes=meter.peak_memory_bytes, method=self.name,
                              options=options,
                              uncertainty=None if spread is None else meas.restore(spread))
