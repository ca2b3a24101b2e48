"""Flow-matching priors: the prior type, checkpoints and the bundled priors."""
from .base import FlowPrior, gaussian_prior
from .checkpoint import CheckpointError, load_prior_file, save_prior
from .registry import list_priors, load_prior

__all__ = ["FlowPrior", "gaussian_prior", "save_prior", "load_prior", "load_prior_file",
           "list_priors", "CheckpointError"]
