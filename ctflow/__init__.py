"""ctflow: CT reconstruction and imaging inverse problems with flow-matching priors.

The centre is MS-Flow (trajectory stitching): the generative ODE trajectory is split into
segments whose end states are free variables coupled by soft penalties, so each update needs
forward evaluations over one short segment only and memory stays constant in the ODE steps.
"""
__version__ = "0.1.0"

from .flow import integrate
from .priors import FlowPrior, gaussian_prior

__all__ = ["__version__", "integrate", "FlowPrior", "gaussian_prior"]
