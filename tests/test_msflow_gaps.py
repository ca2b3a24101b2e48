"""MS-Flow reports its relative stitching gap per trajectory and the trajectory consistency of
its result; under continuation both fall to ~0 on a Gaussian prior with its closed-form flow."""
from __future__ import annotations

import torch

from ctflow.operators import GaussianBlur
from ctflow.priors import gaussian_prior
from ctflow.solvers import MSFlow

N = 8


def _problem():
    prior = gaussian_prior(torch.full((1, N, N), 0.5, dtype=torch.float64),
                           torch.full((1, N, N), 0.2, dtype=torch.float64))
    A = GaussianBlur(N, sigma=1.0)
    g = torch.Generator().manual_seed(0)
    x = (0.5 + 0.2 * torch.randn(2, 1, N, N, generator=g, dtype=torch.float64)).clamp(0, 1)
    return prior, A, A(x) + 0.01 * torch.randn(x.shape, generator=g, dtype=torch.float64)


def _solve(schedule, **kw):
    prior, A, y = _problem()
    return MSFlow(K=4, M=2, sweeps=25, rho=10.0, schedule=schedule, alpha=0.5,
                  trajectory="interpolate", init="adjoint", **kw).solve(A, y, prior, 0.01)


def test_gaps_close_under_continuation_and_not_at_a_small_constant_rho():
    cont = _solve("continuation", rho_growth=2.0, rho_max=1e9)
    const = _solve("constant")
    gaps = [max(h["gap_rel"]) for h in cont.history]
    assert len(cont.history[0]["gap_rel"]) == 2              # one per trajectory
    assert gaps[-1] < 1e-3 < gaps[0] and gaps[-1] < gaps[0] / 100
    assert max(cont.history[-1]["consistency"]) < 1e-3
    # at a small constant penalty the states do not lie on one trajectory
    assert max(const.history[-1]["gap_rel"]) > 0.05
    assert max(const.history[-1]["consistency"]) > 0.05


def test_rollout_start_has_zero_gaps_and_consistency_costs_no_nfe():
    prior, A, y = _problem()
    r = MSFlow(K=3, M=1, sweeps=1, alpha=0.5, init="adjoint").solve(A, y, prior, 0.01)
    assert max(r.history[0]["gap_rel"]) == 0.0                # rollout: s_{k+1} = Phi_k(s_k)
    nfe_sweeps = r.history[-1]["nfe_forward"]
    assert r.nfe["forward"] == nfe_sweeps                     # the diagnostic is not counted
    assert len(r.history[-1]["consistency"]) == 2


def test_nfe_per_image_counts_every_item_of_a_batched_call():
    """8 draws of 2 images run as one batch of 16: one call counts once in ``nfe`` but 8 per
    image in ``nfe_per_image``; D-Flow solves items alone, so its per-image NFE is its
    per-solve NFE."""
    from ctflow.solvers import DFlow

    prior, A, y = _problem()
    r = MSFlow(K=3, M=1, sweeps=2, alpha=0.5, init="adjoint", draws=8).solve(A, y, prior, 0.01)
    assert r.nfe_per_image["forward"] == 8 * r.nfe["forward"]
    one = MSFlow(K=3, M=1, sweeps=2, alpha=0.5, init="adjoint").solve(A, y[:1], prior, 0.01)
    assert one.nfe_per_image["forward"] == one.nfe["forward"]
    d = DFlow(N=2, iterations=1, max_iter=2, alpha=0.5).solve(A, y, prior, 0.01)
    assert d.nfe_per_image["forward"] == d.nfe["forward"] / 2
    assert d.nfe_per_image["backward"] == d.nfe["backward"] / 2
