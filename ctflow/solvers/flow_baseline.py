r"""Plumbing shared by the training-free flow baselines, PnP-Flow
(:mod:`ctflow.solvers.pnpflow`) and OT-ODE (:mod:`ctflow.solvers.otode`).

Both take the start options of :class:`StartOptions` (``init``, ``init_iterations``,
``tv_weight``, ``x_init``) besides ``seed`` and ``progress``, check the problem and the prior
in the same way before any work (:func:`begin_solve`), start from the same public image
(:func:`start_image`) and draw their noise on the CPU from one seeded generator, so that a
run is reproducible on every device.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, NamedTuple, Optional

from ctflow.operators import LinearOperator

import torch

from ctflow.solvers.init import TV_START_WEIGHT, check_start, initial_image
from ctflow.solvers.inputs import check_prior, check_problem, check_weights
from ctflow.solvers.options import SolverOptions, check_x_init
from ctflow.solvers.rng import make_generator
from ctflow.solvers.velocity import SolverVelocity
from ctflow.solvers.weights import whiten

__all__ = ["StartOptions", "FlowSolve", "begin_solve", "start_image", "times"]


@dataclasses.dataclass(frozen=True, eq=False)
class StartOptions(SolverOptions):
    """The start options of PnP-Flow and OT-ODE (and ``seed``, ``progress``).

    Attributes:
        init: the starting image when ``x_init`` is None: one of
            :data:`~ctflow.solvers.init.INIT_CHOICES`, a tensor or a callable ``y -> image``
            (see :func:`~ctflow.solvers.init.initial_image`; ``"zeros"`` is mid-grey 0.5).
        init_iterations: CGLS iterations of ``init="cgls"`` (int >= 1; refused otherwise).
        tv_weight: relative TV weight of ``init="tv"`` (>= 0; refused otherwise).
        x_init: an explicit public starting image (a tensor ``(B or 1, C, *domain)``), or
            ``None``; ``init`` is refused (has no effect) when it is given.
    """

    init: Any = "auto"
    init_iterations: int = 10
    tv_weight: float = TV_START_WEIGHT
    x_init: Optional[torch.Tensor] = None

    def check(self) -> None:
        self._set("x_init", check_x_init(self.x_init, owner=self.OWNER))
        why = self.start_unused()
        check_start(self, iterations="init_iterations", used=why is None, why=why or "")
        if why is not None:
            self.refuse_unless(False, ("x_init",), why)
        else:
            self.refuse_unless(self.x_init is None or self.is_default("init"), ("init",),
                               "when x_init is given (x_init is the start)")

    def start_unused(self) -> Optional[str]:
        """Why the start image has no effect with these options (``None``: it has one)."""
        return None


class FlowSolve(NamedTuple):
    """What a flow baseline knows once the problem has been checked (:func:`begin_solve`)."""

    #: the noise standard deviation :math:`\sigma \ge 0` of ``y``
    sigma: float
    #: the prior's normalisation scale :math:`a`
    scale: float
    #: the prior's velocity field, counting its evaluations
    velocity: SolverVelocity
    #: the seeded CPU generator of every noise draw
    generator: torch.Generator
    #: the weight of :math:`\tfrac12\|Ax - y\|^2` in the reported objective:
    #: :math:`1/\sigma^2`, or 1 when :math:`\sigma = 0`
    data_scale: float
    #: the operator of the data term: :math:`W^{1/2}A` with statistical weights, else ``A``
    operator: LinearOperator
    #: the data of the data term: :math:`W^{1/2}y` with statistical weights, else ``y``
    y: torch.Tensor
    #: the checked statistical weights (``None``: all ones)
    weights: Optional[torch.Tensor]

    @property
    def nfe(self) -> Dict[str, int]:
        """Velocity evaluations so far: ``{"forward": ..., "backward": ...}``."""
        return self.velocity.nfe


def begin_solve(owner: str, operator, y: torch.Tensor, prior, sigma: float,
                seed: int, weights: Any = None) -> FlowSolve:
    """Check the problem (:func:`~ctflow.solvers.inputs.check_problem`, ``sigma >= 0``),
    the statistical ``weights`` (:func:`~ctflow.solvers.inputs.check_weights`) and the
    image-space prior (:func:`~ctflow.solvers.inputs.check_prior`) before any work, and set
    up the counted velocity field, the seeded generator and the (whitened, with weights:
    :func:`~ctflow.solvers.weights.whiten`) data term."""
    sigma = check_problem(operator, y, sigma, owner=owner)
    weights = check_weights(weights, y, owner=owner)
    check_prior(prior, operator, owner=owner, channels=int(y.shape[1]))
    data_operator, data = whiten(operator, y, weights)
    return FlowSolve(sigma=sigma, scale=float(getattr(prior, "scale", 1.0)),
                     velocity=SolverVelocity(prior, y.device),
                     generator=make_generator(seed),
                     data_scale=1.0 / (sigma * sigma) if sigma > 0 else 1.0,
                     operator=data_operator, y=data, weights=weights)


def start_image(owner: str, operator, y: torch.Tensor, options: StartOptions,
                sigma: float, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The public starting image in [0, 1]: ``options.x_init`` if given, else from
    ``options.init`` (:func:`~ctflow.solvers.init.initial_image`; ``"cgls"`` takes
    ``options.init_iterations`` steps, ``"tv"`` the relative weight ``options.tv_weight`` at
    the noise level ``sigma``; both weighted by ``weights``). A tensor start may have batch
    size 1 or that of ``y``."""
    x_init = options.x_init
    start = x_init if x_init is not None else options.init
    x, _ = initial_image(start, operator, y, owner=owner,
                         cgls_iterations=options.init_iterations, sigma=sigma,
                         tv_weight=options.tv_weight,
                         name="x_init" if x_init is not None else "init", weights=weights)
    return x


def times(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time ``t`` for every item of the batch ``x``: shape ``(B,)``."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
