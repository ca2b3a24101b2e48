"""Flow-matching priors: the prior type, checkpoints, the bundled priors, latent priors and
the Stable Diffusion 3 adapter (:func:`from_diffusers`)."""
from .base import FlowPrior, gaussian_prior
from .checkpoint import CheckpointError, load_prior_file, save_prior
from .diffusers_adapter import from_diffusers
from .latent import LatentFlowPrior, is_latent_prior, save_latent_prior
from .registry import list_priors, load_prior

__all__ = ["FlowPrior", "gaussian_prior", "save_prior", "load_prior", "load_prior_file",
           "list_priors", "CheckpointError", "LatentFlowPrior", "is_latent_prior",
           "save_latent_prior", "from_diffusers"]
