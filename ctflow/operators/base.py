r"""The linear-operator core: one abstract class on batched torch tensors.

A :class:`LinearOperator` :math:`A` maps a batch of domain items ``(B, C, *domain_shape)`` to a
batch of range items ``(B, C, *range_shape)``. Every operator implements ``_forward`` and
``_adjoint``; the public :meth:`LinearOperator.forward` / :meth:`LinearOperator.adjoint` check
shapes and dtypes first and raise a :class:`ValueError` naming the expected and the given shape.

Algebra (all lazy, all exact):

* ``A @ B`` is the composition :math:`x \mapsto A(Bx)`, adjoint :math:`B^T A^T`;
* ``c * A`` scales, adjoint :math:`c A^T`; ``A + B``, ``A - B``, ``-A``;
* ``A.T`` is the adjoint as an operator, cached, with ``A.T.T is A``;
* ``A.norm()`` is the operator norm :math:`\|A\|_2 = \sqrt{\lambda_{\max}(A^T A)}` by power
  iteration (cached per operator);
* ``A.dot_test()`` returns :math:`|\langle Ax, y\rangle - \langle x, A^T y\rangle| /
  (\|Ax\|\,\|y\|)` for random ``x, y``.

Autograd flows through every operator: torch-native operators differentiate natively, external
backends wrap their calls in :class:`AdjointFunction`, whose backward is the adjoint.

Operators that can solve the shifted normal equations :math:`(A^T A + s I)x = b` in closed form
(masks, identity, circular convolutions) override :meth:`LinearOperator.solve_shifted_normal`;
the default returns ``None`` and solvers fall back to conjugate gradients.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = [
    "LinearOperator",
    "AdjointOperator",
    "ComposedOperator",
    "ScaledOperator",
    "SumOperator",
    "AdjointFunction",
    "check_batched",
]

Shape = Tuple[int, ...]


def _shape_str(shape: Sequence) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_batched(x, item_shape: Shape, *, what: str, owner: str = "operator") -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor of shape ``(B, C, *item_shape)``."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{owner}: {what} must be a torch.Tensor of shape "
                         f"(B, C, {', '.join(map(str, item_shape))}), got {type(x).__name__}")
    expected = "(B, C, " + ", ".join(str(s) for s in item_shape) + ")"
    if x.ndim != 2 + len(item_shape) or tuple(x.shape[2:]) != tuple(item_shape):
        raise ValueError(f"{owner}: {what} shape mismatch: expected {expected}, "
                         f"got {_shape_str(x.shape)}")
    if not (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"{owner}: {what} dtype mismatch: expected a floating dtype "
                         f"(float32 or float64), got {x.dtype}")


class AdjointFunction(torch.autograd.Function):
    """Autograd bridge for external backends: forward applies ``fwd``, backward applies ``adj``.

    ``AdjointFunction.apply(x, fwd, adj)`` is differentiable in ``x`` with
    :math:`\\partial/\\partial x \\langle g, A x\\rangle = A^T g`, and the backward itself is
    differentiable again through the same pair (double backward works).
    """

    @staticmethod
    def forward(ctx, x, fwd, adj):  # noqa: D401 - torch signature
        ctx.fwd, ctx.adj = fwd, adj
        with torch.no_grad():
            return fwd(x)

    @staticmethod
    def backward(ctx, g):
        return AdjointFunction.apply(g, ctx.adj, ctx.fwd), None, None


class LinearOperator:
    """Abstract linear operator on batched tensors ``(B, C, *domain_shape)``.

    Subclasses call ``super().__init__(domain_shape, range_shape)`` and implement
    ``_forward(x)`` and ``_adjoint(y)`` on already-validated batched tensors. The output
    follows the input's device and dtype.
    """

    #: Human-readable name used in error messages.
    name: str = "LinearOperator"

    def __init__(self, domain_shape: Sequence[int], range_shape: Sequence[int]):
        self.domain_shape: Shape = tuple(int(s) for s in domain_shape)
        self.range_shape: Shape = tuple(int(s) for s in range_shape)
        self._adjoint_op: Optional[LinearOperator] = None
        self._norm_cache: Optional[float] = None

    # -- to implement -------------------------------------------------------------------
    def _forward(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _adjoint(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- public application -------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the operator to ``x`` of shape ``(B, C, *domain_shape)``."""
        check_batched(x, self.domain_shape, what="input", owner=self._label())
        return self._forward(x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the adjoint to ``y`` of shape ``(B, C, *range_shape)``."""
        check_batched(y, self.range_shape, what="adjoint input", owner=self._label())
        return self._adjoint(y)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`A^T A x`."""
        return self.adjoint(self.forward(x))

    def solve_shifted_normal(self, b: torch.Tensor, shift: float) -> Optional[torch.Tensor]:
        """Solve :math:`(A^T A + \\text{shift}\\, I) x = b` in closed form, or return ``None``.

        ``None`` means "no closed form here": callers use conjugate gradients instead.
        """
        return None

    def _label(self) -> str:
        return f"{self.name}({_shape_str(self.domain_shape)} -> {_shape_str(self.range_shape)})"

    def __repr__(self) -> str:
        return self._label()

    # -- algebra ------------------------------------------------------------------------
    @property
    def T(self) -> "LinearOperator":
        """The adjoint as an operator (cached; ``A.T.T is A``)."""
        if self._adjoint_op is None:
            self._adjoint_op = AdjointOperator(self)
        return self._adjoint_op

    def __matmul__(self, other):
        if isinstance(other, LinearOperator):
            return ComposedOperator(self, other)
        if isinstance(other, torch.Tensor):
            return self.forward(other)
        return NotImplemented

    def __mul__(self, c):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return ScaledOperator(self, float(c))
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, c):
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            return ScaledOperator(self, 1.0 / float(c))
        return NotImplemented

    def __neg__(self):
        return ScaledOperator(self, -1.0)

    def __add__(self, other):
        if isinstance(other, LinearOperator):
            return SumOperator(self, other)
        return NotImplemented

    def __sub__(self, other):
        if isinstance(other, LinearOperator):
            return SumOperator(self, ScaledOperator(other, -1.0))
        return NotImplemented

    # -- numerics -----------------------------------------------------------------------
    def _probe(self, shape: Shape, *, batch: int = 1, channels: int = 1,
               dtype=torch.float64, device=None, generator=None) -> torch.Tensor:
        return torch.randn((batch, channels, *shape), dtype=dtype, device=device,
                           generator=generator)

    def norm(self, *, iterations: int = 1000, tol: float = 1e-10, seed: int = 0,
             dtype=torch.float64, device=None, recompute: bool = False) -> float:
        """Operator norm :math:`\\|A\\|_2` (unsquared) by power iteration on :math:`A^T A`.

        Stops when the Rayleigh quotient changes by less than ``tol`` (relative) between
        iterations, or after ``iterations``. With a small gap between the top singular values the
        estimate approaches from below; the tight default tolerance keeps that error small.
        The result is cached on the operator; ``recompute=True`` ignores the cache.
        """
        if self._norm_cache is not None and not recompute:
            return self._norm_cache
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = self._probe(self.domain_shape, dtype=dtype, generator=g).to(device or "cpu")
        x = x / x.norm()
        lam = 0.0
        with torch.no_grad():
            for _ in range(iterations):
                z = self.normal(x)
                lam_new = float((z * x).sum())
                nz = z.norm()
                if float(nz) == 0.0:
                    lam_new = 0.0
                    break
                x = z / nz
                if abs(lam_new - lam) <= tol * max(abs(lam_new), 1e-30):
                    lam = lam_new
                    break
                lam = lam_new
        self._norm_cache = math.sqrt(max(lam, 0.0))
        return self._norm_cache

    def dot_test(self, *, batch: int = 2, channels: int = 1, dtype=torch.float64,
                 device=None, seed: int = 0) -> float:
        """Relative adjoint mismatch :math:`|\\langle Ax,y\\rangle-\\langle x,A^Ty\\rangle|/(\\|Ax\\|\\|y\\|)`."""
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = self._probe(self.domain_shape, batch=batch, channels=channels, dtype=dtype,
                        generator=g).to(device or "cpu")
        y = self._probe(self.range_shape, batch=batch, channels=channels, dtype=dtype,
                        generator=g).to(device or "cpu")
        with torch.no_grad():
            ax = self.forward(x)
            aty = self.adjoint(y)
            lhs = float((ax * y).sum())
            rhs = float((x * aty).sum())
            denom = float(ax.norm() * y.norm())
        return abs(lhs - rhs) / max(denom, 1e-300)


class AdjointOperator(LinearOperator):
    """The adjoint :math:`A^T` of an operator; ``AdjointOperator(A).T is A``."""

    def __init__(self, op: LinearOperator):
        super().__init__(op.range_shape, op.domain_shape)
        self.op = op
        self._adjoint_op = op
        self.name = f"{op.name}.T"

    def _forward(self, x):
        return self.op._adjoint(x)

    def _adjoint(self, y):
        return self.op._forward(y)

    def norm(self, **kwargs) -> float:
        return self.op.norm(**kwargs)


class ComposedOperator(LinearOperator):
    """:math:`(AB)x = A(Bx)`, adjoint :math:`B^T A^T`."""

    def __init__(self, outer: LinearOperator, inner: LinearOperator):
        if tuple(inner.range_shape) != tuple(outer.domain_shape):
            raise ValueError(f"cannot compose {outer!r} @ {inner!r}: inner range "
                             f"{_shape_str(inner.range_shape)} != outer domain "
                             f"{_shape_str(outer.domain_shape)}")
        super().__init__(inner.domain_shape, outer.range_shape)
        self.outer, self.inner = outer, inner
        self.name = f"({outer.name} @ {inner.name})"

    def _forward(self, x):
        return self.outer._forward(self.inner._forward(x))

    def _adjoint(self, y):
        return self.inner._adjoint(self.outer._adjoint(y))


class ScaledOperator(LinearOperator):
    """:math:`(cA)x = c\\,Ax`, adjoint :math:`c A^T`."""

    def __init__(self, op: LinearOperator, c: float):
        super().__init__(op.domain_shape, op.range_shape)
        self.op, self.c = op, float(c)
        self.name = f"{self.c:g}*{op.name}"

    def _forward(self, x):
        return self.c * self.op._forward(x)

    def _adjoint(self, y):
        return self.c * self.op._adjoint(y)

    def solve_shifted_normal(self, b, shift):
        # (c^2 A^T A + s I) x = b  <=>  (A^T A + s/c^2 I) x = b / c^2
        if self.c == 0.0:
            return b / shift
        c2 = self.c * self.c
        return self.op.solve_shifted_normal(b / c2, shift / c2)

    def norm(self, **kwargs) -> float:
        return abs(self.c) * self.op.norm(**kwargs)


class SumOperator(LinearOperator):
    """:math:`(A+B)x = Ax + Bx`, adjoint :math:`A^T + B^T`."""

    def __init__(self, a: LinearOperator, b: LinearOperator):
        if a.domain_shape != b.domain_shape or a.range_shape != b.range_shape:
            raise ValueError(f"cannot add {a!r} and {b!r}: shapes differ (domain "
                             f"{_shape_str(a.domain_shape)} vs {_shape_str(b.domain_shape)}, range "
                             f"{_shape_str(a.range_shape)} vs {_shape_str(b.range_shape)})")
        super().__init__(a.domain_shape, a.range_shape)
        self.a, self.b = a, b
        self.name = f"({a.name} + {b.name})"

    def _forward(self, x):
        return self.a._forward(x) + self.b._forward(x)

    def _adjoint(self, y):
        return self.a._adjoint(y) + self.b._adjoint(y)

