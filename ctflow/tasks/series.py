r"""Reconstruct a CT DICOM series slice by slice into a derived DICOM series.

:func:`reconstruct_dicom` is the library function behind ``ctflow reconstruct-dicom``. It is
a *simulation study* by default: each input slice is taken as the ground truth, a sparse-view
measurement is simulated from it, reconstructed, and the result is written back as DICOM and
compared with the input. A measured sinogram file can replace the simulation.

Per slice :math:`k` (HU image :math:`h_k` of the original matrix size):

1. clip to :math:`[-1024, 3071]` HU (removes the -3024/-2048 padding outside the scan circle);
2. window with the prior's ``hu_window`` :math:`(l, u)`: :math:`x = \mathrm{clip}((h - l)/(u - l),
   0, 1)` -- HU outside the window are clipped and **do not come back**;
3. pad to a square (with 0) and resize to the working size :math:`n`
   (:func:`ctflow.tasks.problem.to_working_size`, the preparation of the prior's training
   data): :math:`x_k \in [0, 1]^{n \times n}`;
4. measure: :math:`y = A x_k + \sigma\varepsilon` with the ``noise`` model
   (:class:`~ctflow.operators.noise.GaussianNoise`: an absolute :math:`\sigma`, or a relative
   level :math:`\eta`, :math:`\sigma = \eta\,\|A x_k\|_2/\sqrt m`, the benchmarks' convention),
   :math:`\varepsilon \sim N(0, I)` drawn from a generator seeded by ``(seed,
   SOPInstanceUID)`` (the same draw in every run and whatever the slice range) -- or :math:`y`
   from the ``sinogram`` file, with :math:`\sigma = \eta\,\|y\|_2/\sqrt m` (or the absolute
   :math:`\sigma`);
5. reconstruct :math:`\hat x_k` = ``ctflow.reconstruct(y, A, prior, method, sigma=sigma)``
   (the solver seeded by the same per-slice seed);
6. PSNR/SSIM of :math:`\hat x_k` against :math:`x_k` (data range 1);
7. map back: bicubic re-sampling to the padded square, crop, clip to :math:`[0, 1]`,
   :math:`h = l + \hat x (u - l)` HU, and write one derived DICOM slice on the **source's
   grid** (Rows, Columns, PixelSpacing and positions of the input slice; when the working
   size differs from the source's side, ImageType gets ``RESAMPLED`` as value 4 and
   DerivationDescription and ``summary.json`` (``"grid"``) state the working grid and its
   pixel size). The derived SeriesInstanceUID is new on every run (``stable_uids=True``: a
   function of the input series and the settings); the SOPInstanceUIDs and file names
   (``<InstanceNumber>-<SOPInstanceUID>.dcm``) are functions of it and of the source slice;
   InstanceNumber is the source slice's; ``summary.json`` records the UID (written before
   the first slice), so a resumed run adds to the same series.

Outputs in ``out_dir``: the derived slices, ``summary.json`` (settings, per-slice metrics of
every slice in the folder -- slices of earlier runs outside this run's range are kept --, their
means, versions, timing; rewritten atomically after every slice, ``"status": "complete"`` at
the end) and ``montage.png`` (:mod:`ctflow.tasks.montage`). With ``resume=True`` slices whose
output file exists and is a valid DICOM of the derived series are skipped (their metrics are
taken from the previous ``summary.json``); inputs are never modified, ``out_dir`` may not be
``in_dir`` (or inside it), and existing outputs are never overwritten
(:mod:`ctflow.tasks.outputs`).

``map_slices`` solves the slices elsewhere: a function ``(jobs, spec, prior) -> iterator of
(key, result)`` whose workers run :func:`solve_slice` (steps 4-7, the same function as
in-process) and return its result; this process writes each slice as it arrives, so the
outputs, the summary and ``resume`` are the same as in-process.
:func:`ctflow.distributed.ray_slice_mapper` builds one on Ray (``ctflow reconstruct-dicom
--ray``).

The module is longer than 400 lines because :func:`reconstruct_dicom` is one pipeline (checks,
resume, solve, write, clean-up) whose steps share the run's state; its folder, UID and summary
helpers live in :mod:`ctflow.tasks.outputs`.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np

from ctflow.data import (clip_hu, derived_output_name, derived_series_number,
                         derived_series_uid, read_dicom_series, write_dicom_slice)
from ctflow.data.atomic import atomic_write_json
from ctflow.operators.noise import GaussianNoise, PoissonNoise
from ctflow.priors.recommended import choose_options
from ctflow.solvers import registry
import ctflow.tasks.outputs as outputs
from ctflow.tasks.info import resolve_device, versions
from ctflow.tasks.montage import montage_items, write_montage
from ctflow.operators.ct import preset_names
from ctflow.tasks.problem import (DEFAULT_HU_WINDOW, HU_CLIP, check_noise, make_ct_operator,
                                  resolve_prior, to_working_size, working_size)
from ctflow.tasks.slices import noise_model, solve_slice
from ctflow.tasks.sinograms import load_sinograms

__all__ = ["reconstruct_dicom", "solve_slice", "SliceMapper"]

PathLike = Union[str, os.PathLike]
#: ``map_slices(jobs, spec, prior)``: solve the jobs elsewhere, yield ``(key, result)``.
SliceMapper = Callable[[List[Dict[str, Any]], Dict[str, Any], Any],
                       Iterable[Tuple[str, Dict[str, Any]]]]


def _executor(map_slices: Optional[SliceMapper]) -> Any:
    """What the summary records about where the slices were solved."""
    if map_slices is None:
        return "in-process"
    describe = getattr(map_slices, "describe", None)
    return describe() if callable(describe) else \
        {"map_slices": getattr(map_slices, "__qualname__", type(map_slices).__name__)}


def reconstruct_dicom(in_dir: PathLike, out_dir: PathLike, *, views: int = 60,
                      geometry: str = "parallel",
                      noise: GaussianNoise = GaussianNoise(relative=0.01),
                      method: str = "msflow", prior: Any = "ct64", size: Optional[int] = None,
                      slices: Union[slice, Tuple[int, int], None] = None, device: Any = None,
                      resume: bool = False, seed: int = 0, progress: bool = True,
                      sinogram: Optional[PathLike] = None, backend: str = "torch",
                      hu_window: Optional[Tuple[float, float]] = None, verbose: bool = False,
                      map_slices: Optional[SliceMapper] = None, stable_uids: bool = False,
                      preset: Optional[str] = None, **options) -> Dict[str, Any]:
    """Reconstruct the CT series in ``in_dir`` slice by slice into a derived series in
    ``out_dir`` (see the module docstring for the exact steps and the outputs).

    Args:
        in_dir: a folder holding one CT series (read with ``ctflow.data.read_dicom_series``).
        out_dir: the output folder (created); must not be ``in_dir`` or inside it.
        views: projection angles of the simulated measurement.
        geometry: ``"parallel"``, ``"fan"`` or a preset in mm (``"clinical-fan"``,
            ``"lodopab-parallel"``; :func:`ctflow.tasks.geometry_names`), with the working
            grid's physical pixel size from the series' PixelSpacing.
        noise: the noise model: :class:`~ctflow.operators.noise.GaussianNoise` (an absolute
            ``sigma`` or a ``relative`` level; default 1 % of the RMS of the clean data, or of
            the measured sinogram), or :class:`~ctflow.operators.noise.PoissonNoise` (a
            low-dose scan with ``I0`` photons per detector bin, physical units and the
            statistical weights; docs/lowdose.md). Zero is accepted for the methods that do not need
            :math:`\\sigma` (registry ``needs_sigma``); the others refuse it before any work.
        method: a method of :mod:`ctflow.solvers.registry` (``"msflow"``, ``"fbp"``, ...).
        prior: a bundled prior name, a checkpoint path, a prior object, or ``None`` (only for
            the methods without ``needs_prior``; then ``hu_window`` defaults to [-1024, 3071]
            HU and the working size to 64). For those methods a given prior only sets the HU
            window and the working size (it is not passed to the solver).
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
        map_slices: ``None`` (every slice in this process) or a function ``(jobs, spec,
            prior) -> iterator of (key, result)`` solving the slices elsewhere, e.g.
            ``ctflow.distributed.ray_slice_mapper(options)``. ``jobs``: dicts with ``key``
            (the SOPInstanceUID), ``x``, ``hu_shape``, ``measured``; ``spec``: ``method``,
            ``noise``, ``seed``, ``size``, ``views``, ``geometry``, ``backend``, ``device``
            (as requested; ``"auto"`` for ``None``), ``window``, ``options``; ``prior``: the
            name/path or object, ``None`` for the methods without a prior. Each result is
            :func:`solve_slice`'s; this process writes it (atomically, keyed by the
            SOPInstanceUID), so ``resume`` works the same. A ``describe()`` method of
            ``map_slices``, if any, is recorded as the summary's ``executor``.
        stable_uids: derive the SeriesInstanceUID (and so the SOPInstanceUIDs) from the input
            series and the settings, the same in every run; by default each run writes a new
            series. ``resume`` always reuses the UID recorded in ``summary.json``.
        preset: ``None``/``"recommended"`` (without ``options``: the prior's recommended
            settings for the method) or ``"paper"`` (the solver's defaults); see
            :mod:`ctflow.priors.recommended`. The summary's ``settings.solver_options``
            records the options used.
        **options: solver options passed to ``ctflow.reconstruct``.

    Returns:
        The summary dict (also written to ``out_dir/summary.json``).
    """
    renamed = {"noise_level": "noise=GaussianNoise(relative=...) or GaussianNoise(sigma=...)",
               "ray": "map_slices=ctflow.distributed.ray_slice_mapper(...)"}
    for old in set(renamed) & set(options):
        raise TypeError(f"reconstruct_dicom: {old!r} was replaced: pass {renamed[old]}")
    t_start = time.perf_counter()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    outputs.check_folders(in_dir, out_dir)
    spec_m = registry.method(method)
    method = spec_m.name
    check_noise(method, noise)
    if prior is None and spec_m.needs_prior:
        raise ValueError(f"method {method!r} needs a prior (prior=None is only for "
                         f"{', '.join(registry.method_names(needs_prior=False))})")
    dev = resolve_device(device)

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
    solve_prior = prior_obj if spec_m.needs_prior else None

    # The series and the slice range.
    vol = read_dicom_series(in_dir, progress=False)
    n = working_size(size, prior_obj, native=int(max(vol.shape[1:])))
    if prior_obj is not None and spec_m.needs_prior and not prior_obj.fits(n):
        raise ValueError(f"working size {n} does not suit the prior, which models "
                         f"{prior_obj.size_text()} images")
    nz = len(vol)
    if isinstance(slices, tuple):
        slices = slice(*slices)
    indices = list(range(nz)[slices] if slices is not None else range(nz))
    if not indices:
        raise ValueError(f"slice range {slices.start}:{slices.stop} selects no slice of the "
                         f"{nz}-slice series in {in_dir}")

    measured = None
    if sinogram is not None:
        measured = load_sinograms(sinogram)
        if measured.shape[0] not in (nz, len(indices)):
            raise ValueError(f"{sinogram}: holds {measured.shape[0]} sinograms, expected one "
                             f"per slice of the series ({nz}) or of the range ({len(indices)})")
        views = int(measured.shape[1])
    lowdose = isinstance(noise, PoissonNoise)
    if lowdose and measured is not None:
        raise ValueError("a measured sinogram carries its own noise: noise=PoissonNoise(...) "
                         "(--dose) simulates a scan and cannot be combined with sinogram=")
    # a low-dose scan or a preset geometry needs the physical pixel size of the working grid
    pixel_mm = None
    if lowdose or geometry in preset_names():
        pixel_mm = float(max(vol.shape[1:]) * vol.spacing[2] / n)
    A = make_ct_operator(n, views, geometry=geometry, pixel_mm=pixel_mm, backend=backend,
                         device=dev)
    if measured is not None and tuple(measured.shape[1:]) != tuple(A.range_shape[-2:]):
        raise ValueError(f"{sinogram}: sinograms of shape {tuple(measured.shape[1:])} do not "
                         f"match the {geometry} geometry at size {n} with {views} views, "
                         f"which expects {tuple(A.range_shape[-2:])}")

    settings = {
        "in_dir": str(in_dir.resolve()), "out_dir": str(out_dir.resolve()),
        "method": method, "prior": prior_label, "views": int(views), "geometry": geometry,
        "noise": noise.describe(), "noise_model": noise_model(noise, measured is not None),
        "dose_I0": noise.I0 if lowdose else None, "pixel_mm": pixel_mm,
        "size": n, "slices": [indices[0], indices[-1] + 1], "seed": int(seed),
        "backend": backend, "device": str(dev),
        "sinogram": str(Path(sinogram).resolve()) if sinogram is not None else None,
        "options": dict(options), "hu_window": list(window), "hu_clip": list(HU_CLIP),
        "source_series_uid": vol.series_uid, "stable_uids": bool(stable_uids),
        "preset": preset,
    }
    run_options, note = choose_options(solve_prior, method, options, preset=preset)
    settings["solver_options"] = {"options": run_options, "from": note}
    if preset is not None:
        options = dict(options, preset=preset)
    settings["series_description"] = description = outputs.series_description(
        settings, with_prior=spec_m.needs_prior)

    # Output folder, earlier runs and resume.
    summary_path = out_dir / "summary.json"
    previous = outputs.read_previous(summary_path, settings, resume=resume)
    derived_uid = outputs.choose_series_uid(previous, derived_series_uid(vol, description),
                                            stable=stable_uids)
    series_number = int(previous.get("derived_series_number")
                        or derived_series_number(vol, derived_uid))
    grid = outputs.grid_note(n, vol.shape[1:], vol.spacing[1:])
    derivation = f"{description}; {grid['text']}"
    targets = {k: out_dir / derived_output_name(vol, k, derived_uid) for k in indices}
    if not resume and out_dir.is_dir():
        outputs.check_no_clash(list(targets.values()))
    created_dir = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    done = skipped = 0
    try:
        with outputs.locked_out_dir(out_dir):
            if resume:      # temporaries of this series' outputs left by a killed run
                outputs.remove_stale_temps(out_dir, [t.name for t in targets.values()]
                                           + ["summary.json", "montage.png"])
            prev_records = {r["sop_instance_uid"]: r for r in previous.get("slices", [])
                            if "sop_instance_uid" in r and not r.get("metrics_from")}
            # Records of an earlier run outside this run's slice range stay in the summary.
            current = {vol.slices[k].sop_instance_uid for k in indices}
            others = [r for r in previous.get("slices", [])
                      if r.get("sop_instance_uid") not in current
                      and (out_dir / str(r.get("output_file", ""))).is_file()]
            records: List[Dict[str, Any]] = []
            shown: List[Dict[str, Any]] = []
            summary: Dict[str, Any] = {
                "status": "running", "settings": settings, "versions": versions(),
                "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "derived_series_uid": derived_uid, "derived_series_number": series_number,
                "stable_uids": bool(settings.get("stable_uids")), "grid": grid, "slices": [],
                "executor": _executor(map_slices),
            }

            bar = None
            if progress:
                from tqdm.auto import tqdm
                bar = tqdm(total=len(indices), desc=f"reconstruct-dicom ({method})", unit="slice")
            try:
                # 1) Outputs of earlier runs (resume): keep the valid ones, set invalid ones aside.
                pending: List[Dict[str, Any]] = []
                for pos, k in enumerate(indices):
                    sop = vol.slices[k].sop_instance_uid
                    hu = np.asarray(clip_hu(vol.hu[k], *HU_CLIP), dtype=np.float32)
                    x = to_working_size(hu, n, hu_window=window)
                    target = targets[k]
                    if target.exists() or target.is_symlink():
                        if not resume:
                            raise FileExistsError(f"output file exists: {target}; pass --resume to "
                                                  "keep it and continue, or choose another OUT_DIR")
                        if outputs.valid_output(target, derived_uid):
                            rec = dict(prev_records.get(sop) or outputs.record_from_file(
                                target, x, k, sop, window, n), resumed=True)
                            records.append(rec)
                            small = to_working_size(outputs.read_output_hu(target), n,
                                                    hu_window=window)
                            shown.append({"index": k, "input": x.numpy(), "recon": small.numpy(),
                                          "psnr": rec.get("psnr"), "ssim": rec.get("ssim")})
                            skipped += 1
                            if bar is not None:
                                bar.update(1)
                            continue
                        outputs.set_aside(target)   # not ours, or damaged: never deleted
                    y_meas = None
                    if measured is not None:
                        y_meas = measured[k if measured.shape[0] == nz else pos]
                    pending.append({"index": k, "key": sop or f"slice-{k}", "x": x,
                                    "hu_shape": tuple(int(v) for v in hu.shape),
                                    "measured": y_meas})

                # 2) Solve the pending slices (here or through map_slices); write each as it comes.
                def finish(job: Dict[str, Any], out: Dict[str, Any]) -> None:
                    nonlocal done
                    k = job["index"]
                    meta = vol.slices[k]
                    if not np.all(np.isfinite(out["hu"])):     # before anything is written
                        raise ValueError(f"{meta.path}: the {method} reconstruction of slice {k} "
                                         "holds NaN or infinite values; nothing was written for "
                                         "it (check the prior and the options)")
                    if targets[k].exists():     # a slice is written once, whatever happened upstream
                        raise FileExistsError(f"output file appeared during the run: {targets[k]}")
                    if not summary_path.exists():   # the UIDs are on record before any slice
                        atomic_write_json(summary_path, summary)
                    written = Path(write_dicom_slice(out["hu"], vol, k, out_dir,
                                                     description=description,
                                                     series_uid=derived_uid,
                                                     series_number=series_number,
                                                     derivation=derivation,
                                                     resampled=grid["resampled"]))
                    rec = {"index": k, "sop_instance_uid": meta.sop_instance_uid,
                           "source_file": meta.path, "output_file": written.name,
                           "psnr": outputs.finite_or_none(out["psnr"]), "ssim": float(out["ssim"]),
                           "seconds": out["seconds"], "nfe": dict(out["nfe"]),
                           "peak_memory_bytes": out["peak_memory_bytes"],
                           "noise_sigma": out["noise_sigma"], "noise_seed": out["noise_seed"],
                           "resumed": False}
                    records.append(rec)
                    shown.append({"index": k, "input": job["x"].numpy(),
                                  "recon": np.asarray(out["recon"]),
                                  "psnr": rec["psnr"], "ssim": rec["ssim"]})
                    done += 1
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(psnr=f"{out['psnr']:.2f}", ssim=f"{out['ssim']:.3f}")
                    outputs.fill_summary(summary, others, records, done, skipped, t_start)
                    atomic_write_json(summary_path, summary)

                if map_slices is None:
                    for job in pending:
                        finish(job, solve_slice(job["x"], operator=A, prior=solve_prior,
                                                method=method, noise=noise, seed=seed,
                                                key=job["key"], hu_shape=job["hu_shape"],
                                                window=window, device=dev,
                                                measured=job["measured"], **options))
                elif pending:
                    spec = {"method": method, "noise": noise, "seed": int(seed), "size": n,
                            "views": int(views), "geometry": geometry, "backend": backend,
                            "pixel_mm": pixel_mm,
                            "device": "auto" if device is None else str(device),
                            "window": list(window), "options": dict(options)}
                    if not spec_m.needs_prior:
                        prior_spec = None
                    elif isinstance(prior, (str, os.PathLike)):
                        prior_spec = prior
                    else:
                        prior_spec = prior_obj
                    by_key = {job["key"]: job for job in pending}
                    for key, out in map_slices(pending, spec, prior_spec):
                        finish(by_key[key], out)
            finally:
                if bar is not None:
                    bar.close()

            summary["status"] = "complete"
            outputs.fill_summary(summary, others, records, done, skipped, t_start)
            summary["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            summary["montage"] = "montage.png"
            picked, note = montage_items(shown)
            write_montage(out_dir / "montage.png", picked,
                          title=f"{description}  (input | reconstruction){note}")
            atomic_write_json(summary_path, summary)
            if verbose:
                print(f"wrote {done} slice(s) to {out_dir} (summary.json, montage.png)",
                      file=sys.stderr)
            return summary
    except BaseException:
        if done == 0:   # a run that wrote no slice leaves nothing behind (no folder it made)
            outputs.discard_empty_run(out_dir, summary_path, own_summary=not previous,
                                      remove_dir=created_dir)
        raise
