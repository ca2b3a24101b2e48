"""The volume type shared by the DICOM and NIfTI readers, and HU windowing helpers.

Geometry convention (the DICOM one, used for volumes from every reader):

* ``hu`` is indexed ``(Z, Y, X)`` = ``(k, j, i)``: ``i`` runs along the image row direction
  ``r = orientation[:3]``, ``j`` along the column direction ``c = orientation[3:]`` and ``k``
  along the slice normal ``n = r × c``, with slices sorted so that the position along ``n``
  strictly increases with ``k``.
* Positions are in the DICOM patient coordinate system (LPS: x towards the patient's left,
  y towards posterior, z towards head), in millimetres. ``positions[k]`` is the centre of
  voxel ``(k, 0, 0)`` (DICOM ImagePositionPatient).
* ``spacing = (dz, dy, dx)`` in mm: ``dy`` is the distance between rows (PixelSpacing[0]),
  ``dx`` between columns (PixelSpacing[1]) and ``dz`` between slice centres along ``n``.
  Hence the voxel ``(k, j, i)`` sits at ``positions[k] + i·dx·r + j·dy·c``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["SliceMeta", "Volume", "clip_hu", "window_hu", "unwindow_hu", "HU_MIN", "HU_MAX"]

#: Default HU clipping range: air (-1024) to the largest value of a 12-bit scanner (3071).
HU_MIN = -1024.0
HU_MAX = 3071.0


@dataclass
class SliceMeta:
    """Metadata of one DICOM slice (or one axial slice of a NIfTI volume).

    ``position`` is ImagePositionPatient (mm, LPS), ``slope``/``intercept`` the rescale that
    maps stored values to HU (``hu = stored·slope + intercept``).
    """

    path: str
    sop_instance_uid: str = ""
    instance_number: int | None = None
    position: tuple[float, float, float] | None = None
    slope: float = 1.0
    intercept: float = 0.0
    patient_id: str = ""
    study_uid: str = ""
    series_uid: str = ""
    modality: str = ""
    rows: int = 0
    columns: int = 0
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    series_description: str = ""
    transfer_syntax: str = ""

    @property
    def file_name(self) -> str:
        """The file's base name."""
        return Path(self.path).name


@dataclass
class Volume:
    """A CT volume in Hounsfield units with its geometry (see the module docstring).

    Attributes
    ----------
    hu : float32 ``numpy.ndarray`` or ``torch.Tensor`` of shape ``(Z, Y, X)``, HU.
    spacing : ``(dz, dy, dx)`` in mm.
    positions : ``(Z, 3)`` float64 array, ImagePositionPatient of each slice (mm, LPS).
    orientation : ``(6,)`` float64 array, ImageOrientationPatient (row then column cosines).
    slices : per-slice metadata, in the order of ``hu``.
    series_uid, study_uid, modality : from the headers (empty for NIfTI).
    datasets : DICOM headers (pixel data removed) of each slice, in the order of ``hu``; the
        writer uses them as references. Empty for volumes that did not come from DICOM.
    source : the folder or file the volume was read from (``None`` if built in memory).
    """

    hu: Any
    spacing: tuple[float, float, float]
    positions: np.ndarray
    orientation: np.ndarray
    slices: list[SliceMeta] = field(default_factory=list)
    series_uid: str = ""
    study_uid: str = ""
    modality: str = ""
    datasets: list = field(default_factory=list, repr=False)
    source: str | None = None

    def __post_init__(self) -> None:
        if self.hu.ndim != 3:
            raise ValueError(f"Volume.hu must have shape (Z, Y, X); got shape {tuple(self.hu.shape)}")
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.orientation = np.asarray(self.orientation, dtype=np.float64).reshape(6)
        self.spacing = tuple(float(s) for s in self.spacing)
        if len(self.spacing) != 3:
            raise ValueError(f"Volume.spacing must be (dz, dy, dx); got {self.spacing}")
        if self.positions.shape[0] != self.hu.shape[0]:
            raise ValueError(
                f"Volume has {self.hu.shape[0]} slices but {self.positions.shape[0]} positions")

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(Z, Y, X)``."""
        return tuple(int(s) for s in self.hu.shape)

    @property
    def row_direction(self) -> np.ndarray:
        """Unit vector ``r`` along which the column index ``i`` (X) increases."""
        return self.orientation[:3]

    @property
    def column_direction(self) -> np.ndarray:
        """Unit vector ``c`` along which the row index ``j`` (Y) increases."""
        return self.orientation[3:]

    @property
    def normal(self) -> np.ndarray:
        """Slice normal ``n = r × c``; the slice index ``k`` (Z) increases along it."""
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping the homogeneous index ``(i, j, k, 1)`` (X, Y, Z) to LPS mm.

        ``A = [[dx·r, dy·c, dz·n, p_0], [0, 0, 0, 1]]`` (columns), with ``p_0 = positions[0]``.
        """
        dz, dy, dx = self.spacing
        a = np.eye(4)
        a[:3, 0] = dx * self.row_direction
        a[:3, 1] = dy * self.column_direction
        a[:3, 2] = dz * self.normal
        a[:3, 3] = self.positions[0]
        return a

    @property
    def slice_locations(self) -> np.ndarray:
        """Position of each slice along the normal, ``positions[k] · n`` (mm, increasing)."""
        return self.positions @ self.normal

    # ------------------------------------------------------------------ conversions
    def numpy(self) -> np.ndarray:
        """``hu`` as a float32 numpy array."""
        if isinstance(self.hu, torch.Tensor):
            return self.hu.detach().cpu().numpy().astype(np.float32, copy=False)
        return np.asarray(self.hu, dtype=np.float32)

    def to_tensor(self, device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``hu`` as a torch tensor ``(Z, Y, X)``."""
        if isinstance(self.hu, torch.Tensor):
            return self.hu.to(device=device, dtype=dtype)
        return torch.as_tensor(np.ascontiguousarray(self.hu), dtype=dtype, device=device)

    def __len__(self) -> int:
        return int(self.hu.shape[0])


# ---------------------------------------------------------------------- windowing
def clip_hu(hu: Any, lo: float = HU_MIN, hi: float = HU_MAX) -> Any:
    """Clip HU values to ``[lo, hi]`` (numpy array or torch tensor, same type back).

    Pixels outside the circular scan field of view of many scanners hold padding values
    (−3024 or −2048 HU); clipping maps them to air (−1024 by default) before windowing.
    """
    if lo >= hi:
        raise ValueError(f"clip_hu needs lo < hi; got lo={lo}, hi={hi}")
    if isinstance(hu, torch.Tensor):
        return hu.clamp(lo, hi)
    return np.clip(np.asarray(hu), lo, hi)


def window_hu(hu: Any, lo: float = HU_MIN, hi: float = HU_MAX) -> Any:
    """Clip to ``[lo, hi]`` and map linearly to ``[0, 1]``: ``x = (clip(hu) − lo) / (hi − lo)``."""
    x = clip_hu(hu, lo, hi)
    return (x - lo) / (hi - lo)


def unwindow_hu(x: Any, lo: float = HU_MIN, hi: float = HU_MAX) -> Any:
    """Inverse of :func:`window_hu` on ``[0, 1]``: ``hu = lo + x·(hi − lo)``."""
    if lo >= hi:
        raise ValueError(f"unwindow_hu needs lo < hi; got lo={lo}, hi={hi}")
    return lo + x * (hi - lo)
