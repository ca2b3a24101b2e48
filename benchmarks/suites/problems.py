r"""The data and forward problems of the case suites, set up by :mod:`ctflow.tasks`.

Data (the same for every method):

1. the held-out COVID-19-NY-SBU slices of ``ctflow.data.heldout_slices`` (TEST: 10 slices of 5
   patients; VALIDATION: 4 slices of 2 patients, used only for tuning), read in HU with the
   scanner padding (-3024/-2048) clipped to -1024 HU;
2. prepared exactly as the prior's training data by ``ctflow.tasks.to_working_size`` with the
   prior's ``hu_window`` :math:`[l, h]`: :math:`\mathrm{clip}((\mathrm{HU} - l)/(h - l), 0,
   1)`, padded to a square with 0, resized with antialiasing to ``prior.image_size``.

Noise convention (documented in ``benchmarks/README.md``): ``y = A x + \sigma\,\varepsilon``,
:math:`\varepsilon \sim N(0, I)`, simulated by ``ctflow.tasks.simulate_measurement`` with a
``ctflow.operators.noise.GaussianNoise``:

* ``model="relative"`` (CT suites): ``GaussianNoise(relative=eta)``,
  :math:`\sigma = \eta\,\|Ax\|_2/\sqrt{m}` (``m`` = number of measurements); "1 % noise" is
  :math:`\eta = 0.01`;
* ``model="absolute"`` (restoration suite): ``GaussianNoise(sigma=eta)`` on the ``[0, 1]``
  image scale.

:math:`\sigma` is passed to every solver as ``sigma``. The draw :math:`\varepsilon` is seeded by
(base seed, image id, problem) (:func:`benchmarks.cases.derived_seed`; not
``ctflow.tasks.slice_seed``, whose values differ: the committed results were drawn with these
seeds) -- never by the method -- so every method sees the same ``y``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from ctflow.data import heldout_files, heldout_slices
from ctflow.operators import Denoising, GaussianBlur, Inpainting, SuperResolution
from ctflow.operators.noise import GaussianNoise
from ctflow.tasks import make_ct_operator, simulate_measurement, to_working_size

__all__ = ["image_ids", "heldout_hu", "prepare_slice", "build_operator", "noise_model",
           "measure", "ct_problem"]


def image_ids(split: str, n: Optional[int] = None) -> List[str]:
    """Ids ``<split>/<file stem>`` of the held-out slices (sorted by file name), first ``n``."""
    ids = [f"{split}/{Path(f).stem}" for f in heldout_files(split)]
    return ids if n is None else ids[:int(n)]


def heldout_hu(split: str) -> Dict[str, Any]:
    """The held-out slices of ``split`` in HU by file stem."""
    return {Path(s.meta.file_name).stem: s.hu for s in heldout_slices(split)}


def prepare_slice(hu, *, image_size: int, hu_window: Tuple[float, float]) -> torch.Tensor:
    """One HU slice -> ``(1, 1, S, S)`` float32 in ``[0, 1]``, exactly as the prior was trained
    (``ctflow.tasks.to_working_size``)."""
    x = to_working_size(hu, int(image_size), hu_window=tuple(hu_window))
    return x[None, None].contiguous()


def build_operator(problem: Dict[str, Any], image_size: int):
    """The forward operator a problem describes.

    ``operator``: ``"parallel-beam"`` (``views``, optional ``backend``;
    ``ctflow.tasks.make_ct_operator``), ``"blur"`` (``sigma``), ``"inpaint"`` (``kind``
    random|box|freeform, ``fraction``/``box_size``, ``mask_seed``), ``"superres"``
    (``factor``, ``mode``), ``"denoise"``.
    """
    kind = problem.get("operator")
    if kind == "parallel-beam":
        return make_ct_operator(image_size, int(problem["views"]),
                                backend=problem.get("backend", "torch"))
    if kind == "blur":
        return GaussianBlur(image_size, sigma=float(problem["sigma"]))
    if kind == "inpaint":
        kw = {"kind": problem["kind"], "seed": int(problem.get("mask_seed", 0))}
        for key in ("fraction", "box_size"):
            if problem.get(key) is not None:
                kw[key] = problem[key]
        return Inpainting(image_size, **kw)
    if kind == "superres":
        return SuperResolution(image_size, factor=int(problem["factor"]),
                               mode=problem.get("mode", "average"))
    if kind == "denoise":
        return Denoising(image_size)
    raise ValueError(f"unknown problem operator {kind!r}; expected parallel-beam, blur, "
                     f"inpaint, superres or denoise")


def noise_model(noise: Dict[str, Any]) -> GaussianNoise:
    """The :class:`GaussianNoise` of a problem's ``noise`` entry: ``{"model": "relative",
    "level": eta}`` or ``{"model": "absolute", "level": sigma}``."""
    model = noise.get("model")
    if model == "relative":
        return GaussianNoise(relative=noise["level"])
    if model == "absolute":
        return GaussianNoise(sigma=noise["level"])
    raise ValueError(f"noise model must be 'relative' or 'absolute', got {model!r}")


def measure(A, x: torch.Tensor, noise: Dict[str, Any], seed: int) -> Tuple[torch.Tensor, float]:
    """``y = A x + sigma * eps`` for one image ``x`` ``(1, C, H, W)``, ``eps`` drawn on the CPU
    from ``seed`` (device-independent); returns ``(y, sigma)``."""
    y, sigma = simulate_measurement(A, x, noise_model(noise),
                                    generator=torch.Generator().manual_seed(int(seed)))
    return y, float(sigma[0])


def ct_problem(views: int, level: float = 0.01) -> Dict[str, Any]:
    """A parallel-beam problem with relative Gaussian noise (the CT noise convention)."""
    return {"operator": "parallel-beam", "views": int(views),
            "noise": {"model": "relative", "level": float(level)}}
