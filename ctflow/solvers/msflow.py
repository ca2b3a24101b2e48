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
  space (:math:`A_m = A/a`, see :mod:`ctflow.solvers.common`), in closed form through
  ``operator.solve_shifted_normal`` where available, else by ``cg_iters`` warm-started CG steps;
* block :math:`k < K` minimises :math:`c_k(s_k) + \tfrac{\rho_k}2\|s_{k+1} - \Phi_k(s_k)\|^2`
  with :math:`c_0 = \lambda R` and
  :math:`c_k = \tfrac{\rho_{k-1}}2\|\cdot - \Phi_{k-1}(s_{k-1})\|^2`.

  - ``"jacobian-free"``: the Jacobian of :math:`\Phi_k` is replaced by the identity, so the
    block problem becomes :math:`\min c_k(s) + \tfrac{\rho_k}2\|s - z\|^2` with
    :math:`z = s_{k+1} - \Phi_k(s_k^\text{old}) + s_k^\text{old}`, solved in closed form:
    :math:`s_k = [\rho_{k-1}\Phi_{k-1}(s_{k-1}) + \rho_k z]/(\rho_{k-1} + \rho_k)` for interior
    blocks and the radial proximal map (:func:`~ctflow.solvers.common.radial_prox`) for
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
initialisation, so this needs ``alpha < 1``); the result is the mean of their images and
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

The result image is :math:`x(s_K)` clipped to :math:`[0, 1]` (averaged over the draws). NFE
counts every velocity call (a batched call counts once), the initialisation's included.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Sequence

import torch

from ctflow.flow.integrate import METHODS, integrate
from ctflow.solvers.common import (FlowSolverBase, SolverVelocity, blend_init,
                     check_choice, check_int, check_positive,
                     check_probability, data_step, initial_image, make_generator,
                     make_problem, merge_flow_options, per_item_dot, per_item_sq,
                     progress_bar, radial_prior, radial_prox, TV_START_WEIGHT)
from ctflow.solvers.result import Reconstruction, SolveMeter

__all__ = ["MSFlow"]

UPDATES = ("jacobian-free", "exact", "joint")
SWEEPS = ("gauss-seidel", "jacobi")
ORDERS = ("forward", "backward")
SCHEDULES = ("constant", "continuation", "adaptive")
JOINT_OPTIMIZERS = ("gd", "adam")
TRAJECTORIES = ("rollout", "interpolate")


NODE_GRIDS = ("uniform", "power")


def node_grid(nodes: Any, K: int, *, power: float = 2.0) -> List[float]:
    r"""The segment nodes :math:`0 = t_0 < \dots < t_K = 1`: ``"uniform"`` (:math:`k/K`),
    ``"power"`` (:math:`1 - (1 - k/K)^p`, finer towards the data end :math:`t = 1` for
    :math:`p > 1`) or an explicit list (returned as floats)."""
    if isinstance(nodes, str):
        if nodes == "uniform":
            return [k / K for k in range(K + 1)]
        return [0.0] + [1.0 - (1.0 - k / K) ** power for k in range(1, K)] + [1.0]
    return [float(t) for t in nodes]


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


#: ``max_batch="auto"`` on a CPU. Per-image time of the bundled ``ct64`` velocity (64 x 64
#: U-Net) on the 2-core CI-class CPU, idle: 1 thread 25.7 / 24.2 / 31.8 / 34.7 / 40.0 ms and
#: 2 threads 16.7 / 17.8 / 16.0 / 19.5 / 23.4 ms at batch 8 / 16 / 32 / 64 / 128: past a few
#: dozen images the activations leave the caches and a larger batch only costs. On a GPU the
#: opposite holds (small batches leave it idle), hence no limit there.
CPU_MAX_BATCH = 16


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


class MSFlow(FlowSolverBase):
    r"""MS-Flow solver (see the module docstring for the mathematics).

    Keyword-only options (defaults in :attr:`DEFAULTS`):

    ``K`` segments, ``M`` steps per segment, ``method`` (``"euler"``, ``"heun"``,
    ``"midpoint"``; ``integrator`` is an alias, for ``ctflow.reconstruct`` where ``method``
    names the solver), ``lam`` :math:`\lambda`, ``rho`` (number or per-segment list),
    ``schedule`` (``"constant"``, ``"continuation"``, ``"adaptive"``), ``rho_growth``,
    ``rho_max``, ``rho_min``, ``adapt_factor``, ``sweeps`` (outer iterations), ``alpha``
    (blend), ``init`` (``"auto"``, ``"fbp"``, ``"adjoint"``, ``"cgls"``, ``"zeros"``, a tensor
    or a callable ``y -> image``), ``update`` (``"jacobian-free"``, ``"exact"``, ``"joint"``),
    ``sweep`` (``"gauss-seidel"``, ``"jacobi"``), ``order`` (``"forward"``, ``"backward"``),
    ``relaxation`` :math:`\omega \in (0, 1]` (Jacobian-free steps; default 1 for
    Gauss–Seidel, 0.5 for Jacobi), ``trajectory``
    (``"rollout"``, ``"interpolate"``: the initial states), ``nodes`` (``"uniform"``,
    ``"power"`` or a list of :math:`K+1` times) and ``node_power``, ``draws`` (independent
    solves averaged; ``Reconstruction.uncertainty`` is their spread), ``inner_iters`` and
    ``max_backtracks`` (exact and joint updates), ``cg_iters``/``cg_tol`` (data step),
    ``cgls_iters`` (``init="cgls"``), ``tv_weight`` (``init="tv"``: the relative TV weight, see
    :func:`~ctflow.solvers.common.initial_image`), ``joint_optimizer`` (``"gd"``, ``"adam"``),
    ``lr`` (Adam), ``max_batch`` (the most images per velocity call: ``None`` = no limit, an
    int, or ``"auto"``: :data:`CPU_MAX_BATCH` on a CPU, no limit on a GPU; Jacobi and joint
    sweeps stack all K segments in one call, run in chunks of this size; the values and the
    NFE count are unchanged), ``seed``, ``progress`` (tqdm over sweeps).

    ``MSFlow(**options).solve(operator, y, prior, noise_level)`` returns a
    :class:`~ctflow.solvers.result.Reconstruction`; the instance is also callable as
    ``solver(operator, y, prior, noise_level, options=None)`` (``options`` override).
    ``noise_level`` is the standard deviation :math:`\sigma` of the Gaussian noise in ``y``.
    """

    name = "msflow"
    DEFAULTS: Dict[str, Any] = dict(
        K=8, M=4, method="euler", integrator=None, lam=1.0, rho=1000.0, schedule="constant",
        rho_growth=1.5, rho_max=1e8, rho_min=1e-8, adapt_factor=2.0, sweeps=20, alpha=1.0,
        init="auto", update="jacobian-free", sweep="gauss-seidel", order="forward",
        relaxation=None,
        inner_iters=3, max_backtracks=20, cg_iters=10, cg_tol=1e-6, cgls_iters=10,
        tv_weight=TV_START_WEIGHT, trajectory="rollout", nodes="uniform", node_power=2.0, draws=1,
        joint_optimizer="gd", lr=1e-2, max_batch="auto", seed=0, progress=False,
    )

    # -------------------------------------------------------------------------------------
    @classmethod
    def validate(cls, options: Dict[str, Any]) -> Dict[str, Any]:
        """Defaults plus ``options``, checked; ``ValueError`` names a bad option."""
        own = "MSFlow"
        o = merge_flow_options(options, cls.DEFAULTS, owner=own)
        o["K"] = check_int("K", o["K"], owner=own)
        o["M"] = check_int("M", o["M"], owner=own)
        check_choice("method", o["method"], tuple(METHODS), owner=own)
        o["lam"] = check_positive("lam", o["lam"], owner=own, allow_zero=True)
        rho = o["rho"]
        if isinstance(rho, torch.Tensor):
            rho = rho.tolist()
        if isinstance(rho, (list, tuple)):
            if len(rho) != o["K"]:
                raise ValueError(f"{own}: option rho must be a number or a list of K={o['K']} "
                                 f"numbers (one per segment), got {len(rho)} values")
            o["rho"] = [check_positive("rho", r, owner=own) for r in rho]
        else:
            o["rho"] = check_positive("rho", rho, owner=own)
        check_choice("schedule", o["schedule"], SCHEDULES, owner=own)
        o["rho_growth"] = check_positive("rho_growth", o["rho_growth"], owner=own)
        o["rho_max"] = check_positive("rho_max", o["rho_max"], owner=own)
        o["rho_min"] = check_positive("rho_min", o["rho_min"], owner=own)
        if o["rho_min"] > o["rho_max"]:
            raise ValueError(f"{own}: option rho_min ({o['rho_min']}) must not exceed rho_max "
                             f"({o['rho_max']})")
        o["adapt_factor"] = check_positive("adapt_factor", o["adapt_factor"], owner=own)
        if o["adapt_factor"] < 1:
            raise ValueError(f"{own}: option adapt_factor must be >= 1, got {o['adapt_factor']}")
        o["sweeps"] = check_int("sweeps", o["sweeps"], owner=own, minimum=0)
        o["alpha"] = check_probability("alpha", o["alpha"], owner=own)
        check_choice("update", o["update"], UPDATES, owner=own)
        check_choice("sweep", o["sweep"], SWEEPS, owner=own)
        check_choice("order", o["order"], ORDERS, owner=own)
        check_choice("trajectory", o["trajectory"], TRAJECTORIES, owner=own)
        o["node_power"] = check_positive("node_power", o["node_power"], owner=own)
        o["nodes"] = _check_nodes(o["nodes"], o["K"], owner=own)
        o["draws"] = check_int("draws", o["draws"], owner=own)
        if o["relaxation"] is None:      # see the module docstring: Jacobi needs damping
            o["relaxation"] = 0.5 if o["sweep"] == "jacobi" else 1.0
        o["relaxation"] = check_probability("relaxation", o["relaxation"], owner=own,
                                            open_low=True)
        o["inner_iters"] = check_int("inner_iters", o["inner_iters"], owner=own)
        o["max_backtracks"] = check_int("max_backtracks", o["max_backtracks"], owner=own,
                                        minimum=0)
        o["cg_iters"] = check_int("cg_iters", o["cg_iters"], owner=own)
        o["cg_tol"] = check_positive("cg_tol", o["cg_tol"], owner=own, allow_zero=True)
        check_choice("joint_optimizer", o["joint_optimizer"], JOINT_OPTIMIZERS, owner=own)
        o["lr"] = check_positive("lr", o["lr"], owner=own)
        if o["max_batch"] not in (None, "auto"):
            o["max_batch"] = check_int("max_batch", o["max_batch"], owner=own)
        return o

    # -------------------------------------------------------------------------------------
    def solve(self, operator, y: torch.Tensor, prior, noise_level: float) -> Reconstruction:
        """Reconstruct from ``y``; see the class and module docstrings."""
        o = self.options
        sigma, meas = self.begin(operator, y, prior, noise_level)
        yb = meas.y
        D = o["draws"]
        with SolveMeter(yb.device) as meter:
            mb = o["max_batch"]
            if mb == "auto":
                mb = CPU_MAX_BATCH if yb.device.type == "cpu" else None
            v = SolverVelocity(prior, yb.device, max_batch=mb)
            with v.evaluation_mode():
                # D independent trajectories per measurement in one batch (item i*D + d)
                run = _Run(o, operator, yb.repeat_interleave(D, dim=0), prior, sigma, v)
                history = run.solve()
            images = prior.from_model(run.s[-1]).clamp(0.0, 1.0).detach()
            images = images.reshape(yb.shape[0], D, *images.shape[1:])
            image = images.mean(1)
            spread = images.std(1) if D > 1 else None
        return Reconstruction(image=meas.restore(image), history=history,
                              nfe=run.v.nfe, seconds=meter.seconds,
                              peak_memory_bytes=meter.peak_memory_bytes, method=self.name,
                              options={**o, "init": run.init_label},
                              uncertainty=None if spread is None else meas.restore(spread))


class _Run:
    """State of one MS-Flow solve (states, cached segment flows, penalties)."""

    def __init__(self, o, operator, y, prior, sigma, velocity: SolverVelocity):
        self.o = o
        self.K, self.M, self.method = o["K"], o["M"], o["method"]
        self.N = self.K * self.M
        self.lam = o["lam"]
        self.prior = prior
        self.B = y.shape[0]
        self.v = velocity
        self.problem = make_problem(operator, y, prior, sigma)   # latent priors: decoder
        self.nodes = node_grid(o["nodes"], self.K, power=o["node_power"])
        self._nodes_t = torch.tensor(self.nodes, dtype=torch.float64)
        rho = o["rho"]
        self.rho: List[float] = list(rho) if isinstance(rho, list) else [float(rho)] * self.K
        self.t_start = time.perf_counter()
        x0, self.init_label = initial_image(o["init"], operator, y, owner="MSFlow",
                                            cgls_iterations=o["cgls_iters"],
                                            noise_level=sigma, tv_weight=o["tv_weight"])
        gen = make_generator(o["seed"])
        s0 = blend_init(self.v, prior, x0, alpha=o["alpha"], steps=self.N, method=self.method,
                        generator=gen)
        self.s: List[torch.Tensor] = [s0]
        self.phi: List[torch.Tensor] = []
        with torch.no_grad():
            if o["trajectory"] == "rollout":
                for k in range(self.K):
                    nxt = self.segment(self.s[k], k)
                    self.phi.append(nxt)
                    self.s.append(nxt.clone())
            else:   # straight line from s_0 to the initial image (the training interpolant)
                sK = prior.to_model(x0)
                self.s = [s0 if k == 0 else (1 - t) * s0 + t * sK
                          for k, t in enumerate(self.nodes)]
                if o["sweep"] == "jacobi":     # all segments in one batched call, as a sweep
                    kk = torch.arange(self.K).repeat_interleave(self.B)
                    F = self.segments(torch.cat(self.s[:-1]), kk)
                    self.phi = [F[k * self.B:(k + 1) * self.B].clone() for k in range(self.K)]
                else:   # one segment at a time: the activations of one batch, whatever K is
                    self.phi = [self.segment(self.s[k], k) for k in range(self.K)]

    # --- flows -----------------------------------------------------------------------
    def segment(self, x: torch.Tensor, k: int, grad: bool = False) -> torch.Tensor:
        """:math:`\\Phi_k(x)`."""
        return integrate(self.v, x, self.nodes[k], self.nodes[k + 1], self.M, self.method,
                         grad=grad)

    def segments(self, x: torch.Tensor, ks: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """:math:`\\Phi_{k_i}(x_i)` for a stack of items with segment indices ``ks`` (one
        batched velocity call per step, one time grid per item)."""
        if bool((ks == ks[0]).all()):
            k = int(ks[0])
            return self.segment(x, k, grad)
        kc = ks.to("cpu", torch.long)
        return integrate(self.v, x, self._nodes_t[kc], self._nodes_t[kc + 1], self.M,
                         self.method, grad=grad)

    # --- objective -------------------------------------------------------------------
    def record(self, sweep: int) -> Dict[str, Any]:
        with torch.no_grad():
            sK = self.s[-1]
            data = float(self.problem.data(sK).sum())
            prior = self.lam * float(radial_prior(self.s[0]).sum()) if self.lam else 0.0
            gaps = [0.5 * float(per_item_sq(self.s[k + 1] - self.phi[k]).sum())
                    for k in range(self.K)]
            penalty = sum(r * g for r, g in zip(self.rho, gaps))
            nfe = self.v.nfe
            return {"sweep": sweep, "data": data, "prior": prior, "gaps": gaps,
                    "trajectory_loss": sum(gaps), "penalty": penalty,
                    "objective": data + prior + penalty,
                    "residual": self.problem.relative_residual(sK), "rho": list(self.rho),
                    "nfe_forward": nfe["forward"], "nfe_backward": nfe["backward"],
                    "seconds": time.perf_counter() - self.t_start}

    # --- block machinery -------------------------------------------------------------
    def _block_data(self, ks: Sequence[int]):
        """Stacked per-item data for blocks ``ks`` (all < K) from the current states."""
        B = self.B
        S = torch.cat([self.s[k] for k in ks])
        T = torch.cat([self.s[k + 1] for k in ks])
        F = torch.cat([self.phi[k] for k in ks])
        P = torch.cat([self.phi[k - 1] if k > 0 else torch.zeros_like(self.s[0]) for k in ks])
        dev, dt = S.device, S.dtype

        def per_item(vals):
            return torch.tensor([v for v in vals for _ in range(B)], dtype=dt, device=dev)

        r = per_item([self.rho[k] for k in ks])
        a = per_item([self.rho[k - 1] if k > 0 else 0.0 for k in ks])
        lam = per_item([self.lam if k == 0 else 0.0 for k in ks])
        kk = torch.tensor([k for k in ks for _ in range(B)])
        return S, T, F, P, r, a, lam, kk

    @staticmethod
    def _prox_c(z, L, P, a, lam):
        r""":math:`\arg\min_s c(s) + \tfrac L2\|s - z\|^2`, :math:`c = \lambda R +
        \tfrac a2\|\cdot - P\|^2` (per item, only one of the two terms is active)."""
        anchored = (_bc(a, z) * P + _bc(L, z) * z) / _bc(a + L, z)
        if bool((lam > 0).any()):
            radial = radial_prox(z, lam, L)
            return torch.where(_bc(lam > 0, z), radial, anchored)
        return anchored

    @staticmethod
    def _c(s, P, a, lam):
        out = 0.5 * a * per_item_sq(s - P)
        if bool((lam > 0).any()):
            out = out + torch.where(lam > 0, lam * radial_prior(s), torch.zeros_like(out))
        return out

    def _update_blocks_jf(self, ks: Sequence[int]) -> None:
        """Jacobian-free closed-form update of blocks ``ks`` (one batched flow call after)."""
        S, T, F, P, r, a, lam, kk = self._block_data(ks)
        with torch.no_grad():
            z = T - F + S
            new = self._prox_c(z, r, P, a, lam)
            w = self.o["relaxation"]
            if w != 1.0:
                new = S + w * (new - S)
            Fnew = self.segments(new, kk)
        self._store(ks, new, Fnew)

    def _update_blocks_exact(self, ks: Sequence[int]) -> None:
        """Proximal-gradient steps with exact VJPs through one segment per block."""
        S, T, F, P, r, a, lam, kk = self._block_data(ks)
        S_old = S.clone()
        L = r.clone()
        n_bt = self.o["max_backtracks"]
        eps = 100.0 * torch.finfo(S.dtype).eps
        for _ in range(self.o["inner_iters"]):
            Sg = S.detach().requires_grad_(True)
            with torch.enable_grad():
                Fg = self.segments(Sg, kk, grad=True)
                g_items = 0.5 * r * per_item_sq(T - Fg)
                grad, = torch.autograd.grad(g_items.sum(), Sg)
            F = Fg.detach()
            g0 = g_items.detach()
            with torch.no_grad():
                obj0 = g0 + self._c(S, P, a, lam)
                active = torch.ones_like(r, dtype=torch.bool)
                n_items = r.shape[0]
                for _bt in range(n_bt + 1):
                    idx = active.nonzero().flatten()
                    if idx.numel() == 0:
                        break
                    full = idx.numel() == n_items

                    def take(t, idx=idx, full=full):
                        return t if full else t[idx]

                    Li, Si, gi = take(L), take(S), take(grad)
                    trial = self._prox_c(Si - gi / _bc(Li, Si), Li, take(P), take(a), take(lam))
                    Ft = self.segments(trial, take(kk))
                    ri = take(r)
                    g1 = 0.5 * ri * per_item_sq(take(T) - Ft)
                    d = trial - Si
                    model = take(g0) + per_item_dot(gi, d) + 0.5 * Li * per_item_sq(d)
                    obj1 = g1 + self._c(trial, take(P), take(a), take(lam))
                    o0 = take(obj0)
                    ok = (g1 <= model + 1e-12 * o0.abs()) & (obj1 <= o0)
                    if full and bool(ok.all()):          # the common case: every step taken
                        S, F, L = trial, Ft, L * 0.5
                        break
                    # a step below rounding level: the block is stationary, stop trying
                    settled = ~ok & (per_item_sq(d).sqrt() <= eps * per_item_sq(Si).sqrt())
                    active[idx[settled]] = False
                    acc = idx[ok]
                    if acc.numel():
                        S[acc] = trial[ok]
                        F[acc] = Ft[ok]
                        L[acc] = L[acc] * 0.5
                    rej = idx[~ok]
                    L[rej] = L[rej] * 2.0
                    active[acc] = False
                # items that never passed keep their state (no increase of J)
                L[active] = r[active]
        w = self.o["relaxation"]
        if w != 1.0:
            with torch.no_grad():
                S = S_old + w * (S.detach() - S_old)
                F = self.segments(S, kk)
        self._store(ks, S.detach(), F.detach())

    def _store(self, ks, S, F):
        for j, k in enumerate(ks):
            self.s[k] = S[j * self.B:(j + 1) * self.B].clone()
            self.phi[k] = F[j * self.B:(j + 1) * self.B].clone()

    def _data_step(self) -> None:
        with torch.no_grad():
            self.s[-1], _ = data_step(self.problem, self.phi[-1], self.rho[-1], self.s[-1],
                                      cg_iterations=self.o["cg_iters"], cg_tol=self.o["cg_tol"])

    # --- sweeps ----------------------------------------------------------------------
    def sweep_gauss_seidel(self) -> None:
        update = (self._update_blocks_exact if self.o["update"] == "exact"
                  else self._update_blocks_jf)
        if self.o["order"] == "forward":
            for k in range(self.K):
                update([k])
            self._data_step()
        else:
            self._data_step()
            for k in reversed(range(self.K)):
                update([k])

    def sweep_jacobi(self) -> None:
        update = (self._update_blocks_exact if self.o["update"] == "exact"
                  else self._update_blocks_jf)
        old_phi_last, old_sK = self.phi[-1], self.s[-1]
        update(list(range(self.K)))   # every block from the previous sweep's neighbours
        with torch.no_grad():
            self.s[-1], _ = data_step(self.problem, old_phi_last, self.rho[-1], old_sK,
                                      cg_iterations=self.o["cg_iters"], cg_tol=self.o["cg_tol"])

    # --- joint gradient descent --------------------------------------------------------
    def _joint_objective(self, states: List[torch.Tensor], grad: bool):
        """:math:`J` and the stacked segment flows (one batched call over all segments)."""
        K, B = self.K, self.B
        X = torch.cat(states[:-1])
        kk = torch.arange(K).repeat_interleave(B)
        F = self.segments(X, kk, grad=grad)
        gaps = per_item_sq(torch.cat(states[1:]) - F).reshape(K, B).sum(1)
        rho = torch.tensor(self.rho, dtype=X.dtype, device=X.device)
        J = (self.problem.data(states[-1]).sum() + 0.5 * (rho * gaps).sum())
        if self.lam:
            J = J + self.lam * radial_prior(states[0]).sum()
        return J, F

    def _set_from_joint(self, states, F):
        K, B = self.K, self.B
        self.s = [st.detach().clone() for st in states]
        self.phi = [F[k * B:(k + 1) * B].detach().clone() for k in range(K)]

    def joint_setup(self) -> None:
        self.joint_step = None
        if self.o["joint_optimizer"] == "adam":
            self.params = [st.detach().clone().requires_grad_(True) for st in self.s]
            self.adam = torch.optim.Adam(self.params, lr=self.o["lr"])

    def sweep_joint(self) -> None:
        if self.o["joint_optimizer"] == "adam":
            self.adam.zero_grad(set_to_none=True)
            with torch.enable_grad():
                J, _ = self._joint_objective(self.params, grad=True)
                grads = torch.autograd.grad(J, self.params)
            for p, g in zip(self.params, grads):
                p.grad = g
            self.adam.step()
            with torch.no_grad():
                _, F = self._joint_objective(self.params, grad=False)
            self._set_from_joint(self.params, F)
            return
        params = [st.detach().clone().requires_grad_(True) for st in self.s]
        with torch.enable_grad():
            J, _ = self._joint_objective(params, grad=True)
            grads = torch.autograd.grad(J, params)
        J0 = float(J.detach())
        gsq = sum(float(per_item_sq(g).sum()) for g in grads)
        if self.joint_step is None:
            self.joint_step = 1.0 / (self.lam + 2.0 * max(self.rho) + 1.0)
        t = self.joint_step * 2.0
        with torch.no_grad():
            for _ in range(self.o["max_backtracks"] + 1):
                trial = [p.detach() - t * g for p, g in zip(params, grads)]
                J1, F = self._joint_objective(trial, grad=False)
                if float(J1) <= J0 - 1e-4 * t * gsq:
                    self.joint_step = t
                    self._set_from_joint(trial, F)
                    return
                t *= 0.5
        self.joint_step = t

    # --- penalties ---------------------------------------------------------------------
    def update_penalties(self) -> None:
        o = self.o
        if o["schedule"] == "constant":
            return
        if o["schedule"] == "continuation":
            self.rho = [min(r * o["rho_growth"], o["rho_max"]) for r in self.rho]
            return
        with torch.no_grad():
            d = [math.sqrt(float(per_item_sq(self.s[k + 1] - self.phi[k]).sum()))
                 for k in range(self.K)]
        tiny = 1e-300
        if max(d) <= tiny:
            factors = [1.0] * self.K
        else:
            logs = [math.log(max(x, tiny)) for x in d]
            mean = math.exp(sum(logs) / len(logs))
            tau = o["adapt_factor"]
            factors = [min(max(math.sqrt(max(x, tiny) / mean), 1.0 / tau), tau) for x in d]
        self.rho = [min(max(r * o["rho_growth"] * f, o["rho_min"]), o["rho_max"])
                    for r, f in zip(self.rho, factors)]

    # --- driver --------------------------------------------------------------------------
    def solve(self) -> List[Dict[str, Any]]:
        o = self.o
        history = [self.record(0)]
        bar = progress_bar(o["sweeps"], enabled=o["progress"], desc="MS-Flow")
        if o["update"] == "joint":
            self.joint_setup()
            step = self.sweep_joint
        elif o["sweep"] == "jacobi":
            step = self.sweep_jacobi
        else:
            step = self.sweep_gauss_seidel
        try:
            for j in range(1, o["sweeps"] + 1):
                step()
                history.append(self.record(j))
                bar.update(1)
                bar.set_postfix(objective=f"{history[-1]['objective']:.4g}",
                                residual=f"{history[-1]['residual']:.3g}")
                self.update_penalties()
        finally:
            bar.close()
        return history
