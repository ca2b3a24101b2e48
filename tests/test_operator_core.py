"""The algebra of operators/base.py, checked against dense matrices and concrete operators."""
import math

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from ctflow.operators import (AdjointFunction, AdjointOperator, ComposedOperator, Denoising,
                              GaussianBlur, Inpainting, LinearOperator, ScaledOperator,
                              SumOperator, SuperResolution)


class MatrixOperator(LinearOperator):
    """A dense matrix ``M`` acting on flattened items; counts its applications."""

    name = "Matrix"

    def __init__(self, M, domain_shape, range_shape):
        super().__init__(domain_shape, range_shape)
        assert M.shape == (math.prod(range_shape), math.prod(domain_shape))
        self.M = M
        self.calls = 0

    def _forward(self, x):
        self.calls += 1
        B, C = x.shape[:2]
        return (x.reshape(B, C, -1) @ self.M.T.to(x.dtype)).reshape(B, C, *self.range_shape)

    def _adjoint(self, y):
        self.calls += 1
        B, C = y.shape[:2]
        return (y.reshape(B, C, -1) @ self.M.to(y.dtype)).reshape(B, C, *self.domain_shape)


def with_singular_values(m, n, values, seed):
    """An ``(m, n)`` matrix with the given singular values (random orthogonal factors)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    S = torch.zeros(m, n, dtype=torch.float64)
    k = len(values)
    S[range(k), range(k)] = torch.tensor(values, dtype=torch.float64)
    return U @ S @ V.T


def rand(shape, seed=0, dtype=torch.float64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense(op):
    n = math.prod(op.domain_shape)
    basis = torch.eye(n, dtype=torch.float64).reshape(n, 1, *op.domain_shape)
    with torch.no_grad():
        return op(basis).reshape(n, -1).T


@pytest.fixture
def ops():
    """B: (3, 4) -> (5, 2);  A, A2: (5, 2) -> (2, 3)."""
    MB = rand((10, 12), seed=1)
    MA = with_singular_values(6, 10, [3.0, 1.5, 1.0, 0.5, 0.2, 0.1], seed=2)
    MA2 = rand((6, 10), seed=3)
    return (MatrixOperator(MA, (5, 2), (2, 3)), MatrixOperator(MA2, (5, 2), (2, 3)),
            MatrixOperator(MB, (3, 4), (5, 2)))


# ------------------------------------------------------------------------- adjoint and .T
def test_transpose_is_cached_and_involutive(ops):
    A, _, _ = ops
    At = A.T
    assert isinstance(At, AdjointOperator)
    assert A.T is At                       # cached
    assert At.T is A                       # A.T.T is A
    assert At.domain_shape == A.range_shape and At.range_shape == A.domain_shape
    torch.testing.assert_close(dense(At), A.M.T)
    blur = GaussianBlur((6, 7), sigma=1.0)
    assert blur.T.T is blur and blur.T is blur.T
    torch.testing.assert_close(dense(blur.T), dense(blur).T)


def test_dense_matrix_of_test_operator(ops):
    A, _, B = ops
    torch.testing.assert_close(dense(A), A.M)
    torch.testing.assert_close(dense(B), B.M)
    assert A.dot_test() < 1e-13 and B.T.dot_test() < 1e-13


# ------------------------------------------------------------------------- composition
def test_composition(ops):
    A, _, B = ops
    AB = A @ B
    assert isinstance(AB, ComposedOperator)
    assert AB.domain_shape == (3, 4) and AB.range_shape == (2, 3)
    torch.testing.assert_close(dense(AB), A.M @ B.M)
    torch.testing.assert_close(dense(AB.T), (A.M @ B.M).T)
    y = rand((2, 3, 2, 3), seed=4)
    torch.testing.assert_close(AB.T(y), (B.T @ A.T)(y))
    torch.testing.assert_close(AB.adjoint(y), B.adjoint(A.adjoint(y)))
    x = rand((2, 3, 3, 4), seed=5)
    torch.testing.assert_close(A @ (B @ x), AB(x))      # operator @ tensor applies
    assert AB.dot_test() < 1e-13


def test_composition_with_restoration_operators():
    blur = GaussianBlur((8, 8), sigma=1.0)
    sr = SuperResolution((8, 8), factor=2)
    mask = Inpainting((8, 8), kind="random", seed=1)
    op = sr @ blur @ mask
    assert op.domain_shape == (8, 8) and op.range_shape == (4, 4)
    torch.testing.assert_close(dense(op), dense(sr) @ dense(blur) @ dense(mask))
    torch.testing.assert_close(dense(op.T), dense(mask.T) @ dense(blur.T) @ dense(sr.T))
    assert op.dot_test() < 1e-13


def test_composing_mismatched_shapes_raises(ops):
    A, _, B = ops
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 2\)|\(5, 2\).*\(3, 4\)") as err:
        B @ A                               # A's range (2, 3) != B's domain (3, 4)
    assert "(2, 3)" in str(err.value) and "(3, 4)" in str(err.value)
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(8, 8\)"):
        GaussianBlur(8, sigma=1.0) @ SuperResolution(8, factor=2)


# ------------------------------------------------------------------------- scalars, sums
def test_scalar_multiples(ops):
    A, _, _ = ops
    for op, c in [(2.5 * A, 2.5), (A * 2.5, 2.5), (A / 4, 0.25), (-A, -1.0), (3 * A, 3.0)]:
        assert isinstance(op, ScaledOperator)
        torch.testing.assert_close(dense(op), c * A.M)
        torch.testing.assert_close(dense(op.T), c * A.M.T)
        assert op.dot_test() < 1e-13
    with pytest.raises(TypeError):
        A * "2"
    with pytest.raises(TypeError):
        A * True


def test_sums_and_differences(ops):
    A, A2, B = ops
    for op, M in [(A + A2, A.M + A2.M), (A - A2, A.M - A2.M), (A + 2 * A2 - A, 2 * A2.M),
                  ((A + A2) @ B, (A.M + A2.M) @ B.M)]:
        torch.testing.assert_close(dense(op), M)
        torch.testing.assert_close(dense(op.T), M.T)
        assert op.dot_test() < 1e-13
    assert isinstance(A + A2, SumOperator)
    with pytest.raises(ValueError):
        A + B
    with pytest.raises(ValueError):
        GaussianBlur(8, sigma=1.0) - SuperResolution(8, factor=2)
    with pytest.raises(TypeError):
        A + 1.0


# ------------------------------------------------------------------------- norm
def test_norm_is_largest_singular_value(ops):
    A, A2, B = ops
    for op in [A, A2, B, A.T, A @ B, A + A2, A - A2, 0.5 * A, -A2, (A + A2) @ B]:
        sv = float(torch.linalg.svdvals(dense(op))[0])
        assert abs(op.norm() - sv) <= 1e-6 * sv, op
    assert abs(A.norm() - 3.0) <= 3e-6


def test_norm_of_restoration_operators():
    for op in [GaussianBlur((7, 9), sigma=1.2), GaussianBlur((7, 9), sigma=0.6, boundary="zero"),
               Inpainting((7, 9), kind="box"), SuperResolution((8, 6), factor=2),
               SuperResolution((8, 6), factor=2, mode="decimate"), Denoising((3, 5))]:
        sv = float(torch.linalg.svdvals(dense(op))[0])
        assert abs(op.norm() - sv) <= 1e-6 * sv, op
        # the generic power iteration (base class) agrees on these well-separated spectra
        assert abs(LinearOperator.norm(op, recompute=True) - sv) <= 1e-4 * sv, op


def test_norm_is_cached(ops):
    A, _, _ = ops
    n1 = A.norm()
    calls = A.calls
    assert calls > 0
    assert A.norm() == n1 and A.calls == calls           # cached: no more applications
    assert A.T.norm() == n1 and A.calls == calls         # the adjoint shares the cache
    n2 = A.norm(recompute=True)
    assert A.calls > calls and abs(n2 - n1) <= 1e-12 * n1
    assert (2.0 * A).norm() == pytest.approx(2.0 * n1, rel=1e-15)


# ------------------------------------------------------------------------- shifted normal
@pytest.mark.parametrize("c", [2.0, -0.5])
@pytest.mark.parametrize("base", [Inpainting((6, 7), kind="random", seed=2),
                                  GaussianBlur((6, 7), sigma=1.0),
                                  SuperResolution((6, 8), factor=2),
                                  Denoising((6, 7))], ids=repr)
def test_scaled_operator_solve_shifted_normal(base, c):
    op = c * base
    b = rand((2, 1, *base.domain_shape), seed=6)
    x = op.solve_shifted_normal(b, 0.3)
    # (c^2 A^T A + s I) x = b
    residual = op.adjoint(op(x)) + 0.3 * x - b
    assert float(residual.norm() / b.norm()) <= 1e-10


def test_shifted_normal_fallbacks(ops):
    A, _, _ = ops
    b = rand((1, 1, 5, 2), seed=7)
    assert A.solve_shifted_normal(b, 1.0) is None        # default: no closed form
    assert (2.0 * A).solve_shifted_normal(b, 1.0) is None
    torch.testing.assert_close((0.0 * A).solve_shifted_normal(b, 4.0), b / 4.0)
    assert GaussianBlur(6, sigma=1.0, boundary="zero").solve_shifted_normal(
        rand((1, 1, 6, 6)), 1.0) is None


# ------------------------------------------------------------------------- errors
def test_shape_errors_name_expected_and_given(ops):
    A, _, _ = ops
    with pytest.raises(ValueError) as err:
        A(rand((2, 1, 2, 5)))
    assert "expected (B, C, 5, 2)" in str(err.value) and "got (2, 1, 2, 5)" in str(err.value)
    with pytest.raises(ValueError) as err:
        A.adjoint(rand((2, 1, 5, 2)))
    assert "expected (B, C, 2, 3)" in str(err.value) and "got (2, 1, 5, 2)" in str(err.value)
    with pytest.raises(ValueError) as err:
        A(rand((5, 2)))                                  # batch and channel dims missing
    assert "expected (B, C, 5, 2)" in str(err.value) and "got (5, 2)" in str(err.value)
    with pytest.raises(ValueError, match="torch.Tensor"):
        A([[1.0, 2.0]])
    blur = GaussianBlur((8, 9), sigma=1.0)
    with pytest.raises(ValueError) as err:
        blur(rand((1, 1, 9, 8)))
    msg = str(err.value)
    assert "GaussianBlur" in msg and "expected (B, C, 8, 9)" in msg and "got (1, 1, 9, 8)" in msg
    with pytest.raises(ValueError) as err:
        SuperResolution(8, factor=2).adjoint(rand((1, 1, 8, 8)))
    assert "expected (B, C, 4, 4)" in str(err.value) and "got (1, 1, 8, 8)" in str(err.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_dtype_rejected(ops, dtype):
    A, _, _ = ops
    with pytest.raises(ValueError, match="dtype"):
        A(torch.zeros(1, 1, 5, 2, dtype=dtype))
    with pytest.raises(ValueError, match=str(dtype)):
        Inpainting(4).adjoint(torch.zeros(1, 1, 4, 4, dtype=dtype))


# ------------------------------------------------------------------------- autograd
def autograd_operators():
    A = MatrixOperator(rand((6, 10), seed=8), (5, 2), (2, 3))
    B = MatrixOperator(rand((10, 6), seed=9), (3, 2), (5, 2))
    return [
        A, A.T, A @ B, A + 2.0 * A, -A,
        GaussianBlur((5, 6), sigma=1.0),
        GaussianBlur((5, 6), sigma=0.8, boundary="zero"),
        Inpainting((5, 6), kind="random", seed=1),
        Inpainting((5, 6), kind="box"),
        Inpainting((8, 8), kind="freeform", seed=1),
        SuperResolution((6, 4), factor=2),
        SuperResolution((6, 4), factor=2, mode="decimate"),
        Denoising((3, 4)),
        SuperResolution((8, 8), factor=2) @ GaussianBlur((8, 8), sigma=1.0),
    ]


@pytest.mark.parametrize("op", [o for o in autograd_operators()
                                if not isinstance(o, (MatrixOperator, AdjointOperator,
                                                      ComposedOperator, SumOperator,
                                                      ScaledOperator))
                                and o.solve_shifted_normal(
                                    torch.zeros(1, 1, *o.domain_shape, dtype=torch.float64),
                                    1.0) is not None], ids=repr)
def test_gradcheck_shifted_normal_solve(op):
    b = rand((1, 2, *op.domain_shape), seed=13).requires_grad_()
    assert gradcheck(lambda t: op.solve_shifted_normal(t, 0.7), (b,))


@pytest.mark.parametrize("op", [MatrixOperator(rand((6, 10), seed=8), (5, 2), (2, 3)),
                                GaussianBlur((5, 6), sigma=1.0, boundary="zero"),
                                SuperResolution((6, 4), factor=2)], ids=repr)
def test_adjoint_function_bridge(op):
    x = rand((2, 1, *op.domain_shape), seed=14).requires_grad_()

    def f(t):
        return AdjointFunction.apply(t, op._forward, op._adjoint)

    out = f(x)
    torch.testing.assert_close(out, op(x.detach()))
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))
    g = rand(out.shape, seed=15)
    (grad,) = torch.autograd.grad((f(x) * g).sum(), x)
    torch.testing.assert_close(grad, op.adjoint(g))
