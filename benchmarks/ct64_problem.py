r"""The small CT problem of the ``memory`` and ``convergence`` benchmarks (paper Figs. 1, 3).

A 64×64 image (Shepp-Logan, or the first held-out VALIDATION slice prepared as the prior's
training data), a parallel-beam ray transform with 30 angles (``ctflow.tasks.make_ct_operator``)
and the velocity prior: the bundled ``ct64`` where it exists, else a default U-Net with random
(seeded) weights (peak memory does not depend on the weights).

Noise: the package's one convention, ``GaussianNoise(relative=eta)``
(:math:`\sigma = \eta\,\|Ax\|_2/\sqrt m`), simulated by ``ctflow.tasks.simulate_measurement``
from seed 0, like the case suites. (``results/convergence.*`` up to issue 16 were made with
:math:`\sigma = \eta\cdot\mathrm{mean}|Ax|`; the peak-memory results do not depend on it.)
"""
from __future__ import annotations

import torch

from ctflow.data import heldout_slices, shepp_logan
from ctflow.flow import UNet
from ctflow.operators import GaussianBlur
from ctflow.operators.noise import GaussianNoise
from ctflow.priors import FlowPrior, list_priors, load_prior
from ctflow.tasks import make_ct_operator, simulate_measurement

from benchmarks.suites.problems import prepare_slice

__all__ = ["IMAGE_SIZE", "ANGLES", "SEED", "load_velocity_prior", "build_problem"]

IMAGE_SIZE = 64
ANGLES = 30
SEED = 0


def load_velocity_prior(device: str, *, allow_bundled: bool = True):
    """``(prior, label)``: the bundled ``ct64`` prior if available, else a default U-Net with
    random weights (seeded)."""
    if allow_bundled:
        try:
            if "ct64" in list_priors():
                prior = load_prior("ct64", device=device)
                return prior.eval(), "bundled prior ct64 (trained weights)"
        except (ImportError, ValueError, FileNotFoundError, OSError):
            pass
    torch.manual_seed(SEED)
    net = UNet(image_size=IMAGE_SIZE).to(device)
    prior = FlowPrior(net, image_size=IMAGE_SIZE, channels=1, name="unet-random")
    return prior.eval(), "UNet default config, random weights (no bundled ct64 prior found)"


def _validation_slice(hu_window) -> torch.Tensor:
    """The first held-out VALIDATION slice, prepared exactly as the CT prior saw its data."""
    hu = heldout_slices("validation")[0].hu
    return prepare_slice(hu, image_size=IMAGE_SIZE, hu_window=hu_window)


def build_problem(device: str, *, noise: float = 0.01, angles: int = ANGLES,
                  image: str = "shepp-logan", hu_window=(-1024.0, 1024.0)):
    """``(operator, y, x, sigma, label)``: a 64×64 CT problem with the relative noise level
    ``noise`` (a fraction of the RMS of the clean measurement).

    ``image``: ``"shepp-logan"`` or ``"validation"`` (the first held-out validation slice in
    the prior's HU window; Shepp–Logan if the samples are unavailable).
    """
    g = torch.Generator().manual_seed(SEED)
    x = None
    if image == "validation":
        try:
            x = _validation_slice(hu_window)
        except (ImportError, FileNotFoundError, ValueError, OSError):
            x = None
    if x is None:
        x = shepp_logan(IMAGE_SIZE).reshape(1, 1, IMAGE_SIZE, IMAGE_SIZE)
        image = "shepp-logan"
    x = x.to(device)
    try:
        A = make_ct_operator(IMAGE_SIZE, angles)
        label = f"RayTransform(ParallelBeam2D({IMAGE_SIZE}, angles={angles}))"
    except ImportError:
        A = GaussianBlur(IMAGE_SIZE, sigma=1.5)
        label = f"GaussianBlur({IMAGE_SIZE}, sigma=1.5) (no RayTransform available)"
    y, sigma = simulate_measurement(A, x, GaussianNoise(relative=float(noise)), generator=g)
    return A, y, x, float(sigma[0]), f"{label}, image: {image}"
