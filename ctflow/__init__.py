"""ctflow: CT reconstruction and imaging inverse problems with flow-matching priors.

The centre is MS-Flow (trajectory stitching): the generative ODE trajectory is split into
segments whose end states are free variables coupled by soft penalties, so each update needs
forward evaluations over one short segment only and memory stays constant in the ODE steps.

>>> import ctflow
>>> from ctflow.operators import ParallelBeam2D, RayTransform
>>> A = RayTransform(ParallelBeam2D(64, angles=60))
>>> prior = ctflow.load_prior("ct64")
>>> result = ctflow.reconstruct(y, A, prior, method="msflow", sigma=0.01)  # doctest: +SKIP
"""
from ctflow._version import __version__

from ctflow.flow import integrate
from ctflow.metrics import psnr, relative_error, ssim
from ctflow.priors import (FlowPrior, LatentFlowPrior, from_diffusers, gaussian_prior, list_priors,
                     load_prior, save_prior)
from ctflow.solvers import DFlow, MSFlow, Reconstruction, reconstruct

__all__ = ["__version__", "integrate", "FlowPrior", "LatentFlowPrior", "from_diffusers",
           "gaussian_prior", "load_prior", "list_priors", "save_prior", "reconstruct", "MSFlow",
           "DFlow", "Reconstruction", "psnr", "ssim", "relative_error"]
