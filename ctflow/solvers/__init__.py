"""Solvers for inverse problems with flow priors, the registry of methods and ``reconstruct``.

Every solver class takes its options as keywords (or one instance of its frozen ``Options``
dataclass, e.g. ``MSFlow.Options``), is called as ``.solve(operator, y, prior, sigma)``
(``sigma`` the absolute noise standard deviation of ``y``) and returns a
:class:`Reconstruction`: MS-Flow (trajectory stitching), D-Flow, PnP-Flow, OT-ODE and the
classical baselines FBP, CGLS, Landweber and TV. The methods are listed once, in
:mod:`ctflow.solvers.registry` (``METHODS``, ``method``, ``method_names``).

Modules (one concern each): ``registry``, ``api`` (``reconstruct``), ``options`` (the options
convention and its checks), ``inputs`` (checks of ``y``, ``sigma`` and the prior), ``linalg``
(per-item reductions, conjugate gradients), ``init`` (initial images), ``problem`` (the data
term and MS-Flow's data step), ``latent`` (the data term of latent priors), ``radial``,
``velocity``, ``rng``, ``progress``, ``result``, ``base`` (the solver classes' front), one
module per solver (``msflow`` with ``msflow_sweeps``, ``dflow``, ``pnpflow``, ``otode``,
``fbp``, ``tv`` with ``pdhg``, ``cgls``, ``landweber``) and ``flow_baseline``.
"""
from ctflow.solvers.api import reconstruct, solver_class
from ctflow.solvers.base import FlowOptions, IterativeOptions
from ctflow.solvers.cgls import CGLS, cgls
from ctflow.solvers.denoise_project import FlowDP
from ctflow.solvers.dflow import DFlow
from ctflow.solvers.fbp import FBP_FILTERS, FBPSolver
from ctflow.solvers.flow_baseline import StartOptions
from ctflow.solvers.init import (INIT_CHOICES, TV_START_WEIGHT, blend_init, fbp_initialiser,
                                 initial_image)
from ctflow.solvers.inputs import (Measurement, check_prior, check_problem, check_sigma,
                                   prepare_measurement)
from ctflow.solvers.landweber import Landweber, landweber
from ctflow.solvers.latent import LatentDataProblem
from ctflow.solvers.linalg import (broadcast_items, conjugate_gradient, per_item_dot,
                                   per_item_norm, per_item_sq)
from ctflow.solvers.msflow import CPU_MAX_BATCH, MSFlow, node_grid
from ctflow.solvers.options import SolverOptions
from ctflow.solvers.otode import OTODE
from ctflow.solvers.pdhg import divergence, gradient, pdhg_tv, tv_iso
from ctflow.solvers.pnpflow import PnPFlow
from ctflow.solvers.problem import ModelSpaceProblem, data_step, make_problem
from ctflow.solvers.radial import radial_prior, radial_prox
from ctflow.solvers.registry import METHODS, Method, method, method_names
from ctflow.solvers.result import Reconstruction, SolveMeter
from ctflow.solvers.rng import make_generator
from ctflow.solvers.tv import TV
from ctflow.solvers.velocity import SolverVelocity

#: The options dataclass of every solver class (also ``<Solver>.Options``).
MSFlowOptions = MSFlow.Options
DFlowOptions = DFlow.Options
PnPFlowOptions = PnPFlow.Options
OTODEOptions = OTODE.Options
FBPOptions = FBPSolver.Options
TVOptions = TV.Options
CGLSOptions = CGLS.Options
LandweberOptions = Landweber.Options

__all__ = [
    # the entry point and the registry
    "reconstruct", "solver_class", "METHODS", "Method", "method", "method_names",
    # solver classes and their options
    "MSFlow", "DFlow", "PnPFlow", "OTODE", "FBPSolver", "TV", "CGLS", "Landweber",
    "MSFlowOptions", "DFlowOptions", "PnPFlowOptions", "OTODEOptions", "FBPOptions",
    "TVOptions", "CGLSOptions", "LandweberOptions", "SolverOptions", "FlowOptions",
    "IterativeOptions", "StartOptions",
    # results
    "Reconstruction", "SolveMeter",
    # building blocks
    "cgls", "landweber", "pdhg_tv", "gradient", "divergence", "tv_iso", "FBP_FILTERS",
    "INIT_CHOICES", "TV_START_WEIGHT", "initial_image", "fbp_initialiser", "blend_init",
    "Measurement", "prepare_measurement", "check_problem", "check_sigma", "check_prior",
    "conjugate_gradient", "broadcast_items", "per_item_sq", "per_item_norm", "per_item_dot",
    "ModelSpaceProblem", "make_problem", "data_step", "LatentDataProblem", "radial_prior",
    "radial_prox", "SolverVelocity", "make_generator", "node_grid", "CPU_MAX_BATCH",
]
