"""Solvers for inverse problems with flow priors, and the ``reconstruct`` dispatcher.

MS-Flow (trajectory stitching) and D-Flow live here; PnP-Flow, OT-ODE and the classical
baselines (FBP, CGLS, TV) are imported on first access, so a missing optional module never
breaks ``import ctflow.solvers``.
"""
from .api import METHODS, reconstruct, solver_class
from .dflow import DFlow
from .msflow import MSFlow
from .result import Reconstruction, SolveMeter

_LAZY = {"PnPFlow": "pnpflow", "OTODE": "otode", "FBPSolver": "classical", "TV": "classical",
         "CGLS": "classical"}

__all__ = ["reconstruct", "METHODS", "solver_class", "MSFlow", "DFlow", "Reconstruction",
           "SolveMeter", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
