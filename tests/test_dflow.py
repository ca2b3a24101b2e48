"""D-Flow on the closed-form Gaussian prior: the Euler flow map is affine, so D-Flow's optimum
is computable independently (scipy, float64) and D-Flow must reach it."""
import numpy as np
import pytest
import scipy.optimize
import torch

from ctflow.flow import GaussianVelocity, integrate
from ctflow.priors import FlowPrior
from ctflow.solvers.dflow import DFlow

from helpers import Dense

DT = torch.float64


def problem(*, n=8, m=96, sigma=0.01, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.rand(1, n, n, generator=g, dtype=DT) - 0.5
    sig = 0.6 + 0.4 * torch.rand(1, n, n, generator=g, dtype=DT)
    prior = FlowPrior(GaussianVelocity(mu, sig), image_size=n, scale=6.0, shift=-3.0)
    A = Dense(torch.randn(m, n * n, generator=g, dtype=DT) / n, n)
    x = prior.from_model((mu + sig * torch.randn(1, n, n, generator=g, dtype=DT)).unsqueeze(0))
    y = A(x) + sigma * torch.randn(1, 1, m, generator=g, dtype=DT)
    return A, y, prior


def reference_optimum(A, y, prior, *, N, sigma, lam):
    n = prior.image_size
    z = torch.zeros(1, 1, n, n, dtype=DT)
    c = integrate(prior.velocity, z, 0.0, 1.0, N, "euler").flatten().numpy()
    d = integrate(prior.velocity, z + 1, 0.0, 1.0, N, "euler").flatten().numpy() - c
    W, yn, a, b, dim = A.W.numpy(), y.flatten().numpy(), prior.scale, prior.shift, n * n

    def f(s):
        r = W @ ((c + d * s - b) / a) - yn
        ns = s @ s
        val = 0.5 * r @ r / sigma ** 2 + lam * (0.5 * ns - 0.5 * (dim - 1) * np.log(ns))
        return val, d * (W.T @ r) / (a * sigma ** 2) + lam * (s - (dim - 1) * s / ns)

    rng = np.random.default_rng(0)
    best = min((scipy.optimize.minimize(f, rng.standard_normal(dim), jac=True, method="L-BFGS-B",
                                        options={"gtol": 1e-12, "ftol": 1e-16, "maxiter": 20000,
                                                 "maxcor": 50}) for _ in range(3)),
               key=lambda r: r.fun)
    return best.fun, torch.tensor((c + d * best.x - b) / a).reshape(1, 1, n, n)


def test_dflow_reaches_the_independent_optimum():
    sigma, lam, N = 0.01, 1.0, 6
    A, y, prior = problem(sigma=sigma)
    F_star, x_star = reference_optimum(A, y, prior, N=N, sigma=sigma, lam=lam)
    res = DFlow(N=N, lam=lam, iterations=8, max_iter=20, init="adjoint").solve(A, y, prior, sigma)
    F = [h["objective"] for h in res.history]
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(F, F[1:]))   # strong-Wolfe L-BFGS descends
    assert F[-1] == pytest.approx(F_star, rel=1e-8, abs=1e-6)
    assert float((res.image - x_star).norm()) <= 1e-5 * float(x_star.norm())
    assert res.history[-1]["residual"] < res.history[0]["residual"]
    # every function evaluation back-propagates through all N steps
    assert res.nfe["backward"] > 0 and res.nfe["backward"] % N == 0
    assert res.method == "dflow" and res.image.shape == (1, 1, 8, 8)


def test_dflow_midpoint_and_progress(capsys):
    A, y, prior = problem(m=40, seed=2)
    res = DFlow(N=3, method="midpoint", iterations=2, max_iter=3, progress=True).solve(
        A, y, prior, 0.01)
    assert len(res.history) == 3 and res.nfe["forward"] > 0
    assert res.history[-1]["objective"] < res.history[0]["objective"]
    assert "D-Flow" in capsys.readouterr().err
    again = DFlow(N=3, method="midpoint", iterations=2, max_iter=3).solve(A, y, prior, 0.01)
    assert torch.equal(res.image, again.image)                     # seeded


@pytest.mark.parametrize("bad, match", [
    (dict(N=0), "N"), (dict(method="rk4"), "method"), (dict(lam=-1.0), "lam"),
    (dict(alpha=2.0), "alpha"), (dict(iterations=-1), "iterations"), (dict(foo=1), "foo"),
    (dict(init="nope"), "init"),
])
def test_dflow_invalid_options(bad, match):
    with pytest.raises(ValueError, match=match):
        DFlow(**bad)


class PoisonedAfter:
    """The Gaussian velocity, returning NaN from call ``after`` on (a flow that blows up)."""

    def __init__(self, velocity, after):
        self.velocity, self.after, self.calls = velocity, after, 0

    def __call__(self, x, t):
        self.calls += 1
        out = self.velocity(x, t)
        return out if self.calls <= self.after else out * float("nan")


def test_dflow_keeps_the_last_finite_iterate_when_lbfgs_diverges():
    A, y, _ = problem(m=40, seed=3)
    opts = dict(N=3, iterations=1, max_iter=3, init="adjoint")

    def prior_with(after):
        _, _, prior = problem(m=40, seed=3)
        prior.velocity = PoisonedAfter(prior.velocity, after)
        return prior

    counting = prior_with(10 ** 9)
    first = DFlow(**opts).solve(A, y, counting, 0.01)
    # the same run, asked for 3 iterations, with the flow blowing up after the first one
    res = DFlow(**{**opts, "iterations": 3}).solve(A, y, prior_with(counting.velocity.calls),
                                                     0.01)
    assert torch.isfinite(res.image).all()
    assert torch.equal(res.image, first.image)
    assert len(res.history) == 2 and res.history[-1]["diverged_at"] == 2
