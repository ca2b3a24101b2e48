"""Flow maps: order of accuracy, the exact Gaussian flow, inversion, evaluation counts."""
import math

import pytest
import torch

from ctflow.flow import CountingVelocity, GaussianVelocity, evals_per_step, integrate


def v_cubic(x, t):
    """dx/dt = 3 t^2 (independent of x): x(t) = x(0) + t^3."""
    return (3 * t * t).reshape(-1, *([1] * (x.ndim - 1))).to(x) * torch.ones_like(x)


def err(method, steps, t0=0.0, t1=1.0):
    x0 = torch.zeros(2, 1, 1, 1, dtype=torch.float64)
    x = integrate(v_cubic, x0 + t0 ** 3, t0, t1, steps, method)
    return float((x - t1 ** 3).abs().max())


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_order_of_accuracy(method, order):
    errs = [err(method, n) for n in (8, 16, 32, 64)]
    for e1, e2 in zip(errs[:-1], errs[1:]):
        # halving h divides the error by 2^order (to within 10 %)
        assert e1 / e2 == pytest.approx(2.0 ** order, rel=0.1)
    # absolute size: the leading error constants of the three rules on 3t^2
    h = 1 / 64
    expected = {"euler": 1.5 * h, "midpoint": h * h / 4, "heun": h * h / 2}[method]
    assert errs[-1] == pytest.approx(expected, rel=0.05)


def test_exact_closed_forms():
    # Euler is the left Riemann sum: sum_i 3 (ih)^2 h = h^3 (n-1) n (2n-1) / 2
    n = 10
    h = 1 / n
    x = integrate(v_cubic, torch.zeros(1, 1, dtype=torch.float64), 0, 1, n, "euler")
    assert float(x) == pytest.approx(h ** 3 * (n - 1) * n * (2 * n - 1) / 2, abs=1e-14)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_backward_cubic(method):
    # from x(1) = 1 back to x(0) = 0; second-order methods: error O(h^2)
    x = integrate(v_cubic, torch.ones(1, 1, dtype=torch.float64), 1.0, 0.0, 200, method)
    tol = 1e-2 if method == "euler" else 1e-4
    assert abs(float(x)) < tol


def test_zero_steps_and_bad_input():
    x = torch.randn(2, 3)
    assert torch.equal(integrate(v_cubic, x, 0, 1, 0), x)
    with pytest.raises(ValueError, match="method"):
        integrate(v_cubic, x, 0, 1, 2, "rk4")
    with pytest.raises(ValueError, match="steps"):
        integrate(v_cubic, x, 0, 1, -1)


def gaussian_1d():
    mu = torch.tensor([[[1.0, -2.0], [0.5, 3.0]]], dtype=torch.float64)      # (1, 2, 2)
    sigma = torch.tensor([[[0.5, 2.0], [1.5, 0.2]]], dtype=torch.float64)
    return GaussianVelocity(mu, sigma), mu, sigma


def test_gaussian_velocity_carries_noise_to_data():
    v, mu, sigma = gaussian_1d()
    n = 4000
    z = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = integrate(v, z, 0.0, 1.0, 100, "heun")
    # discretisation: close to the exact affine flow map
    assert torch.allclose(x, v.flow_map(z, 0.0, 1.0), atol=1e-3)
    # statistics within sampling error: SE(mean) = sigma/sqrt(n), SE(var) = var*sqrt(2/(n-1))
    m, s2 = x.mean(0), x.var(0)
    assert bool(((m - mu).abs() < 4 * sigma / math.sqrt(n) + 1e-3).all())
    assert bool(((s2 - sigma ** 2).abs() < 4 * sigma ** 2 * math.sqrt(2 / (n - 1)) + 1e-3).all())


class FullCovVelocity:
    r"""Exact rectified-flow velocity of N(mu, S) with a full covariance:
    v(x, t) = mu + (t S - (1-t) I)(t^2 S + (1-t)^2 I)^{-1}(x - t mu), via S = Q diag(l) Q^T."""

    def __init__(self, mu, S):
        self.mu = mu
        self.l, self.Q = torch.linalg.eigh(S)

    def __call__(self, x, t):
        t = t.reshape(-1, 1).to(x)
        y = (x - t * self.mu) @ self.Q
        y = y * (t * self.l - (1 - t)) / (t * t * self.l + (1 - t) ** 2)
        return self.mu + y @ self.Q.T


def test_full_covariance_gaussian():
    mu = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    A = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [-0.5, 0.3, 0.4]], dtype=torch.float64)
    S = A @ A.T
    n = 4000
    z = torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = integrate(FullCovVelocity(mu, S), z, 0.0, 1.0, 100, "midpoint")
    m = x.mean(0)
    C = torch.cov(x.T)
    d = torch.diagonal(S)
    se_mean = torch.sqrt(d / n)
    se_cov = torch.sqrt((d[:, None] * d[None, :] + S ** 2) / n)
    assert bool(((m - mu).abs() < 4 * se_mean).all())
    assert bool(((C - S).abs() < 4 * se_cov + 1e-3).all())


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_backward_inverts_forward(method):
    v, _, _ = gaussian_1d()
    z = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    errs = []
    for steps in (8, 32, 128):
        x1 = integrate(v, z, 0.0, 1.0, steps, method)
        z_back = integrate(v, x1, 1.0, 0.0, steps, method)
        errs.append(float((z_back - z).abs().max()))
    assert errs[0] > errs[1] > errs[2]
    # 4x the steps: the round-trip error falls like h (Euler) or h^2 (midpoint, Heun)
    assert errs[1] / errs[2] > (3.0 if method == "euler" else 12.0)
    assert errs[2] < (0.2 if method == "euler" else 1e-3)
    # the exact map is inverted exactly by the exact backward map
    x1 = v.flow_map(z, 0.0, 1.0)
    assert torch.allclose(v.flow_map(x1, 1.0, 0.0), z, atol=1e-12)


def test_counting_velocity_forward_and_vjp():
    v, _, _ = gaussian_1d()
    for method in ("euler", "midpoint", "heun"):
        cv = CountingVelocity(v)
        z = torch.randn(3, 1, 2, 2, dtype=torch.float64, requires_grad=True)
        out = integrate(cv, z, 0.0, 1.0, 5, method, grad=True)
        assert cv.forward_evals == 5 * evals_per_step(method)
        assert cv.backward_evals == 0
        out.sum().backward()
        assert cv.backward_evals == 5 * evals_per_step(method)
        cv.reset()
        integrate(cv, z.detach(), 0.0, 0.5, 2, method, grad=False)
        assert (cv.forward_evals, cv.backward_evals) == (2 * evals_per_step(method), 0)


def test_gradient_through_flow_map_matches_closed_form():
    # d/dz sum Phi(z) for the affine exact map is s(1)/s(0) = sigma per component
    v, _, sigma = gaussian_1d()
    z = torch.randn(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    integrate(v, z, 0.0, 1.0, 200, "heun", grad=True).sum().backward()
    assert torch.allclose(z.grad, sigma.expand_as(z), atol=1e-4)
    with torch.no_grad():
        y = integrate(v, z, 0.0, 1.0, 3, "euler", grad=None)
    assert not y.requires_grad
