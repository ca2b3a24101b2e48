"""Flow-DP (denoise and project): one round against its closed form on a Gaussian prior, the
option checks, draws."""
from __future__ import annotations

import pytest
import torch

import ctflow
from ctflow.operators import Denoising
from ctflow.priors import gaussian_prior
from ctflow.solvers import FlowDP
from ctflow.solvers.rng import make_generator, randn


def _problem(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.full((1, n, n), 0.5)
    s = torch.full((1, n, n), 0.1)
    prior = gaussian_prior(mu, s)
    x = (0.5 + 0.1 * torch.randn(1, 1, n, n, generator=g)).clamp(0, 1)
    y = x + 0.02 * torch.randn(x.shape, generator=g)
    return prior, Denoising(n), x, y, mu, s


def test_one_round_equals_its_closed_form():
    """For x1 ~ N(mu, s^2) the flow denoiser is the posterior mean
    E[x1 | x_t = z] = mu + t s^2 (z - t mu) / (t^2 s^2 + (1 - t)^2), and with A = I the data step
    is (y + rho sigma^2 d) / (1 + rho sigma^2)."""
    prior, A, x, y, mu, s = _problem()
    sigma, t, rho, seed = 0.02, 0.9, 500.0, 3
    start = y.clone()
    r = FlowDP(t=t, rounds=1, rho=rho, init=start, seed=seed).solve(A, y, prior, sigma)
    eps = randn(start.shape, make_generator(seed), start)
    z = t * start + (1 - t) * eps
    d = mu + t * s ** 2 * (z - t * mu) / (t ** 2 * s ** 2 + (1 - t) ** 2)
    want = (y + rho * sigma ** 2 * d) / (1 + rho * sigma ** 2)
    torch.testing.assert_close(r.image, want.clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert r.history[0]["data_step"] == "closed-form" and r.nfe["forward"] == 1


def test_rounds_draws_and_the_registry():
    prior, A, x, y, *_ = _problem()
    r = ctflow.reconstruct(y, A, prior, method="flowdp", sigma=0.02, rounds=4, draws=3)
    assert r.image.shape == y.shape and r.uncertainty.shape == y.shape
    assert len(r.history) == 4 and r.method == "flowdp"
    assert ctflow.solvers.method("flowdp").solver_class() is FlowDP
    # the prior pulls towards mu, the data term towards y: the result lies in between
    err_y = float((r.image - y).norm())
    assert 0 < err_y < float((y - 0.5).norm())


@pytest.mark.parametrize("opts,msg", [
    (dict(t=1.0), "option t must be < 1"),
    (dict(t=0.0), "option t"),
    (dict(rounds=0), "rounds"),
    (dict(rho=0.0), "rho"),
    (dict(init="fbp", cgls_iters=5), "cgls_iters"),
])
def test_bad_options_are_refused(opts, msg):
    with pytest.raises(ValueError, match=msg):
        FlowDP(**opts)
