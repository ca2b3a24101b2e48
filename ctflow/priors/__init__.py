"""Flow-matching priors: the prior type, checkpoints, the bundled priors, latent priors and
the Stable Diffusion 3 adapter (:func:`from_diffusers`)."""
from ctflow.priors.base import FlowPrior, gaussian_prior
from ctflow.priors.checkpoint import CheckpointError, load_prior_file, save_prior
from ctflow.priors.diffusers_adapter import from_diffusers
from ctflow.priors.latent import LatentFlowPrior, is_latent_prior, save_latent_prior
from ctflow.priors.registry import list_priors, load_prior

__all__ = ["FlowPrior", "gaussian_prior", "save_prior", "load_prior", "load_prior_file",
           "list_priors", "CheckpointError", "LatentFlowPrior", "is_latent_prior",
           "save_latent_prior", "from_diffusers"]
