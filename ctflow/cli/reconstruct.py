"""``ctflow reconstruct``: reconstruct a sinogram or an image file (.npy, .h5, DICOM)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict

import numpy as np
import torch

from ctflow.cli.common import (CLIError, add_command, add_solver_arguments, default_prior, echo,
                               input_path, noise_from_args, parse_options)
from ctflow.data import read_dicom_series, read_dicom_slices
from ctflow.data.atomic import atomic_save
from ctflow.metrics import psnr, ssim
from ctflow.operators.noise import PoissonNoise
from ctflow.operators.units import WindowMap
from ctflow.solvers.registry import method
from ctflow.tasks import (DEFAULT_HU_WINDOW, infer_size, make_ct_operator, read_h5_array,
                          resolve_prior, run_solver, slice_seed,
                          measure, slice_stack, to_working_size, working_size)

__all__ = ["register", "cmd_reconstruct", "OUTPUT_SUFFIXES"]

OUTPUT_SUFFIXES = (".npy", ".h5", ".hdf5", ".png")

EPILOG = """\
Input kinds:
  sinogram   a 2-D array (views, detectors) or a stack (Z, views, detectors) of line
             integrals of an image in [0, 1] (the geometry convention of ctflow.operators.ct:
             the image covers [-1, 1]^2); views = the array's row count
  image      a 2-D array (H, W) in [0, 1] (or a stack (Z, H, W)), or DICOM (a file or a
             series folder, windowed with the prior's HU window): the sparse-view measurement
             is simulated (--views, --sigma / --noise-rel) and PSNR/SSIM against it are
             reported
  auto       DICOM -> image; arrays: square last two axes -> image, otherwise sinogram

Noise: --noise-rel ETA (default 0.01) is relative: sigma = ETA * RMS of the clean data when
simulating, of the measured sinogram otherwise; --sigma S is the absolute standard deviation.
0 is accepted by the methods that need no sigma (fbp, tv, cgls, landweber).
--dose I0 simulates a low-dose transmission scan of an image input instead: Poisson counts
with I0 photons per detector bin, in physical units (the HU window -> mu in mm^-1, pixel size
from the DICOM header or the preset's field of view; needs a DICOM input or a preset
--geometry), reconstructed with the statistical weights (sigma = 1; docs/lowdose.md).

Output by extension: .npy (float32 reconstruction in [0, 1]), .h5/.hdf5 (datasets
'reconstruction', 'measurement' and, for image inputs, 'ground_truth', plus attributes
with the settings and metrics), .png (8-bit grayscale; stacks side by side).

examples:
  ctflow reconstruct sino.npy -o recon.npy --method fbp
  ctflow reconstruct phantom.npy -o recon.png --views 30 --noise-rel 0.02 --method tv
  ctflow reconstruct scan.h5 --dataset sinogram -o recon.h5 --method msflow --prior ct64
  ctflow reconstruct slice.dcm -o slice.png --method msflow --option sweeps=20
  ctflow reconstruct slice.dcm -o slice.png --geometry clinical-fan --views 1152 --dose 1e4
"""


def register(sub) -> None:
    """Add ``reconstruct`` to the sub-parsers ``sub``."""
    p = add_command(sub, "reconstruct", "reconstruct a sinogram or image file (.npy, .h5, "
                    "DICOM)", EPILOG, cmd_reconstruct)
    p.add_argument("input", help="a .npy, .h5/.hdf5 file, a DICOM file or a DICOM series folder; "
                   "sample:NAME[/FILE] for a bundled sample (e.g. sample:chest-subset/1-31.dcm)")
    p.add_argument("--output", "-o", required=True, help="output file: .npy, .h5/.hdf5 or .png")
    p.add_argument("--kind", choices=("auto", "sinogram", "image"), default="auto",
                   help="what the input holds")
    p.add_argument("--dataset", default=None,
                   help="HDF5 dataset name (default: the only dataset, or 'sinogram'/'image')")
    add_solver_arguments(p)
    p.add_argument("--slice", type=int, default=None,
                   help="DICOM series input: reconstruct only this slice index (0-based, "
                        "in anatomical order); default: every slice")
    p.add_argument("--hu-window", type=float, nargs=2, metavar=("LO", "HI"), default=None,
                   help="window HU inputs with this range (default: the prior's hu_window)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")


def _load_input(args, path: Path):
    """→ (kind, float32 array (Z, a, b), source: "array" or "dicom", side in mm of the
    padded square slice from the DICOM pixel spacing, or None)."""
    suffix = path.suffix.lower()
    side_mm = None
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001
            raise CLIError(f"{path}: not a readable .npy array ({type(exc).__name__}: {exc})") \
                from None
        source = "array"
    elif suffix in (".h5", ".hdf5"):
        arr = read_h5_array(path, args.dataset,
                            preferred=("sinogram", "observation", "image", "ground_truth",
                                       "data"))
        source = "array"
    else:
        if path.is_dir():
            vol = read_dicom_series(path)
            arr = vol.numpy()
            side_mm = max(arr.shape[-2] * vol.spacing[1], arr.shape[-1] * vol.spacing[2])
            if args.slice is not None:
                if not -len(vol) <= args.slice < len(vol):
                    raise CLIError(f"--slice {args.slice}: the series has {len(vol)} slices")
                arr = arr[args.slice:args.slice + 1] if args.slice != -1 else arr[-1:]
        else:
            slices = read_dicom_slices([path])
            arr = np.stack([s.hu for s in slices])
            ps = slices[0].meta.pixel_spacing
            if ps is not None:
                side_mm = max(arr.shape[-2] * ps[0], arr.shape[-1] * ps[1])
        source = "dicom"
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiu":
        raise CLIError(f"{path}: expected a numeric array, got dtype {arr.dtype}")
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    arr = slice_stack(arr, path, what="input array", axes="rows, columns")
    kind = args.kind
    if source == "dicom":
        if kind == "sinogram":
            raise CLIError(f"{path}: a DICOM input is an image, not a sinogram")
        kind = "image"
    elif kind == "auto":
        kind = "image" if arr.shape[-1] == arr.shape[-2] else "sinogram"
    return kind, arr, source, side_mm


def _save(out: Path, recon, *, measurement, truth, attrs: Dict[str, Any]) -> None:
    """Write the reconstruction(s) to ``out`` (.npy, .h5/.hdf5 or .png), atomically."""
    suffix = out.suffix.lower()
    img = recon[0] if recon.shape[0] == 1 else recon
    if suffix == ".npy":
        atomic_save(out, lambda p: np.save(p, img.astype(np.float32)), suffix=suffix)
    elif suffix in (".h5", ".hdf5"):
        import h5py

        def write(p: Path) -> None:
            with h5py.File(p, "w") as f:
                f.create_dataset("reconstruction", data=img.astype(np.float32))
                f.create_dataset("measurement", data=np.squeeze(measurement, 0)
                                 if measurement.shape[0] == 1 else measurement)
                if truth is not None:
                    f.create_dataset("ground_truth", data=truth[0] if truth.shape[0] == 1
                                     else truth)
                for k, v in attrs.items():
                    f.attrs[k] = json.dumps(v) if isinstance(v, (dict, list)) else \
                        ("" if v is None else v)
        atomic_save(out, write, suffix=suffix)
    else:  # .png
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.image as mpimg

        tiles = [np.clip(r, 0, 1) for r in recon]
        gap = np.ones((tiles[0].shape[0], 2), dtype=np.float32)
        row = tiles[0]
        for t in tiles[1:]:
            row = np.concatenate([row, gap, t], axis=1)
        atomic_save(out, lambda p: mpimg.imsave(p, row, cmap="gray", vmin=0.0, vmax=1.0,
                                                format="png"), suffix=suffix)


def _check_paths(path: Path, out: Path, overwrite: bool) -> None:
    if not path.exists():
        raise FileNotFoundError(f"input not found: {path}")
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CLIError(f"--output {out}: the extension must be one of "
                       f"{', '.join(OUTPUT_SUFFIXES)}")
    if out.exists() and not overwrite:
        raise CLIError(f"--output {out} exists; pass --overwrite to replace it")
    if out.resolve() == path.resolve():
        raise CLIError(f"--output {out} is the input file")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output folder not found: {out.parent}")


def _hu_window(args, kind: str, source: str, prior, arr, path: Path):
    """The HU window of the input (or ``None``) and the input, clipped for HU images."""
    window = args.hu_window
    if source == "dicom" and window is None:
        window = getattr(prior, "hu_window", None) or DEFAULT_HU_WINDOW
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
        if not lo < hi:
            raise CLIError(f"--hu-window {lo} {hi}: needs LO < HI")
        if kind == "sinogram":
            raise CLIError("--hu-window applies to image inputs, not sinograms")
        return (lo, hi), np.clip(arr, -1024.0, 3071.0)  # scanner padding -> air
    if kind == "image" and (arr.min() < -0.05 or arr.max() > 1.05):
        raise CLIError(f"{path}: image values span [{arr.min():.4g}, {arr.max():.4g}], but "
                       "images must lie in [0, 1]; pass --hu-window LO HI for HU images")
    return None, arr


def _working_size(args, kind: str, source: str, prior, arr, flow: bool) -> int:
    fixed = getattr(prior, "image_size", None) if prior is not None else None
    if args.size is not None:
        n = int(args.size)
    elif (flow or source == "dicom") and fixed is not None:
        n = int(fixed)  # as reconstruct-dicom: a fixed-size prior's working size
    elif kind == "sinogram":
        n = infer_size(arr.shape[-2], arr.shape[-1], geometry=args.geometry)
    else:
        n = working_size(None, prior, native=int(max(arr.shape[-2:]))) \
            if prior is not None and (flow or source == "dicom") else int(max(arr.shape[-2:]))
    if flow and prior is not None and not prior.fits(n):
        raise CLIError(f"working size {n} does not suit the prior, which models "
                       f"{prior.size_text()} images")
    return n


def _pixel_mm(args, kind: str, side_mm, n: int):
    """The working pixel size (mm) of a ``--dose`` scan: the DICOM slice's side / ``n``, or
    ``None`` (a preset's native field of view); ``CLIError`` where no physical size exists."""
    if kind == "sinogram":
        raise CLIError("--dose simulates the scan of an image input; a sinogram input is "
                       "measured data (use --sigma / --noise-rel)")
    if side_mm is None and args.geometry in ("parallel", "fan"):
        raise CLIError(f"--dose needs physical units: --geometry {args.geometry} has none for "
                       "an array input; use a DICOM input or --geometry clinical-fan / "
                       "lodopab-parallel")
    return None if side_mm is None else float(side_mm) / n


def cmd_reconstruct(args) -> int:
    """Run ``ctflow reconstruct`` (see :data:`EPILOG`)."""
    name = args.method
    spec = method(name)
    noise = noise_from_args(args, name)
    path, out = input_path(args.input), Path(args.output)
    _check_paths(path, out, args.overwrite)
    prior_name = default_prior(name, args.prior)
    if prior_name is None and spec.needs_prior:
        raise CLIError(f"method {name!r} needs a prior; pass --prior NAME or PATH")
    kind, arr, source, side_mm = _load_input(args, path)
    device = torch.device(args.device)
    prior = resolve_prior(prior_name, device=device) if prior_name else None
    options = parse_options(args.option)
    window, arr = _hu_window(args, kind, source, prior, arr, path)
    n = _working_size(args, kind, source, prior, arr, spec.needs_prior)
    views = int(arr.shape[-2]) if kind == "sinogram" else int(args.views)
    lowdose = isinstance(noise, PoissonNoise)
    pixel_mm = _pixel_mm(args, kind, side_mm, n) if lowdose else None
    try:
        A = make_ct_operator(n, views, geometry=args.geometry, pixel_mm=pixel_mm,
                             backend=args.backend, device=device)
    except ValueError as exc:
        raise CLIError(f"--geometry {args.geometry}: {exc}") from None
    units = WindowMap(window or getattr(prior, "hu_window", None) or DEFAULT_HU_WINDOW) \
        if lowdose else None
    if kind == "sinogram" and tuple(arr.shape[-2:]) != tuple(A.range_shape[-2:]):
        raise CLIError(f"{path}: sinogram shape {tuple(arr.shape[-2:])} does not match the "
                       f"{args.geometry} geometry at size {n} with {views} views, which "
                       f"expects {tuple(A.range_shape[-2:])}; set --size or --geometry")

    recons, meas, truths, rows = [], [], [], []
    for z in range(arr.shape[0]):
        if kind == "image":
            # HU images: prepared exactly as the prior's training data (window, pad, resize).
            x = to_working_size(arr[z], n, hu_window=window).to(device).reshape(1, 1, n, n)
            gen = torch.Generator().manual_seed(slice_seed(args.seed, f"{path.name}:{z}"))
            y, sigma, weights = measure(A, x, noise, window=units, generator=gen)
            truths.append(x.reshape(n, n).cpu().numpy())
        else:
            y = torch.from_numpy(arr[z]).to(device).reshape(1, 1, *arr.shape[-2:])
            sigma = noise.std(y)   # a relative level refers to the measured data
            x, weights = None, None
        opts = dict(options)
        solve_seed = int(opts.pop("seed", slice_seed(args.seed, f"solve:{z}") % 2**31))
        show = bool(opts.pop("progress", not args.quiet))
        res = run_solver(y, A, prior, method=name, sigma=float(sigma[0]),
                         weights=None if name == "fbp" else weights,
                         seed=solve_seed, progress=show, **opts)
        img = res.image.detach().to("cpu", torch.float32).reshape(n, n).clamp(0, 1)
        if not torch.isfinite(img).all():   # checked before anything is written
            raise CLIError(f"{path}: the {name} reconstruction of image {z} holds NaN or "
                           f"infinite values (prior {prior_name}); nothing was written")
        row = {"index": z, "sigma": float(sigma[0]), "seconds": round(res.seconds, 3),
               "nfe": dict(res.nfe)}
        if x is not None:
            ref = x.reshape(n, n).cpu()
            row.update(psnr=float(psnr(img, ref)), ssim=float(ssim(img, ref)))
        rows.append(row)
        recons.append(img.numpy())
        meas.append(y.reshape(*y.shape[-2:]).cpu().numpy())
        extra = f", PSNR {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}" if "psnr" in row else ""
        echo(args, f"[{z + 1}/{arr.shape[0]}] {name}: {row['seconds']:.2f} s{extra}")

    attrs = {"method": name, "prior": prior_name, "kind": kind, "views": views,
             "geometry": args.geometry, "noise": noise.describe(), "size": n,
             "seed": args.seed, "backend": args.backend, "options": options,
             "hu_window": list(window) if window is not None else None,
             "pixel_mm": A.geometry.pixel_size if lowdose else None,
             "units": units.describe() if lowdose else None,
             "input": str(path), "metrics": rows}
    _save(out, np.stack(recons), measurement=np.stack(meas),
          truth=np.stack(truths) if truths else None, attrs=attrs)
    line = f"wrote {out} ({len(recons)} image(s), {n}x{n}, {name})"
    if truths:
        line += (f"; PSNR {np.mean([r['psnr'] for r in rows]):.2f} dB, "
                 f"SSIM {np.mean([r['ssim'] for r in rows]):.3f}")
    print(line)
    return 0
