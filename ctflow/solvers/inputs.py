r"""Checks of a solver's inputs, all made before any work: the measurement ``y``, the noise
standard deviation ``sigma`` and the prior.

* :func:`prepare_measurement`: ``y`` in one of the layouts ``reconstruct`` accepts, batched;
* :func:`check_problem`: the strict batched layout of the solver classes' ``solve``;
* :func:`check_sigma`: :math:`\sigma` a finite number ``> 0`` (``>= 0`` where allowed);
* :func:`check_weights`: the statistical weights of a weighted data term (finite,
  non-negative, broadcastable to ``y``; :mod:`ctflow.solvers.weights`);
* :func:`check_prior`: a flow prior of the operator's image size, latent priors only for the
  methods whose registry entry supports them.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ctflow.solvers.options import is_number
from ctflow.solvers.registry import METHODS

__all__ = ["check_sigma", "check_problem", "check_weights", "Measurement",
           "prepare_measurement", "check_prior"]


def check_sigma(sigma: Any, *, owner: str, allow_zero: bool = False) -> float:
    """The absolute noise standard deviation :math:`\\sigma` of ``y`` (units of ``y``): a
    finite number ``> 0`` (``>= 0`` with ``allow_zero``: methods that do not need it accept
    noise-free data). A one-element tensor is accepted."""
    if isinstance(sigma, torch.Tensor) and sigma.numel() == 1:
        sigma = float(sigma)
    ok = is_number(sigma) and math.isfinite(float(sigma)) and (
        float(sigma) >= 0 if allow_zero else float(sigma) > 0)
    if not ok:
        raise ValueError(f"{owner}: sigma must be a finite number "
                         f"{'>=' if allow_zero else '>'} 0 (the absolute standard deviation "
                         f"of the noise in y), got {sigma!r}")
    return float(sigma)


def check_problem(operator, y: Any, sigma: Any, *, owner: str) -> float:
    """Check a problem in the strict batched layout before any work: ``operator`` a
    ``LinearOperator``, ``y`` a finite floating tensor ``(B, C, *operator.range_shape)`` and
    ``sigma`` a finite number ``>= 0``; returns ``sigma`` as a float. (``reconstruct``
    accepts more layouts of ``y``: :func:`prepare_measurement`.)"""
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
    return check_sigma(sigma, owner=owner, allow_zero=True)


def check_weights(weights: Any, y: torch.Tensor, *, owner: str) -> Optional[torch.Tensor]:
    r"""The statistical weights :math:`w` of the data term
    :math:`\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2`, checked against the batched ``y``
    ``(B, C, *range_shape)`` before any work; ``None`` (all ones) stays ``None``.

    ``weights`` is a tensor (or array, or a number) that broadcasts to ``y``'s shape, with
    finite, non-negative values, not all zero for any batch item (else ``ValueError`` naming
    the shapes or the bad values). Returns it as a tensor of ``y``'s dtype, device and number
    of dimensions (leading axes of length 1 added; not expanded).
    """
    if weights is None:
        return None
    if isinstance(weights, (str, bytes)) or isinstance(weights, bool):
        raise ValueError(f"{owner}: weights must be a tensor of non-negative statistical "
                         f"weights broadcastable to y's shape {tuple(y.shape)}, got "
                         f"{weights!r}")
    try:
        w = torch.as_tensor(weights)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{owner}: weights must be a tensor of non-negative statistical "
                         f"weights broadcastable to y's shape {tuple(y.shape)}, got "
                         f"{type(weights).__name__} ({exc})") from None
    if w.is_complex():
        raise ValueError(f"{owner}: weights must be real, got dtype {w.dtype}")
    try:
        ok = w.ndim <= y.ndim and torch.broadcast_shapes(w.shape, y.shape) == y.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"{owner}: weights shape mismatch: weights of shape "
                         f"{tuple(w.shape)} do not broadcast to y's shape {tuple(y.shape)} "
                         f"(B, C, *range_shape)")
    w = w.detach().to(dtype=y.dtype, device=y.device)
    finite = torch.isfinite(w)
    if not bool(finite.all()):
        nan = int(torch.isnan(w).sum())
        raise ValueError(f"{owner}: weights contain {nan} NaN and {int((~finite).sum()) - nan} "
                         f"infinite value(s); weights must be finite")
    if bool((w < 0).any()):
        raise ValueError(f"{owner}: weights must be non-negative, got "
                         f"{int((w < 0).sum())} negative value(s) (min {float(w.min()):g})")
    w = w.reshape((1,) * (y.ndim - w.ndim) + tuple(w.shape))
    top = torch.broadcast_to(w, y.shape).reshape(y.shape[0], -1).amax(1)
    if bool((top == 0).any()):
        items = [int(i) for i in torch.nonzero(top == 0).flatten()]
        raise ValueError(f"{owner}: the weights of batch item(s) {items} are all zero (the "
                         f"data term would vanish)")
    return w


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
        """``image`` (batched) in the layout ``y`` came in."""
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


def check_prior(prior, operator, *, owner: str, allow_latent: bool = False,
                channels: Optional[int] = None) -> None:
    """The prior must be a flow prior whose image shape ``(C, S, S)`` matches
    ``operator.domain_shape`` (and ``channels``, the channels of ``y``, when given).

    Latent priors (``prior.is_latent``, :mod:`ctflow.priors.latent`) are refused unless the
    solver supports them (``allow_latent``; the registry lists which methods do)."""
    if prior is None:
        raise ValueError(f"{owner}: this method needs a prior (a FlowPrior), got None")
    if getattr(prior, "is_latent", False) and not allow_latent:
        latent = [n for n, m in METHODS.items() if "latent" in m.prior_kinds]
        raise ValueError(f"{owner}: prior {getattr(prior, 'name', '')!r} is a latent prior "
                         f"(velocity in a latent space, images through a decoder); only the "
                         f"methods {', '.join(map(repr, latent))} support latent priors")
    for attr in ("velocity", "image_size", "channels", "to_model", "from_model"):
        if not hasattr(prior, attr):
            raise ValueError(f"{owner}: prior must be a FlowPrior (velocity, image_size, "
                             f"channels, to_model, from_model); got {type(prior).__name__} "
                             f"without {attr!r}")
    if not callable(prior.velocity):
        raise ValueError(f"{owner}: prior.velocity must be callable, got "
                         f"{type(prior.velocity).__name__}")
    dom = tuple(operator.domain_shape)
    fits = getattr(prior, "fits", None)
    ok = (len(dom) == 2 and dom[0] == dom[1] and fits(dom[0])) if callable(fits) \
        else dom == (prior.image_size,) * 2
    if not ok:
        size = prior.size_text() if hasattr(prior, "size_text") else \
            f"{prior.image_size}x{prior.image_size}"
        raise ValueError(f"{owner}: the prior models {size} images but the operator's domain "
                         f"shape is {dom}; use a prior and an operator of the same image size")
    if channels is not None and int(prior.channels) != int(channels):
        raise ValueError(f"{owner}: the prior models {prior.channels} channel(s) but y has "
                         f"{channels}")
    if float(getattr(prior, "scale", 1.0)) == 0.0:
        raise ValueError(f"{owner}: prior.scale must be non-zero")

