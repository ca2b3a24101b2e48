"""The one registry of reconstruction methods.

Every part of ctflow that offers a choice of method reads it: :func:`ctflow.reconstruct`,
the command line (``--method``), the DICOM series task, the benchmarks and the tuning. A new
solver is added here (one :class:`Method` entry) and nowhere else.

>>> from ctflow.solvers.registry import METHODS, method
>>> sorted(METHODS)[:3]
['cgls', 'dflow', 'fbp']
>>> method("msflow").needs_prior
True
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

__all__ = ["Method", "METHODS", "method", "method_names", "PRIOR_KINDS"]

#: Kinds of prior a method may support: ``"pixel"`` (:class:`~ctflow.priors.FlowPrior` on
#: images) and ``"latent"`` (:class:`~ctflow.priors.LatentFlowPrior`).
PRIOR_KINDS = ("pixel", "latent")


@dataclass(frozen=True)
class Method:
    """One reconstruction method.

    Attributes:
        name: the name used by ``reconstruct(method=...)`` and ``--method``.
        label: the name in tables and figures.
        module, cls: the solver class ``ctflow.solvers.<module>.<cls>`` (imported on use).
        needs_prior: whether the method needs a flow prior.
        prior_kinds: the kinds of prior it supports (:data:`PRIOR_KINDS`; empty if none).
        needs_sigma: whether it needs the noise standard deviation ``sigma > 0``.
        summary: one line for ``--help`` and the docs.
    """

    name: str
    label: str
    module: str
    cls: str
    needs_prior: bool
    prior_kinds: tuple[str, ...]
    needs_sigma: bool
    summary: str

    def solver_class(self) -> type:
        """The solver class (imported on first use)."""
        try:
            mod = importlib.import_module(f"ctflow.solvers.{self.module}")
        except ImportError as exc:
            raise ValueError(f"method {self.name!r} is unavailable: its module "
                             f"ctflow.solvers.{self.module} failed to import ({exc})") from exc
        return getattr(mod, self.cls)

    @property
    def options_type(self) -> type:
        """The frozen dataclass holding the method's options (``<Solver>.Options``)."""
        return self.solver_class().Options

    def supports(self, prior: Any) -> bool:
        """Whether ``prior`` (an object, or ``None``) is of a kind this method supports."""
        if prior is None:
            return not self.needs_prior
        from ctflow.priors.latent import is_latent_prior

        kind = "latent" if is_latent_prior(prior) else "pixel"
        return kind in self.prior_kinds


_FLOW = ("pixel",)
_BOTH = ("pixel", "latent")

#: name -> :class:`Method`, in the order of the docs and tables.
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("msflow", "MS-Flow", "msflow", "MSFlow", True, _BOTH, True,
           "trajectory stitching: K segments with free end states, soft penalties"),
    Method("dflow", "D-Flow", "dflow", "DFlow", True, _BOTH, True,
           "optimise the initial noise through the whole ODE (back-propagation)"),
    Method("pnpflow", "PnP-Flow", "pnpflow", "PnPFlow", True, _FLOW, True,
           "plug-and-play: data gradient step, interpolation, flow denoiser"),
    Method("otode", "OT-ODE", "otode", "OTODE", True, _FLOW, True,
           "ODE sampling with a data-consistency correction of the velocity"),
    Method("flowdp", "Flow-DP", "denoise_project", "FlowDP", True, _FLOW, True,
           "one-step flow denoiser near t = 1 alternated with an exact data step"),
    Method("fbp", "FBP", "fbp", "FBPSolver", False, (), False,
           "filtered back-projection (CT operators only)"),
    Method("tv", "TV", "tv", "TV", False, (), False,
           "total-variation regularised least squares (PDHG)"),
    Method("cgls", "CGLS", "cgls", "CGLS", False, (), False,
           "conjugate gradients on the normal equations (early stopping)"),
    Method("landweber", "Landweber", "landweber", "Landweber", False, (), False,
           "Landweber iteration (gradient descent on the data term)"),
)}


def method_names(*, needs_prior: bool | None = None) -> tuple[str, ...]:
    """The registered names (all, or only those that do / do not need a prior)."""
    return tuple(n for n, m in METHODS.items()
                 if needs_prior is None or m.needs_prior == needs_prior)


def method(name: Any) -> Method:
    """The :class:`Method` called ``name`` (case-insensitive); ``ValueError`` listing the
    registered names otherwise."""
    key = name.lower() if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of "
                         f"{', '.join(map(repr, METHODS))}")
    return METHODS[key]
