"""Reading CT DICOM: whole series into a :class:`~ctflow.data.volume.Volume`, or single slices.

* :func:`read_dicom_series` — a folder (searched recursively) or a list of files holding one
  series → a volume in HU, sorted along the slice normal.
* :func:`read_dicom_slices` — independent single slices (e.g. one slice per patient and study)
  → a list of ``(hu, meta)`` pairs, in the order given.

Stored values become HU through the Modality LUT, ``hu = stored·RescaleSlope + RescaleIntercept``
(``pydicom.pixels.apply_rescale``). Compressed transfer syntaxes are decoded by pydicom's
decoder plugins: JPEG 2000 through pylibjpeg + pylibjpeg-openjpeg (or Pillow), JPEG Lossless
(process 14) through pylibjpeg-libjpeg or GDCM, RLE natively.

Files are found, read, checked and decoded one at a time by :mod:`ctflow.data.dicom_file`;
this module assembles slices and series. Every problem raises :class:`DicomError` (a
``ValueError``) whose message names the file and the problem; a path that does not exist
raises ``FileNotFoundError``.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from ctflow.data.dicom_file import (NON_DICOM_SUFFIXES, DicomError, check_image, decode_hu,
                                    float_tuple, header_copy, list_dicom_files, read_dataset,
                                    slice_meta)
from ctflow.data.volume import SliceMeta, Volume, clip_hu

__all__ = [
    "DicomError",
    "DicomSlice",
    "read_dicom_series",
    "read_dicom_slices",
    "list_dicom_files",
    "NON_DICOM_SUFFIXES",
]


class DicomSlice(NamedTuple):
    """One decoded slice: ``hu`` (float32, ``(rows, columns)``) and its :class:`SliceMeta`."""

    hu: np.ndarray
    meta: SliceMeta


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
        ds = read_dataset(f)
        check_image(ds, f, allow_non_ct)
        hu = decode_hu(ds, f)
        if clip is not None:
            hu = clip_hu(hu, *clip).astype(np.float32, copy=False)
        out.append(DicomSlice(hu, slice_meta(ds, f)))
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
        ds = read_dataset(f)
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
        check_image(ds, f, allow_non_ct)
        for key in ("ImagePositionPatient", "ImageOrientationPatient"):
            if key not in ds or not ds.get(key):
                raise DicomError(f"{f}: missing {key}, cannot place the slice in the volume "
                                 f"(use read_dicom_slices for unrelated single slices)")
        metas.append(slice_meta(ds, f))

    # Two files with one SOPInstanceUID: the same slice twice, or a broken series. Refused
    # here, before anything is decoded or written (a writer keyed by the UID would lose one).
    seen: dict[str, Path] = {}
    for m, (f, _) in zip(metas, items):
        if m.sop_instance_uid and m.sop_instance_uid in seen:
            raise DicomError(f"{seen[m.sop_instance_uid]} and {f}: duplicate SOPInstanceUID "
                             f"{m.sop_instance_uid} in one series (the same slice twice?); "
                             "remove one of the files")
        seen.setdefault(m.sop_instance_uid, f)

    # Each slice is compared with the most common orientation / matrix / spacing, so that
    # the odd one out is the file named in the error.
    iops = [np.array(float_tuple(ds.ImageOrientationPatient, 6, f, "ImageOrientationPatient"))
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
        hu[k] = decode_hu(ds, f)
    headers = [header_copy(items[i][1]) for i in order]
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
