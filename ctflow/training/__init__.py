"""Training of flow priors and autoencoders (datasets, patches, the loop, evaluation).

Library functions with keyword arguments only; the command line is ``ctflow train ...`` and
``ctflow evaluate-prior ...`` (:mod:`ctflow.cli`).

* :mod:`ctflow.training.datasets` -- training images (CT slices, ellipses, MedMNIST, tensors);
* :mod:`ctflow.training.patches` -- patches of the full-resolution split (size-agnostic priors);
* :mod:`ctflow.training.loop` -- EMA, learning-rate schedule, the loop, checkpoint state;
* :mod:`ctflow.training.prior` -- flow matching (:func:`train_prior`, :func:`bundle_checkpoint`);
* :mod:`ctflow.training.autoencoder` -- latent priors (autoencoder, flow on its codes, bundle);
* :mod:`ctflow.training.evaluate` -- a prior's samples against held-out slices;
* :mod:`ctflow.training.resumable` -- a compact resumable state to carry a run in git.
"""
from ctflow.training.autoencoder import (AutoEncoderResult, bundle_latent, load_autoencoder,
                                         train_autoencoder, train_latent_flow)
from ctflow.training.datasets import (CTSliceDataset, DicomSliceDataset, ImageTensorDataset,
                                      ellipses_dataset, medmnist_dataset)
from ctflow.training.evaluate import (evaluate_prior, heldout_images, loss_curve_png, pixel_w1,
                                      prior_report, sample_grid)
from ctflow.training.loop import EMA, latest_checkpoint, lr_at
from ctflow.training.patches import PatchDataset, split_slices
from ctflow.training.prior import (COUPLINGS, TIME_SAMPLINGS, TrainResult, bundle_checkpoint,
                                   train_prior)
from ctflow.training.resumable import export_state, import_state

__all__ = ["AutoEncoderResult", "bundle_latent", "load_autoencoder", "train_autoencoder",
           "train_latent_flow", "CTSliceDataset", "DicomSliceDataset", "ImageTensorDataset",
           "ellipses_dataset", "medmnist_dataset", "evaluate_prior", "heldout_images",
           "loss_curve_png", "pixel_w1", "prior_report", "sample_grid", "EMA",
           "latest_checkpoint", "lr_at", "PatchDataset", "split_slices", "COUPLINGS",
           "TIME_SAMPLINGS", "TrainResult", "bundle_checkpoint", "train_prior", "export_state",
           "import_state"]
