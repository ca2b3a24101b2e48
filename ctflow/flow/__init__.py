"""Flow maps and velocity fields (t = 0 noise, t = 1 data), the U-Net velocity model,
flow-matching training and its datasets.

The training names (``train_prior``, ``train_main``, ...) are imported on first use, so that
``python -m ctflow.flow.train`` runs the module once.
"""
from .gaussian import GaussianVelocity
from .integrate import METHODS, CountingVelocity, evals_per_step, integrate, time_grid
from .unet import UNet
from .datasets import (CTSliceDataset, DicomSliceDataset, ImageTensorDataset, ellipses_dataset,
                       medmnist_dataset)

_TRAIN_NAMES = ("train_prior", "TrainResult", "EMA", "ot_couple", "flow_matching_loss",
                "bundle_checkpoint", "train_main")

__all__ = ["integrate", "METHODS", "evals_per_step", "CountingVelocity", "time_grid",
           "GaussianVelocity", "UNet", "CTSliceDataset", "DicomSliceDataset",
           "ImageTensorDataset", "ellipses_dataset", "medmnist_dataset", *_TRAIN_NAMES]


def __getattr__(name):
    if name in _TRAIN_NAMES:
        from . import train
        return getattr(train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
