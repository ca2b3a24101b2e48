r"""The one way every solver builds its initial image, and the blend start of D-Flow / MS-Flow.

* :func:`initial_image`: the public start image from ``init`` -- FBP, a least-squares scaled
  :math:`A^Ty`, a few CGLS steps, the TV reconstruction, a mid-grey image, a tensor or a
  callable ``y -> image`` (the classical baselines' ``x_init`` goes through it too);
* :func:`check_start`: the checks of the start options (``init``, the CGLS steps of
  ``init="cgls"``, ``tv_weight``), refusing the ones that have no effect;
* :func:`blend_init`: :math:`s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,
  \varepsilon` in the prior's model space.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Tuple

import torch

from ctflow.flow.integrate import integrate
from ctflow.solvers.linalg import broadcast_items, conjugate_gradient, per_item_dot, per_item_sq
from ctflow.solvers.options import SolverOptions, check_choice, check_int, check_positive
from ctflow.solvers.pdhg import pdhg_tv
from ctflow.solvers.rng import randn
from ctflow.solvers.weights import normalize_weights, whiten

__all__ = ["INIT_CHOICES", "TV_START_WEIGHT", "check_init", "check_start", "initial_image",
           "fbp_initialiser", "blend_init"]

#: Named initial images (``init`` may also be a tensor or a callable ``y -> image``).
INIT_CHOICES = ("auto", "fbp", "adjoint", "cgls", "tv", "zeros")

#: Default relative TV weight of ``init="tv"`` (the start every flow solver can take),
#: tuned on the restoration validation slices (``benchmarks/configs/restoration.json``).
TV_START_WEIGHT = 0.1


def check_init(init: Any, *, owner: str) -> Any:
    """``init``: one of :data:`INIT_CHOICES`, a tensor or a callable ``y -> image``."""
    if isinstance(init, torch.Tensor) or (callable(init) and not isinstance(init, str)):
        return init
    if not isinstance(init, str) or init not in INIT_CHOICES:
        raise ValueError(f"{owner}: option init must be one of "
                         f"{', '.join(map(repr, INIT_CHOICES))}, a tensor or a callable "
                         f"y -> image, got {init!r}")
    return init


def _named(init: Any, name: str) -> bool:
    return isinstance(init, str) and init == name


def check_start(opts: SolverOptions, *, iterations: str, used: bool = True,
                why: str = "") -> None:
    """Check the start options of ``opts`` in place: ``init`` (:func:`check_init`), the CGLS
    steps of ``init="cgls"`` (the field called ``iterations``, an int >= 1) and ``tv_weight``
    (>= 0, ``init="tv"``). The CGLS steps and ``tv_weight`` are refused unless ``init``
    names them; all three are refused when the start image is not ``used`` (``why`` says
    why)."""
    own = opts.OWNER
    check_init(opts.init, owner=own)
    opts._set(iterations, check_int(iterations, getattr(opts, iterations), owner=own))
    opts._set("tv_weight", check_positive("tv_weight", opts.tv_weight, owner=own,
                                          allow_zero=True))
    opts.refuse_unless(used, ("init", iterations, "tv_weight"), why)
    opts.refuse_unless(_named(opts.init, "cgls"), (iterations,), "unless init='cgls'")
    opts.refuse_unless(_named(opts.init, "tv"), ("tv_weight",), "unless init='tv'")


def fbp_initialiser(operator) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """An FBP callable ``y -> image`` for CT operators (those with a ``.geometry``), else ``None``.

    Imports ``ctflow.operators.ct.FBP`` lazily, so the solvers stay on the operator interface.
    """
    geometry = getattr(operator, "geometry", None)
    if geometry is None:
        return None
    try:
        from ctflow.operators.ct import FBP  # type: ignore[attr-defined]
    except ImportError:
        return None
    try:
        fbp = FBP(geometry)
    except TypeError:
        fbp = FBP(geometry=geometry)
    return fbp


def _scaled_adjoint(operator, y: torch.Tensor) -> torch.Tensor:
    r""":math:`c\,A^Ty` with :math:`c = \langle AA^Ty, y\rangle / \|AA^Ty\|^2` per item (the
    least-squares optimal scaling of the back-projection)."""
    aty = operator.adjoint(y)
    aaty = operator.forward(aty)
    c = per_item_dot(aaty, y) / per_item_sq(aaty).clamp_min(torch.finfo(y.dtype).tiny)
    return broadcast_items(c, aty) * aty


def _named_image(init: str, operator, y: torch.Tensor, *, owner: str, cgls_iterations: int,
                 sigma: Optional[float], tv_weight: float,
                 weights: Optional[torch.Tensor]) -> Tuple[torch.Tensor, str]:
    check_choice("init", init, INIT_CHOICES, owner=owner)
    if init in ("auto", "fbp"):
        fbp = fbp_initialiser(operator)
        if fbp is None and init == "fbp":
            raise ValueError(f"{owner}: init='fbp' needs a CT operator with a .geometry "
                             f"(and ctflow.operators.ct.FBP); use init='adjoint', "
                             f"'cgls', a tensor or a callable y -> image instead")
        if fbp is not None:
            return fbp(y), "fbp"        # FBP is unweighted
    weights, sigma = normalize_weights(weights, sigma)   # for TV (the others: invariant)
    operator, y = whiten(operator, y, weights)
    if init in ("auto", "fbp", "adjoint"):      # "auto" without a CT geometry
        return _scaled_adjoint(operator, y), "adjoint"
    if init == "cgls":      # CG steps on the normal equations from zero (per item)
        return conjugate_gradient(operator.normal, operator.adjoint(y), None,
                                  iterations=cgls_iterations), init
    if init == "tv":
        if sigma is None or not sigma > 0:
            raise ValueError(f"{owner}: init='tv' needs the noise level sigma > 0 (its TV "
                             f"weight tv_weight is relative to sigma), got {sigma!r}")
        sigma = float(sigma)                 # relative weight: lambda = w * sigma
        x, _ = pdhg_tv(operator, y, weight=tv_weight * sigma, tol=1e-6, scale=sigma * sigma)
        return x, init
    return torch.full((y.shape[0], y.shape[1], *operator.domain_shape), 0.5,
                      dtype=y.dtype, device=y.device), init


def initial_image(init: Any, operator, y: torch.Tensor, *, owner: str,
                  cgls_iterations: int = 10, sigma: Optional[float] = None,
                  tv_weight: float = TV_START_WEIGHT, clip: bool = True,
                  name: str = "init",
                  weights: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, str]:
    """The initial public image (clipped to ``[0, 1]`` with ``clip``) and a label for it.

    ``init``: ``"auto"`` (FBP for CT operators with a ``.geometry``, else ``"adjoint"``),
    ``"fbp"``, ``"adjoint"`` (least-squares scaled :math:`A^Ty`), ``"cgls"``
    (``cgls_iterations`` CG steps on the normal equations), ``"tv"`` (the TV reconstruction
    :func:`~ctflow.solvers.pdhg.pdhg_tv` with relative weight ``tv_weight`` at the noise level
    ``sigma > 0``: fills what the data leave open -- masked pixels, lost resolution -- with
    a piecewise-constant guess, where the adjoint and CGLS leave zeros), ``"zeros"`` (a
    mid-grey 0.5 image), a tensor ``(B or 1, C, *domain_shape)`` (or ``(C, *domain_shape)``
    for one item), or a callable ``y -> image``. ``name`` is the option named in errors.

    ``weights`` (checked statistical weights, :mod:`ctflow.solvers.weights`, or ``None``)
    weight the data term of ``"adjoint"``, ``"cgls"`` and ``"tv"`` (they run on the whitened
    :math:`W^{1/2}A, W^{1/2}y`); FBP and a callable see the unweighted ``y``.
    """
    what = "init image" if name == "init" else f"option {name}"
    with torch.no_grad():
        if isinstance(init, torch.Tensor):
            x, label = init.detach().to(dtype=y.dtype, device=y.device), "tensor"
        elif callable(init) and not isinstance(init, str):
            x = init(y)
            label = getattr(init, "__name__", type(init).__name__)
        else:
            x, label = _named_image(init, operator, y, owner=owner,
                                    cgls_iterations=cgls_iterations, sigma=sigma,
                                    tv_weight=tv_weight, weights=weights)
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{owner}: init must produce a torch.Tensor, got {type(x).__name__}")
        x = x.to(dtype=y.dtype, device=y.device)
        want = (y.shape[0], y.shape[1], *operator.domain_shape)
        if x.ndim == len(want) - 1 and y.shape[0] == 1:
            x = x.unsqueeze(0)
        if (tuple(x.shape) != want and x.ndim == len(want) and x.shape[0] == 1
                and tuple(x.shape[1:]) == tuple(want[1:])):
            x = x.expand(want)
        if tuple(x.shape) != want:
            raise ValueError(f"{owner}: {what} shape mismatch: expected {want}, got "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{owner}: {what} contains NaN or inf")
        return (x.clamp(0.0, 1.0) if clip else x), label


def blend_init(velocity: Callable, prior, x_init: Optional[torch.Tensor], *, alpha: float,
               steps: int, method: str, generator: torch.Generator,
               like: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The blend initialisation of D-Flow / MS-Flow in model space:

    .. math:: s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,\varepsilon,
              \qquad \varepsilon \sim N(0, I),

    where :math:`\Psi^{-1}` integrates the ODE backward from :math:`t=1` to :math:`t=0` with
    ``steps`` steps of ``method`` (no gradients), starting at ``prior.to_model(x_init)``.
    ``alpha = 0`` is pure noise (and skips the backward ODE; ``x_init`` may then be ``None``
    with ``like``, a tensor of the image batch's shape, dtype and device). For a latent prior
    the states are latents (``prior.latent_shape``) and ``prior.to_model`` is its encoder.
    """
    ref = x_init if x_init is not None else like
    shape = tuple(ref.shape)
    if getattr(prior, "is_latent", False):
        shape = (ref.shape[0], *prior.latent_shape)
    eps = randn(shape, generator, ref)
    if alpha <= 0:
        return eps
    with torch.no_grad():
        z = integrate(velocity, prior.to_model(x_init), 1.0, 0.0, steps, method, grad=False)
    return math.sqrt(alpha) * z + math.sqrt(1.0 - alpha) * eps
