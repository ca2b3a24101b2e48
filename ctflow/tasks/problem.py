r"""The one problem set-up of ctflow's tasks: operator, working size, measurement, prior, solve.

``ctflow reconstruct``, ``ctflow reconstruct-dicom`` (:mod:`ctflow.tasks.series`), the demo
(:mod:`ctflow.tasks.demo`) and the benchmarks build their problems with these functions, so a
slice is prepared, measured and solved the same way everywhere:

* :func:`to_working_size` / :func:`from_working_size` -- a slice (HU or ``[0, 1]``) to the
  ``n × n`` working image in ``[0, 1]`` (exactly the preparation of the priors' training data)
  and back;
* :func:`make_ct_operator` (parallel or fan beam, :data:`FAN_DISTANCES`) and
  :func:`infer_size` (the image size that matches a sinogram's detector count);
* :func:`simulate_measurement` -- :math:`y = Ax + \sigma\varepsilon` with a
  :class:`~ctflow.operators.noise.GaussianNoise` (absolute ``sigma`` or a ``relative`` level);
* :func:`check_noise` -- a method that needs :math:`\sigma > 0` (registry ``needs_sigma``)
  refuses a zero noise before any work;
* :func:`resolve_prior` -- a name, a checkpoint path or a prior object to a prior on a device;
* :func:`run_solver` -- :func:`ctflow.solvers.api.reconstruct` with the per-slice ``seed``;
* :func:`slice_seed` -- the per-slice seed from the run seed and the slice's key.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ctflow.data.volume import window_hu
from ctflow.operators import ct
from ctflow.operators.noise import GaussianNoise
from ctflow.solvers import registry
from ctflow.solvers.api import reconstruct

__all__ = ["DEFAULT_HU_WINDOW", "DEFAULT_SIZE", "FAN_DISTANCES", "HU_CLIP", "make_ct_operator",
           "infer_size", "simulate_measurement", "check_noise", "resolve_prior", "run_solver",
           "slice_seed", "to_working_size", "from_working_size", "working_size"]

#: HU window used when no prior is given (``prior=None``): the full 12-bit CT range.
DEFAULT_HU_WINDOW = (-1024.0, 3071.0)
#: HU range every input slice is clipped to first (the -3024/-2048 padding outside the scan
#: circle becomes air).
HU_CLIP = (-1024.0, 3071.0)
#: Working size used when neither ``size`` nor a prior gives one.
DEFAULT_SIZE = 64
#: Fan-beam distances used by ``geometry="fan"``, in units of the image half-width (the image
#: covers [-1, 1]^2): source to rotation centre 4, rotation centre to detector 2
#: (magnification 1.5, a full fan angle of about 41 degrees over the image's circumscribed
#: circle; a clinical scanner's ratios are similar).
FAN_DISTANCES = {"source_origin": 4.0, "origin_detector": 2.0}

_GEOMETRIES = {"parallel": ct.ParallelBeam2D, "fan": ct.FanBeam2D}


#: The largest working size (pixels per side) of :func:`make_ct_operator`.
MAX_SIZE = 4096


def _geometry(geometry: str, size: int, views: int):
    if geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be 'parallel' or 'fan', got {geometry!r}")
    extra = FAN_DISTANCES if geometry == "fan" else {}
    return _GEOMETRIES[geometry](image_size=int(size), angles=int(views), **extra)


def make_ct_operator(size: int, views: int, *, geometry: str = "parallel",
                     backend: str = "torch", device: Any = None):
    r"""The CT forward operator on ``size × size`` images with ``views`` angles.

    ``geometry`` is ``"parallel"`` (:class:`ctflow.operators.ct.ParallelBeam2D`, angles
    uniform over :math:`[0, \pi)`) or ``"fan"`` (:class:`ctflow.operators.ct.FanBeam2D` with
    the distances :data:`FAN_DISTANCES`, angles uniform over :math:`[0, 2\pi)`); both use the
    geometry's default detector (covering the image). Returns
    ``RayTransform(geom, backend=backend)`` placed on ``device`` where the operator supports
    it (tensors passed to it decide the device for the torch backend).
    """
    size, views = int(size), int(views)
    if not 8 <= size <= MAX_SIZE:
        raise ValueError(f"working size must be 8 to {MAX_SIZE} pixels, got {size}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    op = ct.RayTransform(_geometry(geometry, size, views), backend=backend)
    to = getattr(op, "to", None)
    if device is not None and callable(to):
        moved = to(torch.device(device))
        op = moved if moved is not None else op
    return op


def infer_size(views: int, detectors: int, *, geometry: str = "parallel",
               max_size: int = 4096) -> int:
    r"""The image size ``N`` whose default ``geometry`` has ``detectors`` detector bins
    (parallel beam: :math:`\lceil\sqrt2 N\rceil`); ``ValueError`` if none does."""
    for n in range(8, max_size + 1):
        d = _geometry(geometry, n, views).sinogram_shape[-1]
        if d == detectors:
            return n
        if d > detectors:
            break
    raise ValueError(f"no image size gives {detectors} detectors in the default {geometry} "
                     f"geometry; pass --size")


def simulate_measurement(operator, x: torch.Tensor, noise: GaussianNoise, *,
                         generator: Optional[torch.Generator] = None
                         ) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Noisy data :math:`y = A x + \sigma\varepsilon` with the noise model ``noise``
    (:class:`~ctflow.operators.noise.GaussianNoise`: an absolute ``sigma`` or a ``relative``
    level :math:`\sigma = \eta\,\|Ax\|_2/\sqrt m` per item, the benchmarks' convention).
    :math:`\varepsilon` is drawn in float64 on the CPU from ``generator``, so the draw is the
    same on every device. Returns ``(y, sigma)``, ``sigma`` of shape ``(B,)``."""
    if not isinstance(noise, GaussianNoise):
        raise TypeError("simulate_measurement: noise must be a GaussianNoise (sigma= absolute "
                        f"or relative= level), got {type(noise).__name__}")
    with torch.no_grad():
        return noise.simulate(operator(x), generator=generator)


def check_noise(method: str, noise: GaussianNoise) -> GaussianNoise:
    """``noise`` if ``method`` can use it: a :class:`GaussianNoise`, and not zero when the
    method needs :math:`\\sigma > 0` (registry ``needs_sigma``); ``ValueError`` (``TypeError``
    for another type) naming both otherwise. Called before any work starts."""
    if not isinstance(noise, GaussianNoise):
        raise TypeError("noise must be a ctflow.operators.noise.GaussianNoise (sigma= absolute "
                        f"or relative= level), got {noise!r}")
    spec = registry.method(method)
    level = noise.sigma if noise.sigma is not None else noise.relative
    if spec.needs_sigma and level == 0:
        which = "sigma" if noise.sigma is not None else "relative level"
        raise ValueError(f"method {spec.name!r} needs a noise standard deviation > 0, got "
                         f"{which} 0; zero noise is accepted by "
                         f"{', '.join(n for n, m in registry.METHODS.items() if not m.needs_sigma)}")
    return noise


def resolve_prior(prior: Any, *, device: Any = None):
    """``None`` → ``None``; a prior object (anything with ``image_size`` and ``to``: a
    :class:`~ctflow.priors.FlowPrior` or a latent prior) → itself on ``device``; a name or a
    checkpoint path → ``ctflow.priors.registry.load_prior(prior, device=device)`` in eval mode.
    A prior that cannot be found raises ``FileNotFoundError``."""
    if prior is None:
        return None
    if not isinstance(prior, (str, bytes)) and not hasattr(prior, "__fspath__"):
        return prior.to(device=device) if device is not None else prior
    from ctflow.priors.registry import load_prior

    try:
        p = load_prior(str(prior), device=device)
    except KeyError as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise FileNotFoundError(f"prior not found: {msg}") from None
    eval_ = getattr(p, "eval", None)
    return (eval_() or p) if callable(eval_) else p


def _solver_takes(method: str, name: str) -> bool:
    """Does the solver behind ``method`` take the option ``name`` (its ``Options``)?"""
    return name in registry.method(method).options_type.names()


def run_solver(y: torch.Tensor, operator, prior, *, method: str, sigma: Optional[float],
               seed: Optional[int] = None, progress: bool = False, **options):
    """``ctflow.solvers.api.reconstruct(y, operator, prior, method, sigma=sigma, **options)``
    → a :class:`~ctflow.solvers.result.Reconstruction`.

    ``seed`` (reduced modulo :math:`2^{31}`) and ``progress`` are passed on to the solvers
    that take them unless ``options`` already set them. A method that needs no prior
    (registry ``needs_prior``) gets ``prior=None``, so the prior only set up the problem."""
    spec = registry.method(method)
    if seed is not None and "seed" not in options and _solver_takes(spec.name, "seed"):
        options["seed"] = int(seed) % 2**31
    if progress and "progress" not in options and _solver_takes(spec.name, "progress"):
        options["progress"] = True
    return reconstruct(y, operator, prior if spec.needs_prior else None, spec.name,
                       sigma=sigma, **options)


def working_size(size: Optional[int], prior: Any, *, native: int) -> int:
    """The side of the images a task reconstructs: ``size`` if given, else a fixed-size
    prior's ``image_size``, else (a size-agnostic prior) the data's ``native`` side, else
    (no prior) :data:`DEFAULT_SIZE`."""
    if size is not None:
        return int(size)
    if prior is not None:
        fixed = getattr(prior, "image_size", None)
        return int(fixed) if fixed is not None else int(native)
    return DEFAULT_SIZE


def slice_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and a slice key (its SOPInstanceUID): the same slice
    gets the same noise draw in every run, whichever slice range is processed."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).hexdigest()
    return int(h[:15], 16)


def _resize(t: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of a 2-D tensor to ``size × size`` (unchanged if it is)."""
    if tuple(t.shape) == (size, size):
        return t
    return F.interpolate(t[None, None], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)[0, 0]


def to_working_size(x: Any, size: int, *, hu_window: Optional[Tuple[float, float]] = None
                    ) -> torch.Tensor:
    """A 2-D slice → ``(size, size)`` float32 in [0, 1].

    * ``hu_window=(lo, hi)`` (HU slices): exactly the preparation of the priors' training data
      (``ctflow.training.datasets.CTSliceDataset`` without augmentation; a test keeps the two
      equal): ``clip((HU - lo)/(hi - lo), 0, 1)``, zero-padded to a centred square,
      antialiased bilinear resize to twice the working size, then to the working size.
    * ``hu_window=None`` (images already in [0, 1]): clipped to [0, 1], zero-padded to a
      centred square and resized once with antialiased bilinear interpolation; an image that
      is already ``size × size`` is returned unchanged.
    """
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {arr.shape}")
    size = int(size)
    if hu_window is not None:
        lo, hi = float(hu_window[0]), float(hu_window[1])
        if not lo < hi:
            raise ValueError(f"hu_window must be (lo, hi) with lo < hi, got {hu_window}")
        arr = np.asarray(window_hu(arr, lo, hi), dtype=np.float32)
    h, w = arr.shape
    n = max(h, w)
    sq = np.zeros((n, n), dtype=np.float32)
    sq[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = np.clip(arr, 0.0, 1.0)
    t = torch.from_numpy(sq)
    if hu_window is not None:
        t = _resize(t, 2 * size).clamp(0.0, 1.0)
    return _resize(t, size).clamp(0.0, 1.0).contiguous()


def from_working_size(x: torch.Tensor, shape: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`to_working_size` up to resampling: bicubic resize to the padded
    square, crop the centre ``shape`` back, clip to [0, 1]."""
    h, w = int(shape[0]), int(shape[1])
    n = max(h, w)
    size = x.shape[-1]
    x4 = x.reshape(1, 1, size, size)
    if n == size:
        up = x4
    elif n > size:
        up = F.interpolate(x4, size=(n, n), mode="bicubic", align_corners=False)
    else:
        up = F.interpolate(x4, size=(n, n), mode="area")
    top, left = (n - h) // 2, (n - w) // 2
    return up[0, 0, top:top + h, left:left + w].clamp(0.0, 1.0)
