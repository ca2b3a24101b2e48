"""Every solver runs unchanged on every kind of operator: the torch ray transform, an
ODL-backed ray transform, and the restoration operators (issue 5 item 5, issue 3 item 4).

The prior is the closed-form Gaussian flow, centred on a smoothed version of the truth, so the
flow solvers have a meaningful prior and the test stays fast. Each solve must return a valid
image in [0, 1] whose relative data residual is at most half that of a flat grey image (an
image that ignores the data).
"""
import pytest
import torch

import ctflow
from ctflow.operators import (Denoising, GaussianBlur, Inpainting, ParallelBeam2D, RayTransform,
                              SuperResolution)
from ctflow.operators.ct import available_backends

N = 16
D64 = torch.float64

FAST = {
    "msflow": dict(K=2, M=2, sweeps=4, rho=100.0),
    "dflow": dict(N=4, iterations=2, max_iter=5),
    "pnpflow": dict(steps=8, draws=1),
    "otode": dict(steps=8),
    "tv": dict(iterations=60),
    "cgls": dict(iterations=15),
}


def _odl_usable() -> bool:
    return any(b.name == "odl/astra_cpu" and b.available for b in available_backends())


def _truth() -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, N, dtype=D64),
                            torch.linspace(-1, 1, N, dtype=D64), indexing="ij")
    img = 0.2 + 0.6 * ((xx ** 2 + yy ** 2) < 0.5).to(D64) + 0.1 * (xx > 0.3).to(D64)
    return img[None, None]


def _operators():
    ops = {
        "ray-torch": lambda: RayTransform(ParallelBeam2D(N, angles=10), backend="torch"),
        "blur": lambda: GaussianBlur(N, sigma=1.0),
        "inpaint": lambda: Inpainting(N, kind="random", fraction=0.5, seed=1),
        "superres": lambda: SuperResolution(N, factor=2),
        "denoise": lambda: Denoising(N),
    }
    if _odl_usable():
        ops["ray-odl"] = lambda: RayTransform(ParallelBeam2D(N, angles=10), backend="odl",
                                              impl="astra_cpu")
    return ops


def _residual(op, x, y) -> float:
    return float((op(x) - y).norm() / y.norm())


@pytest.mark.parametrize("op_name", sorted(_operators()))
@pytest.mark.parametrize("method", sorted(FAST))
def test_every_solver_runs_on_every_operator(op_name, method):
    op = _operators()[op_name]()
    x = _truth()
    g = torch.Generator().manual_seed(0)
    y = op(x)
    sigma = 0.01 * float(y.norm()) / y.numel() ** 0.5
    y = y + sigma * torch.randn(y.shape, generator=g, dtype=D64)
    mean = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1,
                                          count_include_pad=False)[0]
    prior = ctflow.gaussian_prior(mean, torch.full_like(mean, 0.15))
    result = ctflow.reconstruct(y, op, prior, method=method, sigma=sigma, seed=0,
                                **FAST[method])
    assert result.image.shape == x.shape
    assert torch.isfinite(result.image).all()
    assert float(result.image.min()) >= 0.0 and float(result.image.max()) <= 1.0
    flat = torch.full_like(x, float(x.mean()))
    assert _residual(op, result.image, y) < 0.5 * _residual(op, flat, y), (op_name, method)


@pytest.mark.skipif(not _odl_usable(), reason="ODL with astra_cpu is not installed here")
def test_msflow_identical_on_torch_and_odl_backends():
    """The same MS-Flow call on both backends gives nearly the same image (the two
    projectors agree to well under 1 %)."""
    x = _truth()
    geom = ParallelBeam2D(N, angles=10)
    a_t, a_o = RayTransform(geom, backend="torch"), RayTransform(geom, backend="odl")
    y = a_t(x)
    mean = torch.full((1, N, N), 0.4, dtype=D64)
    prior = ctflow.gaussian_prior(mean, torch.full_like(mean, 0.2))
    r_t = ctflow.reconstruct(y, a_t, prior, method="msflow", sigma=0.01, **FAST["msflow"])
    r_o = ctflow.reconstruct(y, a_o, prior, method="msflow", sigma=0.01, **FAST["msflow"])
    assert float((r_t.image - r_o.image).norm() / r_t.image.norm()) < 0.05
