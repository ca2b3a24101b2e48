"""Solvers for inverse problems with flow priors, and the ``reconstruct`` dispatcher.

Every solver takes ``(operator, y, prior, noise_level, options)`` and returns a
:class:`Reconstruction`: MS-Flow (trajectory stitching), D-Flow, PnP-Flow, OT-ODE and the
classical baselines FBP, CGLS, Landweber and TV.
"""
from .api import METHODS, reconstruct, solver_class
from .classical import CGLS, TV, FBPSolver, Landweber
from .dflow import DFlow
from .msflow import MSFlow
from .otode import OTODE
from .pnpflow import PnPFlow
from .result import Reconstruction, SolveMeter

__all__ = ["reconstruct", "METHODS", "solver_class", "MSFlow", "DFlow", "PnPFlow", "OTODE",
           "FBPSolver", "TV", "CGLS", "Landweber", "Reconstruction", "SolveMeter"]
