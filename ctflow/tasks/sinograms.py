"""Measured data files: sinogram stacks (``.npy``, HDF5) and HDF5 datasets.

``ctflow reconstruct`` and ``ctflow reconstruct-dicom --sinogram`` read their measured data
with these functions; every error names the file and what was wrong with it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

import numpy as np

from ctflow.data.hdf5 import check_read_size

__all__ = ["load_sinograms", "read_h5_array", "slice_stack"]

PathLike = Union[str, os.PathLike]


def load_sinograms(path: PathLike) -> np.ndarray:
    """A measured sinogram file → float32 ``(Z, views, detectors)``.

    ``.npy``: a 2-D or 3-D array. ``.h5``/``.hdf5``: the dataset ``sinogram``, ``data`` or
    ``observation``, or the only dataset in the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sinogram file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:    # the header first (memory-mapped): a file claiming a huge array is refused
            head = np.load(path, allow_pickle=False, mmap_mode="r")
            check_read_size(head.shape, head.dtype.itemsize, path)
            del head
            arr = np.load(path, allow_pickle=False)
        except ValueError as exc:
            if "refused" in str(exc):
                raise
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
        except Exception as exc:
            raise ValueError(f"{path}: not a readable .npy array ({exc})") from None
    elif suffix in (".h5", ".hdf5"):
        arr = read_h5_array(path, None, preferred=("sinogram", "data", "observation"))
    else:
        raise ValueError(f"{path}: sinogram files must be .npy, .h5 or .hdf5")
    return slice_stack(arr, path, what="sinogram", axes="views, detectors")


def slice_stack(arr: Any, source: Any, *, what: str = "array", axes: str = "H, W"
                ) -> np.ndarray:
    """``arr`` as a finite float32 stack of slices ``(Z, *axes)``; a 2-D array is one slice.

    ``ValueError`` naming ``source`` (a path) for any other number of dimensions and for
    NaN or infinite values; ``what`` and ``axes`` name the array and its two axes there."""
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{source}: expected a 2-D {what} ({axes}) or a stack (Z, {axes}), "
                         f"got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{source}: the {what} holds NaN or infinite values")
    return arr


def read_h5_array(path: PathLike, dataset: Optional[str],
                  preferred: Sequence[str] = ()) -> np.ndarray:
    """Read one dataset of an HDF5 file: ``dataset`` if given, else the first of
    ``preferred`` present, else the only dataset in the file (``ValueError`` listing the
    datasets otherwise)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"HDF5 file not found: {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from None
    def read(name: str) -> np.ndarray:
        d = f[name]
        check_read_size(d.shape or (), d.dtype.itemsize, f"{path}: dataset {name!r}")
        try:
            return np.asarray(d[()])
        except (OSError, MemoryError) as exc:
            raise ValueError(f"{path}: cannot read dataset {name!r} ({exc})") from None

    with f:
        names: List[str] = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        if dataset is not None:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise ValueError(f"{path}: no dataset {dataset!r}; datasets: {names}")
            return read(dataset)
        for name in preferred:
            if name in f and isinstance(f[name], h5py.Dataset):
                return read(name)
        if len(names) == 1:
            return read(names[0])
        raise ValueError(f"{path}: {len(names)} datasets {names}; choose one with --dataset")
