"""Solvers for inverse problems with flow priors, and the ``reconstruct`` dispatcher.

Every solver takes ``(operator, y, prior, noise_level, options)`` and returns a
:class:`Reconstruction`: MS-Flow (trajectory stitching), D-Flow, PnP-Flow, OT-ODE and the
classical baselines FBP, CGLS, Landweber and TV.
"""
from ctflow.solvers.api import METHODS, reconstruct, solver_class
from ctflow.solvers.classical import CGLS, TV, FBPSolver, Landweber
from ctflow.solvers.dflow import DFlow
from ctflow.solvers.msflow import MSFlow
from ctflow.solvers.otode import OTODE
from ctflow.solvers.pnpflow import PnPFlow
from ctflow.solvers.result import Reconstruction, SolveMeter

__all__ = ["reconstruct", "METHODS", "solver_class", "MSFlow", "DFlow", "PnPFlow", "OTODE",
           "FBPSolver", "TV", "CGLS", "Landweber", "Reconstruction", "SolveMeter"]

# The method registry at package level (benchmarks and applications read method names here).
from ctflow.solvers.registry import Method, method, method_names  # noqa: E402

__all__ += ["Method", "method", "method_names"]
