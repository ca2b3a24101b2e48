"""GaussianNoise (ctflow.operators.noise): statistics of the simulated noise for absolute and
relative levels, the per-item relative sigma, validation errors, and reproducible draws.

The statistical checks use many draws (``n`` values in all) and bounds of 5 standard errors:
the mean of N(0, s^2) noise has standard error ``s / sqrt(n)``, its sample standard deviation
about ``s / sqrt(2 n)``; a correct implementation fails them with probability below 1e-6.
"""
from __future__ import annotations

import math

import pytest
import torch

from ctflow.operators.noise import GaussianNoise

Z = 5.0   # standard errors allowed


def draws(noise: GaussianNoise, clean: torch.Tensor, n_draws: int, seed: int = 0):
    """The noise ``y - clean`` of ``n_draws`` simulations (one generator, drawn in turn),
    stacked on a new leading axis, and the per-item sigma of the last one."""
    g = torch.Generator().manual_seed(seed)
    out, sigma = [], None
    for _ in range(n_draws):
        y, sigma = noise.simulate(clean, generator=g)
        out.append((y - clean).double())
    return torch.stack(out), sigma


def check_mean_and_std(e: torch.Tensor, s: float) -> None:
    n = e.numel()
    mean, std = float(e.mean()), float(e.std())
    assert abs(mean) <= Z * s / math.sqrt(n), (mean, s, n)
    assert abs(std - s) <= Z * s / math.sqrt(2 * n), (std, s, n)


@pytest.mark.parametrize("sigma", [0.05, 1.0, 30.0])
def test_absolute_sigma_has_mean_zero_and_that_standard_deviation(sigma):
    clean = torch.linspace(-2.0, 5.0, 2 * 3 * 16 * 16, dtype=torch.float64).reshape(2, 3, 16, 16)
    e, s = draws(GaussianNoise(sigma=sigma), clean, 40)
    assert s.shape == (2,) and torch.equal(s, torch.full((2,), sigma, dtype=torch.float64))
    check_mean_and_std(e, sigma)
    for b in range(2):                               # every batch item gets the same sigma
        check_mean_and_std(e[:, b], sigma)
    # independent values: neighbouring pixels and consecutive draws are uncorrelated
    flat = e.reshape(e.shape[0], -1)
    n = flat[:, 1:].numel()
    corr = float((flat[:, 1:] * flat[:, :-1]).mean()) / sigma ** 2
    assert abs(corr) <= Z / math.sqrt(n)
    corr = float((e[1:] * e[:-1]).mean()) / sigma ** 2
    assert abs(corr) <= Z / math.sqrt(e[1:].numel())


@pytest.mark.parametrize("eta", [0.01, 0.1, 0.5])
def test_relative_level_is_eta_times_rms_per_batch_item(eta):
    gen = torch.Generator().manual_seed(1)
    # items of very different scales: a relative level follows each item's own RMS
    scales = torch.tensor([1e-3, 1.0, 250.0], dtype=torch.float64).view(3, 1, 1, 1)
    clean = scales * (torch.rand(3, 1, 20, 24, generator=gen, dtype=torch.float64) + 0.5)
    noise = GaussianNoise(relative=eta)
    rms = clean.reshape(3, -1).pow(2).mean(dim=1).sqrt()
    want = eta * rms
    torch.testing.assert_close(noise.std(clean), want, rtol=1e-12, atol=0.0)
    e, s = draws(noise, clean, 50, seed=2)
    torch.testing.assert_close(s, want, rtol=1e-12, atol=0.0)
    for b in range(3):
        check_mean_and_std(e[:, b], float(want[b]))


def test_relative_sigma_formula_and_reference_is_the_clean_data():
    v = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float32)   # RMS 5/sqrt(2), 0
    noise = GaussianNoise(relative=0.2)
    s = noise.std(v)
    assert s.dtype == torch.float64 and s.shape == (2,)
    torch.testing.assert_close(s, torch.tensor([0.2 * 5.0 / math.sqrt(2.0), 0.0],
                                               dtype=torch.float64))
    y, sigma = noise.simulate(v, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y[1], v[1])                   # zero data: zero relative noise
    assert sigma.dtype == torch.float64 and y.dtype == torch.float32   # sigma is exact
    assert not torch.equal(y[0], v[0])


def test_zero_noise_returns_the_clean_data():
    clean = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    for noise in (GaussianNoise(sigma=0), GaussianNoise(relative=0.0)):
        y, sigma = noise.simulate(clean, generator=torch.Generator().manual_seed(1))
        assert torch.equal(y, clean) and torch.equal(sigma, torch.zeros(2, dtype=torch.float64))


def test_output_dtype_shape_and_device_follow_the_clean_data():
    for dtype in (torch.float32, torch.float64):
        clean = torch.zeros(3, 2, 4, 5, dtype=dtype)
        y, sigma = GaussianNoise(sigma=0.5).simulate(clean)
        assert y.shape == clean.shape and y.dtype == dtype and y.device == clean.device
        assert sigma.shape == (3,) and sigma.dtype == torch.float64
        assert sigma.device == clean.device


def test_same_seed_same_draw_other_seed_other_draw():
    clean = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for noise in (GaussianNoise(sigma=0.1), GaussianNoise(relative=0.05)):
        a, _ = noise.simulate(clean, generator=torch.Generator().manual_seed(7))
        b, _ = noise.simulate(clean, generator=torch.Generator().manual_seed(7))
        c, _ = noise.simulate(clean, generator=torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)
    # the draw does not depend on the dtype of the data: float64 noise, then cast
    a32, _ = GaussianNoise(sigma=0.1).simulate(clean.float(),
                                               generator=torch.Generator().manual_seed(7))
    a64, _ = GaussianNoise(sigma=0.1).simulate(clean.double(),
                                               generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a32.double(), a64, rtol=0, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_draw_equals_the_cpu_draw():
    clean = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    noise = GaussianNoise(relative=0.05)
    cpu, _ = noise.simulate(clean, generator=torch.Generator().manual_seed(7))
    gpu, sigma = noise.simulate(clean.cuda(), generator=torch.Generator().manual_seed(7))
    assert gpu.is_cuda and sigma.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu)


@pytest.mark.parametrize("kwargs, match", [
    ({}, r"exactly one of sigma=.*relative=.*got sigma=None, relative=None"),
    ({"sigma": 0.1, "relative": 0.1}, r"exactly one of.*got sigma=0.1, relative=0.1"),
    ({"sigma": -0.5}, r"sigma must be a finite number >= 0, got -0.5"),
    ({"relative": -1e-3}, r"relative must be a finite number >= 0, got -0.001"),
    ({"sigma": float("nan")}, r"sigma must be a finite number >= 0, got nan"),
    ({"relative": float("inf")}, r"relative must be a finite number >= 0, got inf"),
    ({"sigma": True}, r"sigma must be a finite number >= 0, got True"),
    ({"relative": "0.01"}, r"relative must be a finite number >= 0, got '0.01'"),
    ({"sigma": None, "relative": None}, r"exactly one of"),
])
def test_bad_values_are_refused_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianNoise(**kwargs)


def test_values_are_floats_frozen_and_described():
    noise = GaussianNoise(sigma=2)
    assert isinstance(noise.sigma, float) and noise.sigma == 2.0 and noise.relative is None
    with pytest.raises(AttributeError):
        noise.sigma = 3.0
    assert noise.describe() == {"model": "gaussian", "sigma": 2.0}
    assert GaussianNoise(relative=0.01).describe() == {"model": "gaussian", "relative": 0.01}
    assert GaussianNoise(relative=0.01) == GaussianNoise(relative=0.01)
