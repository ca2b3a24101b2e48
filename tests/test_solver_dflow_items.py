"""D-Flow solves every batch item on its own (issue 20): a batch equals its items solved alone,
NFE add up per image; the discrepancy principle and a fine inversion of the start."""
from __future__ import annotations

import pytest
import torch

from ctflow.operators import GaussianBlur
from ctflow.priors import gaussian_prior
from ctflow.solvers import DFlow

N = 8


def _setup(batch=3):
    g = torch.Generator().manual_seed(0)
    prior = gaussian_prior(torch.full((1, N, N), 0.5, dtype=torch.float64),
                           torch.full((1, N, N), 0.2, dtype=torch.float64))
    A = GaussianBlur(N, sigma=1.0)
    x = (0.5 + 0.2 * torch.randn(batch, 1, N, N, generator=g, dtype=torch.float64)).clamp(0, 1)
    y = A(x) + 0.01 * torch.randn(batch, 1, N, N, generator=g, dtype=torch.float64)
    return prior, A, y


def test_batch_equals_items_alone_and_nfe_is_per_image():
    prior, A, y = _setup()
    solver = DFlow(N=4, iterations=3, max_iter=3, alpha=0.5, seed=2)
    batch = solver.solve(A, y, prior, 0.01)
    alone = [solver.solve(A, y[i:i + 1], prior, 0.01) for i in range(3)]
    for i, r in enumerate(alone):
        torch.testing.assert_close(batch.image[i:i + 1], r.image, rtol=0, atol=0)
    for k in ("forward", "backward"):
        assert batch.nfe[k] == sum(r.nfe[k] for r in alone)
    assert batch.history[-1]["data"] == pytest.approx(sum(r.history[-1]["data"]
                                                          for r in alone))


def test_discrepancy_principle_stops_early():
    prior, A, y = _setup(batch=1)
    full = DFlow(N=4, iterations=8, max_iter=5, alpha=0.5).solve(A, y, prior, 0.01)
    m = y.numel()
    assert full.history[-1]["data"] < 50 * m / 2      # the data term falls below 50 m/2
    early = DFlow(N=4, iterations=8, max_iter=5, alpha=0.5,
                  discrepancy=50.0).solve(A, y, prior, 0.01)
    assert early.history[-1]["stopped"] == "discrepancy"
    assert early.history[-1]["data"] <= 50 * m / 2
    assert len(early.history) <= len(full.history)
    assert early.nfe["forward"] <= full.nfe["forward"]


def test_invert_steps_sets_the_start_and_is_refused_without_a_start():
    prior, A, y = _setup(batch=1)
    coarse = DFlow(N=2, iterations=0, alpha=1.0, init="adjoint").solve(A, y, prior, 0.01)
    fine = DFlow(N=2, iterations=0, alpha=1.0, init="adjoint",
                 invert_steps=64).solve(A, y, prior, 0.01)
    assert not torch.equal(coarse.image, fine.image)
    with pytest.raises(ValueError, match="invert_steps"):
        DFlow(alpha=0.0, invert_steps=64)
    with pytest.raises(ValueError, match="discrepancy"):
        DFlow(iterations=0, discrepancy=1.0)
