r"""The solver classes' common front.

:class:`Solver`: ``Solver(**options)`` or ``Solver(options)`` (an instance of the class's
``Options`` dataclass, see :mod:`ctflow.solvers.options`), ``solve(operator, y, prior, sigma,
*, weights=None)`` and ``solver(operator, y, prior, sigma, options=None, *, weights=None)``
(``options`` a dict overriding some options for one call; ``weights`` the statistical weights
of the data term, :mod:`ctflow.solvers.weights`). :class:`FlowSolver` adds the checks a flow
solve starts with; :class:`IterativeSolver` is the classical baselines' ``solve`` (start
image ``x_init``, meter, result).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from ctflow.flow.integrate import METHODS as INTEGRATORS
from ctflow.solvers.init import TV_START_WEIGHT, check_start, initial_image
from ctflow.solvers.inputs import (Measurement, check_prior, check_problem, check_sigma,
                                   check_weights, prepare_measurement)
from ctflow.solvers.options import (SolverOptions, check_choice, check_positive,
                                    check_probability, check_x_init, record_options)
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.weights import normalize_weights, whiten

__all__ = ["Solver", "FlowSolver", "FlowOptions", "IterativeSolver", "IterativeOptions",
           "finish"]


class Solver:
    """Base of every solver class: ``Options`` (a frozen :class:`SolverOptions` dataclass)
    and the constructor that builds it."""

    #: the method's name in the registry (:mod:`ctflow.solvers.registry`)
    name = ""
    #: the solver's options dataclass (set by every subclass)
    Options = SolverOptions

    def __init__(self, options: Optional[SolverOptions] = None, /, **kw: Any):
        if options is not None and not isinstance(options, SolverOptions):
            raise TypeError(f"{type(self).__name__}: the only positional argument is a "
                            f"{type(self).__name__}.Options; give the other options as "
                            f"keywords, got {type(options).__name__}")
        self.options = self.Options.build(options, **kw)

    def __call__(self, operator, y, prior, sigma, options: Optional[Mapping[str, Any]] = None,
                 *, weights: Optional[torch.Tensor] = None):
        """``solve``, with ``options`` (a dict) overriding this solver's options."""
        solver = type(self)(self.options, **options) if options else self
        return solver.solve(operator, y, prior, sigma, weights=weights)

    def solve(self, operator, y: torch.Tensor, prior, sigma, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        r"""Reconstruct from ``y = A x + noise``: the data term is
        :math:`\tfrac1{2\sigma^2}\sum_i w_i (Ax - y)_i^2` with ``weights`` :math:`w`
        (``None``: all ones; :mod:`ctflow.solvers.weights`)."""
        raise NotImplementedError  # pragma: no cover

    def recorded_options(self, **extra: Any) -> Dict[str, Any]:
        """The options as :attr:`Reconstruction.options` records them, plus ``extra``."""
        return record_options({**self.options.as_dict(), **extra})


def finish(solver: Solver, x: torch.Tensor, history: List[Dict[str, Any]], meter: SolveMeter,
           nfe: Optional[Dict[str, int]] = None, *,
           nfe_per_image: Optional[Dict[str, float]] = None, **extra: Any) -> Reconstruction:
    """The :class:`Reconstruction` of a public image ``x`` (clipped to ``[0, 1]``)."""
    return Reconstruction(image=x.detach().clamp(0.0, 1.0), history=history,
                          nfe=dict(nfe or {"forward": 0, "backward": 0}),
                          nfe_per_image=dict(nfe_per_image or {"forward": 0.0,
                                                               "backward": 0.0}),
                          seconds=meter.seconds, peak_memory_bytes=meter.peak_memory_bytes,
                          method=solver.name, options=solver.recorded_options(**extra))


@dataclasses.dataclass(frozen=True, eq=False)
class FlowOptions(SolverOptions):
    r"""Options MS-Flow and D-Flow share (and ``seed``, which seeds the noise
    :math:`\varepsilon` of the blend start, and ``progress``).

    Attributes:
        method: the ODE integrator, ``"euler"`` (the default, also for ``None``),
            ``"midpoint"`` or ``"heun"``.
        integrator: an alias of ``method`` for ``ctflow.reconstruct``, where ``method`` names
            the solver (folded into ``method``; both given and different: refused).
        lam: the weight :math:`\lambda \ge 0` of the radial prior :math:`R(s_0)`.
        alpha: the blend :math:`\alpha \in [0, 1]` of the start
            :math:`s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,
            \varepsilon` (1: no noise, 0: pure noise).
        init: the initial image :math:`x_\text{init}`: one of
            :data:`~ctflow.solvers.init.INIT_CHOICES`, a tensor or a callable ``y -> image``
            (:func:`~ctflow.solvers.init.initial_image`); refused where the start image has
            no effect (see :meth:`start_unused`).
        cgls_iters: CGLS steps of ``init="cgls"`` (int >= 1; refused otherwise).
        tv_weight: relative TV weight of ``init="tv"`` (>= 0; refused otherwise).
    """

    method: Optional[str] = None
    integrator: Optional[str] = None
    lam: float = 1.0
    alpha: float = 1.0
    init: Any = "auto"
    cgls_iters: int = 10
    tv_weight: float = TV_START_WEIGHT

    def check(self) -> None:
        own = self.OWNER
        if self.integrator is not None:
            if self.method is not None and self.method != self.integrator:
                raise ValueError(f"{own}: options method={self.method!r} and "
                                 f"integrator={self.integrator!r} disagree; give one of them")
            self._set("method", self.integrator)
            self._set("integrator", None)
        if self.method is None:
            self._set("method", "euler")
        check_choice("method", self.method, tuple(INTEGRATORS), owner=own)
        self._set("lam", check_positive("lam", self.lam, owner=own, allow_zero=True))
        self._set("alpha", check_probability("alpha", self.alpha, owner=own))

    def check_start(self) -> None:
        """The checks of ``init``, ``cgls_iters`` and ``tv_weight`` (after the subclass's own
        checks, which :meth:`start_unused` may read)."""
        why = self.start_unused()
        check_start(self, iterations="cgls_iters", used=why is None, why=why or "")

    def start_unused(self) -> Optional[str]:
        """Why the initial image has no effect with these options (``None``: it has one);
        by default when ``alpha = 0`` (the start is pure noise)."""
        return "with alpha=0 (the start is pure noise)" if self.alpha == 0 else None


class FlowSolver(Solver):
    """Base of the trajectory solvers (MS-Flow, D-Flow), which take image and latent priors
    and every layout of ``y`` that :func:`~ctflow.solvers.inputs.prepare_measurement` does."""

    def begin(self, operator, y, prior, sigma, weights=None
              ) -> Tuple[float, Measurement, Optional[torch.Tensor]]:
        r"""Check ``sigma > 0``, the prior (image or latent) against ``operator`` and ``y``
        and the statistical ``weights`` against the batched ``y``, all before any work;
        return :math:`\sigma`, the prepared measurement and the checked weights."""
        own = type(self).__name__
        sigma = check_sigma(sigma, owner=own)
        check_prior(prior, operator, owner=own, allow_latent=True)
        meas = prepare_measurement(operator, y, owner=own, channels=prior.channels)
        return sigma, meas, check_weights(weights, meas.y, owner=own)

    def start_image(self, operator, y: torch.Tensor, sigma: float,
                    weights: Optional[torch.Tensor] = None
                    ) -> Tuple[Optional[torch.Tensor], str]:
        """The initial public image of the options' ``init`` (weighted by ``weights``, see
        :func:`~ctflow.solvers.init.initial_image`) and its label; ``(None, "none")`` when
        the options make it unused (:meth:`FlowOptions.start_unused`), so no work is spent
        on it."""
        o = self.options
        if o.start_unused() is not None:
            return None, "none"
        return initial_image(o.init, operator, y, owner=type(self).__name__,
                             cgls_iterations=o.cgls_iters, sigma=sigma, tv_weight=o.tv_weight,
                             weights=weights)


@dataclasses.dataclass(frozen=True, eq=False)
class IterativeOptions(SolverOptions):
    """Options of the iterative classical baselines.

    Attributes:
        x_init: the starting image (a floating tensor ``(B or 1, C, *domain_shape)``, not
            clipped), or ``None`` for zeros.
    """

    x_init: Optional[torch.Tensor] = None

    def check(self) -> None:
        self._set("x_init", check_x_init(self.x_init, owner=self.OWNER))


class IterativeSolver(Solver):
    """``solve`` of the iterative classical baselines: check the problem, take the start image
    (``x_init``, or ``None`` for zeros), run the subclass's ``_run(operator, y, sigma, x0)``
    → ``(x, history, extra recorded options)`` under a :class:`SolveMeter`, clip and record.

    With statistical ``weights`` ``_run`` gets the whitened problem
    :math:`(W^{1/2}A, W^{1/2}y)` (:func:`~ctflow.solvers.weights.whiten`), whose unweighted
    least squares is the weighted one; ``weights=None`` passes ``operator`` and ``y``
    unchanged."""

    Options = IterativeOptions
    #: whether ``weights`` are normalised to mean 1 (and ``sigma`` to the equivalent white
    #: noise level) first: :func:`~ctflow.solvers.weights.normalize_weights`
    normalizes_weights = False

    def solve(self, operator, y: torch.Tensor, prior=None, sigma: float = 0.0, *,
              weights: Optional[torch.Tensor] = None) -> Reconstruction:
        r"""Reconstruct from ``y = A x + noise`` (the prior is unused; ``sigma`` is the
        absolute noise standard deviation in ``y``, 0 allowed; ``weights`` the statistical
        weights :math:`w` of the data term :math:`\tfrac12\sum_i w_i(Ax - y)_i^2`, ``None``
        for all ones)."""
        o = type(self).__name__
        sigma = check_problem(operator, y, sigma, owner=o)
        weights = check_weights(weights, y, owner=o)
        x_init = self.options.x_init
        x0 = None
        if x_init is not None:
            x0, _ = initial_image(x_init, operator, y, owner=o, clip=False, name="x_init")
        if self.normalizes_weights:
            weights, sigma = normalize_weights(weights, sigma)
        self.before_run(sigma)
        operator, y = whiten(operator, y, weights)
        with SolveMeter(y.device) as meter:
            x, history, extra = self._run(operator, y, sigma, x0)
        return finish(self, x, history, meter, **extra)

    def before_run(self, sigma: float) -> None:
        """Checks that need ``sigma`` (before any work); none by default."""

    def _run(self, operator, y, sigma, x0):
        raise NotImplementedError  # pragma: no cover
