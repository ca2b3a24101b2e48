"""Flow maps and velocity fields (t = 0 noise, t = 1 data) and the velocity networks.

Training lives in :mod:`ctflow.training`.
"""
from ctflow.flow.gaussian import GaussianVelocity
from ctflow.flow.integrate import METHODS, CountingVelocity, evals_per_step, integrate, time_grid
from ctflow.flow.unet import UNet

__all__ = ["integrate", "METHODS", "evals_per_step", "CountingVelocity", "time_grid",
           "GaussianVelocity", "UNet"]

# The autoencoder of latent priors at package level (benchmarks build one with random weights).
from ctflow.flow.autoencoder import AutoEncoder, LatentCodec  # noqa: E402

__all__ += ["AutoEncoder", "LatentCodec"]
