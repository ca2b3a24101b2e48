"""Flow-matching priors: the prior type, checkpoints and the bundled priors."""
from .base import FlowPrior, gaussian_prior

__all__ = ["FlowPrior", "gaussian_prior"]
