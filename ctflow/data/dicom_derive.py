"""The contents of a derived DICOM slice, for :mod:`ctflow.data.dicom_write`: the int16 rescale
(:func:`choose_rescale`), UIDs, numbers and file names (:func:`derived_series_uid` -- stable
across runs, on request --, :func:`derived_sop_uid`, :func:`derived_series_number`,
:func:`derived_instance_number`, :func:`derived_file_name`), and the dataset of one derived
slice (:func:`derived_slice`, :func:`encode_dataset`). What goes into the dataset is described
in :mod:`ctflow.data.dicom_write`.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian,
                         generate_uid)

from ctflow.data.dicom_file import DicomError
from ctflow.data.volume import Volume

__all__ = ["choose_rescale", "derived_series_uid", "derived_sop_uid", "derived_file_name",
           "derived_slice", "encode_dataset", "study_uid_of", "default_series_number",
           "derived_series_number", "derived_instance_number", "derived_output_name"]

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


def derived_sop_uid(series_uid: str, reference: Volume, k: int) -> str:
    """The SOPInstanceUID of the derived slice made from ``reference`` slice ``k`` in the
    derived series ``series_uid``: a function of both (new with every new series UID; the same
    for a resumed run that reuses the series UID)."""
    m = reference.slices[k]
    return generate_uid(entropy_srcs=["ctflow-derived-sop", str(series_uid),
                                      m.sop_instance_uid or m.path])


def derived_file_name(sop_instance_uid: str, instance_number: int | None = None) -> str:
    """The output file name of the derived slice with the (derived) ``sop_instance_uid``:
    ``"<instance number, 4 digits>-<UID>.dcm"`` (``"<UID>.dcm"`` without a number). It is
    never named after the source slice's UID."""
    uid = str(sop_instance_uid).strip()
    if not uid or any(ch not in "0123456789." for ch in uid):
        raise ValueError(f"derived_file_name needs a DICOM UID (digits and dots); got {uid!r}")
    if instance_number is None:
        return f"{uid}.dcm"
    return f"{int(instance_number):04d}-{uid}.dcm"


def derived_instance_number(reference: Volume, k: int) -> int:
    """InstanceNumber of the derived slice ``k``: the source slice's (so the derived series
    runs in the source's order), or ``k + 1`` when the source has none."""
    number = reference.slices[k].instance_number
    return int(number) if number is not None else int(k) + 1


def derived_series_number(reference: Volume, series_uid: str) -> int:
    """SeriesNumber of a derived series: the source's SeriesNumber ``s`` plus
    ``1000 * (1 + h mod 99999)``, ``h`` a hash of the derived ``series_uid`` -- so different
    derived series of one input get different numbers (the last three digits still show
    ``s`` for ``s < 1000``)."""
    h = int(hashlib.sha256(str(series_uid).encode()).hexdigest()[:12], 16)
    number = default_series_number(reference) - 1000 + 1000 * (1 + h % 99999)
    return int(number % (2 ** 31 - 1))


# ---------------------------------------------------------------------- datasets
def _derived_dataset(
    ref: pydicom.Dataset, hu: np.ndarray, *, slope: float, intercept: float, sop_uid: str,
    series_uid: str, study_uid: str, description: str, series_number: int,
    instance_number: int, position: np.ndarray, orientation: np.ndarray,
    pixel_spacing: tuple[float, float], source_sop_uid: str, now: _dt.datetime,
    derivation: str | None = None, resampled: bool = False,
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
    ds.ImageType = _image_type(ref, resampled)
    ds.SeriesDescription = description[:64]
    ds.DerivationDescription = (derivation or description)[:1024]
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


def _image_type(ref: pydicom.Dataset, resampled: bool) -> list[str]:
    """``DERIVED\\SECONDARY\\<value 3>`` -- value 3 (required by the CT Image IOD) is the
    source's (``AXIAL``, ``LOCALIZER``), ``AXIAL`` when it has none; ``RESAMPLED`` is
    added as value 4 when the image was reconstructed on another grid and re-sampled."""
    values = list(ref.get("ImageType", None) or [])
    third = str(values[2]).strip().upper() if len(values) > 2 and str(values[2]).strip() \
        else "AXIAL"
    return ["DERIVED", "SECONDARY", third] + (["RESAMPLED"] if resampled else [])


def _ds_str(v: float) -> str:
    """A decimal string of at most 16 characters (the DS limit) for ``v``."""
    v = float(v)
    for digits in range(12, 0, -1):
        s = f"{v:.{digits}g}"
        if len(s) <= 16:
            return s
    raise ValueError(f"cannot encode {v} as a DICOM decimal string")


def encode_dataset(ds: pydicom.Dataset) -> bytes:
    """The bytes of ``ds`` as a DICOM file (preamble, file meta, Explicit VR Little Endian)."""
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


def study_uid_of(reference: Volume) -> str:
    """The StudyInstanceUID of the derived series: the reference's, or a stable stand-in."""
    if reference.study_uid:
        return reference.study_uid
    # Blank in the source (some anonymisers): a stable stand-in derived from the source series.
    return generate_uid(entropy_srcs=["ctflow-study", _source_key(reference)])


def default_series_number(reference: Volume) -> int:
    """The reference's SeriesNumber + 1000 (1000 when it has none)."""
    try:
        return int(reference.datasets[0].get("SeriesNumber", 0) or 0) + 1000
    except (TypeError, ValueError):
        return 1000


def derived_slice(hu2d, reference, k, *, slope, intercept, series_uid, study_uid, description,
                  series_number, now, instance_number=None, derivation=None,
                  resampled=False) -> pydicom.Dataset:
    """The derived dataset of HU slice ``hu2d`` made from ``reference`` slice ``k`` (geometry
    resampled to the slice's shape; SOPInstanceUID :func:`derived_sop_uid`; InstanceNumber
    :func:`derived_instance_number` unless given; DerivationDescription ``derivation`` or
    ``description``; ``resampled`` adds ``RESAMPLED`` to ImageType)."""
    m = reference.slices[k]
    position, spacing = _geometry(reference, k, hu2d.shape[0], hu2d.shape[1])
    return _derived_dataset(
        reference.datasets[k], hu2d, slope=slope, intercept=intercept,
        sop_uid=derived_sop_uid(series_uid, reference, k),
        series_uid=series_uid, study_uid=study_uid, description=description,
        series_number=series_number,
        instance_number=instance_number if instance_number is not None
        else derived_instance_number(reference, k),
        position=position, orientation=reference.orientation, pixel_spacing=spacing,
        source_sop_uid=m.sop_instance_uid, now=now, derivation=derivation,
        resampled=resampled)


def derived_output_name(reference: Volume, k: int, series_uid: str) -> str:
    """The file name of the derived slice of ``reference`` slice ``k`` in the derived series
    ``series_uid``: :func:`derived_file_name` of its :func:`derived_sop_uid` and
    :func:`derived_instance_number`."""
    return derived_file_name(derived_sop_uid(series_uid, reference, k),
                             derived_instance_number(reference, k))
