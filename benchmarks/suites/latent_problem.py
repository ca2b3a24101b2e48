"""The ``latent`` suite's problems: its config, the latent prior, the 128×128 slices and the
operators of its tasks (also at the 64×64 of the image-space prior).

The suite is described in :mod:`benchmarks.suites.latent`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ctflow.flow import AutoEncoder, LatentCodec, UNet
from ctflow.operators import ParallelBeam2D, RayTransform, SuperResolution
from ctflow.priors import LatentFlowPrior, list_priors, load_prior

from benchmarks.suites.problems import heldout_hu, measure, prepare_slice

__all__ = ["SUITE", "CONFIG", "LATENT_PRIOR", "IMAGE_PRIOR", "IMAGE_SIZE", "load_config",
           "latent_prior", "slice_image", "task_operator", "task_measurement"]

SUITE = "latent"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "latent.json"
LATENT_PRIOR = "ct128latent"
IMAGE_PRIOR = "ct64"
IMAGE_SIZE = 128


def load_config() -> dict:
    """``benchmarks/configs/latent.json``."""
    return json.loads(CONFIG.read_text())


def latent_prior(device: str = "cpu"):
    """``(prior, label)``: the bundled latent prior, or the default architectures with random
    (seeded) weights when it is not bundled."""
    if LATENT_PRIOR in list_priors():
        return load_prior(LATENT_PRIOR, device=device), f"bundled {LATENT_PRIOR} (trained)"
    cfg = load_config()["random_fallback"]
    torch.manual_seed(0)
    codec = LatentCodec(AutoEncoder(**cfg["autoencoder"]))
    lat = codec.autoencoder.latent_shape(IMAGE_SIZE)
    net = UNet(**cfg["flow"])
    prior = LatentFlowPrior(net, decoder=codec.decode, encoder=codec.encode,
                            image_size=IMAGE_SIZE, latent_shape=lat, hu_window=(-1024.0, 1024.0),
                            name="latent-random")
    prior.codec = codec
    return prior.to(device=device).eval(), "default architectures, random weights"


def slice_image(image_id: str, image_size: int, hu_window) -> torch.Tensor:
    """A held-out slice (``"test/<stem>"`` / ``"validation/<stem>"``) at ``image_size``."""
    split, stem = image_id.split("/", 1)
    hu = heldout_hu(split)
    if stem not in hu:
        raise ValueError(f"no held-out slice {image_id!r}")
    return prepare_slice(hu[stem], image_size=image_size, hu_window=hu_window)


def task_operator(task: dict, image_size: int):
    """The operator of ``task`` at ``image_size`` (CT: the 128×128 geometry's detector
    layout at every size, so one sinogram serves both discretisations)."""
    if task["operator"] == "parallel-beam":
        ref = ParallelBeam2D(IMAGE_SIZE, angles=int(task["views"]))
        geom = ParallelBeam2D(image_size, angles=int(task["views"]), detectors=ref.detectors,
                              detector_spacing=ref.detector_spacing)
        return RayTransform(geom)
    if task["operator"] == "superres":
        k = int(task["factor"]) * image_size // IMAGE_SIZE
        return SuperResolution(image_size, factor=k, mode="average")
    raise ValueError(f"latent suite: unknown task operator {task['operator']!r}")


def task_measurement(task: dict, x, seed: int):
    A = task_operator(task, IMAGE_SIZE)
    y, sigma = measure(A, x, {"model": "relative", "level": float(task["noise"])}, seed)
    return A, y, sigma
