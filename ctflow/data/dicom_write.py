"""Writing reconstructions as a derived DICOM series (never touching the input).

* :func:`write_dicom_series` — a whole ``(Z, Y, X)`` HU volume, one file per slice.
* :func:`write_dicom_slice` — one slice (for slice-by-slice writers that resume: the
  SOPInstanceUID and the file name are functions of the derived series UID and the source
  slice, see :func:`~ctflow.data.dicom_derive.derived_sop_uid` and :func:`derived_file_name`;
  pass the same ``series_uid`` to every call of one series).

The output is a *derived* series of the reference study: same StudyInstanceUID and
FrameOfReferenceUID, a new SeriesInstanceUID (random unless given) and new SOPInstanceUIDs,
a SeriesNumber that differs between derived series (:func:`derived_series_number`),
InstanceNumber of the source slice, ImageType ``DERIVED\\SECONDARY\\<source value 3, e.g.
AXIAL>`` (plus ``RESAMPLED`` on request), SeriesDescription naming the method and settings
(the full text, or ``derivation``, goes into DerivationDescription), a SourceImageSequence
pointing at each source slice, and the reference geometry. File names are
``<InstanceNumber>-<derived SOPInstanceUID>.dcm`` (never the source's UID). Private tags of the reference are dropped (they describe the original
acquisition and pixel data, not the derived image). Files are uncompressed Explicit VR Little
Endian, signed 16-bit.

Stored values: ``stored = round((hu − intercept) / slope)`` in int16, chosen by
:func:`choose_rescale` so that the whole HU range fits: ``slope = 1, intercept = 0`` whenever
the rounded range lies in [−32768, 32767] (always for CT: the error is then ≤ 0.5 HU); wider
ranges shift the intercept and, beyond 65535 HU of range, grow the slope. Nothing is clipped
unless ``clip=(lo, hi)`` is passed, which clips the HU values first.

Safety: everything is checked before the first byte is written — the volume's shape and
finiteness, that the output folder is neither an input folder nor inside one, and that no
output file exists. Each file is written atomically
(:func:`ctflow.data.atomic.atomic_write_bytes`: a hidden temporary name in the output folder,
then a rename); if writing fails part-way, the files written by that call are removed again.
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pydicom.uid import generate_uid

from ctflow.data.atomic import atomic_write_bytes
from ctflow.data.dicom_derive import (choose_rescale, derived_file_name, derived_series_number,
                                      derived_series_uid, derived_slice, encode_dataset,
                                      derived_output_name, study_uid_of)
from ctflow.data.dicom_file import DicomError
from ctflow.data.volume import Volume

__all__ = [
    "write_dicom_series",
    "write_dicom_slice",
    "derived_series_uid",
    "derived_file_name",
    "derived_series_number",
    "derived_output_name",
    "choose_rescale",
]


# ---------------------------------------------------------------------- checks
def _as_numpy(hu: Any, what: str) -> np.ndarray:
    if isinstance(hu, torch.Tensor):
        hu = hu.detach().cpu().numpy()
    arr = np.asarray(hu, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{what} holds non-finite values (first at index {tuple(bad)})")
    return arr


def _check_reference(reference: Any) -> Volume:
    if not isinstance(reference, Volume):
        raise TypeError(f"reference must be a Volume from read_dicom_series; got "
                        f"{type(reference).__name__}")
    if len(reference.datasets) != len(reference) or len(reference.slices) != len(reference):
        raise ValueError(f"reference volume has {len(reference.datasets)} DICOM headers for "
                         f"{len(reference)} slices; pass a Volume read with read_dicom_series")
    return reference


def _input_dirs(reference: Volume) -> list[Path]:
    dirs = {Path(m.path).resolve().parent for m in reference.slices if m.path}
    if reference.source:
        src = Path(reference.source).resolve()
        dirs.add(src if src.is_dir() else src.parent)
    return sorted(dirs)


def _check_out_dir(out_dir: str | os.PathLike, reference: Volume) -> Path:
    out = Path(out_dir).resolve()
    for d in _input_dirs(reference):
        if out == d or d in out.parents:
            where = "is" if out == d else "is inside"
            raise DicomError(f"{out}: output folder {where} the input folder {d}; write the "
                             f"derived series to a separate folder (inputs are never touched)")
    if out.exists() and not out.is_dir():
        raise DicomError(f"{out}: output path exists and is not a folder")
    return out


def _check_targets(paths: Sequence[Path]) -> None:
    seen = set()
    for p in paths:
        if p in seen:
            raise DicomError(f"{p}: two slices would be written to the same file "
                             f"(duplicate source SOPInstanceUID)")
        seen.add(p)
        if p.exists() or p.is_symlink():
            raise FileExistsError(f"{p}: output file already exists; refusing to overwrite it "
                                  f"(choose a new output folder or remove the file)")


def _write_all(out: Path, items: list[tuple[Path, bytes]]) -> list[Path]:
    """Write ``(path, bytes)`` pairs atomically; on failure remove what this call wrote."""
    created_dir = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    try:
        for path, data in items:
            atomic_write_bytes(path, data, overwrite=False)
            written.append(path)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        if created_dir:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    return written


# ---------------------------------------------------------------------- public writers
def write_dicom_series(
    volume_hu: Any,
    reference: Volume,
    out_dir: str | os.PathLike,
    *,
    description: str,
    series_number: int | None = None,
    series_uid: str | None = None,
    clip: tuple[float, float] | None = None,
) -> list[Path]:
    """Write ``volume_hu`` (``(Z, Y, X)`` HU, numpy or torch) as a derived series of ``reference``.

    Parameters
    ----------
    volume_hu : the reconstruction, one slice per reference slice (same order as
        ``reference.hu``). The in-plane size may differ from the reference: PixelSpacing is then
        scaled so that the field of view is kept (see the module docstring).
    reference : the :class:`Volume` returned by :func:`read_dicom_series` for the input.
    out_dir : output folder (created if missing); must not be, or be inside, an input folder.
    description : SeriesDescription (first 64 characters) and DerivationDescription; name the
        method and its settings, e.g. ``"ctflow msflow 60 views sigma=0.01 seed=0"``.
    series_number : SeriesNumber of the derived series (default:
        :func:`derived_series_number` of the series UID).
    series_uid : SeriesInstanceUID (default: a new random UID; pass
        :func:`derived_series_uid` for a UID that is stable across runs).
    clip : optional ``(lo, hi)`` to clip HU before storing.

    Returns the written paths in slice order; file names come from
    :func:`~ctflow.data.dicom_derive.derived_output_name` (instance number and derived UID).
    """
    reference = _check_reference(reference)
    vol = _as_numpy(volume_hu, "volume_hu")
    if vol.ndim != 3 or vol.shape[0] != len(reference):
        raise ValueError(f"volume_hu must have shape ({len(reference)}, Y, X) to match the "
                         f"reference; got {vol.shape}")
    if vol.shape[1] < 1 or vol.shape[2] < 1:
        raise ValueError(f"volume_hu has an empty slice shape {vol.shape[1:]}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string naming the method and settings")
    if clip is not None:
        vol = np.clip(vol, clip[0], clip[1])
    out = _check_out_dir(out_dir, reference)
    series_uid = series_uid or generate_uid()
    names = [derived_output_name(reference, k, series_uid) for k in range(len(reference))]
    targets = [out / n for n in names]
    _check_targets(targets)

    slope, intercept = choose_rescale(float(vol.min()), float(vol.max()))
    study_uid = study_uid_of(reference)
    number = derived_series_number(reference, series_uid) if series_number is None \
        else int(series_number)
    now = _dt.datetime.now()
    blobs = []
    for k in range(len(reference)):
        ds = derived_slice(vol[k], reference, k, slope=slope, intercept=intercept,
                           series_uid=series_uid, study_uid=study_uid, description=description,
                           series_number=number, now=now)
        blobs.append((targets[k], encode_dataset(ds)))
    return _write_all(out, blobs)


def write_dicom_slice(
    hu: Any,
    reference: Volume,
    index: int,
    out_dir: str | os.PathLike,
    *,
    description: str,
    series_uid: str | None = None,
    series_number: int | None = None,
    clip: tuple[float, float] | None = None,
    derivation: str | None = None,
    resampled: bool = False,
) -> Path:
    """Write one derived slice ``hu`` (``(Y, X)`` HU) made from ``reference`` slice ``index``.

    The file is ``out_dir / derived_output_name(reference, index, series_uid)`` (the instance
    number and the derived SOPInstanceUID, a deterministic function of the series UID and the
    source slice), so a resumed run that reuses the series UID can tell which source slices
    are done. ``series_uid`` defaults to ``derived_series_uid(reference, description,
    series_number)`` (stable across runs; pass a UID of your own, e.g. ``generate_uid()``
    once per series, for a new series); SeriesNumber defaults to
    :func:`derived_series_number`; InstanceNumber is the source slice's. ``derivation``
    replaces ``description`` in DerivationDescription; ``resampled=True`` adds
    ``RESAMPLED`` to ImageType (the image was reconstructed on another grid). The rescale is
    chosen per slice (:func:`choose_rescale`). Same checks as :func:`write_dicom_series`;
    an existing file raises ``FileExistsError``.
    """
    reference = _check_reference(reference)
    if not 0 <= int(index) < len(reference):
        raise IndexError(f"slice index {index} out of range for a {len(reference)}-slice reference")
    index = int(index)
    arr = _as_numpy(hu, "hu")
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"hu must be a 2-D slice (Y, X); got shape {arr.shape}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string naming the method and settings")
    if clip is not None:
        arr = np.clip(arr, clip[0], clip[1])
    out = _check_out_dir(out_dir, reference)
    series_uid = series_uid or derived_series_uid(reference, description, series_number)
    target = out / derived_output_name(reference, index, series_uid)
    _check_targets([target])
    number = derived_series_number(reference, series_uid) if series_number is None \
        else int(series_number)
    slope, intercept = choose_rescale(float(arr.min()), float(arr.max()))
    ds = derived_slice(arr, reference, index, slope=slope, intercept=intercept,
                       series_uid=series_uid, study_uid=study_uid_of(reference),
                       description=description, series_number=number, now=_dt.datetime.now(),
                       derivation=derivation, resampled=resampled)
    return _write_all(out, [(target, encode_dataset(ds))])[0]
