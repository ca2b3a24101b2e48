"""One contract for every operator of ctflow.operators (and ctflow.operators.ct).

The registry :data:`CASES` lists, for every concrete :class:`~ctflow.operators.LinearOperator`
subclass of the package, small instances (the restoration operators, the torch ray transforms
for parallel and fan beams, FBP, the composites ``A.T``, ``A @ B``, ``c * A``, ``A + B``, and
the ODL and tomosipo backends, skipped when not installed or not usable here).
:func:`test_registry_covers_every_operator_class` walks the subclasses and fails when a new
operator class is not in the registry.

Every case is checked for: domain and range shapes (and the errors for wrong shapes and
integer dtypes); output dtype and device for float32 and float64 inputs on the CPU (and CUDA
when present), item-wise batching and float32/float64 agreement; the dot test
:math:`\\langle Ax, y\\rangle = \\langle x, A^T y\\rangle`; the adjoint of the adjoint;
linearity of the forward and of the adjoint; and autograd: the backward of the forward is the
adjoint, ``gradcheck`` of forward and adjoint in double precision (for exact adjoints) and
``gradgradcheck`` for the torch-native operators.

Tolerances: exact torch-native operators 1e-10 (float64) and 1e-5 (float32, relative to
:math:`\\|Ax\\|\\,\\|y\\|`); ODL with ASTRA computes in float32 (1e-5); scikit-image's and
ASTRA's GPU back-projections are approximate transposes (1e-2; tomosipo probed with
non-negative inputs, as its own tests explain).
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Callable, Optional

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import ctflow.operators as ops_pkg
from ctflow.operators import (AdjointOperator, ComposedOperator, Denoising, GaussianBlur,
                              Inpainting, LinearOperator, ScaledOperator, SumOperator,
                              SuperResolution)
from ctflow.operators.ct import (FBP, FanBeam2D, ParallelBeam2D, RayTransform, available_backends,
                                 preset)

PAR = ParallelBeam2D(5, 4, detectors=7)
FAN = FanBeam2D(5, 5, source_origin=3.0, origin_detector=1.0, detectors=7)
PAR_ODL = ParallelBeam2D(6, 5, detectors=8)
FAN_ODL = FanBeam2D(6, 6, source_origin=3.0, origin_detector=1.5, detectors=9)
# ASTRA works in float32: a coarser difference step keeps gradcheck meaningful
ASTRA_GRAD = dict(eps=1e-2, atol=1e-3, rtol=1e-3)


@dataclass(frozen=True)
class Case:
    """One registry entry: ``build()`` makes the operator, ``cls`` is the class it covers."""

    id: str
    cls: type
    build: Callable[[], LinearOperator]
    backend: Optional[str] = None       # name in available_backends(); None: torch-native
    exact: bool = True                  # the adjoint is the exact transpose
    dot_tol64: float = 1e-10
    dot_tol32: float = 1e-5
    positive: bool = False              # probe the dot test with non-negative inputs
    grad: dict = field(default_factory=dict)

    @property
    def native(self) -> bool:
        return self.backend is None


def _mask():
    return (torch.arange(30).reshape(5, 6) % 3 != 0).to(torch.float32)


def _odl(name, build, **kw):
    return dict(backend=name, build=build, **kw)


CASES = [
    # restoration
    Case("blur-circular", GaussianBlur, lambda: GaussianBlur((5, 6), sigma=1.0)),
    Case("blur-circular-wrapping", GaussianBlur, lambda: GaussianBlur((9, 7), sigma=3.0)),
    Case("blur-anisotropic", GaussianBlur,
         lambda: GaussianBlur((6, 7), sigma=(0.7, 2.0), kernel_size=(3, 5))),
    Case("blur-zero", GaussianBlur, lambda: GaussianBlur((5, 6), sigma=0.8, boundary="zero")),
    Case("inpainting-random", Inpainting, lambda: Inpainting((5, 6), kind="random", seed=1)),
    Case("inpainting-box", Inpainting,
         lambda: Inpainting((6, 5), kind="box", box_size=(2, 3), position="random", seed=4)),
    Case("inpainting-freeform", Inpainting, lambda: Inpainting(8, kind="freeform", seed=1)),
    Case("inpainting-custom", Inpainting, lambda: Inpainting((5, 6), mask=_mask())),
    Case("superres-average", SuperResolution, lambda: SuperResolution((6, 9), factor=3)),
    Case("superres-decimate", SuperResolution,
         lambda: SuperResolution((6, 4), factor=2, mode="decimate")),
    Case("denoising", Denoising, lambda: Denoising((3, 4))),
    # CT, torch backend
    Case("ray-parallel", RayTransform, lambda: RayTransform(PAR)),
    Case("ray-fan", RayTransform, lambda: RayTransform(FAN)),
    Case("ray-fan-nonuniform", RayTransform,
         lambda: RayTransform(FanBeam2D(5, torch.linspace(0.1, 5.0, 6), source_origin=4.0,
                                        origin_detector=4.0, extent=1.5, detectors=8))),
    # the geometry presets in mm (clinical fan beam, LoDoPaB parallel beam) on coarse grids;
    # their detectors are wide (736 / 513 bins), so gradcheck runs in fast mode
    Case("ray-preset-clinical-fan", RayTransform,
         lambda: RayTransform(preset("clinical-fan", 5, 60.0, views=3)),
         grad=dict(fast_mode=True)),
    Case("ray-preset-lodopab", RayTransform,
         lambda: RayTransform(preset("lodopab-parallel", 5, 40.0, views=2)),
         grad=dict(fast_mode=True)),
    Case("fbp-parallel", FBP, lambda: FBP(PAR, "hann")),
    Case("fbp-fan", FBP, lambda: FBP(FAN, "shepp-logan", frequency_scaling=0.8)),
    # composites
    Case("adjoint-blur", AdjointOperator, lambda: GaussianBlur((5, 6), sigma=1.0).T),
    Case("adjoint-ray", AdjointOperator, lambda: RayTransform(FAN).T),
    Case("composed-superres-blur", ComposedOperator,
         lambda: SuperResolution((6, 6), factor=2) @ GaussianBlur((6, 6), sigma=1.0)),
    Case("composed-ray-inpainting", ComposedOperator,
         lambda: RayTransform(PAR) @ Inpainting(5, kind="random", seed=2)),
    Case("scaled-blur", ScaledOperator, lambda: 2.5 * GaussianBlur((5, 6), sigma=1.0)),
    Case("negated-ray", ScaledOperator, lambda: -RayTransform(PAR)),
    Case("divided-fbp", ScaledOperator, lambda: FBP(PAR) / 4.0),
    Case("sum-blur-identity", SumOperator,
         lambda: GaussianBlur((5, 6), sigma=1.0, boundary="zero") + Denoising((5, 6))),
    Case("difference-ray-ray", SumOperator, lambda: RayTransform(PAR) - 0.5 * RayTransform(PAR)),
    # external backends
    Case("odl-astra_cpu-parallel", RayTransform,
         lambda: RayTransform(PAR_ODL, backend="odl", impl="astra_cpu"),
         backend="odl/astra_cpu", dot_tol64=1e-5, dot_tol32=1e-4, grad=ASTRA_GRAD),
    Case("odl-astra_cpu-fan", RayTransform,
         lambda: RayTransform(FAN_ODL, backend="odl", impl="astra_cpu"),
         backend="odl/astra_cpu", dot_tol64=1e-5, dot_tol32=1e-4, grad=ASTRA_GRAD),
    Case("odl-astra_cuda-parallel", RayTransform,
         lambda: RayTransform(PAR_ODL, backend="odl", impl="astra_cuda"),
         backend="odl/astra_cuda", dot_tol64=1e-5, dot_tol32=1e-4, grad=ASTRA_GRAD),
    Case("odl-skimage-parallel", RayTransform,
         lambda: RayTransform(PAR_ODL, backend="odl", impl="skimage"),
         backend="odl/skimage", exact=False, dot_tol64=1e-2, dot_tol32=1e-2),
    Case("tomosipo-parallel", RayTransform,
         lambda: RayTransform(ParallelBeam2D(16, 12), backend="tomosipo"),
         backend="tomosipo", exact=False, dot_tol64=1e-2, dot_tol32=1e-2, positive=True),
    Case("tomosipo-fan", RayTransform,
         lambda: RayTransform(FanBeam2D(16, 16, source_origin=3.0, origin_detector=1.5),
                              backend="tomosipo"),
         backend="tomosipo", exact=False, dot_tol64=1e-2, dot_tol32=1e-2, positive=True),
]

_MODULE_OF_BACKEND = {"odl/astra_cpu": "odl", "odl/astra_cuda": "odl", "odl/skimage": "odl",
                      "tomosipo": "tomosipo"}


@functools.lru_cache(maxsize=None)
def _backend_infos():
    return {i.name: i for i in available_backends()}


_BUILT: dict = {}


def build(case: Case) -> LinearOperator:
    """The case's operator (built once), skipping when its backend is missing or unusable."""
    if case.backend is not None:
        pytest.importorskip(_MODULE_OF_BACKEND[case.backend])
        info = _backend_infos()[case.backend]
        if not info.available:
            pytest.skip(f"{case.backend}: {info.reason}")
    if case.id not in _BUILT:
        _BUILT[case.id] = case.build()
    op = _BUILT[case.id]
    assert isinstance(op, case.cls) and type(op) is case.cls, (case.id, type(op))
    return op


def rand(shape, seed, dtype=torch.float64, positive=False, device="cpu"):
    """Seeded noise (uniform when ``positive``), drawn in float64 and then cast, so that the
    float32 and float64 probes hold the same values."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=torch.float64) if positive else \
        torch.randn(shape, generator=g, dtype=torch.float64)
    return t.to(device=device, dtype=dtype)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / max(float(b.double().norm()), 1e-300))


DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")])]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64],
                                 ids=["float32", "float64"])
ALL = pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)


# ------------------------------------------------------------------------------ the registry
def _concrete_operator_classes() -> set:
    """Every concrete LinearOperator subclass defined in ctflow.operators (every module of the
    package imported first). A class is concrete when it implements ``_forward``."""
    for mod in pkgutil.walk_packages(ops_pkg.__path__, prefix="ctflow.operators."):
        importlib.import_module(mod.name)
    found, todo = set(), [LinearOperator]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("ctflow.operators") \
                    and sub._forward is not LinearOperator._forward:
                found.add(sub)
    return found


def test_registry_covers_every_operator_class():
    classes = _concrete_operator_classes()
    registered = {c.cls for c in CASES}
    missing = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes - registered)
    assert not missing, f"operators without a contract case in CASES: {missing}"
    assert registered <= classes, registered - classes
    # the torch ray transforms of both geometries, and composites of CT operators, are there
    kinds = {c.id for c in CASES}
    assert {"ray-parallel", "ray-fan", "fbp-parallel", "fbp-fan", "adjoint-ray"} <= kinds
    assert len(kinds) == len(CASES)


# ------------------------------------------------------------------------------ shapes, dtypes
@ALL
@pytest.mark.parametrize("device", DEVICES)
def test_shapes_dtypes_devices(case, device):
    op = build(case)
    assert isinstance(op.domain_shape, tuple) and isinstance(op.range_shape, tuple)
    out = {}
    for dtype in (torch.float32, torch.float64):
        x = rand((2, 3, *op.domain_shape), 0, dtype, case.positive, device)
        y = rand((2, 3, *op.range_shape), 1, dtype, case.positive, device)
        ax, aty = op(x), op.adjoint(y)
        assert ax.shape == (2, 3, *op.range_shape) and aty.shape == x.shape
        assert ax.dtype == dtype and aty.dtype == dtype
        assert ax.device == x.device and aty.device == y.device
        # batch items are independent
        torch.testing.assert_close(op(x[1:2, 2:3]), ax[1:2, 2:3], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(op.adjoint(y[:1, 1:2]), aty[:1, 1:2], rtol=1e-4, atol=1e-5)
        out[dtype] = (ax, aty)
    assert rel(out[torch.float32][0], out[torch.float64][0]) < 1e-4
    assert rel(out[torch.float32][1], out[torch.float64][1]) < 1e-4


@ALL
def test_shape_and_dtype_errors(case):
    op = build(case)
    bad = (op.domain_shape[0] + 1, *op.domain_shape[1:])
    with pytest.raises(ValueError, match="shape mismatch"):
        op(torch.zeros(1, 1, *bad))
    with pytest.raises(ValueError, match="shape mismatch"):
        op.adjoint(torch.zeros(1, 1, *op.range_shape[:-1], op.range_shape[-1] + 1))
    with pytest.raises(ValueError, match="dtype"):
        op(torch.zeros(1, 1, *op.domain_shape, dtype=torch.int64))
    with pytest.raises(ValueError, match="dtype"):
        op.adjoint(torch.zeros(1, 1, *op.range_shape, dtype=torch.int32))


# ------------------------------------------------------------------------------ adjoint
@ALL
@DTYPES
def test_dot_test(case, dtype):
    op = build(case)
    x = rand((2, 2, *op.domain_shape), 2, dtype, case.positive)
    y = rand((2, 2, *op.range_shape), 3, dtype, case.positive)
    with torch.no_grad():
        ax, aty = op(x).double(), op.adjoint(y).double()
    lhs, rhs = float((ax * y.double()).sum()), float((x.double() * aty).sum())
    mismatch = abs(lhs - rhs) / float(ax.norm() * y.double().norm())
    assert mismatch <= (case.dot_tol64 if dtype == torch.float64 else case.dot_tol32)


@ALL
def test_adjoint_of_adjoint(case):
    op = build(case)
    assert op.T.T is op and op.T is op.T
    assert op.T.domain_shape == op.range_shape and op.T.range_shape == op.domain_shape
    x = rand((1, 2, *op.domain_shape), 4, positive=case.positive)
    y = rand((1, 2, *op.range_shape), 5, positive=case.positive)
    torch.testing.assert_close(op.T(y), op.adjoint(y), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.T.adjoint(x), op(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.T.T(x), op(x), rtol=1e-12, atol=1e-12)


@ALL
def test_linearity(case):
    op = build(case)
    tol = 1e-10 if case.native else 1e-5
    x1, x2 = (rand((2, 1, *op.domain_shape), s, positive=case.positive) for s in (6, 7))
    y1, y2 = (rand((2, 1, *op.range_shape), s, positive=case.positive) for s in (8, 9))
    a, b = 0.7, -1.3
    assert rel(op(a * x1 + b * x2), a * op(x1) + b * op(x2)) <= tol
    assert rel(op.adjoint(a * y1 + b * y2), a * op.adjoint(y1) + b * op.adjoint(y2)) <= tol
    assert float(op(torch.zeros_like(x1)).abs().max()) == 0.0


# ------------------------------------------------------------------------------ autograd
@ALL
def test_backward_is_the_adjoint(case):
    op = build(case)
    x = rand((2, 1, *op.domain_shape), 10, positive=case.positive).requires_grad_()
    g = rand((2, 1, *op.range_shape), 11, positive=case.positive)
    (grad,) = torch.autograd.grad((op(x) * g).sum(), x)
    torch.testing.assert_close(grad, op.adjoint(g), rtol=1e-6, atol=1e-9)
    y = rand((2, 1, *op.range_shape), 12, positive=case.positive).requires_grad_()
    h = rand((2, 1, *op.domain_shape), 13, positive=case.positive)
    (grad,) = torch.autograd.grad((op.adjoint(y) * h).sum(), y)
    torch.testing.assert_close(grad, op(h), rtol=1e-6, atol=1e-9)


@ALL
def test_gradcheck_forward_and_adjoint(case):
    op = build(case)
    if not case.exact:
        pytest.skip(f"{case.id}: approximate adjoint (the backward is the backend's "
                    f"back-projection, checked by test_backward_is_the_adjoint)")
    x = rand((1, 2, *op.domain_shape), 14).requires_grad_()
    y = rand((2, 1, *op.range_shape), 15).requires_grad_()
    assert gradcheck(op.forward, (x,), **case.grad)
    assert gradcheck(op.adjoint, (y,), **case.grad)
    if case.native:
        assert gradgradcheck(op.forward, (x,))
        assert gradgradcheck(op.adjoint, (y,))
