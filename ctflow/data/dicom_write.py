"""Writing reconstructions as a derived DICOM series (never touching the input).

* :func:`write_dicom_series` — a whole ``(Z, Y, X)`` HU volume, one file per slice.
* :func:`write_dicom_slice` — one slice (for slice-by-slice writers that resume: the file name
  is a function of the source slice's SOPInstanceUID, see :func:`derived_file_name`, and the
  series UID can be made stable across runs with :func:`derived_series_uid`).

The output is a *derived* series of the reference study: same StudyInstanceUID and
FrameOfReferenceUID, a new SeriesInstanceUID and new SOPInstanceUIDs, ImageType
``DERIVED\\SECONDARY``, SeriesDescription naming the method and settings (the full text also
goes into DerivationDescription), a SourceImageSequence pointing at each source slice, and the
reference geometry. Private tags of the reference are dropped (they describe the original
acquisition and pixel data, not the derived image). Files are uncompressed Explicit VR Little
Endian, signed 16-bit.

Stored values: ``stored = round((hu − intercept) / slope)`` in int16, chosen by
:func:`choose_rescale` so that the whole HU range fits: ``slope = 1, intercept = 0`` whenever
the rounded range lies in [−32768, 32767] (always for CT: the error is then ≤ 0.5 HU); wider
ranges shift the intercept and, beyond 65535 HU of range, grow the slope. Nothing is clipped
unless ``clip=(lo, hi)`` is passed, which clips the HU values first.

Safety: everything is checked before the first byte is written — the volume's shape and
finiteness, that the output folder is neither an input folder nor inside one, and that no
output file exists. Each file is written atomically (:func:`ctflow.data.atomic.atomic_write_bytes`: a hidden
temporary name in the output folder, then a rename); if writing fails part-way, the files written by that call are
removed again.
"""
from __future__ import annotations

import copy
import datetime as _dt
import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pydicom
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian,
                         generate_uid)

from ctflow.data.atomic import atomic_write_bytes
from ctflow.data.dicom import DicomError
from ctflow.data.volume import Volume

__all__ = [
    "write_dicom_series",
    "write_dicom_slice",
    "derived_series_uid",
    "derived_file_name",
    "choose_rescale",
]

_INT16_MIN, _INT16_MAX = -32768, 32767

# Elements of the reference that must not be carried over to a derived image.
_DROP = (
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "NumberOfFrames",
    "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit",
    "ModalityLUTSequence", "VOILUTSequence", "IconImageSequence", "PlanarConfiguration",
    "SourceImageSequence", "ReferencedImageSequence", "DerivationCodeSequence",
    "PixelDataProviderURL", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
    "SourceApplicationEntityTitle",
)


# ---------------------------------------------------------------------- small public helpers
def choose_rescale(hu_min: float, hu_max: float) -> tuple[float, float]:
    """``(slope, intercept)`` so that ``round((hu − intercept)/slope)`` fits int16.

    ``(1, 0)`` when ``[round(hu_min), round(hu_max)] ⊂ [−32768, 32767]``; else, if the range
    spans at most 65535 HU, ``(1, c)`` with the integer ``c`` centring it; else
    ``slope = (hu_max − hu_min)/65535`` and ``intercept = hu_min + 32768·slope``.
    """
    if not (np.isfinite(hu_min) and np.isfinite(hu_max)) or hu_min > hu_max:
        raise ValueError(f"choose_rescale needs finite hu_min <= hu_max; got {hu_min}, {hu_max}")
    lo, hi = float(np.round(hu_min)), float(np.round(hu_max))
    if lo >= _INT16_MIN and hi <= _INT16_MAX:
        return 1.0, 0.0
    if hi - lo <= _INT16_MAX - _INT16_MIN:
        return 1.0, float(np.floor((lo + hi) / 2.0))
    slope = (float(hu_max) - float(hu_min)) / float(_INT16_MAX - _INT16_MIN)
    return slope, float(hu_min) - _INT16_MIN * slope


def _source_key(reference: Volume) -> str:
    """The reference series' identity: its SeriesInstanceUID, or its first SOP UID if blank."""
    if reference.series_uid:
        return reference.series_uid
    if reference.slices and reference.slices[0].sop_instance_uid:
        return "sop:" + reference.slices[0].sop_instance_uid
    if reference.slices:
        return "path:" + str(Path(reference.slices[0].path).resolve())
    raise DicomError("reference volume has no series UID and no slice metadata")


def derived_series_uid(reference: Volume, description: str,
                       series_number: int | None = None) -> str:
    """A SeriesInstanceUID that is a deterministic function of the source series and settings.

    ``generate_uid(entropy_srcs=[source series UID, description, series number])``: the same
    reconstruction of the same series (same description) always gets the same UID, so a resumed
    run adds slices to the same derived series. Use a description that names the method and
    its settings (and the seed), so that different reconstructions get different UIDs.
    """
    if not isinstance(description, str) or not description.strip():
        raise ValueError("description must be a non-empty string naming the method and settings")
    return generate_uid(entropy_srcs=["ctflow-derived-series", _source_key(reference),
                                      description, str(series_number)])


def derived_file_name(source_sop_uid: str) -> str:
    """The output file name of the derived slice made from the source slice ``source_sop_uid``."""
    uid = str(source_sop_uid).strip()
    if not uid or any(ch not in "0123456789." for ch in uid):
        raise ValueError(f"derived_file_name needs a DICOM UID (digits and dots); got {uid!r}")
    return f"{uid}.dcm"


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


# ---------------------------------------------------------------------- dataset building
def _derived_dataset(
    ref: pydicom.Dataset, hu: np.ndarray, *, slope: float, intercept: float, sop_uid: str,
    series_uid: str, study_uid: str, description: str, series_number: int,
    instance_number: int, position: np.ndarray, orientation: np.ndarray,
    pixel_spacing: tuple[float, float], source_sop_uid: str, now: _dt.datetime,
) -> pydicom.Dataset:
    ds = copy.deepcopy(ref)
    ds.remove_private_tags()
    for key in _DROP:
        if key in ds:
            delattr(ds, key)
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if not sop_class and hasattr(ref, "file_meta"):
        sop_class = str(ref.file_meta.get("MediaStorageSOPClassUID", "") or "")
    sop_class = sop_class or CTImageStorage

    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = description[:64]
    ds.DerivationDescription = description[:1024]
    ds.SeriesNumber = int(series_number)
    ds.InstanceNumber = int(instance_number)
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
    if source_sop_uid:
        src_item = pydicom.Dataset()
        src_item.ReferencedSOPClassUID = sop_class
        src_item.ReferencedSOPInstanceUID = source_sop_uid
        ds.SourceImageSequence = pydicom.Sequence([src_item])

    ds.ImagePositionPatient = [_ds_str(v) for v in position]
    ds.ImageOrientationPatient = [_ds_str(v) for v in orientation]
    ds.PixelSpacing = [_ds_str(v) for v in pixel_spacing]
    ds.SliceLocation = _ds_str(float(position @ np.cross(orientation[:3], orientation[3:])))
    ds.Rows, ds.Columns = int(hu.shape[0]), int(hu.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope = _ds_str(slope)
    ds.RescaleIntercept = _ds_str(intercept)
    ds.RescaleType = "HU"
    stored = np.clip(np.round((hu - intercept) / slope), _INT16_MIN, _INT16_MAX).astype("<i2")
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CTFLOW"
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    return ds


def _ds_str(v: float) -> str:
    """A decimal string of at most 16 characters (the DS limit) for ``v``."""
    v = float(v)
    for digits in range(12, 0, -1):
        s = f"{v:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot encode {v} as a DICOM decimal string")


def _encode(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _geometry(reference: Volume, index: int, rows: int, cols: int
              ) -> tuple[np.ndarray, tuple[float, float]]:
    """Position and PixelSpacing of slice ``index`` resampled to ``rows × cols``.

    The field of view is kept: ``dy' = dy·R/rows``, ``dx' = dx·C/cols``; the first pixel's
    centre moves from ``p`` to ``p + ½(dx' − dx)·r + ½(dy' − dy)·c`` so that the outer edges
    of the image stay where they were.
    """
    m = reference.slices[index]
    dy, dx = reference.spacing[1], reference.spacing[2]
    dy_new, dx_new = dy * m.rows / rows, dx * m.columns / cols
    p = reference.positions[index]
    p_new = (p + 0.5 * (dx_new - dx) * reference.row_direction
             + 0.5 * (dy_new - dy) * reference.column_direction)
    return p_new, (dy_new, dx_new)


def _study_uid(reference: Volume) -> str:
    if reference.study_uid:
        return reference.study_uid
    # Blank in the source (some anonymisers): a stable stand-in derived from the source series.
    return generate_uid(entropy_srcs=["ctflow-study", _source_key(reference)])


def _default_series_number(reference: Volume) -> int:
    try:
        return int(reference.datasets[0].get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000


def _build(hu2d, reference, k, *, slope, intercept, series_uid, study_uid, description,
           series_number, now, instance_number=None):
    m = reference.slices[k]
    position, spacing = _geometry(reference, k, hu2d.shape[0], hu2d.shape[1])
    sop_uid = generate_uid(entropy_srcs=["ctflow-derived-sop", series_uid,
                                         m.sop_instance_uid or m.path])
    return _derived_dataset(
        reference.datasets[k], hu2d, slope=slope, intercept=intercept, sop_uid=sop_uid,
        series_uid=series_uid, study_uid=study_uid, description=description,
        series_number=series_number,
        instance_number=instance_number if instance_number is not None else k + 1,
        position=position, orientation=reference.orientation, pixel_spacing=spacing,
        source_sop_uid=m.sop_instance_uid, now=now)


def _file_name(reference: Volume, k: int) -> str:
    m = reference.slices[k]
    if m.sop_instance_uid:
        return derived_file_name(m.sop_instance_uid)
    raise DicomError(f"{m.path}: source slice has no SOPInstanceUID; cannot name its output")


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
    series_number : SeriesNumber of the derived series (default: reference's + 1000).
    series_uid : SeriesInstanceUID (default: a new random UID; pass
        :func:`derived_series_uid` for a UID that is stable across runs).
    clip : optional ``(lo, hi)`` to clip HU before storing.

    Returns the written paths in slice order; file names come from
    :func:`derived_file_name` of each source SOPInstanceUID.
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
    names = [_file_name(reference, k) for k in range(len(reference))]
    targets = [out / n for n in names]
    _check_targets(targets)

    slope, intercept = choose_rescale(float(vol.min()), float(vol.max()))
    series_uid = series_uid or generate_uid()
    study_uid = _study_uid(reference)
    number = _default_series_number(reference) if series_number is None else int(series_number)
    now = _dt.datetime.now()
    blobs = []
    for k in range(len(reference)):
        ds = _build(vol[k], reference, k, slope=slope, intercept=intercept,
                    series_uid=series_uid, study_uid=study_uid, description=description,
                    series_number=number, now=now)
        blobs.append((targets[k], _encode(ds)))
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
) -> Path:
    """Write one derived slice ``hu`` (``(Y, X)`` HU) made from ``reference`` slice ``index``.

    The file is ``out_dir / derived_file_name(source SOPInstanceUID)``, so a resumed run can
    tell which source slices are done. ``series_uid`` defaults to
    ``derived_series_uid(reference, description, series_number)`` (stable across runs);
    InstanceNumber is ``index + 1``; the SOPInstanceUID is a deterministic function of the
    series UID and the source SOPInstanceUID. The rescale is chosen per slice
    (:func:`choose_rescale`). Same checks as :func:`write_dicom_series`; an existing file
    raises ``FileExistsError``.
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
    target = out / _file_name(reference, index)
    _check_targets([target])
    number = _default_series_number(reference) if series_number is None else int(series_number)
    series_uid = series_uid or derived_series_uid(reference, description, series_number)
    slope, intercept = choose_rescale(float(arr.min()), float(arr.max()))
    ds = _build(arr, reference, index, slope=slope, intercept=intercept, series_uid=series_uid,
                study_uid=_study_uid(reference), description=description,
                series_number=number, now=_dt.datetime.now())
    return _write_all(out, [(target, _encode(ds))])[0]
