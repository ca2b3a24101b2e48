"""NIfTI volumes (nibabel) in and out of the :class:`~ctflow.data.volume.Volume` type.

NIfTI stores an array ``data[i, j, k]`` and an affine to RAS+ world millimetres
(+x = patient's right, +y = anterior, +z = superior). DICOM and
:class:`Volume` use LPS (+x = left, +y = posterior, +z = superior); the two differ by
``diag(−1, −1, 1)``.

:func:`read_nifti` reorients the array (axis flips and permutations only, never resampling)
so that its axes point, as closely as the affine allows, along L, P and S — axial slices with
rows running anterior→posterior and columns right→left, exactly as an axial HFS DICOM series
(ImageOrientationPatient ``1,0,0,0,1,0``) — and returns ``hu`` as ``(Z, Y, X) = (k, j, i)``
with z (superior) increasing. Values are the scaled data (``scl_slope``/``scl_inter``
applied), assumed to be HU for CT.
"""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from nibabel.orientations import (apply_orientation, axcodes2ornt, inv_ornt_aff,
                                  io_orientation, ornt_transform)

from ctflow.data.atomic import atomic_save
from ctflow.data.volume import SliceMeta, Volume

__all__ = ["read_nifti", "write_nifti"]

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def read_nifti(path: str | os.PathLike, *, dtype=np.float32) -> Volume:
    """Read a 3-D NIfTI file (``.nii`` or ``.nii.gz``) into a :class:`Volume` (see module doc).

    ``spacing`` is ``(dz, dy, dx)`` from the reoriented affine's column norms, ``orientation``
    the LPS direction cosines of the X and Y axes, ``positions[k]`` the LPS position of voxel
    ``(k, 0, 0)``. A 4-D file with a single volume is accepted; other 4-D files and affines
    with shear (non-orthogonal axes) raise ``ValueError``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {path}")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc
    shape = img.shape
    if len(shape) == 4 and shape[3] == 1:
        pass
    elif len(shape) != 3:
        raise ValueError(f"{path}: expected a 3-D volume, got shape {shape}")
    try:
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(shape[:3])
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: cannot read the voxel data, the file is truncated or corrupt "
                         f"({type(exc).__name__}: {exc})") from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError(f"{path}: the affine is singular or not finite: {affine.tolist()}")

    transform = ornt_transform(io_orientation(affine), axcodes2ornt(("L", "P", "S")))
    data = apply_orientation(data, transform)
    aff = _RAS_TO_LPS @ affine @ inv_ornt_aff(transform, shape[:3])

    cols = aff[:3, :3]
    dx, dy, dz = (float(np.linalg.norm(cols[:, a])) for a in range(3))
    r, c, n = cols[:, 0] / dx, cols[:, 1] / dy, cols[:, 2] / dz
    if abs(r @ c) > 1e-4 or np.linalg.norm(np.cross(r, c) - n) > 1e-4:
        raise ValueError(f"{path}: affine has sheared or left-handed axes after reorientation "
                         f"({aff[:3, :3].tolist()}); only rotations and flips are supported")
    nz = data.shape[2]
    positions = np.stack([aff[:3, 3] + k * aff[:3, 2] for k in range(nz)])
    hu = np.ascontiguousarray(np.transpose(data, (2, 1, 0)), dtype=dtype)
    slices = [SliceMeta(path=str(path), instance_number=k + 1, position=tuple(positions[k]),
                        rows=hu.shape[1], columns=hu.shape[2], pixel_spacing=(dy, dx),
                        slice_thickness=dz) for k in range(nz)]
    return Volume(hu=hu, spacing=(dz, dy, dx), positions=positions,
                  orientation=np.concatenate([r, c]), slices=slices, source=str(path))


def write_nifti(volume: Volume, path: str | os.PathLike, *, dtype=np.float32,
                overwrite: bool = False) -> Path:
    """Write ``volume`` as NIfTI (``.nii`` or ``.nii.gz``), the inverse of :func:`read_nifti`.

    The array is stored as ``data[i, j, k] = hu[k, j, i]`` with the RAS affine
    ``diag(−1, −1, 1, 1) · volume.affine`` (sform and qform, code "scanner"). The file is
    written to a temporary name in the same folder and renamed; an existing file raises
    ``FileExistsError`` unless ``overwrite=True``.
    """
    path = Path(path)
    if not (path.name.endswith(".nii") or path.name.endswith(".nii.gz")):
        raise ValueError(f"{path}: NIfTI file names end in .nii or .nii.gz")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: file exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    hu = volume.hu.detach().cpu().numpy() if isinstance(volume.hu, torch.Tensor) else volume.hu
    data = np.ascontiguousarray(np.transpose(np.asarray(hu), (2, 1, 0)), dtype=dtype)
    affine = _RAS_TO_LPS @ volume.affine
    img = nib.Nifti1Image(data, affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii"
    atomic_save(path, lambda tmp: nib.save(img, tmp), suffix=suffix)
    return path
