r"""PnP-Flow: plug-and-play restoration with a flow-matching denoiser.

Martin, Gagneux, Hagemann, Steidl, "PnP-Flow: Plug-and-play image restoration with
flow matching", ICLR 2025. Rectified-flow convention: :math:`t = 0` noise, :math:`t = 1` data,
:math:`x_t = t x_1 + (1 - t) x_0`. For :math:`n = 0, \dots, N-1` with
:math:`t_n = t_s + (1 - t_s)\,n/N` (:math:`t_s` = ``t_start``, 0 by default):

.. math::

    z &= x - \gamma_n \nabla F(x)                       && \text{gradient step on the data term}\\
    \tilde z^{(d)} &= t_n z + (1 - t_n)\varepsilon^{(d)},\quad \varepsilon^{(d)} \sim N(0, I)
                                                        && \text{re-noise to time } t_n\\
    x &= \frac1D \sum_{d=1}^{D} \tilde z^{(d)} + (1 - t_n)\,v(\tilde z^{(d)}, t_n)
                                                        && \text{one-step flow denoiser}

(:math:`D` = ``draws``). The denoiser :math:`D_t(z) = z + (1 - t)v(z, t)` is the flow's
estimate of :math:`E[x_1 \mid x_t = z]`.

Spaces and step size. The iteration runs in the prior's model space
:math:`x_m = a\,x + b`; the operator acts on public images, so the data term is
:math:`F(x_m) = \tfrac{1}{2\sigma^2}\|A((x_m - b)/a) - y\|^2`. As in the reference code the
step is :math:`\sigma^2`-scaled, so :math:`\sigma` cancels (and :math:`\sigma = 0` is fine):
:math:`z = x_m - \eta_n\, a^{-1} A^T(A x - y)` with

.. math::

    \eta_n = \frac{\gamma\,(1 - t_n)^{\alpha}}{\|A_m\|^2}, \qquad \|A_m\| = \|A\|/|a|,

i.e. :math:`\gamma` is relative to :math:`1/\|A_m\|^2` (the Lipschitz constant of the
:math:`\sigma^2`-scaled data gradient). This step is the same as a public-space step
:math:`x \leftarrow x - \gamma(1-t_n)^\alpha/\|A\|^2\, A^T(Ax - y)`, so it does not depend on
the prior's normalisation. :math:`\alpha = 0` gives a constant step.

Initialisation: with ``t_start = 0`` the first re-noising discards the starting image
(:math:`\tilde z = \varepsilon`), so the start only matters for ``t_start > 0``. It is an
explicit ``x_init`` image, or ``init`` as in :func:`ctflow.solvers.common.initial_image`
(clipped to [0, 1]).

Cost: :math:`N \cdot D` forward velocity evaluations, no backward ones.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch

from ..flow.integrate import CountingVelocity
from .classical import (_check_bool, _check_float, _check_int, _check_problem, _check_seed,
                        _check_x_init, _finish, _operator_norm, _progress, _rel_residual)
from .common import INIT_CHOICES, initial_image
from .result import Reconstruction, SolveMeter

__all__ = ["PnPFlow"]


# ---------------------------------------------------------------------------------------------
# helpers shared with ctflow.solvers.otode
# ---------------------------------------------------------------------------------------------
def _check_prior(owner: str, prior, operator, y: torch.Tensor):
    """Check that ``prior`` is a flow prior matching the problem; return the velocity."""
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


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _randn_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (reproducible on every device), moved to x."""
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _check_init(owner: str, init):
    """``init``: a name in ``INIT_CHOICES``, a tensor or a callable ``y -> image``."""
    if isinstance(init, str):
        if init not in INIT_CHOICES:
            raise ValueError(f"{owner}: option 'init' must be one of "
                             f"{', '.join(repr(c) for c in INIT_CHOICES)}, a tensor or a "
                             f"callable y -> image, got {init!r}")
    elif not (isinstance(init, torch.Tensor) or callable(init)):
        raise ValueError(f"{owner}: option 'init' must be one of "
                         f"{', '.join(repr(c) for c in INIT_CHOICES)}, a tensor or a callable "
                         f"y -> image, got {type(init).__name__}")
    return init


def _start_image(owner: str, operator, y: torch.Tensor, init,
                 x_init: Optional[torch.Tensor], init_iterations: int) -> torch.Tensor:
    """The public starting image in [0, 1]: ``x_init`` if given, else from ``init`` through
    :func:`ctflow.solvers.common.initial_image` (``"auto"``: FBP for CT operators, else the
    least-squares scaled :math:`A^Ty`; ``"fbp"``; ``"adjoint"``; ``"cgls"``: CGLS steps;
    ``"zeros"``: a constant mid-grey 0.5 image)."""
    start = x_init if x_init is not None else init
    if isinstance(start, torch.Tensor):
        want = (int(y.shape[1]), *operator.domain_shape)
        if tuple(start.shape[1:]) != want or start.shape[0] not in (1, y.shape[0]):
            name = "x_init" if x_init is not None else "init"
            raise ValueError(f"{owner}: option {name!r} shape mismatch: expected "
                             f"({y.shape[0]} or 1, {', '.join(map(str, want))}), "
                             f"got {tuple(start.shape)}")
    x, _ = initial_image(start, operator, y, owner=owner, cgls_iterations=init_iterations)
    return x


def _times(t: float, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(t), dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------
class PnPFlow:
    r"""PnP-Flow (Martin et al., ICLR 2025); see the module docstring for the iteration.

    Options (keyword-only):
        steps (int >= 1, default 100): :math:`N` iterations.
        gamma (float > 0, default 1.0): step size in units of :math:`1/\|A_m\|^2`.
        alpha (float >= 0, default 0.0): step schedule :math:`\gamma_n = \gamma(1-t_n)^\alpha`
            (the paper tunes :math:`\alpha \in [0, 1]` per task; 0 is a constant step, which
            keeps the final iterate closest to the data).
        draws (int >= 1, default 2): noise draws :math:`D` averaged by the denoiser.
        t_start (float in [0, 1), default 0.0): the first time :math:`t_0`.
        init ("auto" | "fbp" | "adjoint" | "cgls" | "zeros" | tensor | callable, default
            "zeros"): the starting image when ``x_init`` is None (see
            :func:`ctflow.solvers.common.initial_image`; "zeros" is mid-grey 0.5).
        init_iterations (int >= 1, default 10): CGLS iterations for ``init="cgls"``.
        x_init (tensor or None, default None): explicit public starting image (wins over
            ``init``).
        seed (int >= 0, default 0): seeds the re-noising draws.
        progress (bool, default False): show a tqdm bar.

    History per step: ``step``, ``t``, ``step_size`` (:math:`\eta_n`, model space),
    ``residual`` (:math:`\|Ax - y\|/\|y\|` of the new iterate), ``objective`` (the data term
    :math:`\tfrac{1}{2\sigma^2}\|Ax - y\|^2`, or :math:`\tfrac12\|Ax-y\|^2` when
    :math:`\sigma = 0`).
    """

    method = "pnpflow"

    def __init__(self, *, steps: int = 100, gamma: float = 1.0, alpha: float = 0.0,
                 draws: int = 2, t_start: float = 0.0, init: Any = "zeros",
                 init_iterations: int = 10, x_init: Optional[torch.Tensor] = None,
                 seed: int = 0, progress: bool = False):
        o = type(self).__name__
        self.options: Dict[str, Any] = {
            "steps": _check_int(o, "steps", steps, minimum=1),
            "gamma": _check_float(o, "gamma", gamma, minimum=0.0, min_open=True),
            "alpha": _check_float(o, "alpha", alpha, minimum=0.0),
            "draws": _check_int(o, "draws", draws, minimum=1),
            "t_start": _check_float(o, "t_start", t_start, minimum=0.0, maximum=1.0,
                                    max_open=True),
            "init": _check_init(o, init),
            "init_iterations": _check_int(o, "init_iterations", init_iterations, minimum=1),
            "x_init": _check_x_init(o, x_init),
            "seed": _check_seed(o, seed),
            "progress": _check_bool(o, "progress", progress),
        }

    def solve(self, operator, y: torch.Tensor, prior,
              noise_level: float = 0.0) -> Reconstruction:
        """Run PnP-Flow on ``y = A x + noise`` (``noise_level`` = noise std in y)."""
        o, opt = type(self).__name__, self.options
        sigma = _check_problem(o, operator, y, noise_level)
        velocity, a = _check_prior(o, prior, operator, y)
        vel = CountingVelocity(velocity)
        gen = _generator(opt["seed"])
        n_steps, draws, ts = opt["steps"], opt["draws"], opt["t_start"]
        data_scale = 1.0 / (sigma * sigma) if sigma > 0 else 1.0
        history: List[Dict[str, Any]] = []
        with SolveMeter(y.device) as meter:
            with torch.no_grad():
                x_pub = _start_image(o, operator, y, opt["init"], opt["x_init"],
                                     opt["init_iterations"])
                lip = (_operator_norm(o, operator, y) / abs(a)) ** 2  # ||A_m||^2
                x = prior.to_model(x_pub)
                ax = operator.forward(prior.from_model(x))
                for n in _progress(range(n_steps), opt["progress"], "pnp-flow"):
                    t = ts + (1.0 - ts) * n / n_steps
                    eta = opt["gamma"] * (1.0 - t) ** opt["alpha"] / lip
                    z = x - (eta / a) * operator.adjoint(ax - y)
                    acc = torch.zeros_like(z)
                    tt = _times(t, z)
                    for _ in range(draws):
                        zt = t * z + (1.0 - t) * _randn_like(z, gen)
                        acc = acc + zt + (1.0 - t) * vel(zt, tt)
                    x = acc / draws
                    ax = operator.forward(prior.from_model(x))
                    rn = float(torch.linalg.vector_norm(ax - y))
                    history.append({"step": n + 1, "t": t, "step_size": eta,
                                    "residual": _rel_residual(ax, y),
                                    "objective": 0.5 * rn * rn * data_scale})
                x_pub = prior.from_model(x)
        nfe = {"forward": vel.forward_evals, "backward": vel.backward_evals}
        return _finish(o, self.method, x_pub, history, meter, opt, nfe)
