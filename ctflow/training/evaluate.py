r"""Developer evaluation of a CT prior against held-out slices.

The score is the 1-Wasserstein distance between pixel-value distributions,

.. math::

    W_1(P, Q) = \int_0^1 |F_P(u) - F_Q(u)|\,du ,

where :math:`F` are the empirical CDFs of all pixel values of ``n`` prior samples (clipped
to the public range :math:`[0, 1]`) and of the held-out slices (windowed and resized exactly
as in training: HU window to :math:`[0, 1]`, square, antialiased resize to the prior's size).
As a reference the same distance is computed for ``n`` random-ellipse phantoms; a prior that
learned CT intensities (air, fat, soft tissue, bone in their proportions) must score clearly
lower. :func:`sample_grid` writes a PNG with prior samples next to real held-out slices.

Command line: ``ctflow evaluate-prior ct64 --png docs/prior-samples.png``
(:mod:`ctflow.cli.evaluate`; :func:`prior_report` is what it runs).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch

from ctflow.data.atomic import atomic_save

__all__ = ["heldout_images", "pixel_w1", "evaluate_prior", "prior_report", "sample_grid",
           "loss_curve_png"]


def heldout_images(image_size: int = 64, hu_window=(-1024.0, 1024.0), *, split: str = "test",
                   paths: Optional[Sequence] = None) -> torch.Tensor:
    """The held-out slices as a ``(N, 1, S, S)`` tensor in ``[0, 1]``, prepared like the
    training data (:class:`~ctflow.training.datasets.CTSliceDataset` without augmentation).

    ``paths`` (DICOM files/folders) default to the bundled held-out sample of the ``split``
    patients (``ctflow.data.heldout_files``)."""
    from ctflow.data import heldout_files, read_dicom_slices
    from ctflow.training.datasets import CTSliceDataset

    files = list(paths) if paths is not None else heldout_files(split)
    slices = []
    for p in files:
        slices.extend(s.hu for s in read_dicom_slices(p))
    ds = CTSliceDataset(slices, image_size=image_size, hu_window=hu_window, augment=False)
    return torch.stack([ds[i] for i in range(len(ds))])


def pixel_w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """1-Wasserstein distance between the pixel values of two image sets."""
    from scipy.stats import wasserstein_distance

    return float(wasserstein_distance(np.asarray(a, dtype=np.float64).ravel(),
                                      np.asarray(b, dtype=np.float64).ravel()))


@torch.no_grad()
def evaluate_prior(prior, *, n: int = 64, steps: int = 50, method: str = "midpoint",
                   seed: int = 0, reference: Optional[torch.Tensor] = None,
                   split: str = "test") -> dict:
    """Sample ``n`` images from ``prior`` and compare pixel histograms with the held-out
    slices; returns ``{"w1_prior", "w1_ellipses", ...}`` plus the samples under
    ``"samples"`` and the reference under ``"reference"`` (tensors)."""
    from ctflow.data import EllipsesDataset

    if reference is None:
        reference = heldout_images(prior.image_size, prior.hu_window or (-1024.0, 1024.0),
                                   split=split)
    g = torch.Generator().manual_seed(seed)
    samples = prior.sample(n, steps=steps, method=method, generator=g).clamp(0.0, 1.0)
    ell = EllipsesDataset(prior.image_size, seed=seed)
    ellipses = torch.stack([ell[i] for i in range(n)]).float()
    return {
        "w1_prior": pixel_w1(samples, reference),
        "w1_ellipses": pixel_w1(ellipses, reference),
        "n_samples": int(n), "n_reference": int(reference.shape[0]), "steps": int(steps),
        "method": method, "seed": int(seed), "split": split,
        "samples": samples, "reference": reference,
    }


def sample_grid(samples: torch.Tensor, reference: torch.Tensor, path, *, n: int = 16,
                title: str = "") -> Path:
    """PNG: ``n`` prior samples (left block, 4 columns) next to up to ``n`` real held-out
    slices (right block; empty cells if there are fewer). Greyscale, ``[0, 1]`` range."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 4
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, 2 * cols + 1, figsize=(2 * cols + 1, rows + 0.6),
                             gridspec_kw={"width_ratios": [1] * cols + [0.15] + [1] * cols})
    for r in range(rows):
        for c in range(2 * cols + 1):
            ax = axes[r, c]
            ax.axis("off")
            k = r * cols + (c if c < cols else c - cols - 1)
            if c == cols or k >= n or k >= (len(samples) if c < cols else len(reference)):
                continue
            img = samples[k] if c < cols else reference[k]
            ax.imshow(np.asarray(img[0], dtype=np.float32), cmap="gray", vmin=0, vmax=1)
    axes[0, cols // 2].set_title("prior samples", fontsize=9, loc="left")
    axes[0, cols + 1 + cols // 2].set_title("held-out slices", fontsize=9, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(wspace=0.04, hspace=0.04, left=0.01, right=0.99, bottom=0.01,
                        top=0.88 if title else 0.93)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_save(path, lambda p: fig.savefig(p, dpi=80, format="png"), suffix=".png")
    finally:
        plt.close(fig)
    return path


def loss_curve_png(loss_log, path, *, smooth: int = 20) -> Path:
    """PNG of a training loss log (``loss.jsonl`` of a run, or ``[[step, loss], ...]``)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if isinstance(loss_log, (str, Path)):
        rows = [json.loads(l) for l in Path(loss_log).read_text().splitlines() if l.strip()]
        pts = [(r["step"], r["loss"]) for r in rows]
    else:
        pts = [(int(s), float(v)) for s, v in loss_log]
    steps = np.array([p[0] for p in pts])
    loss = np.array([p[1] for p in pts])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, loss, lw=0.6, alpha=0.4, label="logged mean loss")
    if len(loss) > smooth:
        k = np.ones(smooth) / smooth
        avg = np.convolve(loss, k, mode="valid")
        ax.plot(steps[smooth // 2: smooth // 2 + len(avg)], avg, lw=1.4,
                label=f"moving average ({smooth} points)")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    try:
        atomic_save(path, lambda p: fig.savefig(p, dpi=90, format="png"), suffix=".png")
    finally:
        plt.close(fig)
    return path


def prior_report(prior, *, name: Optional[str] = None, n: int = 64, steps: int = 50,
                 method: str = "midpoint", seed: int = 0, split: str = "test",
                 png=None) -> Dict[str, Any]:
    """:func:`evaluate_prior` as JSON numbers (``w1_prior``, ``w1_ellipses``, the settings,
    ``prior`` = ``name`` and ``prior_steps_trained``); with ``png`` also a sample grid of 16
    samples next to the held-out test and validation slices (:func:`sample_grid`)."""
    res = evaluate_prior(prior, n=n, steps=steps, method=method, seed=seed, split=split)
    numbers = {k: v for k, v in res.items() if not isinstance(v, torch.Tensor)}
    numbers["prior"] = name if name is not None else prior.name
    numbers["prior_steps_trained"] = (prior.config.get("training", {}).get("steps")
                                      or prior.config.get("step"))
    if png is not None:
        win = prior.hu_window or (-1024.0, 1024.0)
        real = torch.cat([res["reference"],
                          heldout_images(prior.image_size, win, split="validation")])
        sample_grid(res["samples"], real, png,
                    title=f"{prior.name}: 16 samples ({steps} {method} steps)  |  "
                          f"held-out slices: {res['n_reference']} test + "
                          f"{len(real) - res['n_reference']} validation")
    return numbers
