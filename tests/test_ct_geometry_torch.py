"""CT geometries and the torch ray transform: conventions, adjointness, analytic sinograms."""
import math

import pytest
import torch

from ctflow.operators.ct import (FanBeam2D, ParallelBeam2D, RayTransform, available_backends,
                                 backend_names)
from ctflow.operators.ct import torch_backend as tb
from test_ct_helpers import disk, fan_disk_sinogram, parallel_disk_sinogram

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# -- geometry ----------------------------------------------------------------------------------
def test_parallel_defaults_and_conventions():
    g = ParallelBeam2D(128, 60)
    assert g.pixel_size == pytest.approx(2 / 128)
    assert g.detector_spacing == pytest.approx(g.pixel_size)
    assert g.detectors == math.ceil(128 * math.sqrt(2))  # covers the diagonal
    assert g.detectors * g.detector_spacing >= 2 * math.sqrt(2)
    a = g.angles
    assert a.dtype == torch.float64 and a.shape == (60,)
    assert torch.allclose(a, torch.arange(60, dtype=torch.float64) * math.pi / 60)
    s = g.detector_positions()
    assert torch.allclose(s, -s.flip(0)) and s[1] - s[0] == pytest.approx(g.detector_spacing)
    assert g.sinogram_shape == (60, g.detectors) and g.image_shape == (128, 128)
    x, y = g.pixel_centres()
    assert float(x[0, 0]) == pytest.approx(-1 + 1 / 128)
    assert float(y[0, 0]) == pytest.approx(1 - 1 / 128)
    g2 = ParallelBeam2D(10, 4, extent=2.5, detectors=7)
    assert g2.detector_spacing == pytest.approx(2 * math.sqrt(2) * 2.5 / 7)
    g3 = ParallelBeam2D(10, [0.1, 0.2], detector_spacing=0.3)
    assert g3.detectors == math.ceil(2 * math.sqrt(2) / 0.3)


def test_fan_defaults():
    g = FanBeam2D(64, 90, source_origin=4.0, origin_detector=2.0)
    assert torch.allclose(g.angles, torch.arange(90, dtype=torch.float64) * 2 * math.pi / 90)
    mag = 6.0 / 4.0
    assert g.magnification == pytest.approx(mag)
    assert g.detector_spacing == pytest.approx(mag * g.pixel_size)
    rho = math.sqrt(2)
    half = 6.0 * rho / math.sqrt(16 - 2)
    assert g.detectors == math.ceil(2 * half / g.detector_spacing - 1e-9)


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=0), "image_size"),
    (dict(image_size=3.5), "image_size"),
    (dict(image_size=True), "image_size"),
    (dict(extent=-1.0), "extent"),
    (dict(angles=[]), "angles"),
    (dict(angles=0), "angles"),
    (dict(angles=[[0.0, 1.0]]), "angles"),
    (dict(angles=[0.0, float("nan")]), "angles"),
    (dict(detectors=0), "detectors"),
    (dict(detector_spacing=0.0), "detector_spacing"),
])
def test_parallel_validation(kwargs, name):
    args = dict(image_size=8, angles=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        ParallelBeam2D(args.pop("image_size"), args.pop("angles"), **args)


def test_fan_validation():
    with pytest.raises(ValueError, match="source_origin"):
        FanBeam2D(8, 4, source_origin=1.2, origin_detector=1.0)  # inside sqrt(2)*extent
    with pytest.raises(ValueError, match="origin_detector"):
        FanBeam2D(8, 4, source_origin=3.0, origin_detector=-1.0)
    with pytest.raises(TypeError):
        FanBeam2D(8, 4)  # distances are required keywords


def test_geometry_value_semantics():
    a = ParallelBeam2D(16, 8)
    b = ParallelBeam2D(16, torch.arange(8, dtype=torch.float64) * math.pi / 8)
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != ParallelBeam2D(16, 9) and a != a.replace(extent=2.0)
    f = FanBeam2D(16, 8, source_origin=3, origin_detector=1)
    assert f == FanBeam2D(16, 8, source_origin=3.0, origin_detector=1.0) and f != a
    with pytest.raises(AttributeError):
        a.image_size = 3
    t = a.angles
    t += 1.0  # the returned tensor is a copy
    assert a == b
    assert a.replace(image_size=32).detector_spacing == pytest.approx(2 / 32)


# -- torch ray transform ----------------------------------------------------------------------
GEOMETRIES = [
    ParallelBeam2D(8, 6),
    ParallelBeam2D(13, 17, detectors=11),
    ParallelBeam2D(24, 40, extent=2.0, detectors=29),
    FanBeam2D(8, 12, source_origin=3.0, origin_detector=1.0),
    FanBeam2D(13, 17, source_origin=2.5, origin_detector=0.5, detectors=21),
    FanBeam2D(24, torch.linspace(0.1, 5.0, 23), source_origin=4.0, origin_detector=4.0,
              extent=1.5, detectors=31),
]


@pytest.mark.parametrize("geom", GEOMETRIES, ids=repr)
def test_dot_test_float64(geom):
    op = RayTransform(geom)
    assert op.domain_shape == geom.image_shape and op.range_shape == geom.sinogram_shape
    assert op.dot_test(batch=2, channels=2) <= 1e-6
    assert op.dot_test(batch=1, channels=1, seed=3) <= 1e-6


@pytest.mark.parametrize("geom", [ParallelBeam2D(13, 16, detectors=11),
                                  FanBeam2D(13, 24, source_origin=2.5, origin_detector=0.5,
                                            detectors=21)], ids=repr)
def test_symmetry_reduction_matches_plain_matrix(geom):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, *geom.image_shape, dtype=torch.float64, generator=gen)
    y = torch.randn(3, *geom.sinogram_shape, dtype=torch.float64, generator=gen)
    plain = tb.SystemMatrix(geom, dtype=torch.float64, symmetry="none")
    for mode in ("rotation", "dihedral"):
        sym = tb.SystemMatrix(geom, dtype=torch.float64, symmetry=mode)
        assert len(sym.plan.canonical) < geom.num_angles
        assert torch.allclose(sym.forward(x), plain.forward(x), atol=1e-12, rtol=0)
        assert torch.allclose(sym.adjoint(y), plain.adjoint(y), atol=1e-12, rtol=0)


def test_auto_symmetry_for_uniform_angles():
    plan = tb.symmetry_plan(ParallelBeam2D(16, 180))
    assert plan.mode == "dihedral" and len(plan.canonical) == 46
    plan = tb.symmetry_plan(FanBeam2D(16, 360, source_origin=3, origin_detector=1))
    assert plan.mode == "dihedral" and len(plan.canonical) == 46
    angles = 3 * torch.rand(20, generator=torch.Generator().manual_seed(0))
    plan = tb.symmetry_plan(ParallelBeam2D(16, angles))
    assert plan.mode == "none" and len(plan.canonical) == 20


def test_pixel_footprint_orientation_and_mass():
    """A single pixel (top-left) projects to s = x_c at θ = 0 and s = y_c at θ = π/2, and every
    projection integrates to the pixel area h²."""
    g = ParallelBeam2D(16, [0.0, math.pi / 2, 0.3, 2.0])
    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[0, 0, 0, 0] = 1.0
    y = RayTransform(g)(x)[0, 0]
    s = g.detector_positions()
    h = g.pixel_size
    mass = y.sum(1) * g.detector_spacing
    assert torch.allclose(mass, torch.full((4,), h * h, dtype=torch.float64), rtol=1e-12)
    centre = (y * s).sum(1) / y.sum(1)
    xc, yc = -1 + h / 2, 1 - h / 2
    expected = torch.tensor([xc, yc, xc * math.cos(0.3) + yc * math.sin(0.3),
                             xc * math.cos(2.0) + yc * math.sin(2.0)], dtype=torch.float64)
    # bin averaging moves the discrete centroid by a small fraction of a bin only
    assert torch.allclose(centre, expected, atol=g.detector_spacing / 20)


def test_parallel_disk_matches_analytic_line_integrals():
    g = ParallelBeam2D(128, 30)
    sino = RayTransform(g)(disk(g, 0.5))[0, 0]
    ana = parallel_disk_sinogram(g, 0.5)
    err = (sino - ana[None]).norm(dim=1) / ana.norm()
    assert float(err.max()) < 0.01


def test_fan_disk_matches_analytic_line_integrals():
    g = FanBeam2D(128, 16, source_origin=3.0, origin_detector=2.0)
    sino = RayTransform(g)(disk(g, 0.5))[0, 0]
    ana = fan_disk_sinogram(g, 0.5)
    err = (sino - ana[None]).norm(dim=1) / ana.norm()
    assert float(err.max()) < 0.01


def test_float32_matches_float64_and_batching():
    g = ParallelBeam2D(20, 12, detectors=25)
    op = RayTransform(g)
    x = torch.rand(2, 3, 20, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y64 = op(x)
    y32 = op(x.float())
    assert y32.dtype == torch.float32 and y64.dtype == torch.float64
    assert torch.allclose(y32.double(), y64, rtol=1e-5, atol=1e-6)
    single = op(x[1:2, 2:3])
    assert torch.allclose(single, y64[1:2, 2:3], atol=1e-13)
    assert op.T(y64).shape == (2, 3, 20, 20)


def test_shape_and_dtype_errors():
    op = RayTransform(ParallelBeam2D(8, 4, detectors=9))
    with pytest.raises(ValueError, match=r"\(B, C, 8, 8\).*\(1, 1, 8, 9\)"):
        op(torch.zeros(1, 1, 8, 9))
    with pytest.raises(ValueError, match="shape"):
        op(torch.zeros(8, 8))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(1, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="float16"):
        op(torch.zeros(1, 1, 8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"\(B, C, 4, 9\)"):
        op.adjoint(torch.zeros(1, 1, 4, 8))
    with pytest.raises(ValueError, match="geometry"):
        RayTransform("not a geometry")


def test_backend_dispatch():
    g = ParallelBeam2D(8, 4)
    with pytest.raises(RuntimeError, match="torch"):
        RayTransform(g, backend="tomosipo")
    with pytest.raises(ValueError, match="unknown backend"):
        RayTransform(g, backend="nope")
    assert {"torch", "odl", "tomosipo"} <= set(backend_names())
    infos = {i.name: i for i in available_backends()}
    assert set(infos) == {"torch-cpu", "torch-cuda", "odl/astra_cpu", "odl/astra_cuda",
                          "odl/skimage", "tomosipo"}
    assert infos["torch-cpu"].available
    assert infos["torch-cuda"].available == torch.cuda.is_available()
    assert not infos["tomosipo"].available and infos["tomosipo"].reason
    for info in infos.values():
        assert info.available or info.reason


def test_matrix_cache_is_shared_per_geometry():
    g1 = ParallelBeam2D(12, 8)
    g2 = ParallelBeam2D(12, 8)
    m1 = tb.system_matrix(g1, dtype=torch.float64)
    assert tb.system_matrix(g2, dtype=torch.float64) is m1
    assert tb.system_matrix(g1, dtype=torch.float32) is not m1
    assert m1.nnz > 0 and m1.build_seconds >= 0


@cuda
def test_cuda_matches_cpu():
    g = FanBeam2D(32, 24, source_origin=3, origin_detector=1)
    op = RayTransform(g)
    x = torch.rand(2, 1, 32, 32, dtype=torch.float64)
    y = op(x)
    yc = op(x.cuda())
    assert yc.device.type == "cuda"
    assert torch.allclose(yc.cpu(), y, atol=1e-10)
    assert op.dot_test(device="cuda") <= 1e-6
    assert torch.allclose(op.adjoint(yc).cpu(), op.adjoint(y), atol=1e-10)
