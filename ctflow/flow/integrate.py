r"""Flow maps: numerical integration of the generative ODE :math:`\dot x = v(x, t)`.

Convention (rectified flow / OT-CFM): :math:`t = 0` is noise, :math:`t = 1` is data. A
velocity field is any callable ``v(x, t)`` with ``x`` of shape ``(B, C, H, W)`` (or any
``(B, ...)``) and ``t`` of shape ``(B,)``.

:func:`integrate` maps :math:`x(t_0) \mapsto x(t_1)` with ``steps`` uniform steps of size
:math:`h = (t_1 - t_0)/\text{steps}`; :math:`t_1 < t_0` integrates backward (data to noise).

* ``euler``    :math:`x \leftarrow x + h\,v(x, t)`  (order 1, 1 evaluation per step)
* ``midpoint`` :math:`x \leftarrow x + h\,v(x + \tfrac h2 v(x,t), t + \tfrac h2)` (order 2, 2)
* ``heun``     :math:`x \leftarrow x + \tfrac h2 [v(x,t) + v(x + h v(x,t), t+h)]` (order 2, 2)

Gradients are tracked when ``grad=True`` (the default follows torch's grad mode) so that
D-Flow can back-propagate through the whole trajectory; MS-Flow integrates one short segment
at a time. :class:`CountingVelocity` counts forward and backward (vector-Jacobian) velocity
evaluations separately.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Union

import torch

__all__ = ["integrate", "METHODS", "evals_per_step", "CountingVelocity", "time_grid"]

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: Supported integrators and their velocity evaluations per step.
METHODS = {"euler": 1, "midpoint": 2, "heun": 2}


def evals_per_step(method: str) -> int:
    """Velocity evaluations one step of ``method`` costs."""
    _check_method(method)
    return METHODS[method]


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")


def time_grid(t0: float, t1: float, steps: int) -> torch.Tensor:
    """The ``steps + 1`` uniform time points from ``t0`` to ``t1`` (float64, CPU)."""
    return torch.linspace(float(t0), float(t1), int(steps) + 1, dtype=torch.float64)


def integrate(v: Velocity, x: torch.Tensor, t0: Union[float, torch.Tensor],
              t1: Union[float, torch.Tensor], steps: int,
              method: str = "euler", *, grad: Optional[bool] = None,
              return_path: bool = False):
    """Integrate :math:`\\dot x = v(x, t)` from ``t0`` to ``t1`` with ``steps`` uniform steps.

    Args:
        v: velocity field ``v(x, t)``, ``t`` of shape ``(B,)``.
        x: the state at ``t0``, shape ``(B, ...)``.
        t0, t1: start and end time; ``t1 < t0`` integrates backward. Either Python numbers
            (one time grid for the whole batch) or tensors of shape ``(B,)`` (one grid per
            item, :math:`t_j = t_0 + j (t_1 - t_0)/\text{steps}`), so that segments over
            different time intervals run as one batched velocity call.
        steps: number of steps (``>= 1``; ``0`` returns ``x`` unchanged).
        method: ``"euler"``, ``"midpoint"`` or ``"heun"``.
        grad: track gradients (``None``: follow the ambient grad mode).
        return_path: also return the list of states at every grid time.

    Returns:
        The state at ``t1`` (and the path if asked).
    """
    _check_method(method)
    if steps < 0 or int(steps) != steps:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    ctx = contextlib.nullcontext() if grad is None else torch.set_grad_enabled(grad)
    if isinstance(t0, torch.Tensor) or isinstance(t1, torch.Tensor):
        return _integrate_per_item(v, x, t0, t1, int(steps), method, ctx, return_path)
    ts = time_grid(t0, t1, int(steps)).tolist()
    path = [x] if return_path else None
    batch = x.shape[0]

    def tt(s: float) -> torch.Tensor:
        return torch.full((batch,), s, dtype=x.dtype, device=x.device)

    with ctx:
        for a, b in zip(ts[:-1], ts[1:]):
            h = b - a
            if method == "euler":
                x = x + h * v(x, tt(a))
            elif method == "midpoint":
                k = v(x, tt(a))
                x = x + h * v(x + 0.5 * h * k, tt(a + 0.5 * h))
            else:  # heun
                k1 = v(x, tt(a))
                k2 = v(x + h * k1, tt(b))
                x = x + 0.5 * h * (k1 + k2)
            if return_path:
                path.append(x)
    return (x, path) if return_path else x


def _item_times(t, x: torch.Tensor, name: str) -> torch.Tensor:
    batch = x.shape[0]
    t = torch.as_tensor(t, dtype=torch.float64).detach().to("cpu")
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(f"{name} must be a number or a tensor of shape ({batch},) (one time per "
                         f"batch item), got shape {tuple(t.shape)}")
    return t


def _integrate_per_item(v, x, t0, t1, steps, method, ctx, return_path):
    """:func:`integrate` with one uniform time grid per item (``t0``, ``t1`` of shape (B,))."""
    a0 = _item_times(t0, x, "t0")
    a1 = _item_times(t1, x, "t1")
    h64 = (a1 - a0) / max(steps, 1)
    view = (-1,) + (1,) * (x.ndim - 1)
    h = h64.to(dtype=x.dtype, device=x.device).reshape(view)
    path = [x] if return_path else None

    def tt(j: float) -> torch.Tensor:
        return (a0 + j * h64).to(dtype=x.dtype, device=x.device)

    with ctx:
        for j in range(steps):
            if method == "euler":
                x = x + h * v(x, tt(j))
            elif method == "midpoint":
                k = v(x, tt(j))
                x = x + h * v(x + 0.5 * h * k, tt(j + 0.5))
            else:  # heun
                k1 = v(x, tt(j))
                k2 = v(x + h * k1, tt(j + 1))
                x = x + 0.5 * h * (k1 + k2)
            if return_path:
                path.append(x)
    return (x, path) if return_path else x


class _CountBackward(torch.autograd.Function):
    """Identity whose backward bumps a counter: one count per vector-Jacobian product."""

    @staticmethod
    def forward(ctx, y, counter):
        ctx.counter = counter
        return y.view_as(y)

    @staticmethod
    def backward(ctx, g):
        ctx.counter.backward_evals += 1
        ctx.counter.backward_items += int(g.shape[0]) if g.ndim else 1
        return g, None


class CountingVelocity:
    """Wrap a velocity field and count its evaluations.

    ``forward_evals`` counts calls (one per batched call, whatever the batch size);
    ``backward_evals`` counts vector-Jacobian products taken through those calls;
    ``forward_items`` / ``backward_items`` count the batch items of those calls (a call on
    ``b`` images counts ``b``: the cost per image is ``items / images``).
    """

    def __init__(self, v: Velocity):
        self.v = v
        self.reset()

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.forward_evals += 1
        self.forward_items += int(x.shape[0]) if x.ndim else 1
        out = self.v(x, t)
        if out.requires_grad:
            out = _CountBackward.apply(out, self)
        return out

    def reset(self) -> None:
        self.forward_evals = 0
        self.backward_evals = 0
        self.forward_items = 0
        self.backward_items = 0
