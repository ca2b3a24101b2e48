r"""The TV baseline: total-variation regularised least squares by Chambolle–Pock PDHG
(:func:`ctflow.solvers.pdhg.pdhg_tv`); the prior is unused.

.. math::

    \min_x\ \frac{1}{2\sigma^2}\|Ax - y\|^2 + \mu\,\mathrm{TV}_{\mathrm{iso}}(x) + \iota_C(x),

:math:`\sigma` the absolute noise standard deviation of ``y``. Internally the equivalent
:math:`\tfrac12\|Ax-y\|^2 + \lambda\,\mathrm{TV}(x)` is solved, with :math:`\lambda` from
``weight`` and ``weight_mode``:

* ``"relative"`` (default): :math:`\lambda = \text{weight}\cdot\sigma` (the TV weight scales
  with the noise level);
* ``"absolute"``: :math:`\mu = \text{weight}`, i.e. :math:`\lambda = \text{weight}\cdot\sigma^2`;
* ``"unscaled"``: :math:`\lambda = \text{weight}`, whatever :math:`\sigma` is.

Noise-free data (:math:`\sigma = 0`): ``"relative"`` and ``"absolute"`` give
:math:`\lambda = 0`, i.e. no TV term (the right limit: no noise, no regularisation; an
all-air slice reconstructs as 0); TV then warns once that its weight has no effect.
``weight_mode="unscaled"`` (:math:`\lambda` = ``weight``) regularises at any
:math:`\sigma \ge 0`.
The reported ``objective`` and ``gap`` are in the :math:`1/(2\sigma^2)` form when
:math:`\sigma > 0` (else in the unscaled form).

Statistical weights (``weights=w``, :mod:`ctflow.solvers.weights`) make the data term
:math:`\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2`: PDHG runs on the whitened
:math:`W^{1/2}A`, :math:`W^{1/2}y` (the data block of :math:`K` is :math:`W^{1/2}A/c` with
:math:`c = \|W^{1/2}A\|/\sqrt{4d}`, so the step condition and the adaptive step balancing
hold unchanged, and the prox of the data term's conjugate is the same closed form in the
whitened dual variable). In whitened units the noise has standard deviation :math:`\sigma`,
after the weights have been normalised to mean 1 and :math:`\sigma` replaced by the
equivalent white noise level :math:`\sigma/\sqrt{\bar w}` (the same data term,
:func:`~ctflow.solvers.weights.normalize_weights`), so the rules above hold as they are:
weights :math:`cI` with :math:`\sigma` give the image of no weights with
:math:`\sigma/\sqrt c`, and the ``"unscaled"`` form reads
:math:`\tfrac12\sum_i (w_i/\bar w)(Ax-y)_i^2 + \lambda\,\mathrm{TV}(x)` (Poisson post-log
data: weights = counts and :math:`\sigma = 1`).
"""
from __future__ import annotations

import warnings

import dataclasses

from ctflow.solvers.base import IterativeOptions, IterativeSolver
from ctflow.solvers.options import check_bool, check_choice, check_float, check_int
from ctflow.solvers.pdhg import pdhg_tv

__all__ = ["TV", "WEIGHT_MODES"]

#: How :class:`TV` reads its ``weight`` (see the module docstring).
WEIGHT_MODES = ("relative", "absolute", "unscaled")


class TV(IterativeSolver):
    r"""Total-variation regularised reconstruction by PDHG (see the module docstring);
    options: :class:`TV.Options`."""

    name = "tv"
    normalizes_weights = True

    @dataclasses.dataclass(frozen=True, eq=False)
    class Options(IterativeOptions):
        r"""Options of :class:`TV` (and ``x_init``, ``seed``, ``progress``).

        Attributes:
            weight: the TV weight (>= 0), read per ``weight_mode``.
            weight_mode: ``"relative"`` (:math:`\lambda = w\sigma`), ``"absolute"``
                (:math:`\mu = w`, :math:`\lambda = w\sigma^2`) or ``"unscaled"``
                (:math:`\lambda = w`, the only mode for :math:`\sigma = 0`); refused with
                ``weight=0``, where it has no effect.
            iterations: PDHG iterations (int >= 1).
            nonneg: constrain :math:`x \ge 0` (refused as ``False`` with ``box``, which
                implies it).
            box: constrain :math:`0 \le x \le 1` (makes the primal–dual gap finite,
                reported in the history).
            tol: stop when the relative change of x falls below it (>= 0).
            adaptive: balance the primal and dual steps as the iteration goes (see
                :func:`~ctflow.solvers.pdhg.pdhg_tv`); ``False``: fixed equal steps.
            precondition: Pock–Chambolle diagonal steps (per ray and per pixel, see
                :func:`~ctflow.solvers.pdhg.pdhg_tv`) for operators with nonnegative entries;
                converges much faster with statistical weights spanning orders of magnitude
                (low-dose data).
        """

        OWNER = "TV"
        weight: float = 1.0
        weight_mode: str = "relative"
        iterations: int = 300
        nonneg: bool = True
        box: bool = False
        tol: float = 1e-6
        adaptive: bool = True
        precondition: bool = False

        def check(self) -> None:
            super().check()
            o = self.OWNER
            self._set("weight", check_float("weight", self.weight, owner=o, minimum=0.0))
            check_choice("weight_mode", self.weight_mode, WEIGHT_MODES, owner=o)
            self._set("iterations", check_int("iterations", self.iterations, owner=o))
            for name in ("nonneg", "box", "adaptive", "precondition"):
                check_bool(name, getattr(self, name), owner=o)
            self._set("tol", check_float("tol", self.tol, owner=o, minimum=0.0))
            self.refuse_unless(self.weight > 0, ("weight_mode",), "with weight=0")
            self.refuse_unless(not self.box, ("nonneg",),
                               "with box=True (the box [0, 1] implies x >= 0)")

    def effective_weight(self, sigma: float) -> float:
        r""":math:`\lambda` of the unscaled problem :math:`\tfrac12\|Ax-y\|^2 + \lambda TV`."""
        w, sigma, mode = self.options.weight, float(sigma), self.options.weight_mode
        if mode == "unscaled":
            return w
        return w * sigma if mode == "relative" else w * sigma * sigma

    def before_run(self, sigma: float) -> None:
        mode = self.options.weight_mode
        if sigma == 0 and mode != "unscaled" and self.options.weight > 0:
            warnings.warn(f"TV: weight_mode={mode!r} scales the TV weight with sigma and "
                          f"sigma is 0 (noise-free data), so the TV term vanishes and TV is "
                          f"plain least squares; pass weight_mode='unscaled' for lambda = "
                          f"weight in 1/2 ||Ax - y||^2 + lambda TV(x)", UserWarning,
                          stacklevel=2)

    def _run(self, operator, y, sigma, x0):
        opt = self.options
        lam = self.effective_weight(sigma)
        x, history = pdhg_tv(operator, y, weight=lam, iterations=opt.iterations,
                             nonneg=opt.nonneg, box=opt.box, tol=opt.tol, x0=x0,
                             adaptive=opt.adaptive, precondition=opt.precondition,
                             scale=sigma * sigma if sigma > 0 else 1.0,
                             progress=opt.progress)
        return x, history, {"effective_weight": lam}
