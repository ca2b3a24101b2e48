"""Flow maps and velocity fields (t = 0 noise, t = 1 data)."""
from .gaussian import GaussianVelocity
from .integrate import METHODS, CountingVelocity, evals_per_step, integrate, time_grid

__all__ = ["integrate", "METHODS", "evals_per_step", "CountingVelocity", "time_grid",
           "GaussianVelocity"]
