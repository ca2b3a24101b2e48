r"""Plumbing shared by the training-free flow baselines, PnP-Flow
(:mod:`ctflow.solvers.pnpflow`) and OT-ODE (:mod:`ctflow.solvers.otode`).

Both take the options ``init``, ``init_iterations``, ``x_init``, ``seed`` and ``progress``
(:func:`start_options`), check the problem and the prior in the same way before any work
(:func:`begin_solve`), start from the same public image (:func:`start_image`) and draw their
noise on the CPU from one seeded generator (:func:`randn_like`), so that a run is reproducible
on every device.
"""
from __future__ import annotations

from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch

from ctflow.flow.integrate import CountingVelocity
from ctflow.solvers.classical import _common_options
from ctflow.solvers.common import (TV_START_WEIGHT, check_float, check_init, check_int, check_problem,
                     initial_image, make_generator)

__all__ = ["FlowSolve", "begin_solve", "check_flow_prior", "randn_like", "start_image",
           "start_options", "times"]


def start_options(owner: str, *, init: Any, init_iterations: int,
                  x_init: Optional[torch.Tensor], seed: int,
                  progress: bool, tv_weight: float = TV_START_WEIGHT) -> Dict[str, Any]:
    """The checked start and run options: ``init`` (a name in
    :data:`ctflow.solvers.common.INIT_CHOICES`, a tensor or a callable ``y -> image``),
    ``init_iterations`` (int >= 1), ``tv_weight`` (float >= 0, ``init="tv"``), ``x_init``
    (None or a tensor), ``seed`` (int >= 0) and ``progress`` (bool)."""
    return {"init": check_init(init, owner=owner),
            "init_iterations": check_int("init_iterations", init_iterations, owner=owner,
                                         minimum=1),
            "tv_weight": check_float("tv_weight", tv_weight, owner=owner, minimum=0.0),
            **_common_options(owner, x_init, seed, progress)}


def check_flow_prior(owner: str, prior, operator, y: torch.Tensor
                     ) -> Tuple[Any, float]:
    """Check that ``prior`` is a flow prior matching the problem; return its velocity field
    and its normalisation scale :math:`a` (model space :math:`x_m = a x + b`)."""
    velocity = getattr(prior, "velocity", None)
    if velocity is None or not callable(velocity) or not hasattr(prior, "to_model") \
            or not hasattr(prior, "from_model"):
        raise ValueError(f"{owner}: prior must be a ctflow FlowPrior (velocity, to_model, "
                         f"from_model), got {type(prior).__name__}")
    shape = getattr(prior, "shape", None)
    need = (int(y.shape[1]), *operator.domain_shape)
    if shape is not None and tuple(shape) != tuple(need):
        raise ValueError(f"{owner}: prior image shape {tuple(shape)} (C, H, W) does not match "
                         f"the problem: y has {y.shape[1]} channel(s) and the operator domain "
                         f"is {tuple(operator.domain_shape)}")
    scale = float(getattr(prior, "scale", 1.0))
    if scale == 0.0:
        raise ValueError(f"{owner}: prior.scale must be non-zero")
    return velocity, scale


class FlowSolve(NamedTuple):
    """What a flow baseline knows once the problem has been checked (:func:`begin_solve`)."""

    #: the noise standard deviation :math:`\sigma \ge 0` of ``y``
    sigma: float
    #: the prior's normalisation scale :math:`a`
    scale: float
    #: the prior's velocity field, counting its evaluations
    velocity: CountingVelocity
    #: the seeded CPU generator of every noise draw
    generator: torch.Generator
    #: the weight of :math:`\tfrac12\|Ax - y\|^2` in the reported objective:
    #: :math:`1/\sigma^2`, or 1 when :math:`\sigma = 0`
    data_scale: float

    @property
    def nfe(self) -> Dict[str, int]:
        """Velocity evaluations so far: ``{"forward": ..., "backward": ...}``."""
        return {"forward": self.velocity.forward_evals,
                "backward": self.velocity.backward_evals}


def begin_solve(owner: str, operator, y: torch.Tensor, prior, noise_level: float,
                seed: int) -> FlowSolve:
    """Check the problem (:func:`ctflow.solvers.common.check_problem`) and the prior
    (:func:`check_flow_prior`) before any work, and set up the counted velocity field and the
    seeded generator."""
    sigma = check_problem(operator, y, noise_level, owner=owner)
    velocity, scale = check_flow_prior(owner, prior, operator, y)
    return FlowSolve(sigma=sigma, scale=scale, velocity=CountingVelocity(velocity),
                     generator=make_generator(seed),
                     data_scale=1.0 / (sigma * sigma) if sigma > 0 else 1.0)


def randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (reproducible on every device), moved to x."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def start_image(owner: str, operator, y: torch.Tensor, options: Dict[str, Any],
                noise_level: float) -> torch.Tensor:
    """The public starting image in [0, 1]: ``options["x_init"]`` if given, else from
    ``options["init"]`` through :func:`ctflow.solvers.common.initial_image` (``"auto"``: FBP
    for CT operators, else the least-squares scaled :math:`A^Ty`; ``"fbp"``; ``"adjoint"``;
    ``"cgls"``: ``options["init_iterations"]`` CGLS steps; ``"tv"``: TV with relative weight
    ``options["tv_weight"]`` at ``noise_level``; ``"zeros"``: a constant mid-grey
    0.5 image). A tensor start may have batch size 1 or that of ``y``."""
    x_init = options["x_init"]
    start = x_init if x_init is not None else options["init"]
    if isinstance(start, torch.Tensor):
        want = (int(y.shape[1]), *operator.domain_shape)
        if tuple(start.shape[1:]) != want or start.shape[0] not in (1, y.shape[0]):
            name = "x_init" if x_init is not None else "init"
            raise ValueError(f"{owner}: option {name} shape mismatch: expected "
                             f"({y.shape[0]} or 1, {', '.join(map(str, want))}), "
                             f"got {tuple(start.shape)}")
    x, _ = initial_image(start, operator, y, owner=owner,
                         cgls_iterations=options["init_iterations"],
                         noise_level=noise_level, tv_weight=options["tv_weight"])
    return x


def times(t: float, x: torch.Tensor) -> torch.Tensor:
    """The time ``t`` for every item of the batch ``x``: shape ``(B,)``."""
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)
