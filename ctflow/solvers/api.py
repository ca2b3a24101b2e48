r"""``ctflow.reconstruct``: one entry point for every solver.

.. code-block:: python

    result = ctflow.reconstruct(y, A, prior, method="msflow", sigma=0.01, K=8, M=2)
    result.image, result.history, result.nfe, result.seconds, result.peak_memory_bytes

Methods and the classes behind them (each constructed with the keyword ``**options``, which
build its ``Options`` dataclass, and called as ``.solve(operator, y, prior, sigma,
weights=weights)``) are the
entries of the one registry, :data:`ctflow.solvers.registry.METHODS`:

=============  ==============================================  ===============
``method``     class                                           needs a prior
=============  ==============================================  ===============
``"msflow"``   :class:`ctflow.solvers.msflow.MSFlow`           yes
``"dflow"``    :class:`ctflow.solvers.dflow.DFlow`             yes
``"pnpflow"``  :class:`ctflow.solvers.pnpflow.PnPFlow`         yes
``"otode"``    :class:`ctflow.solvers.otode.OTODE`             yes
``"flowdp"``   :class:`ctflow.solvers.denoise_project.FlowDP`  yes
``"fbp"``      :class:`ctflow.solvers.fbp.FBPSolver`           no
``"tv"``       :class:`ctflow.solvers.tv.TV`                   no
``"cgls"``     :class:`ctflow.solvers.cgls.CGLS`               no
``"landweber"`` :class:`ctflow.solvers.landweber.Landweber`    no
=============  ==============================================  ===============

Solver modules are imported on first use. Everything is checked before any work:

* ``method`` must be one of the names above; option names and values are checked by the
  solver's ``Options`` dataclass (``ValueError`` naming the option and the allowed values,
  also for an option that has no effect in the given combination);
* ``y`` must be a floating tensor of shape ``(B, C, *range_shape)``, ``(C, *range_shape)``
  or ``range_shape`` (for one channel) without NaN or inf;
* ``sigma`` (the absolute standard deviation :math:`\sigma` of the Gaussian noise in ``y``,
  in the units of ``y``) must be a finite number, ``> 0`` for the methods whose registry
  entry has ``needs_sigma``, ``>= 0`` (or ``None``) for the others (TV reads its default
  weight relative to sigma and then asks for ``weight_mode="unscaled"`` at sigma 0);
* ``weights`` (the statistical weights :math:`w` of the data term
  :math:`\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2`, ``None`` for all ones) must be finite,
  non-negative, broadcastable to the batched ``y`` ``(B, C, *range_shape)`` and not all zero
  for a batch item (:func:`~ctflow.solvers.inputs.check_weights`); every iterative and flow
  solver uses them (:mod:`ctflow.solvers.weights`), FBP does not and warns;
* ``prior`` (a :class:`~ctflow.priors.FlowPrior` or the name of a bundled prior, loaded with
  ``ctflow.priors.load_prior``) must model images of the operator's domain shape.

Layout: the solvers always see a batched ``y``; ``result.image`` comes back in the layout
``y`` came in (``(B, C, H, W)``, ``(C, H, W)`` or ``(H, W)``).

Seeding: ``seed`` (default 0) is forwarded to the solver when given, and the global torch
generator is seeded with it inside a forked RNG state, so every method is reproducible and
the caller's random state is left untouched. ``progress=True`` (forwarded) shows a tqdm bar.
"""
from __future__ import annotations

from typing import Any

import torch

from ctflow.priors.recommended import choose_options
from ctflow.solvers import registry
from ctflow.solvers.inputs import check_prior, check_sigma, check_weights, prepare_measurement
from ctflow.solvers.registry import METHODS
from ctflow.solvers.result import Reconstruction

__all__ = ["reconstruct", "METHODS", "solver_class"]


def solver_class(method: str):
    """The solver class behind ``method`` (imported lazily; see :mod:`ctflow.solvers.registry`)."""
    return _method(method).solver_class()


def _method(name: Any):
    try:
        return registry.method(name)
    except ValueError as exc:
        raise ValueError(f"reconstruct: {exc}") from None


def _load_prior(name: str):
    try:
        from ctflow.priors import load_prior  # type: ignore[attr-defined]
    except ImportError:
        try:
            from ctflow.priors.registry import load_prior  # type: ignore
        except ImportError as exc:
            raise ValueError(f"reconstruct: prior {name!r} given by name, but ctflow cannot "
                             f"load bundled priors here ({exc}); pass a FlowPrior") from exc
    return load_prior(name)


def reconstruct(y: torch.Tensor, operator, prior=None, method: str = "msflow", *,
                sigma: float | None = None, weights: Any = None,
                preset: str | None = None,
                **options: Any) -> Reconstruction:
    r"""Reconstruct an image from the measurement ``y = A x + noise`` with ``method``.

    Args:
        y: the measurement, ``(B, C, *operator.range_shape)``, ``(C, *range_shape)`` or
            ``range_shape``; finite values only.
        operator: a :class:`~ctflow.operators.LinearOperator` on public ``[0, 1]`` images.
        prior: a :class:`~ctflow.priors.FlowPrior`, a bundled prior name, or ``None`` for
            the methods that need none (``registry.method_names(needs_prior=False)``).
        method: a name of :data:`~ctflow.solvers.registry.METHODS` (case-insensitive).
        sigma: the absolute standard deviation :math:`\sigma` of the Gaussian noise in
            ``y`` (units of ``y``); required (``> 0``) by the methods whose registry entry
            has ``needs_sigma``, optional (``None`` or ``0``) for FBP, TV, CGLS and
            Landweber. A relative level (a fraction of the RMS of the data) is converted by
            :func:`ctflow.operators.noise.GaussianNoise.std` before the call.
        weights: statistical weights :math:`w` of the data term
            :math:`\tfrac1{2\sigma^2}\sum_i w_i(Ax - y)_i^2` (a non-negative finite tensor
            broadcastable to ``y``'s batched shape ``(B, C, *range_shape)``), or ``None``
            for all ones. For post-log transmission (Poisson) data pass the counts and
            ``sigma=1.0``. FBP does not use weights (it warns).
        preset: ``None`` (default) or ``"recommended"``: without solver options, the
            prior's recommended settings for ``method`` (its JSON ``"recommended"``, see
            :mod:`ctflow.priors.recommended`); ``"paper"``: the solver's defaults (the
            paper's layout). The result's ``options["preset"]`` says which were used.
        **options: keyword options of the solver class (the fields of its ``Options``
            dataclass, ``registry.method(method).options_type``); unknown names, bad values
            and options without effect raise ``ValueError``; ``seed`` (default 0) and
            ``progress``. Any of them (but ``seed``/``progress``) replaces the prior's
            recommendation.

    Returns:
        a :class:`~ctflow.solvers.result.Reconstruction` (image in ``[0, 1]`` in the layout
        of ``y``, history, NFE, seconds, peak memory).
    """
    if "noise_level" in options:
        raise TypeError("reconstruct: 'noise_level' was renamed: pass sigma= (the absolute "
                        "noise standard deviation in the units of y)")
    spec = _method(method)
    method, needs_prior = spec.name, spec.needs_prior
    own = f"reconstruct(method={method!r})"
    if not hasattr(operator, "range_shape") or not hasattr(operator, "domain_shape"):
        raise ValueError(f"{own}: operator must be a LinearOperator (with domain_shape and "
                         f"range_shape), got {type(operator).__name__}")
    if sigma is None and not spec.needs_sigma:
        sigma = 0.0
    sigma = check_sigma(sigma, owner=own, allow_zero=not spec.needs_sigma)
    if isinstance(prior, str):
        prior = _load_prior(prior)
    if needs_prior and prior is None:
        free = registry.method_names(needs_prior=False)
        raise ValueError(f"{own}: this method needs a prior (a FlowPrior or a bundled prior "
                         f"name); only {', '.join(map(repr, free))} run without one")
    if prior is not None and needs_prior:
        check_prior(prior, operator, owner=own, allow_latent="latent" in spec.prior_kinds)
    channels = getattr(prior, "channels", None) if prior is not None else None
    meas = prepare_measurement(operator, y, owner=own, channels=channels)
    weights = check_weights(weights, meas.y, owner=own)
    options, preset_note = choose_options(prior, method, options, preset=preset)
    solver = spec.solver_class()(**options)      # the Options dataclass checks every option
    seed = solver.options.seed
    devices = [meas.y.device] if meas.y.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        result = solver.solve(operator, meas.y, prior, sigma, weights=weights)
    result.image = meas.restore(result.image)
    if preset_note is not None:
        result.options = {**dict(result.options or {}), "preset": preset_note}
    if not result.method:
        result.method = method
    return result
