"""Reading CT DICOM: whole series into a :class:`~ctflow.data.volume.Volume`, or single slices.

* :func:`read_dicom_series` — a folder (searched recursively) or a list of files holding one
  series → a volume in HU, sorted along the slice normal.
* :func:`read_dicom_slices` — independent single slices (e.g. one slice per patient and study)
  → a list of ``(hu, meta)`` pairs, in the order given.

Stored values become HU through the Modality LUT, ``hu = stored·RescaleSlope + RescaleIntercept``
(``pydicom.pixels.apply_rescale``). Compressed transfer syntaxes are decoded by pydicom's
decoder plugins: JPEG 2000 through pylibjpeg + pylibjpeg-openjpeg (or Pillow), JPEG Lossless
(process 14) through pylibjpeg-libjpeg or GDCM, RLE natively.

Every problem raises :class:`DicomError` (a ``ValueError``) whose message names the file and
the problem; a path that does not exist raises ``FileNotFoundError``.
"""
from __future__ import annotations

import os
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

from ctflow.data.volume import SliceMeta, Volume, clip_hu

__all__ = [
    "DicomError",
    "DicomSlice",
    "read_dicom_series",
    "read_dicom_slices",
    "list_dicom_files",
    "NON_DICOM_SUFFIXES",
]

#: In a folder, files with these suffixes (and hidden files and ``DICOMDIR``) are skipped;
#: every other file must be a DICOM file. Explicit file lists are never filtered.
NON_DICOM_SUFFIXES = frozenset({
    ".md", ".txt", ".rst", ".json", ".csv", ".tsv", ".xml", ".html", ".htm", ".pdf", ".log",
    ".yaml", ".yml", ".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".nii", ".gz",
    ".npz", ".npy", ".h5", ".hdf5", ".zip", ".tar", ".py", ".ini", ".cfg", ".safetensors",
})

# SOP class of a DICOMDIR (media storage directory): holds no image.
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


class DicomError(ValueError):
    """A DICOM input problem; the message names the file(s) and the problem."""


class DicomSlice(NamedTuple):
    """One decoded slice: ``hu`` (float32, ``(rows, columns)``) and its :class:`SliceMeta`."""

    hu: np.ndarray
    meta: SliceMeta


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
def _read_dataset(path: Path) -> pydicom.Dataset:
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


def _check_image(ds: pydicom.Dataset, path: Path, allow_non_ct: bool) -> None:
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


def _decoder_hint(tsyntax: str) -> str:
    """What to install to decode the transfer syntax ``tsyntax``."""
    if tsyntax in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"):
        return "pip install pylibjpeg pylibjpeg-openjpeg (JPEG 2000)"
    if tsyntax in ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"):
        return "pip install pylibjpeg pylibjpeg-libjpeg, or pyjpegls (JPEG-LS)"
    if tsyntax.startswith("1.2.840.10008.1.2.4."):
        return "pip install pylibjpeg pylibjpeg-libjpeg (JPEG baseline/extended/lossless)"
    return "pip install pylibjpeg pylibjpeg-openjpeg pylibjpeg-libjpeg, or python-gdcm"


def _decode_hu(ds: pydicom.Dataset, path: Path) -> np.ndarray:
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


def _float_tuple(value, n: int, path: Path, key: str) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except Exception as exc:  # noqa: BLE001
        raise DicomError(f"{path}: {key} is not numeric: {value!r}") from exc
    if len(out) != n:
        raise DicomError(f"{path}: {key} should have {n} values, has {len(out)}: {value!r}")
    return out


def _sop_uid(ds: pydicom.Dataset) -> str:
    """SOPInstanceUID, falling back to the file meta's MediaStorageSOPInstanceUID if blank."""
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not uid and hasattr(ds, "file_meta"):
        uid = str(ds.file_meta.get("MediaStorageSOPInstanceUID", "") or "")
    return uid


def _meta(ds: pydicom.Dataset, path: Path) -> SliceMeta:
    pos = ds.get("ImagePositionPatient", None)
    ps = ds.get("PixelSpacing", None)
    inst = ds.get("InstanceNumber", None)
    tsyntax = ds.file_meta.get("TransferSyntaxUID", "") if hasattr(ds, "file_meta") else ""
    thick = ds.get("SliceThickness", None)
    return SliceMeta(
        path=str(path),
        sop_instance_uid=_sop_uid(ds),
        instance_number=int(inst) if inst not in (None, "") else None,
        position=_float_tuple(pos, 3, path, "ImagePositionPatient") if pos else None,
        slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
        intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        patient_id=str(ds.get("PatientID", "") or ""),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "") or ""),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        pixel_spacing=_float_tuple(ps, 2, path, "PixelSpacing") if ps else None,
        slice_thickness=float(thick) if thick not in (None, "") else None,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        transfer_syntax=str(tsyntax),
    )


def _header_copy(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The dataset without its pixel data (kept as a writing reference)."""
    if "PixelData" in ds:
        del ds.PixelData
    return ds


# ---------------------------------------------------------------------- slices
def read_dicom_slices(
    paths: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    allow_non_ct: bool = False,
    clip: tuple[float, float] | None = None,
) -> list[DicomSlice]:
    """Read independent single slices (not a volume) → ``[DicomSlice(hu, meta), ...]``.

    ``paths`` is a folder (recursive, sorted by path) or a list of files (order kept). Each file
    is decoded to HU on its own; slices may come from different patients, studies and sizes.
    ``meta.patient_id`` and ``meta.file_name`` identify each slice. With ``clip=(lo, hi)`` the
    HU values are clipped (:func:`~ctflow.data.volume.clip_hu`), which removes the −3024/−2048
    padding outside the scan circle.
    """
    out = []
    for f in list_dicom_files(paths):
        ds = _read_dataset(f)
        _check_image(ds, f, allow_non_ct)
        hu = _decode_hu(ds, f)
        if clip is not None:
            hu = clip_hu(hu, *clip).astype(np.float32, copy=False)
        out.append(DicomSlice(hu, _meta(ds, f)))
    return out


# ---------------------------------------------------------------------- series
def _majority_index(keys: list) -> int:
    """Index of the first item whose key is the most common one."""
    counts: dict = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    best = max(counts.values())
    return next(i for i, key in enumerate(keys) if counts[key] == best)


def _describe_series(uid: str, items: list) -> str:
    path, ds = items[0]
    return (f"  {uid or '(no SeriesInstanceUID)'}: {len(items)} file(s), Modality {ds.get('Modality', '?')}, "
            f"SeriesNumber {ds.get('SeriesNumber', '?')}, "
            f"'{ds.get('SeriesDescription', '')}', e.g. {path}")


def read_dicom_series(
    path: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    series_uid: str | None = None,
    allow_non_ct: bool = False,
    spacing_tolerance: float = 0.01,
    progress: bool = False,
) -> Volume:
    """Read one DICOM series into a :class:`Volume` in HU (float32, ``(Z, Y, X)``).

    Parameters
    ----------
    path : a folder (searched recursively; see :func:`list_dicom_files` for skipped files) or
        a list of files.
    series_uid : the SeriesInstanceUID to read when the input holds several series; without it
        several series raise a :class:`DicomError` that lists them.
    allow_non_ct : accept modalities other than CT (values are then the rescaled stored values).
    spacing_tolerance : relative tolerance on the gaps between slice positions.
    progress : show a tqdm progress bar while decoding.

    Slice order: with row/column cosines ``r, c`` (ImageOrientationPatient) and normal
    ``n = r × c``, slice ``k`` sits at ``d_k = p_k · n`` (``p_k`` its ImagePositionPatient);
    slices are sorted by ``d_k`` ascending (never by file name or InstanceNumber). The gaps
    ``d_{k+1} − d_k`` must agree within ``spacing_tolerance`` (relative, plus 1e-3 mm);
    ``spacing[0]`` is their median (a single slice takes SpacingBetweenSlices or
    SliceThickness, else 1 mm). Every slice must share orientation, matrix size and
    PixelSpacing.
    """
    files = list_dicom_files(path)
    groups: "OrderedDict[str, list]" = OrderedDict()
    for f in files:
        ds = _read_dataset(f)
        # Files whose SeriesInstanceUID was blanked (some anonymisers do this) form one group
        # keyed "", kept apart from every identified series.
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append((f, ds))

    if series_uid is not None:
        if series_uid not in groups:
            listing = "\n".join(_describe_series(u, it) for u, it in groups.items())
            raise DicomError(f"{path}: series {series_uid} not found; the input holds:\n{listing}")
        chosen = series_uid
    elif len(groups) > 1:
        listing = "\n".join(_describe_series(u, it) for u, it in groups.items())
        raise DicomError(f"{path}: {len(groups)} series found in one input; choose one with "
                         f"series_uid=...:\n{listing}")
    else:
        chosen = next(iter(groups))
    items = groups[chosen]

    # Per-file checks, then geometry.
    metas = []
    for f, ds in items:
        _check_image(ds, f, allow_non_ct)
        for key in ("ImagePositionPatient", "ImageOrientationPatient"):
            if key not in ds or not ds.get(key):
                raise DicomError(f"{f}: missing {key}, cannot place the slice in the volume "
                                 f"(use read_dicom_slices for unrelated single slices)")
        metas.append(_meta(ds, f))

    # Each slice is compared with the most common orientation / matrix / spacing, so that
    # the odd one out is the file named in the error.
    iops = [np.array(_float_tuple(ds.ImageOrientationPatient, 6, f, "ImageOrientationPatient"))
            for f, ds in items]
    for m, (f, _) in zip(metas, items):
        if m.pixel_spacing is None:
            raise DicomError(f"{f}: missing PixelSpacing")
    ref = _majority_index([(tuple(np.round(o, 4)), m.rows, m.columns,
                            tuple(np.round(m.pixel_spacing, 5))) for o, m in zip(iops, metas)])
    f0, ds0 = items[ref]
    iop0, m0 = iops[ref], metas[ref]
    r, c = iop0[:3], iop0[3:]
    if abs(np.linalg.norm(r) - 1) > 1e-3 or abs(np.linalg.norm(c) - 1) > 1e-3 or abs(r @ c) > 1e-3:
        raise DicomError(f"{f0}: ImageOrientationPatient {list(iop0)} is not two orthonormal "
                         f"direction cosines")
    normal = np.cross(r, c)
    for (f, ds), m, iop in zip(items, metas, iops):
        if np.max(np.abs(iop - iop0)) > 1e-4:
            raise DicomError(f"{f}: ImageOrientationPatient {list(iop)} differs from "
                             f"{list(iop0)} of the other slices (e.g. {f0}); slices of one "
                             f"volume must share it")
        if (m.rows, m.columns) != (m0.rows, m0.columns):
            raise DicomError(f"{f}: matrix {m.rows}x{m.columns} differs from "
                             f"{m0.rows}x{m0.columns} of the other slices (e.g. {f0})")
        if np.max(np.abs(np.subtract(m.pixel_spacing, m0.pixel_spacing))) > 1e-4 * max(
                1.0, max(m0.pixel_spacing)):
            raise DicomError(f"{f}: PixelSpacing {m.pixel_spacing} differs from "
                             f"{m0.pixel_spacing} of the other slices (e.g. {f0})")

    pos = np.array([m.position for m in metas], dtype=np.float64)
    d = pos @ normal
    order = np.argsort(d, kind="stable")
    d_sorted = d[order]
    sorted_files = [items[i][0] for i in order]
    if len(order) > 1:
        gaps = np.diff(d_sorted)
        k = int(np.argmin(gaps))
        if gaps[k] <= 1e-3:
            raise DicomError(f"{sorted_files[k]} and {sorted_files[k + 1]}: two slices at the "
                             f"same position along the slice normal ({d_sorted[k]:.3f} mm); "
                             f"duplicate slices or two volumes in one series")
        dz = float(np.median(gaps))
        bad = np.abs(gaps - dz) > spacing_tolerance * dz + 1e-3
        if np.any(bad):
            j = int(np.argmax(np.abs(gaps - dz)))
            raise DicomError(
                f"{sorted_files[j]} -> {sorted_files[j + 1]}: inconsistent slice spacing, "
                f"{gaps[j]:.4g} mm between these slices but {dz:.4g} mm (median) elsewhere "
                f"({int(bad.sum())} irregular gap(s); a missing or extra slice?)")
    else:
        sbs = ds0.get("SpacingBetweenSlices", None) or ds0.get("SliceThickness", None)
        dz = float(sbs) if sbs not in (None, "") else 1.0

    hu = np.empty((len(order), m0.rows, m0.columns), dtype=np.float32)
    it = order
    if progress:
        from tqdm.auto import tqdm
        it = tqdm(order, desc="decoding DICOM", unit="slice")
    for k, i in enumerate(it):
        f, ds = items[i]
        hu[k] = _decode_hu(ds, f)
    headers = [_header_copy(items[i][1]) for i in order]
    dy, dx = m0.pixel_spacing
    src = str(Path(path)) if isinstance(path, (str, os.PathLike)) else None
    return Volume(
        hu=hu,
        spacing=(dz, dy, dx),
        positions=pos[order],
        orientation=iop0,
        slices=[metas[i] for i in order],
        series_uid=chosen,
        study_uid=m0.study_uid,
        modality=m0.modality,
        datasets=headers,
        source=src,
    )
