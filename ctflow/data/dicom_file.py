"""One DICOM file at a time, for :mod:`ctflow.data.dicom`: finding the files of a folder,
reading and checking one file, decoding its pixels to HU and describing it (:class:`SliceMeta`).

Every problem raises :class:`DicomError` (a ``ValueError``) whose message names the file and
the problem; a path that does not exist raises ``FileNotFoundError``.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from ctflow.data.volume import SliceMeta

__all__ = ["DicomError", "NON_DICOM_SUFFIXES", "MAX_MATRIX", "list_dicom_files", "read_dataset", "check_image",
           "decode_hu", "float_tuple", "slice_meta", "header_copy"]

#: In a folder, files with these suffixes (and hidden files and ``DICOMDIR``) are skipped;
#: every other file must be a DICOM file. Explicit file lists are never filtered.
NON_DICOM_SUFFIXES = frozenset({
    ".md", ".txt", ".rst", ".json", ".csv", ".tsv", ".xml", ".html", ".htm", ".pdf", ".log",
    ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".nii", ".gz",
    ".npz", ".npy", ".h5", ".hdf5", ".zip", ".tar", ".py", ".ini", ".cfg", ".safetensors",
})

#: The largest Rows or Columns accepted (a corrupt header claiming more is refused before
#: any pixel is decoded).
MAX_MATRIX = 16384

# SOP class of a DICOMDIR (media storage directory): holds no image.
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


class DicomError(ValueError):
    """A DICOM input problem; the message names the file(s) and the problem."""


# ---------------------------------------------------------------------- file discovery
def list_dicom_files(path: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """The candidate DICOM files of a folder (recursive, sorted) or of an explicit list.

    In a folder, hidden files, ``DICOMDIR`` and files whose suffix is in
    :data:`NON_DICOM_SUFFIXES` (licence, README, NIfTI, …) are skipped. Raises
    ``FileNotFoundError`` for a missing path and :class:`DicomError` when nothing is left.
    """
    if isinstance(path, (str, os.PathLike)):
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"DICOM input not found: {p}")
        if p.is_file():
            return [p]
        files = []
        for f in sorted(p.rglob("*")):
            if not f.is_file():
                continue
            rel = f.relative_to(p)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if f.name.upper() == "DICOMDIR" or f.suffix.lower() in NON_DICOM_SUFFIXES:
                continue
            files.append(f)
        if not files:
            raise DicomError(f"{p}: empty folder, no DICOM files found (searched recursively)")
        return files
    files = [Path(f) for f in path]
    if not files:
        raise DicomError("read_dicom: empty list of files")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"DICOM file not found: {f}")
        if not f.is_file():
            raise DicomError(f"{f}: not a file (pass a folder as a single path, not in a list)")
    return files


# ---------------------------------------------------------------------- per-file reading
def read_dataset(path: Path) -> pydicom.Dataset:
    """Parse one file; non-DICOM and unparseable (e.g. truncated) files raise DicomError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
    except InvalidDicomError:
        # No 'DICM' marker: accept only if a forced parse finds an image header.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, force=True)
            ok = "SOPInstanceUID" in ds and ("Rows" in ds or "Modality" in ds)
        except Exception:  # noqa: BLE001 - any parse failure means "not DICOM"
            ok = False
        if not ok:
            raise DicomError(
                f"{path}: not a DICOM file (no 'DICM' marker at byte 128 and no DICOM "
                f"image header)") from None
    except Exception as exc:  # noqa: BLE001
        raise DicomError(f"{path}: cannot parse DICOM file, it is truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    # pydicom stops quietly at the end of a cut file; a value shorter than its declared
    # length, or a missing type-1 SeriesInstanceUID element, gives the truncation away.
    keys = list(ds.keys())
    if keys:
        raw = ds.get_item(keys[-1])
        length = getattr(raw, "length", None)
        value = getattr(raw, "value", None)
        if (isinstance(value, (bytes, bytearray)) and length is not None
                and length != 0xFFFFFFFF and len(value) < length):
            raise DicomError(f"{path}: truncated file, element {keys[-1]} declares {length} "
                             f"bytes but the file ends after {len(value)}")
    if "SeriesInstanceUID" not in ds:
        last = f"after element {keys[-1]}" if keys else "before the first element"
        raise DicomError(f"{path}: no SeriesInstanceUID element; the file is truncated (parsing "
                         f"ended {last}) or is not a DICOM image")
    try:
        if ds.get("SOPClassUID", "") == _MEDIA_STORAGE_DIRECTORY:
            raise DicomError(f"{path}: is a DICOMDIR (media storage directory), not an image")
    except DicomError:
        raise
    except Exception as exc:  # noqa: BLE001 - a corrupt element found while accessing it
        raise DicomError(f"{path}: cannot parse DICOM file, it is truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    return ds


def check_image(ds: pydicom.Dataset, path: Path, allow_non_ct: bool) -> None:
    """:class:`DicomError` unless ``ds`` is a CT image (any modality with ``allow_non_ct``)
    with pixel data ctflow can decode."""
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT" and not allow_non_ct:
        shown = modality or "(missing)"
        raise DicomError(f"{path}: Modality is {shown}, not CT; ctflow reads CT by default "
                         f"(pass allow_non_ct=True to read it anyway)")
    if "PixelData" not in ds:
        other = [k for k in ("FloatPixelData", "DoubleFloatPixelData") if k in ds]
        extra = f" (it has {other[0]}, which is not supported)" if other else ""
        last = list(ds.keys())[-1]
        raise DicomError(f"{path}: no PixelData element, the file holds no image{extra} or is "
                         f"truncated (it ends after element {last})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DicomError(f"{path}: multi-frame file ({frames} frames); only single-frame "
                         f"slices are supported")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(f"{path}: SamplesPerPixel is {ds.SamplesPerPixel}; CT slices are "
                         f"greyscale (1 sample per pixel)")
    for key in ("Rows", "Columns", "BitsAllocated"):
        if key not in ds:
            raise DicomError(f"{path}: missing {key}, cannot decode the pixel data")
    rows, cols = int(ds.Rows or 0), int(ds.Columns or 0)
    if not (1 <= rows <= MAX_MATRIX and 1 <= cols <= MAX_MATRIX):
        raise DicomError(f"{path}: Rows x Columns = {rows} x {cols} is outside 1..{MAX_MATRIX}; "
                         "refusing to decode (corrupt header?)")
    bits = int(ds.BitsAllocated or 0)
    if bits not in (1, 8, 16, 32, 64):
        raise DicomError(f"{path}: BitsAllocated is {bits}; expected 8, 16 or 32")
    tsyntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    if tsyntax is None or not getattr(tsyntax, "is_compressed", False):
        need = (rows * cols * bits + 7) // 8
        have = len(ds.PixelData or b"")
        if have < need:
            raise DicomError(f"{path}: PixelData holds {have} bytes but Rows x Columns = "
                             f"{rows} x {cols} at {bits} bits needs {need}; the file is "
                             "truncated or its header is wrong")


def _decoder_hint(tsyntax: str) -> str:
    """What to install to decode the transfer syntax ``tsyntax``."""
    if tsyntax in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
        return "pip install pylibjpeg pylibjpeg-openjpeg (JPEG 2000)"
    if tsyntax in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        return "pip install pylibjpeg pylibjpeg-libjpeg, or pyjpegls (JPEG-LS)"
    if tsyntax.startswith("1.2.840.10008.1.2.4."):
        return "pip install pylibjpeg pylibjpeg-libjpeg (JPEG baseline/extended/lossless)"
    return "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg, or python-gdcm"


def decode_hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
    """Decode pixel data and apply the Modality LUT (rescale slope/intercept) → float32 HU."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID", None) if hasattr(ds, "file_meta") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:  # noqa: BLE001
        name = getattr(tsyntax, "name", str(tsyntax))
        msg = str(exc)
        if tsyntax is not None and getattr(tsyntax, "is_compressed", False) and (
                "plugin" in msg.lower() or "missing" in msg.lower() or "requires" in msg.lower()):
            raise DicomError(f"{path}: cannot decode compressed pixel data ({name}), no decoder "
                             f"installed: {_decoder_hint(str(tsyntax))} ({msg})") from exc
        raise DicomError(f"{path}: cannot decode pixel data ({name}); the file is truncated "
                         f"or corrupt ({type(exc).__name__}: {msg})") from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    if arr.shape != (rows, cols):
        raise DicomError(f"{path}: decoded pixel array has shape {arr.shape}, expected "
                         f"(Rows, Columns) = ({rows}, {cols})")
    if "RescaleSlope" in ds or "RescaleIntercept" in ds or "ModalityLUTSequence" in ds:
        hu = apply_rescale(arr, ds)
    else:
        hu = arr
    hu = np.asarray(hu, dtype=np.float32)
    if not np.all(np.isfinite(hu)):
        raise DicomError(f"{path}: pixel values are not finite after rescaling")
    return hu


def float_tuple(value, n: int, path: Path, key: str) -> tuple[float, ...]:
    """``value`` as ``n`` floats; :class:`DicomError` naming ``path`` and ``key`` otherwise."""
    try:
        out = tuple(float(v) for v in value)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(f"{path}: {key} is not numeric: {value!r}") from exc
    if len(out) != n:
        raise DicomError(f"{path}: {key} should have {n} values, has {len(out)}: {value!r}")
    return out


def _spacing(value, path: Path) -> tuple[float, ...]:
    """PixelSpacing as two finite, positive floats (mm); :class:`DicomError` otherwise."""
    out = float_tuple(value, 2, path, "PixelSpacing")
    if not all(np.isfinite(v) and v > 0 for v in out):
        raise DicomError(f"{path}: PixelSpacing {list(out)} must be two positive finite "
                         "numbers (mm)")
    return out


def _sop_uid(ds: pydicom.Dataset) -> str:
    """SOPInstanceUID, falling back to the file meta's MediaStorageSOPInstanceUID if blank."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    return uid


def slice_meta(ds: pydicom.Dataset, path: Path) -> SliceMeta:
    """The :class:`SliceMeta` of one file (position, spacing, UIDs, patient, file name)."""
    pos = ds.get("ImagePositionPatient", None)
    ps = ds.get("PixelSpacing", None)
    inst = ds.get("InstanceNumber", None)
    tsyntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    thick = ds.get("SliceThickness", None)
    return SliceMeta(
        path=str(path),
        sop_instance_uid=_sop_uid(ds),
        instance_number=int(inst) if inst not in (None, "") else None,
        position=float_tuple(pos, 3, path, "ImagePositionPatient") if pos else None,
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "") or ""),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        pixel_spacing=_spacing(ps, path) if ps else None,
        slice_thickness=float(thick) if thick not in (None, "") else None,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        transfer_syntax=str(tsyntax),
    )


def header_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset without its pixel data (kept as a writing reference)."""
    if "PixelData" in ds:
        del ds.PixelData
    return ds
