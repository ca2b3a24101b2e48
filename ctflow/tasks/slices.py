r"""One slice of a series task: simulate (or take) its measurement, reconstruct it, map it
back to HU, compare it with the input (:func:`solve_slice`; the same call runs in this process
and in a worker of ``map_slices``)."""
from __future__ import annotations

import time
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch

from ctflow.metrics import psnr, ssim
from ctflow.operators.noise import PoissonNoise
from ctflow.operators.units import WindowMap
from ctflow.tasks.problem import from_working_size, measure, run_solver, slice_seed

__all__ = ["solve_slice", "noise_model"]


def solve_slice(x: torch.Tensor, *, operator, prior, method: str, noise,
                seed: int, key: str, hu_shape: Tuple[int, int],
                window: Tuple[float, float], device: Any = None,
                measured: Optional[np.ndarray] = None, **options) -> Dict[str, Any]:
    r"""Steps 4-7 of the module docstring for one prepared slice; no file is touched.

    ``x`` is the ``(n, n)`` working-size image in [0, 1]; ``key`` (the SOPInstanceUID) seeds
    the noise draw and the solver with :func:`~ctflow.tasks.problem.slice_seed` ``(seed,
    key)``; ``measured`` (a ``(views, detectors)`` sinogram) replaces the simulation (a
    relative ``noise`` then refers to its RMS). ``noise`` is a
    :class:`~ctflow.operators.noise.GaussianNoise` or a
    :class:`~ctflow.operators.noise.PoissonNoise` (a low-dose scan on an operator in mm: the
    window image becomes attenuation, photon counts are simulated, and the solver gets the
    statistical weights with ``sigma = 1``). The same call runs in this process and in a
    worker of ``map_slices``, so both give the same reconstruction.

    Returns ``recon`` (``(n, n)`` float32 array in [0, 1]), ``hu`` (float32 HU at
    ``hu_shape``: :math:`l + \mathrm{up}(\hat x)(u - l)`), ``psnr``, ``ssim`` (against ``x``),
    ``seconds`` (the solve), ``nfe``, ``peak_memory_bytes``, ``noise_sigma`` and
    ``noise_seed`` (``None`` for a measured sinogram).
    """
    n = int(x.shape[-1])
    s_seed = slice_seed(seed, key)
    dev = torch.device(device) if device is not None else x.device
    xb = x.to(dev).reshape(1, 1, n, n)
    weights = None
    if measured is None:
        gen = torch.Generator().manual_seed(s_seed)
        y, sigma, weights = measure(operator, xb, noise, window=WindowMap(tuple(window)),
                                    generator=gen)
    else:
        meas = np.asarray(measured, dtype=np.float32)
        y = torch.from_numpy(meas).to(dev).reshape(1, 1, *meas.shape[-2:])
        sigma = noise.std(y)
    torch.manual_seed(s_seed)
    t0 = time.perf_counter()
    res = run_solver(y, operator, prior, method=method, sigma=float(sigma[0]), seed=s_seed,
                     weights=None if method == "fbp" else weights, **options)
    seconds = time.perf_counter() - t0
    rec_img = res.image.detach().to("cpu", torch.float32).reshape(n, n).clamp(0, 1)
    ref = x.detach().to("cpu", torch.float32).reshape(n, n)
    up = from_working_size(rec_img, hu_shape)
    hu_out = (window[0] + up * (window[1] - window[0])).numpy().astype(np.float32)
    return {"recon": rec_img.numpy(), "hu": hu_out, "psnr": float(psnr(rec_img, ref)),
            "ssim": float(ssim(rec_img, ref)), "seconds": seconds, "nfe": dict(res.nfe),
            "peak_memory_bytes": res.peak_memory_bytes, "noise_sigma": float(sigma[0]),
            "noise_seed": s_seed if measured is None else None}


def noise_model(noise, measured: bool) -> str:
    """The measurement model in words (recorded in the summary)."""
    if isinstance(noise, PoissonNoise):
        return (f"counts ~ Poisson(I0 exp(-A mu)), I0 = {noise.I0:g} photons per bin"
                + (f" + N(0, {noise.electronic_sigma:g}^2)" if noise.electronic_sigma else "")
                + "; y = -log(max(counts, floor)/I0), weighted least squares (w = counts)")
    ref = "y" if measured else "Ax"
    if noise.sigma is not None:
        return f"y = Ax + sigma*N(0,1), sigma = {noise.sigma:g}"
    return f"y = Ax + sigma*N(0,1), sigma = {noise.relative:g}*rms({ref})"
