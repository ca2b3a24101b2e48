r"""Reconstruct a CT DICOM series slice by slice into a derived DICOM series.

:func:`reconstruct_dicom` is the library function behind ``ctflow reconstruct-dicom``. It is
a *simulation study* by default: each input slice is taken as the ground truth, a sparse-view
measurement is simulated from it, reconstructed, and the result is written back as DICOM and
compared with the input. A measured sinogram file can replace the simulation.

Per slice :math:`k` (HU image :math:`h_k` of the original matrix size):

1. clip to :math:`[-1024, 3071]` HU (removes the -3024/-2048 padding outside the scan circle);
2. window with the prior's ``hu_window`` :math:`(l, u)`: :math:`x = \mathrm{clip}((h - l)/(u - l),
   0, 1)` -- HU outside the window are clipped and **do not come back**;
3. pad to a square (with 0) and resize to the working size :math:`n` with antialiased bilinear
   interpolation -- exactly the preparation of the prior's training data
   (``ctflow.training.datasets.CTSliceDataset`` without augmentation): :math:`x_k \in [0, 1]^{n
   \times n}`;
4. measure: :math:`y = A x_k + \sigma\varepsilon`, :math:`\sigma = \eta\,\|A x_k\|_2/\sqrt m`
   (the fraction :math:`\eta` = ``noise_level`` of the RMS of the clean data, the benchmarks'
   convention), :math:`\varepsilon \sim N(0, I)` drawn from a generator seeded by
   ``(seed, SOPInstanceUID)`` (the same draw in every run and whatever the slice range) -- or
   :math:`y` from the ``sinogram`` file, with :math:`\sigma = \eta\,\|y\|_2/\sqrt m`;
5. reconstruct :math:`\hat x_k` = ``ctflow.reconstruct(y, A, prior, method, noise_level=sigma)``
   (the solver seeded by the same per-slice seed);
6. PSNR/SSIM of :math:`\hat x_k` against :math:`x_k` (data range 1);
7. map back: bicubic upsampling to the padded square, crop, clip to :math:`[0, 1]`,
   :math:`h = l + \hat x (u - l)` HU, and write one derived DICOM slice (the reference header is
   the input slice, file name keyed by its SOPInstanceUID; the derived SeriesInstanceUID is a
   stable function of the input series and the settings, so a resumed run adds to the same
   series).

Outputs in ``out_dir``: the derived slices, ``summary.json`` (settings, per-slice metrics of
every slice in the folder -- slices of earlier runs outside this run's range are kept --, their
means, versions, timing; rewritten atomically after every slice, ``"status": "complete"`` at
the end) and ``montage.png`` (input vs reconstruction of the slices in the range, at most
:data:`MONTAGE_MAX` of them, evenly spaced). With
``resume=True`` slices whose output file exists and is a valid DICOM of the derived series are
skipped (their metrics are taken from the previous ``summary.json``); inputs are never
modified, ``out_dir`` may not be ``in_dir`` (or inside it), and existing outputs are never
overwritten.

``ray=...`` (``ctflow reconstruct-dicom --ray [ADDRESS]``) solves the slices as Ray tasks
(:mod:`ctflow.distributed.slices`): every task runs :func:`solve_slice` -- steps 4-7, the same
function as in-process -- and returns the result; this process writes each slice as it
arrives, so the outputs, the summary and ``--resume`` are the same as in-process.

Also here, because the demo and ``ctflow reconstruct`` share them: :func:`make_ct_operator`,
:func:`simulate_measurement`, :func:`resolve_prior`, :func:`to_working_size` and
:func:`from_working_size`.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import importlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ctflow.data.atomic import atomic_write_bytes, atomic_write_json
from ctflow.operators.noise import GaussianNoise

__all__ = ["reconstruct_dicom", "solve_slice", "make_ct_operator", "simulate_measurement",
           "resolve_prior", "run_solver", "infer_size", "load_sinograms", "read_h5_array",
           "slice_stack", "write_montage", "to_working_size", "from_working_size", "slice_seed",
           "atomic_write_bytes", "atomic_write_json", "versions",
           "DEFAULT_HU_WINDOW", "FAN_DISTANCES", "DEFAULT_SIZE", "CLASSICAL", "MONTAGE_MAX"]

#: HU window used when no prior is given (``prior=None``): the full 12-bit CT range.
DEFAULT_HU_WINDOW = (-1024.0, 3071.0)
#: Working size used when neither ``size`` nor a prior gives one.
DEFAULT_SIZE = 64
#: Fan-beam distances used by ``geometry="fan"``, in units of the image half-width (the image
#: covers [-1, 1]^2): source to rotation centre 4, rotation centre to detector 2
#: (magnification 1.5, a full fan angle of about 41 degrees over the image's circumscribed
#: circle; a clinical scanner's ratios are similar).
FAN_DISTANCES = {"source_origin": 4.0, "origin_detector": 2.0}
#: Most slices drawn in ``montage.png`` (a longer range shows this many, evenly spaced).
MONTAGE_MAX = 16
#: Methods of ``ctflow.reconstruct`` that ignore the prior.
CLASSICAL = ("fbp", "tv", "cgls", "landweber")

PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------- shared building blocks
def versions() -> Dict[str, str]:
    """Versions recorded in summaries: ctflow, torch, numpy, pydicom, python, platform."""
    import ctflow

    out = {"ctflow": getattr(ctflow, "__version__", "?"), "torch": torch.__version__,
           "numpy": np.__version__, "python": sys.version.split()[0],
           "platform": platform.platform()}
    try:
        import pydicom
        out["pydicom"] = pydicom.__version__
    except ImportError:  # pragma: no cover - a core dependency
        pass
    return out


def make_ct_operator(size: int, views: int, *, geometry: str = "parallel",
                     backend: str = "torch", device: Any = None):
    """The CT forward operator on ``size × size`` images with ``views`` angles.

    ``geometry`` is ``"parallel"`` (:class:`ctflow.operators.ct.ParallelBeam2D`, angles
    uniform over :math:`[0, \\pi)`) or ``"fan"`` (:class:`ctflow.operators.ct.FanBeam2D` with
    the distances :data:`FAN_DISTANCES`, angles uniform over :math:`[0, 2\\pi)`); both use the
    geometry's default detector (covering the image). Returns
    ``RayTransform(geom, backend=backend)`` placed on ``device`` where the operator supports
    it (tensors passed to it decide the device for the torch backend).
    """
    size, views = int(size), int(views)
    if size < 8:
        raise ValueError(f"working size must be >= 8 pixels, got {size}")
    if views < 1:
        raise ValueError(f"views must be >= 1, got {views}")
    try:
        ct = importlib.import_module("ctflow.operators.ct")
    except ImportError as exc:
        raise ImportError(f"the CT operators (ctflow.operators.ct) failed to import: {exc}") \
            from exc
    names = {"parallel": "ParallelBeam2D", "fan": "FanBeam2D"}
    if geometry not in names:
        raise ValueError(f"geometry must be 'parallel' or 'fan', got {geometry!r}")
    for needed in (names[geometry], "RayTransform"):
        if not hasattr(ct, needed):
            raise ImportError(f"ctflow.operators.ct has no {needed} (the CT operators are not "
                              "installed in this checkout)")
    extra = FAN_DISTANCES if geometry == "fan" else {}
    geom = getattr(ct, names[geometry])(image_size=size, angles=views, **extra)
    op = ct.RayTransform(geom, backend=backend)
    to = getattr(op, "to", None)
    if device is not None and callable(to):
        moved = to(torch.device(device))
        op = moved if moved is not None else op
    return op


def _geometry_class(geometry: str):
    ct = importlib.import_module("ctflow.operators.ct")
    names = {"parallel": "ParallelBeam2D", "fan": "FanBeam2D"}
    if geometry not in names:
        raise ValueError(f"geometry must be 'parallel' or 'fan', got {geometry!r}")
    cls = getattr(ct, names[geometry], None)
    if cls is None:
        raise ImportError(f"ctflow.operators.ct has no {names[geometry]}")
    return cls


def infer_size(views: int, detectors: int, *, geometry: str = "parallel",
               max_size: int = 4096) -> int:
    """The image size ``N`` whose default ``geometry`` has ``detectors`` detector bins
    (parallel beam: :math:`\lceil\sqrt2 N\rceil`); ``ValueError`` if none does."""
    cls = _geometry_class(geometry)
    for n in range(8, max_size + 1):
        extra = FAN_DISTANCES if geometry == "fan" else {}
        d = cls(image_size=n, angles=int(views), **extra).sinogram_shape[-1]
        if d == detectors:
            return n
        if d > detectors:
            break
    raise ValueError(f"no image size gives {detectors} detectors in the default {geometry} "
                     f"geometry; pass --size")


def _solver_accepts(api, method: str, name: str) -> bool:
    """Does the solver class behind ``method`` take the option ``name``?"""
    import inspect

    try:
        cls = api.solver_class(method)
    except Exception:  # noqa: BLE001 - let reconstruct() report the problem itself
        return False
    defaults = getattr(cls, "DEFAULTS", None)
    if isinstance(defaults, dict):
        return name in defaults
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def run_solver(y: torch.Tensor, operator, prior, *, method: str, noise_level: float,
               seed: Optional[int] = None, progress: bool = False, **options):
    """``ctflow.solvers.api.reconstruct(y, operator, prior, method=..., noise_level=...,
    **options)`` → a :class:`~ctflow.solvers.result.Reconstruction`.

    ``seed`` and ``progress`` are passed on to the solvers that take them (the flow solvers
    and TV) unless ``options`` already set them.
    """
    from ctflow.solvers import api

    if seed is not None and "seed" not in options and _solver_accepts(api, method, "seed"):
        options["seed"] = int(seed) % 2**31
    if progress and "progress" not in options and _solver_accepts(api, method, "progress"):
        options["progress"] = True
    return api.reconstruct(y, operator, prior, method=method, noise_level=noise_level,
                           **options)


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


def resolve_prior(prior: Any, *, device: Any = None):
    """``None`` → ``None``; a :class:`~ctflow.priors.base.FlowPrior` → itself; a name or a
    checkpoint path → ``ctflow.priors.registry.load_prior(prior)`` moved to ``device`` and put
    in eval mode. A prior that cannot be found raises ``FileNotFoundError``."""
    if prior is None:
        return None
    from ctflow.priors.base import FlowPrior

    if isinstance(prior, FlowPrior):
        return prior.to(device=device) if device is not None else prior
    try:
        registry = importlib.import_module("ctflow.priors.registry")
    except ImportError as exc:
        raise ImportError(f"cannot load prior {prior!r}: the prior registry "
                          f"(ctflow.priors.registry) is not available ({exc})") from exc
    try:
        p = registry.load_prior(str(prior), device=device) if _accepts(
            registry.load_prior, "device") else registry.load_prior(str(prior))
    except FileNotFoundError:
        raise
    except KeyError as exc:
        msg = exc.args[0] if exc.args else str(exc)
        raise FileNotFoundError(f"prior not found: {msg}") from None
    if device is not None:
        p = p.to(device=device) or p
    eval_ = getattr(p, "eval", None)
    if callable(eval_):
        p = eval_() or p
    return p


def _accepts(fn, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def slice_seed(seed: int, key: str) -> int:
    """A 63-bit seed from the run seed and a slice key (its SOPInstanceUID): the same slice
    gets the same noise draw in every run, whichever slice range is processed."""
    h = hashlib.sha256(f"{int(seed)}:{key}".encode()).hexdigest()
    return int(h[:15], 16)


def to_working_size(x: Any, size: int, *, hu_window: Optional[Tuple[float, float]] = None
                    ) -> torch.Tensor:
    """A 2-D slice → ``(size, size)`` float32 in [0, 1].

    * ``hu_window=(lo, hi)`` (HU slices): exactly the preparation of the priors' training data
      (``ctflow.training.datasets.CTSliceDataset`` without augmentation): ``clip((HU - lo)/(hi -
      lo), 0, 1)``, zero-padded to a centred square, antialiased bilinear resize through twice
      the working size.
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
        from ctflow.training.datasets import CTSliceDataset

        window = (float(hu_window[0]), float(hu_window[1]))
        ds = CTSliceDataset([arr], image_size=size, hu_window=window, augment=False)
        return ds[0][0].to(torch.float32).clamp(0.0, 1.0).contiguous()
    h, w = arr.shape
    n = max(h, w)
    sq = np.zeros((n, n), dtype=np.float32)
    sq[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = np.clip(arr, 0.0, 1.0)
    t = torch.from_numpy(sq)
    if n != size:
        t = F.interpolate(t[None, None], size=(size, size), mode="bilinear",
                          align_corners=False, antialias=True)[0, 0]
    return t.clamp(0.0, 1.0).contiguous()


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


def _finite_or_none(v: float) -> Optional[float]:
    return float(v) if v is not None and math.isfinite(float(v)) else None


# ---------------------------------------------------------------------- sinogram files
def load_sinograms(path: PathLike) -> np.ndarray:
    """A measured sinogram file → float32 ``(Z, views, detectors)``.

    ``.npy``: a 2-D or 3-D array. ``.h5``/``.hdf5``: the dataset ``sinogram``, ``data`` or
    ``observation``, or the only dataset in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sinogram file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    elif suffix in (".h5", ".hdf5"):
        arr = read_h5_array(path, None, preferred=("sinogram", "data", "observation"))
    else:
        raise ValueError(f"{path}: sinogram files must be .npy, .h5 or .hdf5")
    return slice_stack(arr, path, what="sinogram", axes="views, detectors")


def slice_stack(arr: Any, source: Any, *, what: str = "array", axes: str = "H, W"
                ) -> np.ndarray:
    """``arr`` as a finite float32 stack of slices ``(Z, *axes)``; a 2-D array is one slice.

    ``ValueError`` naming ``source`` (a path) for any other number of dimensions and for
    NaN or infinite values; ``what`` and ``axes`` name the array and its two axes there."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{source}: expected a 2-D {what} ({axes}) or a stack (Z, {axes}), "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{source}: the {what} holds NaN or infinite values")
    return arr


def read_h5_array(path: PathLike, dataset: Optional[str],
                  preferred: Sequence[str] = ()) -> np.ndarray:
    """Read one dataset of an HDF5 file: ``dataset`` if given, else the first of
    ``preferred`` present, else the only dataset in the file (``ValueError`` listing the
    datasets otherwise)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    with f:
        names: List[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if dataset is not None:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise ValueError(f"{path}: no dataset {dataset!r}; datasets: {names}")
            return np.asarray(f[dataset][()])
        for name in preferred:
            if name in f and isinstance(f[name], h5py.Dataset):
                return np.asarray(f[name][()])
        if len(names) == 1:
            return np.asarray(f[names[0]][()])
        raise ValueError(f"{path}: {len(names)} datasets {names}; choose one with --dataset")


# ---------------------------------------------------------------------- DICOM output
def _data_api():
    """The DICOM functions of :mod:`ctflow.data` this module needs (clear error if absent)."""
    data = importlib.import_module("ctflow.data")
    needed = ("read_dicom_series", "clip_hu")
    missing = [n for n in needed if not hasattr(data, n)]
    if missing:
        raise ImportError(f"ctflow.data lacks {', '.join(missing)}")
    return data


def _writer_api(data):
    """``(write_dicom_slice, derived_series_uid, derived_file_name)`` from ``ctflow.data``."""
    names = ("write_dicom_slice", "derived_series_uid", "derived_file_name")
    found = [getattr(data, n, None) for n in names]
    if not all(callable(f) for f in found):
        try:
            mod = importlib.import_module("ctflow.data.dicom_write")
            found = [getattr(mod, n, None) for n in names]
        except ImportError:
            pass
    if not all(callable(f) for f in found):
        raise ImportError("ctflow.data has no one-slice DICOM writer (write_dicom_slice, "
                          "derived_series_uid, derived_file_name); reconstruct-dicom needs it")
    return tuple(found)


def _same_or_inside(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or b in a.parents


def _settings_key(settings: Dict[str, Any]) -> Dict[str, Any]:
    """The settings that must agree between a run and the run it resumes."""
    keys = ("method", "prior", "views", "geometry", "noise_level", "size", "seed", "backend",
            "sinogram", "options", "hu_window", "source_series_uid")
    return {k: settings.get(k) for k in keys}


def _describe(method: str, settings: Dict[str, Any]) -> str:
    """The derived series' description: the method and its settings. The writer puts the first
    64 characters into SeriesDescription and the whole text into DerivationDescription; the
    derived SeriesInstanceUID is a function of it (same settings, same series)."""
    prior = ""
    if settings.get("prior") and method not in CLASSICAL:
        p = str(settings["prior"])
        prior = " " + (Path(p).stem if ("/" in p or os.sep in p) else p)
    if settings.get("sinogram"):
        meas = f"measured {Path(settings['sinogram']).name}"
    else:
        meas = f"{settings['views']} views noise {100 * settings['noise_level']:g}%"
    text = (f"ctflow {method}{prior} {settings['geometry']} {meas} {settings['size']}px "
            f"seed {settings['seed']}")
    if settings.get("options"):
        text += " " + " ".join(f"{k}={json.dumps(v)}" for k, v in
                               sorted(settings["options"].items()))
    return text


def _valid_output(path: Path, series_uid: Optional[str]) -> bool:
    """Does ``path`` hold a readable DICOM image of the derived series?"""
    import pydicom

    if not path.is_file() or path.stat().st_size == 0:
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=False)
        ok = "PixelData" in ds and int(ds.Rows) > 0 and int(ds.Columns) > 0
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * \
            int(ds.get("SamplesPerPixel", 1))
        ok = ok and len(ds.PixelData) >= expected
        if series_uid is not None:
            ok = ok and str(ds.SeriesInstanceUID) == series_uid
        return bool(ok)
    except Exception:  # noqa: BLE001 - any parse failure means "not a valid output"
        return False


def _read_output_hu(path: Path) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)


# ---------------------------------------------------------------------- montage
def write_montage(path: PathLike, items: Sequence[Dict[str, Any]], *, title: str = "") -> None:
    """Write a PNG grid: for each item (``index``, ``input``, ``recon`` 2-D arrays in [0, 1],
    ``psnr``, ``ssim``) the input and the reconstruction side by side, four pairs a row."""
    import io

    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(items)
    if n == 0:
        return
    pairs_per_row = min(4, n)
    rows = int(math.ceil(n / pairs_per_row))
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, squeeze=False,
                             figsize=(2 * pairs_per_row * 1.7, rows * 1.9 + 0.4))
    for ax in axes.flat:
        ax.axis("off")
    for i, it in enumerate(items):
        r, c = divmod(i, pairs_per_row)
        a, b = axes[r, 2 * c], axes[r, 2 * c + 1]
        a.imshow(it["input"], cmap="gray", vmin=0, vmax=1)
        a.set_title(f"slice {it['index']} input", fontsize=7)
        b.imshow(it["recon"], cmap="gray", vmin=0, vmax=1)
        p = it.get("psnr")
        s = it.get("ssim")
        label = "recon" if p is None else f"{p:.1f} dB / {s:.3f}"
        b.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


# ---------------------------------------------------------------------- one slice
def solve_slice(x: torch.Tensor, *, operator, prior, method: str, noise_level: float,
                seed: int, key: str, hu_shape: Tuple[int, int],
                window: Tuple[float, float], device: Any = None,
                measured: Optional[np.ndarray] = None, **options) -> Dict[str, Any]:
    r"""Steps 4-7 of the module docstring for one prepared slice; no file is touched.

    ``x`` is the ``(n, n)`` working-size image in [0, 1]; ``key`` (the SOPInstanceUID) seeds
    the noise draw and the solver with :func:`slice_seed` ``(seed, key)``; ``measured`` (a
    ``(views, detectors)`` sinogram) replaces the simulation. The same call runs in this
    process and inside a Ray task, so both give the same reconstruction.

    Returns ``recon`` (``(n, n)`` float32 array in [0, 1]), ``hu`` (float32 HU at
    ``hu_shape``: :math:`l + \mathrm{up}(\hat x)(u - l)`), ``psnr``, ``ssim`` (against ``x``),
    ``seconds`` (the solve), ``nfe``, ``peak_memory_bytes``, ``noise_sigma`` and
    ``noise_seed`` (``None`` for a measured sinogram).
    """
    from ctflow.metrics import psnr as _psnr, ssim as _ssim

    n = int(x.shape[-1])
    s_seed = slice_seed(seed, key)
    dev = torch.device(device) if device is not None else x.device
    xb = x.to(dev).reshape(1, 1, n, n)
    if measured is None:
        gen = torch.Generator().manual_seed(s_seed)
        y, sigma = simulate_measurement(operator, xb, noise_level, generator=gen)
    else:
        meas = np.asarray(measured, dtype=np.float32)
        y = torch.from_numpy(meas).to(dev).reshape(1, 1, *meas.shape[-2:])
        sigma = relative_sigma(y, noise_level)
    torch.manual_seed(s_seed)
    t0 = time.perf_counter()
    res = run_solver(y, operator, prior, method=method, noise_level=float(sigma[0]),
                     seed=s_seed, **options)
    seconds = time.perf_counter() - t0
    rec_img = res.image.detach().to("cpu", torch.float32).reshape(n, n).clamp(0, 1)
    ref = x.detach().to("cpu", torch.float32).reshape(n, n)
    up = from_working_size(rec_img, hu_shape)
    hu_out = (window[0] + up * (window[1] - window[0])).numpy().astype(np.float32)
    return {"recon": rec_img.numpy(), "hu": hu_out, "psnr": float(_psnr(rec_img, ref)),
            "ssim": float(_ssim(rec_img, ref)), "seconds": seconds, "nfe": dict(res.nfe),
            "peak_memory_bytes": res.peak_memory_bytes, "noise_sigma": float(sigma[0]),
            "noise_seed": s_seed if measured is None else None}


# ---------------------------------------------------------------------- the script
@contextlib.contextmanager
def _locked_out_dir(out_dir: Path):
    """Hold an exclusive lock on ``OUT_DIR/.ctflow-reconstruct-dicom.lock`` (one writer per
    folder), then remove temporary files an interrupted run of ours left behind (hidden
    ``.<name>.<random>.tmp`` files of the atomic writes; never a finished output)."""
    f = open(out_dir / ".ctflow-reconstruct-dicom.lock", "a+")
    try:
        import fcntl

        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # pragma: no cover - not POSIX: no lock, still safe for one writer
        pass
    except OSError:
        f.close()
        raise FileExistsError(f"another reconstruct-dicom run is writing {out_dir}; wait for "
                              "it to finish or choose another OUT_DIR") from None
    try:
        for tmp in out_dir.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink()
        yield
    finally:
        f.close()


def reconstruct_dicom(in_dir: PathLike, out_dir: PathLike, *, views: int = 60,
                      geometry: str = "parallel", noise_level: float = 0.01,
                      method: str = "msflow", prior: Any = "ct64", size: Optional[int] = None,
                      slices: Union[slice, Tuple[int, int], None] = None, device: Any = None,
                      resume: bool = False, seed: int = 0, progress: bool = True,
                      sinogram: Optional[PathLike] = None, backend: str = "torch",
                      hu_window: Optional[Tuple[float, float]] = None,
                      verbose: bool = False, ray: Any = None, **options) -> Dict[str, Any]:
    """Reconstruct the CT series in ``in_dir`` slice by slice into a derived series in
    ``out_dir`` (see the module docstring for the exact steps and the outputs).

    Args:
        in_dir: a folder holding one CT series (read with ``ctflow.data.read_dicom_series``).
        out_dir: the output folder (created); must not be ``in_dir`` or inside it.
        views: projection angles of the simulated measurement.
        geometry: ``"parallel"`` or ``"fan"``.
        noise_level: relative noise level :math:`\\eta` (``0.01`` = 1 %).
        method: any method of ``ctflow.reconstruct`` (``"msflow"``, ``"dflow"``, ``"fbp"``,
            ``"tv"``, ...).
        prior: a bundled prior name, a checkpoint path, a ``FlowPrior``, or ``None`` (only for
            the classical methods; then ``hu_window`` defaults to [-1024, 3071] HU and the
            working size to 64).
        size: working size (default: the prior's ``image_size``).
        slices: ``slice(start, stop)`` or ``(start, stop)``: 0-based indices in anatomical
            order (the volume's slice order), stop exclusive. Default: every slice.
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
        resume: skip slices whose output file exists and is valid; without it an ``out_dir``
            holding outputs of an earlier run is refused.
        seed: run seed; the noise of a slice is seeded by ``(seed, SOPInstanceUID)`` and the
            solver by the same per-slice seed.
        progress: a tqdm progress bar over the slices.
        sinogram: a measured sinogram file (``(Z, views, detectors)``, ``Z`` the number of
            slices of the series or of the selected range) used instead of the simulation.
        backend: CT backend of ``RayTransform``.
        hu_window: override the prior's HU window.
        verbose: print a line per run (where the outputs went).
        ray: ``None`` (default: every slice in this process) or the slices as Ray tasks: an
            address (``"local"`` starts a private loopback-only instance, ``"auto"``,
            ``"HOST:PORT"``, ``"ray://HOST:PORT"``), ``True`` (``"local"``) or a
            :class:`ctflow.distributed.RayOptions` (retries, threads per task, GPUs per task).
            Each task solves one slice (a GPU each when the cluster has GPUs and ``device`` is
            not ``"cpu"``); this process writes every finished slice (atomically, keyed by
            its SOPInstanceUID) and the summary, so retried tasks never duplicate or lose a
            slice and ``resume`` works the same. Results equal the in-process ones (same
            seeds; the tasks run with one torch thread by default). Needs ``ctflow[ray]``.
        **options: solver options passed to ``ctflow.reconstruct``.

    Returns:
        The summary dict (also written to ``out_dir/summary.json``).
    """
    from ctflow.tasks.info import resolve_device
    from ctflow.metrics import psnr as _psnr, ssim as _ssim

    t_start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    if not in_dir.exists():
        raise FileNotFoundError(f"input folder not found: {in_dir}")
    if not in_dir.is_dir():
        raise NotADirectoryError(f"input must be a folder holding a DICOM series: {in_dir}")
    if _same_or_inside(out_dir, in_dir):
        raise ValueError(f"OUT_DIR {out_dir} is the input folder {in_dir} or inside it; "
                         "choose a separate output folder (inputs are never modified)")
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"OUT_DIR exists and is not a folder: {out_dir}")
    method = str(method).lower()
    if prior is None and method not in CLASSICAL:
        raise ValueError(f"method {method!r} needs a prior (prior=None is only for "
                         f"{', '.join(CLASSICAL)})")
    ray_opts = None
    if ray is not None and ray is not False:
        from ctflow.distributed.cluster import as_ray_options, check_installed

        ray_opts = as_ray_options(ray)
        check_installed()
    # Ray tasks resolve the device on their worker ("auto": the task's GPU where it has one).
    ray_device = "auto" if device is None else str(device)
    dev = resolve_device(device)
    data = _data_api()
    write_slice, derived_series_uid, derived_file_name = _writer_api(data)

    # The prior (its window and size define the normalisation) and the working size.
    prior_obj = resolve_prior(prior, device=dev)
    prior_label = None
    if prior_obj is not None:
        prior_label = str(prior) if isinstance(prior, (str, os.PathLike)) else \
            getattr(prior_obj, "name", "prior")
    window = tuple(float(v) for v in (hu_window or getattr(prior_obj, "hu_window", None)
                                      or DEFAULT_HU_WINDOW))
    if not window[0] < window[1]:
        raise ValueError(f"hu_window must be (lo, hi) with lo < hi, got {window}")
    n = int(size) if size is not None else int(getattr(prior_obj, "image_size", DEFAULT_SIZE))
    if prior_obj is not None and method not in CLASSICAL and n != prior_obj.image_size:
        raise ValueError(f"working size {n} differs from the prior's image_size "
                         f"{prior_obj.image_size}; flow priors reconstruct at their own size")

    # The series and the slice range.
    vol = data.read_dicom_series(in_dir, progress=False)
    nz = len(vol)
    if isinstance(slices, tuple):
        slices = slice(*slices)
    rng = range(nz)[slices] if slices is not None else range(nz)
    if len(rng) == 0:
        raise ValueError(f"slice range {slices.start}:{slices.stop} selects no slice of the "
                         f"{nz}-slice series in {in_dir}")
    indices = list(rng)

    measured = None
    if sinogram is not None:
        measured = load_sinograms(sinogram)
        if measured.shape[0] not in (nz, len(indices)):
            raise ValueError(f"{sinogram}: holds {measured.shape[0]} sinograms, expected one "
                             f"per slice of the series ({nz}) or of the range ({len(indices)})")
        if measured.shape[1] != views:
            views = int(measured.shape[1])
    A = make_ct_operator(n, views, geometry=geometry, backend=backend, device=dev)
    if measured is not None and tuple(measured.shape[1:]) != tuple(A.range_shape[-2:]):
        raise ValueError(f"{sinogram}: sinograms of shape {tuple(measured.shape[1:])} do not "
                         f"match the {geometry} geometry at size {n} with {views} views, "
                         f"which expects {tuple(A.range_shape[-2:])}")

    settings = {
        "in_dir": str(in_dir.resolve()), "out_dir": str(out_dir.resolve()),
        "method": method, "prior": prior_label, "views": int(views), "geometry": geometry,
        "noise_level": float(noise_level), "noise_model": "y = Ax + level*rms(Ax)*N(0,1)",
        "size": n, "slices": [indices[0], indices[-1] + 1], "seed": int(seed),
        "backend": backend, "device": str(dev),
        "sinogram": str(Path(sinogram).resolve()) if sinogram is not None else None,
        "options": {k: v for k, v in options.items()}, "hu_window": list(window),
        "hu_clip": [-1024.0, 3071.0], "source_series_uid": vol.series_uid,
        "series_description": None,
    }
    settings["series_description"] = _describe(method, settings)

    # Output folder, earlier runs and resume.
    summary_path = out_dir / "summary.json"
    previous: Dict[str, Any] = {}
    if summary_path.exists():
        try:
            previous = json.loads(summary_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{summary_path}: unreadable summary of an earlier run ({exc}); "
                             "choose another OUT_DIR") from None
        if not resume:
            raise FileExistsError(f"OUT_DIR {out_dir} holds an earlier run (summary.json); "
                                  "pass --resume to continue it or choose another folder")
        if _settings_key(previous.get("settings", {})) != _settings_key(settings):
            old, new = _settings_key(previous.get("settings", {})), _settings_key(settings)
            diff = [k for k in new if old.get(k) != new.get(k)]
            raise ValueError(f"--resume: the run in {out_dir} used different settings "
                             f"({', '.join(diff)}); rerun with the same settings or choose "
                             "another OUT_DIR")
    description = settings["series_description"]
    derived_uid = derived_series_uid(vol, description)
    if previous.get("derived_series_uid") not in (None, derived_uid):
        raise ValueError(f"--resume: {summary_path} belongs to the derived series "
                         f"{previous['derived_series_uid']}, not {derived_uid}; choose another "
                         "OUT_DIR")
    if not resume and out_dir.is_dir():
        clash = [out_dir / derived_file_name(vol.slices[k].sop_instance_uid) for k in indices
                 if (out_dir / derived_file_name(vol.slices[k].sop_instance_uid)).exists()]
        if clash:
            raise FileExistsError(f"output file exists: {clash[0]} ({len(clash)} in all); pass "
                                  "--resume to keep them and continue, or choose another OUT_DIR")
    out_dir.mkdir(parents=True, exist_ok=True)
    with _locked_out_dir(out_dir):
        prev_records = {r["sop_instance_uid"]: r for r in previous.get("slices", [])
                        if "sop_instance_uid" in r and not r.get("metrics_from")}
        # Records of an earlier run outside this run's slice range stay in the summary.
        current = {vol.slices[k].sop_instance_uid for k in indices}
        others = [r for r in previous.get("slices", []) if r.get("sop_instance_uid") not in current
                  and (out_dir / str(r.get("output_file", ""))).is_file()]
        records: List[Dict[str, Any]] = []
        montage_items: List[Dict[str, Any]] = []
        done = skipped = 0
        summary: Dict[str, Any] = {
            "status": "running", "settings": settings, "versions": versions(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "derived_series_uid": derived_uid, "slices": [],
            "executor": ("in-process" if ray_opts is None else
                         {"ray": ray_opts.label, "max_retries": ray_opts.max_retries,
                          "threads_per_task": ray_opts.threads, "task_device": ray_device}),
        }

        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(indices), desc=f"reconstruct-dicom ({method})", unit="slice")
        try:
            # 1) Outputs of earlier runs (resume): keep the valid ones, set invalid ones aside.
            pending: List[Dict[str, Any]] = []
            for pos, k in enumerate(indices):
                meta = vol.slices[k]
                sop = meta.sop_instance_uid
                hu = np.asarray(data.clip_hu(vol.hu[k], -1024.0, 3071.0), dtype=np.float32)
                x = to_working_size(hu, n, hu_window=window)
                target = out_dir / derived_file_name(sop)

                if target.exists() or target.is_symlink():
                    if not resume:
                        raise FileExistsError(f"output file exists: {target}; pass --resume to "
                                              "keep it and continue, or choose another OUT_DIR")
                    if _valid_output(target, derived_uid):
                        rec = dict(prev_records.get(sop) or _record_from_file(
                            target, x, k, sop, window, n, _psnr, _ssim))
                        rec["resumed"] = True
                        records.append(rec)
                        recon_small = to_working_size(_read_output_hu(target), n,
                                                      hu_window=window)
                        montage_items.append({"index": k, "input": x.numpy(),
                                              "recon": recon_small.numpy(), "psnr": rec.get("psnr"),
                                              "ssim": rec.get("ssim")})
                        skipped += 1
                        if bar is not None:
                            bar.update(1)
                        continue
                    # An invalid leftover (not ours, or damaged): keep it aside, never delete it.
                    aside = target.with_name(target.name + f".invalid-{int(time.time())}")
                    os.replace(target, aside)
                y_meas = None
                if measured is not None:
                    j = k if measured.shape[0] == nz else pos
                    y_meas = measured[j]
                pending.append({"index": k, "key": sop or f"slice-{k}", "x": x,
                                "hu_shape": tuple(int(v) for v in hu.shape),
                                "measured": y_meas})

            # 2) Solve the pending slices (here or as Ray tasks); write each as it finishes.
            def finish(job: Dict[str, Any], out: Dict[str, Any]) -> None:
                nonlocal done
                k = job["index"]
                meta = vol.slices[k]
                target = out_dir / derived_file_name(meta.sop_instance_uid)
                if target.exists():     # a slice is written once, whatever happened upstream
                    raise FileExistsError(f"output file appeared during the run: {target}")
                written = Path(write_slice(out["hu"], vol, k, out_dir, description=description,
                                           series_uid=derived_uid))
                rec = {"index": k, "sop_instance_uid": meta.sop_instance_uid,
                       "source_file": meta.path, "output_file": written.name,
                       "psnr": _finite_or_none(out["psnr"]), "ssim": float(out["ssim"]),
                       "seconds": out["seconds"], "nfe": dict(out["nfe"]),
                       "peak_memory_bytes": out["peak_memory_bytes"],
                       "noise_sigma": out["noise_sigma"], "noise_seed": out["noise_seed"],
                       "resumed": False}
                records.append(rec)
                montage_items.append({"index": k, "input": job["x"].numpy(),
                                      "recon": np.asarray(out["recon"]),
                                      "psnr": rec["psnr"], "ssim": rec["ssim"]})
                done += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(psnr=f"{out['psnr']:.2f}", ssim=f"{out['ssim']:.3f}")
                _fill_summary(summary, others, records, done, skipped, t_start)
                atomic_write_json(summary_path, summary)

            if ray_opts is None:
                for job in pending:
                    finish(job, solve_slice(job["x"], operator=A, prior=prior_obj,
                                            method=method, noise_level=noise_level, seed=seed,
                                            key=job["key"], hu_shape=job["hu_shape"],
                                            window=window, device=dev,
                                            measured=job["measured"], **options))
            elif pending:
                from ctflow.distributed.slices import solve_slices_on_ray

                spec = {"method": method, "noise_level": float(noise_level), "seed": int(seed),
                        "size": n, "views": int(views), "geometry": geometry,
                        "backend": backend, "device": ray_device, "window": list(window),
                        "options": dict(options)}
                prior_spec = prior if isinstance(prior, (str, os.PathLike)) else prior_obj
                by_key = {job["key"]: job for job in pending}
                for key, out in solve_slices_on_ray(pending, spec, prior_spec, ray_opts):
                    finish(by_key[key], out)
        finally:
            if bar is not None:
                bar.close()

        summary["status"] = "complete"
        _fill_summary(summary, others, records, done, skipped, t_start)
        summary["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        summary["montage"] = "montage.png"
        montage_items.sort(key=lambda it: it["index"])
        shown = montage_items
        title = f"{settings['series_description']}  (input | reconstruction)"
        if len(montage_items) > MONTAGE_MAX:      # a long series: evenly spaced slices
            picks = sorted({int(round(v)) for v in
                            np.linspace(0, len(montage_items) - 1, MONTAGE_MAX)})
            shown = [montage_items[i] for i in picks]
            title += f"  {len(shown)} of {len(montage_items)} slices"
        write_montage(out_dir / "montage.png", shown, title=title)
        atomic_write_json(summary_path, summary)
        if verbose:
            print(f"wrote {done} slice(s) to {out_dir} (summary.json, montage.png)",
                  file=sys.stderr)
        return summary


def _fill_summary(summary, others, records, done, skipped, t_start) -> None:
    """Per-slice records (earlier runs' slices outside this range included, by slice index);
    means over every slice in the summary; seconds per slice over this run's solves."""
    summary["slices"] = sorted(list(others) + list(records), key=lambda r: r.get("index", 0))
    ps = [r["psnr"] for r in summary["slices"] if r.get("psnr") is not None]
    ss = [r["ssim"] for r in summary["slices"] if r.get("ssim") is not None]
    summary["slices_reconstructed"] = done
    summary["slices_skipped"] = skipped
    summary["mean"] = {"psnr": float(np.mean(ps)) if ps else None,
                       "ssim": float(np.mean(ss)) if ss else None,
                       "seconds_per_slice": float(np.mean([r["seconds"] for r in records
                                                           if not r.get("resumed")]))
                       if done else None}
    summary["seconds_total"] = time.perf_counter() - t_start


def _record_from_file(path, x, k, sop, window, n, psnr_fn, ssim_fn) -> Dict[str, Any]:
    """Metrics of an output written by an interrupted run whose record was not saved."""
    small = to_working_size(_read_output_hu(path), n, hu_window=window)
    return {"index": k, "sop_instance_uid": sop, "output_file": path.name,
            "psnr": _finite_or_none(psnr_fn(small, x)), "ssim": float(ssim_fn(small, x)),
            "seconds": None, "metrics_from": "output file (re-sampled)"}


def _series_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
