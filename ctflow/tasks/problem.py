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
* :func:`simulate_lowdose` -- a transmission scan with
  :class:`~ctflow.operators.noise.PoissonNoise` in physical units (:mod:`ctflow.operators.units`),
  returned as data and statistical weights of the window image;
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
from ctflow.operators.noise import GaussianNoise, LowDoseData, PoissonNoise
from ctflow.operators.units import WindowMap
from ctflow.solvers import registry
from ctflow.solvers.api import reconstruct

__all__ = ["DEFAULT_HU_WINDOW", "DEFAULT_SIZE", "FAN_DISTANCES", "HU_CLIP", "make_ct_operator",
           "infer_size", "simulate_measurement", "simulate_lowdose", "measure", "geometry_names",
           "check_noise", "resolve_prior", "run_solver", "slice_seed", "to_working_size",
           "from_working_size", "working_size"]

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


def geometry_names() -> Tuple[str, ...]:
    """Every ``geometry=`` name: ``parallel``, ``fan`` and the presets in mm
    (:func:`ctflow.operators.ct.preset_names`)."""
    return tuple(_GEOMETRIES) + ct.preset_names()


def _geometry(geometry: str, size: int, views: Optional[int],
              pixel_mm: Optional[float] = None):
    if geometry in ct.PRESETS:
        return ct.preset(geometry, int(size), pixel_mm, views)
    if geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be one of {', '.join(geometry_names())}, "
                         f"got {geometry!r}")
    if views is None:
        raise ValueError(f"geometry {geometry!r} needs a view count (views=None is only for "
                         f"the presets {', '.join(ct.preset_names())})")
    if pixel_mm is None:
        extent = 1.0
    elif isinstance(pixel_mm, bool) or not isinstance(pixel_mm, (int, float)) \
            or not np.isfinite(pixel_mm) or pixel_mm <= 0:
        raise ValueError(f"pixel_mm must be a finite number > 0, got {pixel_mm!r}")
    else:
        extent = 0.5 * int(size) * float(pixel_mm)
    extra = {k: v * extent for k, v in FAN_DISTANCES.items()} if geometry == "fan" else {}
    return _GEOMETRIES[geometry](image_size=int(size), angles=int(views), extent=extent, **extra)


def make_ct_operator(size: int, views: Optional[int], *, geometry: str = "parallel",
                     pixel_mm: Optional[float] = None, backend: str = "torch",
                     device: Any = None):
    r"""The CT forward operator on ``size × size`` images with ``views`` angles.

    ``geometry`` is ``"parallel"`` (:class:`ctflow.operators.ct.ParallelBeam2D`, angles
    uniform over :math:`[0, \pi)`), ``"fan"`` (:class:`ctflow.operators.ct.FanBeam2D` with
    the distances :data:`FAN_DISTANCES`, angles uniform over :math:`[0, 2\pi)`), both with the
    geometry's default detector (covering the image), or a preset in mm
    (:func:`ctflow.operators.ct.preset`: ``clinical-fan``, ``lodopab-parallel``; ``views=None``
    is the preset's full view count).

    ``pixel_mm`` is the pixel size in mm: for ``parallel``/``fan`` the image then covers
    :math:`[-e, e]^2` with ``e = size * pixel_mm / 2`` (the fan distances scale with it) and
    line integrals are in mm; ``None`` keeps the unit half-width (``e = 1``). For the presets
    ``None`` means the preset's native field of view divided by ``size``. Returns
    ``RayTransform(geom, backend=backend)`` placed on ``device`` where the operator supports
    it (tensors passed to it decide the device for the torch backend).
    """
    size = int(size)
    if not 8 <= size <= MAX_SIZE:
        raise ValueError(f"working size must be 8 to {MAX_SIZE} pixels, got {size}")
    if views is not None and int(views) < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    op = ct.RayTransform(_geometry(geometry, size, None if views is None else int(views),
                                   pixel_mm), backend=backend)
    to = getattr(op, "to", None)
    if device is not None and callable(to):
        moved = to(torch.device(device))
        op = moved if moved is not None else op
    return op


def infer_size(views: int, detectors: int, *, geometry: str = "parallel",
               max_size: int = 4096) -> int:
    r"""The image size ``N`` whose default ``geometry`` has ``detectors`` detector bins
    (parallel beam: :math:`\lceil\sqrt2 N\rceil`); ``ValueError`` if none does (and for a
    preset, whose detector is fixed)."""
    if geometry in ct.PRESETS:
        raise ValueError(f"the preset {geometry!r} has a fixed detector "
                         f"({ct.PRESETS[geometry].detectors} bins): its image size cannot be "
                         f"inferred from a sinogram; pass --size")
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


def simulate_lowdose(operator, x: torch.Tensor, noise: PoissonNoise, *,
                     window: Optional[WindowMap] = None,
                     generator: Optional[torch.Generator] = None) -> LowDoseData:
    r"""A simulated low-dose scan of the window image ``x`` (in ``[0, 1]``), ready for
    ``reconstruct(y, operator, prior, method, sigma=1.0, weights=w)`` on ``x``.

    The chain of :mod:`ctflow.operators.units`: :math:`\mu = \max(a x + b, 0)` (mm⁻¹,
    ``window``, default :class:`~ctflow.operators.units.WindowMap` of
    :data:`DEFAULT_HU_WINDOW`), line integrals :math:`p = A\mu` (``operator`` must be a
    geometry in mm: a preset or ``pixel_mm=``), counts and post-log data from ``noise``
    (:meth:`~ctflow.operators.noise.PoissonNoise.simulate`), then the data of the window image
    :math:`y_x = (y - b\,A\mathbf 1)/a` with weights :math:`a^2 w`
    (:meth:`~ctflow.operators.units.WindowMap.data_for_window`). Returns a
    :class:`~ctflow.operators.noise.LowDoseData` (``y``, ``weights`` in ``x``'s dtype,
    ``counts``, ``sigma=1``)."""
    if not isinstance(noise, PoissonNoise):
        raise TypeError(f"simulate_lowdose: noise must be a PoissonNoise, got "
                        f"{type(noise).__name__}")
    window = WindowMap(DEFAULT_HU_WINDOW) if window is None else window
    with torch.no_grad():
        data = noise.simulate(operator(window.to_mu(x, physical=True)), generator=generator)
        y_x, w_x = window.data_for_window(data.y.to(x.dtype), operator,
                                          data.weights.to(x.dtype))
    return LowDoseData(y=y_x, weights=w_x, counts=data.counts, sigma=1.0)


def measure(operator, x: torch.Tensor, noise, *, window: Optional[WindowMap] = None,
            generator: Optional[torch.Generator] = None):
    """A simulated measurement of the window image ``x`` for either noise model:
    ``(y, sigma, weights)`` with ``sigma`` per item ``(B,)`` and ``weights`` ``None`` for a
    :class:`~ctflow.operators.noise.GaussianNoise` (:func:`simulate_measurement`), the
    statistical weights and ``sigma = 1`` for a
    :class:`~ctflow.operators.noise.PoissonNoise` scan (:func:`simulate_lowdose`; the
    operator must be in mm)."""
    if isinstance(noise, PoissonNoise):
        scan = simulate_lowdose(operator, x, noise, window=window, generator=generator)
        return scan.y, torch.ones(x.shape[0], dtype=torch.float64), scan.weights
    y, sigma = simulate_measurement(operator, x, noise, generator=generator)
    return y, sigma, None


def check_noise(method: str, noise):
    """``noise`` if ``method`` can use it: a :class:`GaussianNoise`, and not zero when the
    method needs :math:`\\sigma > 0` (registry ``needs_sigma``); ``ValueError`` (``TypeError``
    for another type) naming both otherwise. Called before any work starts."""
    if isinstance(noise, PoissonNoise):
        registry.method(method)  # the data of a PoissonNoise scan have sigma = 1
        return noise
    if not isinstance(noise, GaussianNoise):
        raise TypeError("noise must be a ctflow.operators.noise.GaussianNoise (sigma= absolute "
                        f"or relative= level) or PoissonNoise, got {noise!r}")
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
               weights: Optional[torch.Tensor] = None, seed: Optional[int] = None,
               progress: bool = False, **options):
    """``ctflow.solvers.api.reconstruct(y, operator, prior, method, sigma=sigma, **options)``
    → a :class:`~ctflow.solvers.result.Reconstruction`.

    ``weights`` (the statistical weights of a low-dose scan, :func:`simulate_lowdose`) are
    passed on as ``weights=`` (data term :math:`\frac1{2\sigma^2}\sum_i w_i(Ax-y)_i^2`);
    ``None`` passes nothing (the unweighted data term, as before).

    ``seed`` (reduced modulo :math:`2^{31}`) and ``progress`` are passed on to the solvers
    that take them unless ``options`` already set them. A method that needs no prior
    (registry ``needs_prior``) gets ``prior=None``, so the prior only set up the problem."""
    spec = registry.method(method)
    if seed is not None and "seed" not in options and _solver_takes(spec.name, "seed"):
        options["seed"] = int(seed) % 2**31
    if progress and "progress" not in options and _solver_takes(spec.name, "progress"):
        options["progress"] = True
    if weights is not None:
        options["weights"] = weights
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
