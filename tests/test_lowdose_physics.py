"""Low-dose CT physics (issue 17): the Poisson transmission model, its safe log and weights,
physical units (HU <-> mu, the prior's window), the weighted data term, and FBP of a water
cylinder simulated on the clinical fan-beam preset."""
from __future__ import annotations

import math

import pytest
import torch

from ctflow.operators.ct import FBP, RayTransform, preset
from ctflow.operators.noise import COUNT_FLOOR, GaussianNoise, LowDoseData, PoissonNoise
from ctflow.operators.units import MU_AIR, MU_MAX, MU_WATER, WindowMap, hu_to_mu, mu_to_hu
from ctflow.tasks.problem import simulate_lowdose


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------- the count model
@pytest.mark.parametrize("sigma_e", [0.0, 3.0])
def test_counts_have_the_poisson_mean_and_variance(sigma_e):
    """Many draws: mean I0 f exp(-p) and variance lambda + sigma_e^2, within 4.5 standard
    errors per bin (12 bins, flat field included)."""
    draws = 20000
    p = torch.linspace(0.0, 5.0, 12, dtype=torch.float64)
    flat = torch.linspace(0.8, 1.2, 12, dtype=torch.float64)
    noise = PoissonNoise(500.0, flat_field=flat, electronic_sigma=sigma_e)
    lam = 500.0 * flat * torch.exp(-p)
    counts = noise.simulate(p.expand(draws, 1, 1, 12), generator=_gen(1)).counts[:, 0, 0]
    mean, var = counts.mean(0), counts.var(0)
    true_var = lam + sigma_e ** 2
    se_mean = torch.sqrt(true_var / draws)
    # variance of the sample variance: (mu4 - var^2)/K, mu4 = lam + 3 lam^2 (+ Gaussian part)
    mu4 = lam + 3 * lam ** 2 + 6 * lam * sigma_e ** 2 + 3 * sigma_e ** 4
    se_var = torch.sqrt((mu4 - true_var ** 2) / draws)
    assert torch.all((mean - lam).abs() < 4.5 * se_mean), (mean, lam)
    assert torch.all((var - true_var).abs() < 4.5 * se_var), (var, true_var)
    assert torch.allclose(noise.expected_counts(p), lam)


def test_post_log_variance_is_one_over_counts_to_first_order():
    """Var(y) = 1/lambda (1 + O(1/lambda)) and the weights are ~ 1/Var(y)."""
    draws = 40000
    lam = torch.tensor([200.0, 1000.0, 5000.0], dtype=torch.float64)
    i0 = 1e4
    p = torch.log(i0 / lam)
    data = PoissonNoise(i0).simulate(p.expand(draws, 1, 1, 3), generator=_gen(2))
    var = data.y[:, 0, 0].var(0)
    rel = var * lam                     # -> 1 + O(1/lambda)
    se = math.sqrt(2.0 / draws)         # relative standard error of a sample variance
    assert torch.all((rel - 1).abs() < 1.5 / lam + 4 * se), rel
    w = data.weights[:, 0, 0].mean(0)
    assert torch.allclose(w, lam, rtol=0.01)
    # the post-log mean is -log(lambda/I0) up to the O(1/lambda) log bias
    assert torch.all((data.y[:, 0, 0].mean(0) - p).abs() < 1.0 / lam + 4 * torch.sqrt(1 / lam / draws))


def test_electronic_noise_weights():
    """w = N^2/(N + sigma_e^2) ~ 1/Var(y) = lambda^2/(lambda + sigma_e^2)."""
    noise = PoissonNoise(1e4, electronic_sigma=10.0)
    n = torch.tensor([1.0, 100.0, 1e4])
    assert torch.allclose(noise.weights(n), n.double() ** 2 / (n.double() + 100.0))
    draws, lam = 40000, 400.0
    p = torch.full((draws, 1, 1, 1), math.log(1e4 / lam), dtype=torch.float64)
    data = noise.simulate(p, generator=_gen(3))
    expect = (lam + 100.0) / lam ** 2
    assert abs(float(data.y.var()) / expect - 1) < 0.05
    assert abs(float(data.weights.mean()) * expect - 1) < 0.02


def test_zero_and_negative_counts_are_safe():
    """Zero counts (no photons) and negative counts (electronic noise) give finite data at
    the floor: y = log(I0 f / floor), weight = floor; no Inf or NaN anywhere."""
    noise = PoissonNoise(100.0)
    data = noise.simulate(torch.full((2, 1, 3, 5), 40.0), generator=_gen(4))
    assert torch.all(data.counts == 0)
    assert torch.isfinite(data.y).all() and torch.isfinite(data.weights).all()
    assert torch.allclose(data.y, torch.full_like(data.y, math.log(100.0 / COUNT_FLOOR)))
    assert torch.all(data.weights == COUNT_FLOOR)
    noisy = PoissonNoise(100.0, electronic_sigma=5.0, count_floor=0.1)
    d2 = noisy.simulate(torch.full((1, 1, 50, 50), 40.0), generator=_gen(5))
    assert bool((d2.counts < 0).any())
    assert torch.isfinite(d2.y).all() and torch.isfinite(d2.weights).all()
    assert float(d2.y.max()) == pytest.approx(math.log(100.0 / 0.1))
    assert float(d2.weights.min()) > 0


def test_post_log_of_measured_counts_and_reconstruct_inputs():
    noise = PoissonNoise(1000.0, flat_field=torch.tensor([1.0, 2.0]))
    counts = torch.tensor([[500.0, 0.0]])
    data = noise.post_log(counts)
    assert isinstance(data, LowDoseData)
    assert torch.allclose(data.y, torch.tensor([[math.log(2.0), math.log(4000.0)]],
                                               dtype=torch.float64))
    y, w, sigma = data.for_reconstruct()
    assert sigma == 1.0 and torch.equal(w, torch.tensor([[500.0, 0.5]], dtype=torch.float64))
    desc = noise.describe()
    assert desc["model"] == "poisson" and desc["I0"] == 1000.0
    assert desc["flat_field"]["shape"] == [2]


# ---------------------------------------------------------------------- units
def test_hu_mu_round_trip_and_reference_values():
    hu = torch.linspace(-1024, 3071, 101, dtype=torch.float64)
    assert torch.allclose(mu_to_hu(hu_to_mu(hu)), hu, atol=1e-9)
    assert hu_to_mu(0.0) == pytest.approx(MU_WATER)
    assert hu_to_mu(-1000.0) == pytest.approx(MU_AIR)
    assert MU_MAX == pytest.approx(0.08135858, rel=1e-9)   # LoDoPaB: 81.35858 m^-1
    assert hu_to_mu(3071.0) == pytest.approx(MU_MAX)


def test_window_map_is_the_affine_chain():
    w = WindowMap((-1000.0, 1000.0))
    x = torch.rand(4, 4, dtype=torch.float64)
    assert torch.allclose(w.to_mu(x), hu_to_mu(w.to_hu(x)))
    assert torch.allclose(w.from_mu(w.to_mu(x)), x)
    assert torch.allclose(w.from_hu(w.to_hu(x)), x)
    assert w.scale == pytest.approx(2000 * (MU_WATER - MU_AIR) / 1000)
    assert w.offset == pytest.approx(MU_AIR)
    lo = WindowMap()  # -1024 HU: slightly below vacuum
    assert lo.offset < 0 and float(lo.to_mu(torch.zeros(1), physical=True)) == 0.0
    with pytest.raises(ValueError, match="lo < hi"):
        WindowMap((100.0, 100.0))


def test_data_for_window_keeps_the_operator_linear():
    """sum w (A(a x + b) - y)^2 == sum (a^2 w) (A x - y_x)^2 for y_x = (y - b A1)/a."""
    g = preset("clinical-fan", 16, 20.0, views=24)
    A = RayTransform(g)
    w = WindowMap((-1024.0, 3071.0))
    x = torch.rand(1, 1, 16, 16, dtype=torch.float64, generator=_gen(6))
    y = A(w.to_mu(x)) + 0.01 * torch.randn(1, 1, *A.range_shape, dtype=torch.float64,
                                           generator=_gen(7))
    weights = torch.rand(y.shape, dtype=torch.float64, generator=_gen(8)) + 0.5
    y_x, w_x = w.data_for_window(y, A, weights)
    lhs = (weights * (A(w.to_mu(x)) - y) ** 2).sum()
    rhs = (w_x * (A(x) - y_x) ** 2).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-10)


# ---------------------------------------------------------------------- weighted data term
def test_weighted_data_term_gradient_matches_autograd():
    """grad of (1/(2 sigma^2)) sum w (Ax - y)^2 is (1/sigma^2) A^T(w (Ax - y))."""
    g = preset("clinical-fan", 16, 20.0, views=20)
    A = RayTransform(g)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64, generator=_gen(9), requires_grad=True)
    y = torch.rand(2, 1, *A.range_shape, dtype=torch.float64, generator=_gen(10)) * 5
    w = torch.rand(y.shape, dtype=torch.float64, generator=_gen(11)) * 100
    sigma = 0.7
    f = (w * (A(x) - y) ** 2).sum() / (2 * sigma ** 2)
    (grad,) = torch.autograd.grad(f, x)
    with torch.no_grad():
        expect = A.T(w * (A(x) - y)) / sigma ** 2
    assert torch.allclose(grad, expect, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------- water cylinder
def _water_cylinder(n: int, pixel_mm: float, window: WindowMap, views: int):
    g = preset("clinical-fan", n, pixel_mm, views=views)
    xg, yg = g.pixel_centres()
    r = torch.sqrt(xg ** 2 + yg ** 2)
    hu = torch.where(r < 0.75 * g.extent, 0.0, -1000.0).to(torch.float64)
    x = window.from_hu(hu).reshape(1, 1, n, n)
    return g, x, r < 0.375 * g.extent


def test_water_cylinder_fbp_mean_hu_and_noise_scaling():
    """A 240 mm water cylinder on the clinical fan preset (64² pixels of 5 mm, 288 views):
    FBP gives 0 ± 5 HU inside at every dose, and the noise std (from two independent draws)
    scales as 1/sqrt(I0) within 15 %."""
    window = WindowMap((-1024.0, 3071.0))
    g, x, roi = _water_cylinder(64, 5.0, window, 288)
    A, fbp = RayTransform(g), FBP(g)
    clean = window.to_hu(fbp(A(x)))[0, 0]
    assert abs(float(clean[roi].mean())) < 2.0
    stds = {}
    for i0 in (1e4, 4e4, 1.6e5):
        recs = []
        for seed in (0, 1):
            scan = simulate_lowdose(A, x, PoissonNoise(i0), window=window, generator=_gen(seed))
            assert torch.isfinite(scan.y).all() and scan.weights.shape == scan.y.shape
            recs.append(window.to_hu(fbp(scan.y))[0, 0])
            assert abs(float(recs[-1][roi].mean())) < 5.0, (i0, float(recs[-1][roi].mean()))
        stds[i0] = float((recs[0] - recs[1])[roi].std()) / math.sqrt(2)
    for i0, s in stds.items():
        ratio = (s * math.sqrt(i0)) / (stds[1e4] * math.sqrt(1e4))
        assert abs(ratio - 1) < 0.15, (i0, s, stds)
    assert stds[1e4] > 10.0  # a visible noise level at 1e4 photons on 5 mm pixels


def test_simulate_lowdose_data_are_unbiased_for_the_window_image():
    """E[y_x] ~ A x and the weights ~ a^2 * counts: the solvers see A on the window image."""
    window = WindowMap((-1024.0, 3071.0))
    g, x, _ = _water_cylinder(16, 20.0, window, 24)
    A = RayTransform(g)
    scans = [simulate_lowdose(A, x, PoissonNoise(1e6), window=window, generator=_gen(s))
             for s in range(3)]
    y_mean = torch.stack([s.y for s in scans]).mean(0)
    assert scans[0].y.dtype == x.dtype and scans[0].sigma == 1.0
    rel = float((y_mean - A(x)).norm() / A(x).norm())
    assert rel < 5e-3
    with pytest.raises(TypeError, match="PoissonNoise"):
        simulate_lowdose(A, x, GaussianNoise(sigma=0.1))


# ---------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("i0", [0, -5.0, float("nan"), float("inf"), "1e4", True])
def test_bad_i0_names_the_value(i0):
    with pytest.raises(ValueError, match=r"I0 .*got"):
        PoissonNoise(i0)


def test_bad_noise_parameters():
    with pytest.raises(ValueError, match="electronic_sigma .*-1"):
        PoissonNoise(1e3, electronic_sigma=-1.0)
    with pytest.raises(ValueError, match="count_floor .*0"):
        PoissonNoise(1e3, count_floor=0.0)
    with pytest.raises(ValueError, match="flat_field"):
        PoissonNoise(1e3, flat_field=torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"flat_field of shape \(3,\)"):
        PoissonNoise(1e3, flat_field=torch.ones(3)).simulate(torch.zeros(1, 1, 2, 4))


def test_nan_counts_and_bad_line_integrals_name_the_problem():
    noise = PoissonNoise(1e3)
    with pytest.raises(ValueError, match="1 NaN"):
        noise.post_log(torch.tensor([1.0, float("nan"), 3.0]))
    with pytest.raises(ValueError, match="non-finite"):
        noise.simulate(torch.tensor([0.0, float("inf")]))
    with pytest.raises(ValueError, match=r"line integrals must be >= 0.*-0\.5"):
        noise.simulate(torch.tensor([0.0, -0.5]))


def test_weights_of_the_wrong_shape_are_refused_by_reconstruct():
    from ctflow import reconstruct

    g = preset("clinical-fan", 16, 20.0, views=12)
    A = RayTransform(g)
    y = torch.zeros(1, 1, *A.range_shape)
    with pytest.raises(ValueError, match=r"weights.*\(1, 1, 3, 5\)"):
        reconstruct(y, A, None, "cgls", sigma=1.0, weights=torch.ones(1, 1, 3, 5))


def test_detector_that_does_not_cover_the_fov_names_the_sizes():
    with pytest.raises(ValueError, match=r"field of view of diameter 502\.4.*image's 614\.4"):
        preset("clinical-fan", 512, 1.2)
    with pytest.raises(ValueError, match="pixel_mm .*-1"):
        preset("lodopab-parallel", 64, -1.0)
