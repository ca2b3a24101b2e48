r"""The sweeps of MS-Flow: the trajectory of states, its block updates (Jacobian-free,
exact, joint), the Gauss–Seidel and Jacobi sweeps and the penalty schedules.

The mathematics is in :mod:`ctflow.solvers.msflow`; :class:`Trajectory` is one solve's state.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ctflow.flow.integrate import integrate
from ctflow.solvers.init import blend_init
from ctflow.solvers.linalg import broadcast_items, per_item_dot, per_item_sq
from ctflow.solvers.problem import data_step, make_problem
from ctflow.solvers.progress import progress
from ctflow.solvers.radial import radial_prior, radial_prox
from ctflow.solvers.rng import make_generator
from ctflow.solvers.velocity import SolverVelocity

__all__ = ["Trajectory", "node_grid"]


def node_grid(nodes: Any, K: int, *, power: float = 2.0) -> List[float]:
    r"""The segment nodes :math:`0 = t_0 < \dots < t_K = 1`: ``"uniform"`` (:math:`k/K`),
    ``"power"`` (:math:`1 - (1 - k/K)^p`, finer towards the data end :math:`t = 1` for
    :math:`p > 1`) or an explicit list (returned as floats)."""
    if isinstance(nodes, str):
        if nodes == "uniform":
            return [k / K for k in range(K + 1)]
        return [0.0] + [1.0 - (1.0 - k / K) ** power for k in range(1, K)] + [1.0]
    return [float(t) for t in nodes]


class Trajectory:
    """State of one MS-Flow solve (states, cached segment flows, penalties) and its block
    updates, sweeps and penalty schedules; :meth:`solve` runs the sweeps."""

    def __init__(self, o, operator, y, prior, sigma, velocity: SolverVelocity,
                 start: Tuple[Optional[torch.Tensor], str], t_start: float,
                 weights: Optional[torch.Tensor] = None):
        self.o = o
        self.K, self.M, self.method = o.K, o.M, o.method
        self.N = self.K * self.M
        self.lam = o.lam
        self.prior = prior
        self.B = y.shape[0]
        self.v = velocity
        # latent priors: the data through the decoder; weights: the whitened data term
        self.problem = make_problem(operator, y, prior, sigma, weights)
        self.problem_is_latent = bool(getattr(prior, "is_latent", False))
        self.nodes = node_grid(o.nodes, self.K, power=o.node_power)
        self._nodes_t = torch.tensor(self.nodes, dtype=torch.float64)
        rho = o.rho
        self.rho: List[float] = list(rho) if isinstance(rho, list) else [float(rho)] * self.K
        self.relaxation = o.resolved_relaxation()
        if self.problem_is_latent:
            self.data_iterations, self.data_tol = o.decoder_steps, o.decoder_tol
        else:
            self.data_iterations, self.data_tol = o.cg_iters, o.cg_tol
        self.t_start = t_start
        x0, self.init_label = start
        gen = make_generator(o.seed)
        like = y.new_empty((self.B, y.shape[1], *operator.domain_shape))
        s0 = blend_init(self.v, prior, x0, alpha=o.alpha, steps=self.N, method=self.method,
                        generator=gen, like=like)
        self.s: List[torch.Tensor] = [s0]
        self.phi: List[torch.Tensor] = []
        with torch.no_grad():
            if o.trajectory == "rollout":
                for k in range(self.K):
                    nxt = self.segment(self.s[k], k)
                    self.phi.append(nxt)
                    self.s.append(nxt.clone())
            else:   # straight line from s_0 to the initial image (the training interpolant)
                sK = prior.to_model(x0)
                self.s = [s0 if k == 0 else (1 - t) * s0 + t * sK
                          for k, t in enumerate(self.nodes)]
                if o.sweep == "jacobi":     # all segments in one batched call, as a sweep
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
                    "gap_rel": self.relative_gaps(),
                    "trajectory_loss": sum(gaps), "penalty": penalty,
                    "objective": data + prior + penalty,
                    "residual": self.problem.relative_residual(sK), "rho": list(self.rho),
                    "nfe_forward": nfe["forward"], "nfe_backward": nfe["backward"],
                    "seconds": time.perf_counter() - self.t_start}

    def relative_gaps(self) -> List[float]:
        r"""Per item (trajectory) the relative stitching gap
        :math:`\max_k \|s_{k+1} - \Phi_k(s_k)\| / \|s_{k+1}\|`."""
        rel = torch.stack([per_item_sq(self.s[k + 1] - self.phi[k]).sqrt()
                           / per_item_sq(self.s[k + 1]).sqrt().clamp_min(1e-30)
                           for k in range(self.K)])
        return [float(v) for v in rel.max(0).values]

    def consistency(self) -> List[float]:
        r"""Per item the trajectory consistency of the result,
        :math:`\|s_K - \Phi_{0\to1}(s_0)\| / \|s_K\|`: how far the stitched end state is
        from the end of the ODE run from :math:`s_0` over the same grid (``K`` segments of
        ``M`` steps). A diagnostic: its velocity calls are not counted in the NFE."""
        with torch.no_grad():
            x = self.s[0]
            for k in range(self.K):
                x = integrate(self.v.uncounted, x, self.nodes[k], self.nodes[k + 1], self.M,
                              self.method, grad=False)
            d = per_item_sq(self.s[-1] - x).sqrt() / per_item_sq(self.s[-1]).sqrt().clamp_min(
                1e-30)
        return [float(v) for v in d]

    # --- block machinery -------------------------------------------------------------
    def _block_data(self, ks: Sequence[int]):
        """Stacked per-item data for blocks ``ks`` (all < K) from the current states."""
        B = self.B
        S = torch.cat([self.s[k] for k in ks])
        T = torch.cat([self.s[k + 1] for k in ks])
        F = torch.cat([self.phi[k] for k in ks])
        P = torch.cat([self.phi[k - 1] if k > 0 else torch.zeros_like(self.s[0]) for k in ks])
        dev, dt = S.device, S.dtype

        def repeat_per_item(vals):       # one value per block -> one per stacked item
            return torch.tensor([v for v in vals for _ in range(B)], dtype=dt, device=dev)

        r = repeat_per_item([self.rho[k] for k in ks])
        a = repeat_per_item([self.rho[k - 1] if k > 0 else 0.0 for k in ks])
        lam = repeat_per_item([self.lam if k == 0 else 0.0 for k in ks])
        kk = torch.tensor([k for k in ks for _ in range(B)])
        return S, T, F, P, r, a, lam, kk

    @staticmethod
    def _prox_c(z, L, P, a, lam):
        r""":math:`\arg\min_s c(s) + \tfrac L2\|s - z\|^2`, :math:`c = \lambda R +
        \tfrac a2\|\cdot - P\|^2` (per item, only one of the two terms is active)."""
        b = broadcast_items
        anchored = (b(a, z) * P + b(L, z) * z) / b(a + L, z)
        if bool((lam > 0).any()):
            radial = radial_prox(z, lam, L)
            return torch.where(broadcast_items(lam > 0, z), radial, anchored)
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
            w = self.relaxation
            if w != 1.0:
                new = S + w * (new - S)
            Fnew = self.segments(new, kk)
        self._store(ks, new, Fnew)

    def _update_blocks_exact(self, ks: Sequence[int]) -> None:
        """Proximal-gradient steps with exact VJPs through one segment per block."""
        S, T, F, P, r, a, lam, kk = self._block_data(ks)
        S_old = S.clone()
        L = r.clone()
        n_bt = self.o.max_backtracks
        eps = 100.0 * torch.finfo(S.dtype).eps
        for _ in range(self.o.inner_iters):
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
                    trial = self._prox_c(Si - gi / broadcast_items(Li, Si), Li, take(P),
                                         take(a), take(lam))
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
        w = self.relaxation
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
                                      iterations=self.data_iterations, tol=self.data_tol)

    # --- sweeps ----------------------------------------------------------------------
    def sweep_gauss_seidel(self) -> None:
        update = (self._update_blocks_exact if self.o.update == "exact"
                  else self._update_blocks_jf)
        if self.o.order == "forward":
            for k in range(self.K):
                update([k])
            self._data_step()
        else:
            self._data_step()
            for k in reversed(range(self.K)):
                update([k])

    def sweep_jacobi(self) -> None:
        update = (self._update_blocks_exact if self.o.update == "exact"
                  else self._update_blocks_jf)
        old_phi_last, old_sK = self.phi[-1], self.s[-1]
        update(list(range(self.K)))   # every block from the previous sweep's neighbours
        with torch.no_grad():
            self.s[-1], _ = data_step(self.problem, old_phi_last, self.rho[-1], old_sK,
                                      iterations=self.data_iterations, tol=self.data_tol)

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
        if self.o.joint_optimizer == "adam":
            self.params = [st.detach().clone().requires_grad_(True) for st in self.s]
            self.adam = torch.optim.Adam(self.params, lr=self.o.lr)

    def sweep_joint(self) -> None:
        if self.o.joint_optimizer == "adam":
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
            for _ in range(self.o.max_backtracks + 1):
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
        if o.schedule == "constant":
            return
        if o.schedule == "continuation":
            self.rho = [min(r * o.rho_growth, o.rho_max) for r in self.rho]
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
            tau = o.adapt_factor
            factors = [min(max(math.sqrt(max(x, tiny) / mean), 1.0 / tau), tau) for x in d]
        self.rho = [min(max(r * o.rho_growth * f, o.rho_min), o.rho_max)
                    for r, f in zip(self.rho, factors)]

    # --- driver --------------------------------------------------------------------------
    def solve(self) -> List[Dict[str, Any]]:
        o = self.o
        history = [self.record(0)]
        bar = progress(total=o.sweeps, enabled=o.progress, desc="MS-Flow")
        if o.update == "joint":
            self.joint_setup()
            step = self.sweep_joint
        elif o.sweep == "jacobi":
            step = self.sweep_jacobi
        else:
            step = self.sweep_gauss_seidel
        try:
            for j in range(1, o.sweeps + 1):
                step()
                history.append(self.record(j))
                bar.update(1)
                bar.set_postfix(objective=f"{history[-1]['objective']:.4g}",
                                residual=f"{history[-1]['residual']:.3g}")
                self.update_penalties()
        finally:
            bar.close()
        return history
