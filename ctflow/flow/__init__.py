"""Flow maps and velocity fields (t = 0 noise, t = 1 data), the U-Net velocity model,
flow-matching training and its datasets."""
from .gaussian import GaussianVelocity
from .integrate import METHODS, CountingVelocity, evals_per_step, integrate, time_grid
from .unet import UNet
from .datasets import (CTSliceDataset, DicomSliceDataset, ImageTensorDataset, ellipses_dataset,
                       medmnist_dataset)
from .train import (EMA, TrainResult, bundle_checkpoint, flow_matching_loss, ot_couple,
                    train_main, train_prior)

__all__ = ["integrate", "METHODS", "evals_per_step", "CountingVelocity", "time_grid",
           "GaussianVelocity", "UNet", "CTSliceDataset", "DicomSliceDataset",
           "ImageTensorDataset", "ellipses_dataset", "medmnist_dataset", "train_prior",
           "TrainResult", "EMA", "ot_couple", "flow_matching_loss", "bundle_checkpoint",
           "train_main"]
