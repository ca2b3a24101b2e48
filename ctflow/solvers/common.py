r"""Plumbing shared by the flow-prior solvers (MS-Flow, D-Flow and the dispatcher).

* option validation (:func:`check_options`, :func:`check_choice`, :func:`check_positive`, ...),
  every error a :class:`ValueError` that names the option and the allowed values;
* input checks (:func:`prepare_measurement`, :func:`check_noise_level`, :func:`check_prior`):
  ``y`` of the wrong shape or with NaN/inf is refused before any work;
* the model-space form of a linear operator (:class:`ModelSpaceProblem`): with the prior's
  normalisation :math:`s = a x + b` (``scale`` :math:`a`, ``shift`` :math:`b`), the data misfit of
  a public image :math:`x = (s - b)/a` is

  .. math:: A x - y = \tfrac1a A s - \big(y + \tfrac ba A\mathbf 1\big) = A_m s - y_m,

  so the solvers work with the linear operator :math:`A_m = A/a` and the shifted data
  :math:`y_m` (exact for any linear :math:`A`); a penalty :math:`\tfrac\rho2\|s-p\|^2` equals
  :math:`\tfrac{\rho a^2}2\|x - x_p\|^2` in public units;
* the radial Gaussian prior :math:`R(s) = \tfrac12\|s\|^2 - (n-1)\log\|s\|` (the negative
  log-density of the norm of an :math:`n`-dimensional standard normal, :func:`radial_prior`)
  and its proximal map in closed form (:func:`radial_prox`);
* blend initialisation :math:`s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,
  \varepsilon` (:func:`blend_init`) with :math:`x_\text{init}` from FBP, a least-squares scaled
  :math:`A^Ty`, a few CGLS steps, a tensor or a callable (:func:`initial_image`);
* batched conjugate gradients (one independent CG per batch item, :func:`conjugate_gradient`)
  and the data step :math:`(A_m^TA_m/\sigma^2 + \rho I)s = A_m^Ty_m/\sigma^2 + \rho p`
  (:func:`data_step`), in closed form when the operator's ``solve_shifted_normal`` hook
  provides one.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple, Union

import torch

from ctflow.flow.integrate import CountingVelocity, integrate

#: Default relative TV weight of ``init="tv"`` (the start every flow solver can take),
#: tuned on the restoration validation slices (``benchmarks/configs/restoration.json``).
TV_START_WEIGHT = 0.1

__all__ = [
    "check_options", "check_choice", "check_positive", "check_int", "check_probability",
    "check_float", "check_bool", "check_seed", "check_init", "check_x_init", "check_problem",
    "check_noise_level", "check_prior", "prepare_measurement", "Measurement",
    "ModelSpaceProblem", "FlowSolverBase", "radial_prior", "radial_prox", "per_item_norm",
    "per_item_sq",
    "conjugate_gradient", "data_step", "initial_image", "fbp_initialiser", "blend_init",
    "SolverVelocity", "make_generator", "progress_bar", "INIT_CHOICES", "merge_flow_options",
    "make_problem",
]

#: Named initial images (``init`` may also be a tensor or a callable ``y -> image``).
INIT_CHOICES = ("auto", "fbp", "adjoint", "cgls", "tv", "zeros")


# ---------------------------------------------------------------------------------------------
# option validation
# ---------------------------------------------------------------------------------------------
def check_options(given: Mapping[str, Any], allowed: Iterable[str], *, owner: str) -> None:
    """Refuse option names that ``owner`` does not know (``ValueError`` listing the known ones)."""
    allowed = sorted(allowed)
    bad = sorted(k for k in given if k not in allowed)
    if bad:
        raise ValueError(f"{owner}: unknown option(s) {', '.join(map(repr, bad))}; allowed "
                         f"options are {', '.join(allowed)}")


def merge_flow_options(given: Mapping[str, Any], defaults: Mapping[str, Any], *,
                       owner: str) -> Dict[str, Any]:
    """Defaults plus ``given`` for a flow solver, with the checks MS-Flow and D-Flow share:
    unknown names refused; ``integrator`` folded into ``method`` (``reconstruct`` uses
    ``method`` for the solver name); ``init`` a tensor, a callable or one of
    :data:`INIT_CHOICES`; ``cgls_iters`` (int >= 1), ``tv_weight`` (>= 0), ``seed``,
    ``progress``."""
    check_options(given, defaults, owner=owner)
    o = dict(defaults)
    o.update(given)
    if o["integrator"] is not None:
        if "method" in given and given["method"] != o["integrator"]:
            raise ValueError(f"{owner}: options method={given['method']!r} and "
                             f"integrator={o['integrator']!r} disagree; give one of them")
        o["method"] = o["integrator"]
    o["integrator"] = None
    check_init(o["init"], owner=owner)
    o["cgls_iters"] = check_int("cgls_iters", o["cgls_iters"], owner=owner)
    o["tv_weight"] = check_positive("tv_weight", o["tv_weight"], owner=owner, allow_zero=True)
    o["seed"] = check_seed(o["seed"], owner=owner)
    o["progress"] = check_bool("progress", o["progress"], owner=owner)
    return o


def check_choice(name: str, value: Any, choices: Sequence[Any], *, owner: str) -> Any:
    """``value`` must be one of the strings ``choices`` (the message lists them)."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{owner}: option {name} must be one of "
                         f"{', '.join(map(repr, choices))}, got {value!r}")
    return value


def _is_number(v: Any) -> bool:
    """A real number (Python or NumPy), not a ``bool``."""
    import numbers
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _range_text(minimum: Optional[float], maximum: Optional[float], min_open: bool,
                max_open: bool) -> str:
    if minimum is None and maximum is None:
        return ""
    if maximum is None:
        return f" {'>' if min_open else '>='} {minimum:g}"
    if minimum is None:
        return f" {'<' if max_open else '<='} {maximum:g}"
    return f" in {'(' if min_open else '['}{minimum:g}, {maximum:g}{')' if max_open else ']'}"


def check_float(name: str, value: Any, *, owner: str, minimum: Optional[float] = None,
                maximum: Optional[float] = None, min_open: bool = False,
                max_open: bool = False) -> float:
    """A finite real number with ``minimum <= value <= maximum`` (``min_open`` / ``max_open``
    make a bound strict; a bound of ``None`` is no bound). Returns it as a ``float``."""
    ok = _is_number(value) and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = float(value) > minimum if min_open else float(value) >= minimum
    if ok and maximum is not None:
        ok = float(value) < maximum if max_open else float(value) <= maximum
    if not ok:
        raise ValueError(f"{owner}: option {name} must be a finite number"
                         f"{_range_text(minimum, maximum, min_open, max_open)}, got {value!r}")
    return float(value)


def check_positive(name: str, value: Any, *, owner: str, allow_zero: bool = False) -> float:
    """A finite real number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    return check_float(name, value, owner=owner, minimum=0.0, min_open=not allow_zero)


def check_probability(name: str, value: Any, *, owner: str, open_low: bool = False) -> float:
    """A number in ``[0, 1]`` (``(0, 1]`` with ``open_low``)."""
    return check_float(name, value, owner=owner, minimum=0.0, maximum=1.0, min_open=open_low)


def check_int(name: str, value: Any, *, owner: str, minimum: int = 1,
              maximum: Optional[int] = None) -> int:
    """An integer (Python or NumPy; ``bool`` refused) with ``minimum <= value`` and, when
    ``maximum`` is given, ``value <= maximum``."""
    import numbers
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and \
        minimum <= int(value) and (maximum is None or int(value) <= maximum)
    if not ok:
        rng = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{owner}: option {name} must be an integer {rng}, got {value!r}")
    return int(value)


def check_bool(name: str, value: Any, *, owner: str) -> bool:
    """``True`` or ``False`` (other truthy values such as ``1`` or ``"yes"`` are refused)."""
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: option {name} must be True or False, got {value!r}")
    return value


def check_seed(value: Any, *, owner: str, name: str = "seed") -> int:
    """A random seed: an integer in :math:`[0, 2^{63} - 1]` (what a torch generator takes)."""
    return check_int(name, value, owner=owner, minimum=0, maximum=2 ** 63 - 1)


def check_noise_level(noise_level: Any, *, owner: str, allow_zero: bool = False) -> float:
    """The noise standard deviation :math:`\\sigma` of ``y``: a finite number ``> 0``
    (``>= 0`` with ``allow_zero``: the classical baselines accept noise-free data)."""
    if isinstance(noise_level, torch.Tensor) and noise_level.numel() == 1:
        noise_level = float(noise_level)
    ok = _is_number(noise_level) and math.isfinite(float(noise_level)) and (
        float(noise_level) >= 0 if allow_zero else float(noise_level) > 0)
    if not ok:
        raise ValueError(f"{owner}: noise_level must be a finite number "
                         f"{'>=' if allow_zero else '>'} 0 (the standard deviation of the "
                         f"noise in y), got {noise_level!r}")
    return float(noise_level)


def check_init(init: Any, *, owner: str) -> Any:
    """``init``: one of :data:`INIT_CHOICES`, a tensor or a callable ``y -> image``."""
    if isinstance(init, torch.Tensor) or (callable(init) and not isinstance(init, str)):
        return init
    if not isinstance(init, str) or init not in INIT_CHOICES:
        raise ValueError(f"{owner}: option init must be one of "
                         f"{', '.join(map(repr, INIT_CHOICES))}, a tensor or a callable "
                         f"y -> image, got {init!r}")
    return init


def check_x_init(value: Any, *, owner: str) -> Optional[torch.Tensor]:
    """``x_init``: ``None`` or a floating tensor (its shape is checked against the problem when
    the solver runs)."""
    if value is not None and not (isinstance(value, torch.Tensor)
                                  and value.is_floating_point()):
        raise ValueError(f"{owner}: option x_init must be None or a floating torch.Tensor "
                         f"of shape (B, C, *operator.domain_shape), got {type(value).__name__}")
    return value


def check_problem(operator, y: Any, noise_level: Any, *, owner: str) -> float:
    """Check a problem in the strict batched layout before any work: ``operator`` a
    ``LinearOperator``, ``y`` a finite floating tensor ``(B, C, *operator.range_shape)`` and
    ``noise_level`` a finite number ``>= 0``; returns ``noise_level`` as a float. (The flow
    solvers accept more layouts of ``y``: :func:`prepare_measurement`.)"""
    if not (hasattr(operator, "forward") and hasattr(operator, "adjoint")
            and hasattr(operator, "domain_shape") and hasattr(operator, "range_shape")):
        raise ValueError(f"{owner}: operator must be a ctflow LinearOperator, "
                         f"got {type(operator).__name__}")
    rs = tuple(operator.range_shape)
    expected = "(B, C, " + ", ".join(str(s) for s in rs) + ")"
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{owner}: y must be a torch.Tensor of shape {expected}, "
                         f"got {type(y).__name__}")
    if y.ndim != 2 + len(rs) or tuple(y.shape[2:]) != rs:
        raise ValueError(f"{owner}: y shape mismatch: expected {expected} "
                         f"(operator range {rs}), got {tuple(y.shape)}")
    if not y.is_floating_point():
        raise ValueError(f"{owner}: y must be float32 or float64, got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{owner}: y contains NaN or infinite values")
    return check_noise_level(noise_level, owner=owner, allow_zero=True)


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
class Measurement:
    """``y`` as a batched ``(B, C, *range_shape)`` tensor plus how to restore the caller's layout.

    Layouts accepted: ``(B, C, *range)``, ``(C, *range)`` with ``C`` the prior's channels, and
    the bare ``range`` shape (for one channel). ``restore(image)`` returns the image in the
    matching layout: ``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``.
    """

    def __init__(self, y: torch.Tensor, added_dims: int):
        self.y = y
        self.added_dims = added_dims

    def restore(self, image: torch.Tensor) -> torch.Tensor:
        for _ in range(self.added_dims):
            image = image.squeeze(0)
        return image


def prepare_measurement(operator, y: Any, *, owner: str, channels: Optional[int] = None
                        ) -> Measurement:
    """Check ``y`` against ``operator.range_shape`` and return it batched; refuse NaN/inf.

    Raises ``ValueError`` naming the expected and given shapes (before any work is done).
    """
    if not isinstance(y, torch.Tensor):
        raise ValueError(f"{owner}: y must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise ValueError(f"{owner}: y must have a floating dtype (float32 or float64), "
                         f"got {y.dtype}")
    rng = tuple(operator.range_shape)
    r = len(rng)
    if r == 0 or y.ndim not in (r, r + 1, r + 2) or tuple(y.shape[y.ndim - r:]) != rng:
        raise ValueError(f"{owner}: y shape mismatch: the operator's range shape is {rng}, so y "
                         f"must have shape (B, C, {', '.join(map(str, rng))}), "
                         f"(C, {', '.join(map(str, rng))}) or {rng}; got {tuple(y.shape)}")
    added = r + 2 - y.ndim
    yb = y.reshape((1,) * added + tuple(y.shape))
    if channels is not None and yb.shape[1] != channels:
        raise ValueError(f"{owner}: y has {yb.shape[1]} channel(s) but the prior models "
                         f"{channels}; expected shape (B, {channels}, "
                         f"{', '.join(map(str, rng))}), got {tuple(y.shape)}")
    if yb.shape[0] == 0:
        raise ValueError(f"{owner}: y has an empty batch, shape {tuple(y.shape)}")
    if not bool(torch.isfinite(yb).all()):
        raise ValueError(f"{owner}: y contains NaN or inf values; clean the measurement first")
    return Measurement(yb, added)


class FlowSolverBase:
    """Shared front of the trajectory solvers (MS-Flow, D-Flow): options checked once by the
    subclass's ``validate`` classmethod at construction, ``solver(operator, y, prior,
    noise_level, options=None)`` as ``solve`` with ``options`` overriding, and the checks every
    solve starts with (:meth:`begin`)."""

    #: the public name of the method (``reconstruct(method=...)``)
    name = ""

    def __init__(self, **options: Any):
        self.options = self.validate(options)

    @classmethod
    def validate(cls, options: Dict[str, Any]) -> Dict[str, Any]:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, operator, y, prior, noise_level, options: Optional[Dict[str, Any]] = None):
        if options:
            return type(self)(**{**self.options, **options}).solve(operator, y, prior,
                                                                    noise_level)
        return self.solve(operator, y, prior, noise_level)

    def solve(self, operator, y, prior, noise_level):  # pragma: no cover
        raise NotImplementedError

    def begin(self, operator, y, prior, noise_level) -> Tuple[float, "Measurement"]:
        r"""Check ``noise_level``, the prior (flat or latent) against ``operator`` and ``y``, all
        before any work; return :math:`\sigma` and the prepared measurement."""
        own = type(self).__name__
        sigma = check_noise_level(noise_level, owner=own)
        check_prior(prior, operator, owner=own, allow_latent=True)
        return sigma, prepare_measurement(operator, y, owner=own, channels=prior.channels)


def check_prior(prior, operator, *, owner: str, allow_latent: bool = False) -> None:
    """The prior's image shape ``(C, S, S)`` must match ``operator.domain_shape``.

    Latent priors (``prior.is_latent``, :mod:`ctflow.priors.latent`) are refused unless the
    solver supports them (``allow_latent``: MS-Flow and D-Flow)."""
    if getattr(prior, "is_latent", False) and not allow_latent:
        raise ValueError(f"{owner}: prior {getattr(prior, 'name', '')!r} is a latent prior "
                         f"(velocity in a latent space, images through a decoder); only the "
                         f"'msflow' and 'dflow' methods support latent priors")
    for attr in ("velocity", "image_size", "channels", "to_model", "from_model"):
        if not hasattr(prior, attr):
            raise ValueError(f"{owner}: prior must be a FlowPrior (velocity, image_size, "
                             f"channels, to_model, from_model); got {type(prior).__name__} "
                             f"without {attr!r}")
    dom = tuple(operator.domain_shape)
    want = (prior.image_size,) * 2
    if dom != want:
        raise ValueError(f"{owner}: the prior models {prior.image_size}x{prior.image_size} "
                         f"images but the operator's domain shape is {dom}; use a prior and an "
                         f"operator of the same image size")


# ---------------------------------------------------------------------------------------------
# small tensor helpers
# ---------------------------------------------------------------------------------------------
def per_item_sq(x: torch.Tensor) -> torch.Tensor:
    """:math:`\\|x_i\\|^2` per batch item, shape ``(B,)``."""
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


def per_item_norm(x: torch.Tensor) -> torch.Tensor:
    return per_item_sq(x).sqrt()


def per_item_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).reshape(a.shape[0], -1).sum(1)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def radial_prior(s: torch.Tensor) -> torch.Tensor:
    r"""Radial Gaussian prior per batch item, :math:`R(s) = \tfrac12\|s\|^2 - (n-1)\log\|s\|`.

    :math:`n` is the dimension of one item. Up to a constant this is the negative log-density
    of :math:`\|s\|` for :math:`s \sim N(0, I_n)` (a :math:`\chi_n` distribution): it keeps the
    noise state on the typical shell :math:`\|s\| \approx \sqrt{n-1}` without pulling it to zero.
    Returns shape ``(B,)``.
    """
    n = s[0].numel()
    sq = per_item_sq(s)
    return 0.5 * sq - 0.5 * (n - 1) * torch.log(sq.clamp_min(torch.finfo(s.dtype).tiny))


def radial_prox(z: torch.Tensor, lam: Union[float, torch.Tensor],
                rho: Union[float, torch.Tensor]) -> torch.Tensor:
    r"""Closed-form :math:`\arg\min_s \lambda R(s) + \tfrac\rho2\|s - z\|^2` per batch item.

    The minimiser points along :math:`z` (the cross term is the only one that sees the
    direction); its radius :math:`r > 0` is the positive root of
    :math:`(\lambda+\rho) r^2 - \rho\|z\| r - \lambda(n-1) = 0`:

    .. math:: r = \frac{\rho\|z\| + \sqrt{\rho^2\|z\|^2 + 4(\lambda+\rho)\lambda(n-1)}}
                        {2(\lambda+\rho)}.

    ``lam`` and ``rho`` are numbers or ``(B,)`` tensors. ``lam = 0`` returns ``z``.
    """
    n = z[0].numel()
    lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
    rho = torch.as_tensor(rho, dtype=z.dtype, device=z.device)
    nz = per_item_norm(z)
    disc = (rho * nz) ** 2 + 4.0 * (lam + rho) * lam * (n - 1)
    r = (rho * nz + torch.sqrt(disc)) / (2.0 * (lam + rho))
    tiny = torch.finfo(z.dtype).tiny
    direction = z / _bcast(nz.clamp_min(tiny), z)
    # z == 0: every direction is optimal; keep a deterministic one (the first axis)
    if bool((nz <= tiny).any()):
        e = torch.zeros_like(z).reshape(z.shape[0], -1)
        e[:, 0] = 1.0
        direction = torch.where(_bcast(nz <= tiny, z), e.reshape(z.shape), direction)
    return _bcast(r, z) * direction


# ---------------------------------------------------------------------------------------------
# model space, conjugate gradients, data step
# ---------------------------------------------------------------------------------------------
class ModelSpaceProblem:
    r"""The data term in the prior's model space.

    With the prior's normalisation :math:`s = a x + b`: :math:`A x - y = A_m s - y_m`,
    :math:`A_m = A/a`, :math:`y_m = y + (b/a)\,A\mathbf 1`. ``data(s)`` is
    :math:`\tfrac{1}{2\sigma^2}\|A_m s - y_m\|^2` per item; ``grad_data(s)`` its gradient.
    """

    def __init__(self, operator, y: torch.Tensor, scale: float, shift: float, sigma: float):
        self.operator = operator
        self.scale, self.shift, self.sigma = float(scale), float(shift), float(sigma)
        self.A = operator if self.scale == 1.0 else operator * (1.0 / self.scale)
        self.y = y
        if self.shift != 0.0:
            ones = torch.ones((1, y.shape[1], *operator.domain_shape), dtype=y.dtype,
                              device=y.device)
            with torch.no_grad():
                self.y_m = y + (self.shift / self.scale) * operator.forward(ones)
        else:
            self.y_m = y
        self.y_norm = float(y.norm())

    def residual(self, s: torch.Tensor) -> torch.Tensor:
        """:math:`A_m s - y_m` (= :math:`A x - y` for the public image :math:`x`)."""
        return self.A.forward(s) - self.y_m

    def data(self, s: torch.Tensor) -> torch.Tensor:
        return per_item_sq(self.residual(s)) / (2.0 * self.sigma ** 2)

    def relative_residual(self, s: torch.Tensor) -> float:
        """:math:`\\|A x - y\\| / \\|y\\|` over the whole batch."""
        return float(self.residual(s).norm()) / max(self.y_norm, 1e-300)

    def normal_rhs(self) -> torch.Tensor:
        return self.A.adjoint(self.y_m)


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       x0: Optional[torch.Tensor] = None, *, iterations: int = 10,
                       tol: float = 0.0) -> torch.Tensor:
    r"""Solve :math:`H x = b` for a symmetric positive (semi)definite ``apply`` by CG.

    One independent CG per batch item (per-item step sizes), so items never mix. Warm start
    ``x0``. CG decreases the energy :math:`\tfrac12 x^THx - b^Tx` monotonically from ``x0``,
    so a warm-started data step never increases its block objective. Stops early per item when
    :math:`\|r\| \le \text{tol}\,\|b\|`.
    """
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rr = per_item_sq(r)
    stop = per_item_norm(b) * tol
    for _ in range(int(iterations)):
        active = rr.sqrt() > stop
        if not bool(active.any()):
            break
        hp = apply(p)
        php = per_item_dot(p, hp)
        ok = active & (php > 0)
        alpha = torch.where(ok, rr / torch.where(ok, php, torch.ones_like(php)),
                            torch.zeros_like(rr))
        x = x + _bcast(alpha, x) * p
        r = r - _bcast(alpha, r) * hp
        rr_new = per_item_sq(r)
        beta = torch.where(ok, rr_new / torch.where(rr > 0, rr, torch.ones_like(rr)),
                           torch.zeros_like(rr))
        p = r + _bcast(beta, p) * p
        rr = torch.where(ok, rr_new, rr)
    return x


def make_problem(operator, y: torch.Tensor, prior, sigma: float):
    """The data term the flow solvers use: :class:`ModelSpaceProblem` for image-space priors,
    :class:`ctflow.solvers.latent.LatentDataProblem` (data seen through the decoder) for
    latent priors."""
    if getattr(prior, "is_latent", False):
        from ctflow.solvers.latent import LatentDataProblem
        return LatentDataProblem(operator, y, prior, sigma)
    return ModelSpaceProblem(operator, y, prior.scale, prior.shift, sigma)


def data_step(problem: ModelSpaceProblem, p: torch.Tensor, rho: float, x0: torch.Tensor, *,
              cg_iterations: int = 10, cg_tol: float = 1e-6) -> Tuple[torch.Tensor, str]:
    r"""The exact minimiser (or ``cg_iterations`` warm-started CG steps) of
    :math:`\tfrac1{2\sigma^2}\|A_m s - y_m\|^2 + \tfrac\rho2\|s - p\|^2`:

    .. math:: (A_m^TA_m + \rho\sigma^2 I)\, s = A_m^T y_m + \rho\sigma^2 p.

    Uses ``operator.solve_shifted_normal`` when it returns a closed form (masks, identity,
    circular blur), else CG started at ``x0``. Returns ``(s, "closed-form" | "cg")``.

    A problem with its own ``solve_data_step`` (latent priors,
    :class:`ctflow.solvers.latent.LatentDataProblem`: ``cg_iterations`` gradient steps through
    the decoder) solves the block itself.
    """
    own_solver = getattr(problem, "solve_data_step", None)
    if own_solver is not None:
        return own_solver(p, rho, x0, iterations=cg_iterations, tol=cg_tol)
    shift = float(rho) * problem.sigma ** 2
    b = problem.normal_rhs() + shift * p
    if shift > 0:
        sol = problem.A.solve_shifted_normal(b, shift)
        if sol is not None:
            return sol, "closed-form"

    def apply(v):
        return problem.A.adjoint(problem.A.forward(v)) + shift * v

    return conjugate_gradient(apply, b, x0, iterations=cg_iterations, tol=cg_tol), "cg"


# ---------------------------------------------------------------------------------------------
# velocity wrapper, initialisation
# ---------------------------------------------------------------------------------------------
class SolverVelocity:
    """The prior's velocity field as the solvers call it: counted, and cast to the module's
    dtype/device when the prior is a torch module of another dtype (the result is cast back).
    ``counter`` is the :class:`CountingVelocity` with ``forward_evals`` / ``backward_evals``.
    ``max_batch`` (``None``: no limit) runs a call on more items than that as consecutive
    chunks of at most ``max_batch`` items: the same values and the same count (one call), with
    the activations of one chunk at a time (MS-Flow's Jacobi sweep stacks all K segments).
    """

    def __init__(self, prior, device: torch.device, *, max_batch: Optional[int] = None):
        self.max_batch = max_batch
        v = prior.velocity
        self.module = v if isinstance(v, torch.nn.Module) else None
        self.param_dtype = None
        if self.module is not None:
            ps = [p for p in self.module.parameters()]
            if ps:
                if ps[0].device != device:
                    self.module.to(device)
                self.param_dtype = ps[0].dtype
        self.counter = CountingVelocity(self._call)
        self._v = v

    def _call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mb = self.max_batch
        if mb is not None and x.shape[0] > mb:   # one logical call, run in chunks
            return torch.cat([self._call_one(x[i:i + mb], t[i:i + mb] if t.ndim else t)
                              for i in range(0, x.shape[0], mb)])
        return self._call_one(x, t)

    def _call_one(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.param_dtype is not None and x.dtype != self.param_dtype:
            return self._v(x.to(self.param_dtype), t.to(self.param_dtype)).to(x.dtype)
        return self._v(x, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.counter(x, t)

    @property
    def nfe(self) -> Dict[str, int]:
        return {"forward": int(self.counter.forward_evals),
                "backward": int(self.counter.backward_evals)}

    @contextlib.contextmanager
    def evaluation_mode(self):
        """Run a torch module in eval mode during the solve (restored afterwards)."""
        was = self.module.training if self.module is not None else False
        if was:
            self.module.eval()
        try:
            yield
        finally:
            if was:
                self.module.train()


def make_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


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
    return _bcast(c, aty) * aty


def _cgls(operator, y: torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` CG steps on the normal equations from zero (per item)."""
    return conjugate_gradient(operator.normal, operator.adjoint(y), None,
                              iterations=iterations)


def initial_image(init: Any, operator, y: torch.Tensor, *, owner: str,
                  cgls_iterations: int = 10, noise_level: Optional[float] = None,
                  tv_weight: float = TV_START_WEIGHT) -> Tuple[torch.Tensor, str]:
    """The initial public image ``x_init`` (clipped to ``[0, 1]``) and a label for it.

    ``init``: ``"auto"`` (FBP for CT operators with a ``.geometry``, else ``"adjoint"``),
    ``"fbp"``, ``"adjoint"`` (least-squares scaled :math:`A^Ty`), ``"cgls"``
    (``cgls_iterations`` CG steps on the normal equations), ``"tv"`` (the TV reconstruction
    :class:`~ctflow.solvers.classical.TV` with relative weight ``tv_weight`` at
    ``noise_level``: fills what the data leave open -- masked pixels, lost resolution -- with
    a piecewise-constant guess, where the adjoint and CGLS leave zeros), ``"zeros"`` (a
    mid-grey 0.5 image), a tensor of the domain shape, or a callable ``y -> image``.
    """
    with torch.no_grad():
        if isinstance(init, torch.Tensor):
            x = init.to(dtype=y.dtype, device=y.device)
            label = "tensor"
        elif callable(init) and not isinstance(init, str):
            x = init(y)
            label = getattr(init, "__name__", type(init).__name__)
        else:
            check_choice("init", init, INIT_CHOICES, owner=owner)
            label = init
            if init in ("auto", "fbp"):
                fbp = fbp_initialiser(operator)
                if fbp is None and init == "fbp":
                    raise ValueError(f"{owner}: init='fbp' needs a CT operator with a .geometry "
                                     f"(and ctflow.operators.ct.FBP); use init='adjoint', "
                                     f"'cgls', a tensor or a callable y -> image instead")
                if fbp is not None:
                    x, label = fbp(y), "fbp"
                else:
                    x, label = _scaled_adjoint(operator, y), "adjoint"
            elif init == "adjoint":
                x = _scaled_adjoint(operator, y)
            elif init == "cgls":
                x = _cgls(operator, y, cgls_iterations)
            elif init == "tv":
                if noise_level is None:
                    raise ValueError(f"{owner}: init='tv' needs the noise level")
                from ctflow.solvers.classical import pdhg_tv      # classical imports this module
                sigma = float(noise_level)           # relative weight: lambda = w * sigma
                x, _ = pdhg_tv(operator, y, weight=tv_weight * sigma,
                               tol=1e-6, scale=sigma * sigma if sigma > 0 else 1.0)
            else:
                x = torch.full((y.shape[0], y.shape[1], *operator.domain_shape), 0.5,
                               dtype=y.dtype, device=y.device)
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
            raise ValueError(f"{owner}: init image shape mismatch: expected {want}, got "
                             f"{tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{owner}: init image contains NaN or inf")
        return x.clamp(0.0, 1.0), label


def blend_init(velocity: Callable, prior, x_init: torch.Tensor, *, alpha: float, steps: int,
               method: str, generator: torch.Generator) -> torch.Tensor:
    r"""The blend initialisation of D-Flow / MS-Flow in model space:

    .. math:: s_0 = \sqrt\alpha\,\Psi^{-1}(x_\text{init}) + \sqrt{1-\alpha}\,\varepsilon,
              \qquad \varepsilon \sim N(0, I),

    where :math:`\Psi^{-1}` integrates the ODE backward from :math:`t=1` to :math:`t=0` with
    ``steps`` steps of ``method`` (no gradients), starting at ``prior.to_model(x_init)``.
    ``alpha = 0`` is pure noise (and skips the backward ODE). For a latent prior the states
    are latents (``prior.latent_shape``) and ``prior.to_model`` is its encoder.
    """
    shape = tuple(x_init.shape)
    if getattr(prior, "is_latent", False):
        shape = (x_init.shape[0], *prior.latent_shape)
    eps = torch.randn(shape, generator=generator, dtype=x_init.dtype).to(x_init.device)
    if alpha <= 0:
        return eps
    with torch.no_grad():
        z = integrate(velocity, prior.to_model(x_init), 1.0, 0.0, steps, method, grad=False)
    return math.sqrt(alpha) * z + math.sqrt(1.0 - alpha) * eps


def progress_bar(total: int, *, enabled: bool, desc: str):
    """A tqdm bar when ``enabled`` (else a silent stand-in with the same methods)."""
    if enabled:
        from tqdm.auto import tqdm
        return tqdm(total=total, desc=desc, leave=False)

    class _Silent:
        def update(self, n=1):
            pass

        def set_postfix(self, *a, **k):
            pass

        def close(self):
            pass

    return _Silent()
