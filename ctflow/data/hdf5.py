"""HDF5: the LoDoPaB-CT file layout, and a crash-safe store for results and benchmark arrays.

LoDoPaB-CT (Leuschner et al., Scientific Data 2021) ships each part (``train``,
``validation``, ``test``) as numbered file pairs

    ground_truth_<part>_<nnn>.hdf5   dataset "data", (n, 362, 362) float32, n <= 128
    observation_<part>_<nnn>.hdf5    dataset "data", (n, 1000, 513) float32

with ``nnn`` = 000, 001, … and 128 slices per file (the last file of a part may hold fewer).
:class:`LoDoPaB` pairs the two and yields ``(observation, ground_truth)`` per slice.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from ctflow.data.atomic import atomic_save

__all__ = ["LoDoPaB", "LODOPAB_PARTS", "ResultStore", "read_limit_bytes", "check_read_size"]

LODOPAB_PARTS = ("train", "validation", "test")
_SLICES_PER_FILE = 128


def read_limit_bytes() -> int:
    """The most bytes one array read from a file may take: half the machine's memory
    (16 GiB where it cannot be found out)."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2
    except (AttributeError, ValueError, OSError):   # pragma: no cover - not POSIX
        return 16 << 30


def check_read_size(shape, itemsize: int, where: Any) -> None:
    """``ValueError`` naming ``where`` if an array of ``shape`` and ``itemsize`` bytes per
    value would take more than :func:`read_limit_bytes` -- checked before reading, so a small
    file that claims a huge dataset is refused instead of exhausting memory."""
    n = 1
    for d in shape:
        n *= int(d)
    nbytes, limit = n * int(itemsize), read_limit_bytes()
    if nbytes > limit:
        raise ValueError(f"{where}: claims an array of shape {tuple(int(d) for d in shape)} "
                         f"({nbytes / 2**30:.1f} GiB), more than the {limit / 2**30:.1f} GiB "
                         "that may be read (half this machine's memory); refused")


def _scan(root: Path, kind: str, part: str) -> dict[int, Path]:
    pattern = re.compile(rf"^{kind}_{part}_(\d{{3}})\.hdf5$")
    out = {}
    for f in root.iterdir():
        m = pattern.match(f.name)
        if m and f.is_file():
            out[int(m.group(1))] = f
    return out


class LoDoPaB(Dataset):
    """One part of LoDoPaB-CT from local HDF5 files.

    Parameters
    ----------
    root : the folder holding the ``.hdf5`` files.
    part : ``"train"``, ``"validation"`` or ``"test"``.
    ground_truth_only : items are just the ground truth (e.g. to train a prior); the
        observation files are then not needed.
    slices_per_file : 128 in the release; every file but the last must hold exactly this many.

    Items are ``(observation, ground_truth)`` float32 tensors of shapes ``(1, angles, detectors)``
    and ``(1, H, W)`` (the release: ``(1, 1000, 513)`` and ``(1, 362, 362)``), or the ground
    truth alone. Files are opened lazily in each process (so DataLoader workers work).
    """

    def __init__(self, root: str | os.PathLike, part: str = "train", *,
                 ground_truth_only: bool = False,
                 slices_per_file: int = _SLICES_PER_FILE) -> None:
        if part not in LODOPAB_PARTS:
            raise ValueError(f"LoDoPaB part must be one of {LODOPAB_PARTS}; got {part!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"LoDoPaB folder not found: {root}")
        self.root, self.part = root, part
        self.ground_truth_only = bool(ground_truth_only)
        self.slices_per_file = int(slices_per_file)
        gt = _scan(root, "ground_truth", part)
        if not gt:
            raise FileNotFoundError(f"{root}: no ground_truth_{part}_<nnn>.hdf5 files")
        obs = {} if self.ground_truth_only else _scan(root, "observation", part)
        numbers = sorted(gt)
        if numbers != list(range(len(numbers))):
            missing = sorted(set(range(numbers[-1] + 1)) - set(numbers))
            raise FileNotFoundError(f"{root}: ground_truth_{part} files are not numbered "
                                    f"000..{numbers[-1]:03d} without gaps; missing {missing}")
        if not self.ground_truth_only:
            for n in numbers:
                if n not in obs:
                    raise FileNotFoundError(f"{root / f'observation_{part}_{n:03d}.hdf5'}: "
                                            f"missing; it pairs with {gt[n].name}")
            extra = sorted(set(obs) - set(numbers))
            if extra:
                raise FileNotFoundError(f"{obs[extra[0]]}: has no matching ground_truth file")
        self.files = []
        counts = []
        for n in numbers:
            pair = (gt[n], None if self.ground_truth_only else obs[n])
            sizes = [self._shape(p)[0] for p in pair if p is not None]
            if len(set(sizes)) != 1:
                raise ValueError(f"{pair[1]}: holds {sizes[1]} slices but {pair[0].name} holds "
                                 f"{sizes[0]}; the pair must match")
            if sizes[0] > self.slices_per_file or (
                    n != numbers[-1] and sizes[0] != self.slices_per_file):
                raise ValueError(f"{pair[0]}: holds {sizes[0]} slices; every file but the last "
                                 f"must hold {self.slices_per_file}")
            self.files.append(pair)
            counts.append(sizes[0])
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._handles: dict = {}
        self._pid = None

    @staticmethod
    def _shape(path: Path) -> tuple[int, ...]:
        try:
            with h5py.File(path, "r") as f:
                if "data" not in f:
                    raise ValueError(f"{path}: no dataset 'data' (found {list(f.keys())})")
                shape = f["data"].shape
        except OSError as exc:
            raise ValueError(f"{path}: not a readable HDF5 file ({exc})") from exc
        if len(shape) != 3:
            raise ValueError(f"{path}: dataset 'data' has shape {shape}; expected (n, H, W)")
        return shape

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """``(file number, slice in file)`` of item ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} slices")
        f = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return f, int(index - self._offsets[f])

    def _read(self, path: Path, k: int) -> torch.Tensor:
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = h5py.File(path, "r")
        return torch.from_numpy(np.asarray(h["data"][k], dtype=np.float32)).unsqueeze(0)

    def __getitem__(self, index: int):
        f, k = self.locate(index)
        gt_path, obs_path = self.files[f]
        gt = self._read(gt_path, k)
        if self.ground_truth_only:
            return gt
        return self._read(obs_path, k), gt

    def close(self) -> None:
        """Close the open HDF5 files (they reopen on the next access)."""
        for h in self._handles.values():
            h.close()
        self._handles = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state


# ---------------------------------------------------------------------- result store
_NAME = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
_JSON_KEYS = "__json_keys__"


def _check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or any(
            part in (".", "..") for part in name.split("/")):
        raise ValueError(f"result name must be slash-separated parts of letters, digits, "
                         f"'_', '-', '.'; got {name!r}")
    return name


def _to_numpy(value: Any, name: str) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object:
        raise ValueError(f"result {name!r}: cannot store an object array; pass numbers")
    return arr


def _set_attrs(obj, attrs: Mapping[str, Any] | None) -> None:
    if not attrs:
        return
    json_keys = set(json.loads(obj.attrs.get(_JSON_KEYS, "[]")))
    for key, value in attrs.items():
        if not isinstance(key, str) or not key or key == _JSON_KEYS:
            raise ValueError(f"invalid attribute name {key!r}")
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, (str, bool, int, float, np.generic)) or (
                isinstance(value, np.ndarray) and value.dtype != object):
            obj.attrs[key] = value
            json_keys.discard(key)
        else:
            try:
                obj.attrs[key] = json.dumps(value)
            except TypeError as exc:
                raise ValueError(f"attribute {key!r}: {type(value).__name__} is neither a number, "
                                 f"a string, an array nor JSON-serialisable") from exc
            json_keys.add(key)
    obj.attrs[_JSON_KEYS] = json.dumps(sorted(json_keys))


def _get_attrs(obj) -> dict[str, Any]:
    json_keys = set(json.loads(obj.attrs.get(_JSON_KEYS, "[]")))
    out = {}
    for key, value in obj.attrs.items():
        if key == _JSON_KEYS:
            continue
        if key in json_keys:
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        elif isinstance(value, bytes):
            value = value.decode()
        out[key] = value
    return out


class ResultStore:
    """An HDF5 file of named arrays with attributes, updated atomically.

    Every change (:meth:`write`, :meth:`write_many`, :meth:`set_attrs`, :meth:`delete`) copies
    the current file to a temporary file in the same folder, applies the change there, flushes it
    to disk and renames it over the original (:func:`ctflow.data.atomic.atomic_save`). A crash
    therefore leaves either the old or the new file, never a half-written one; the price is one file copy per change, so
    batch many small arrays with :meth:`write_many`.

    Names are slash-separated paths (``"msflow/seed0/recon"``); groups are created as needed.
    Attributes may be numbers, strings, arrays, or JSON-serialisable values (dicts, lists,
    ``None``), which come back as such.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        if self.path.exists():
            if not h5py.is_hdf5(self.path):
                raise ValueError(f"{self.path}: exists and is not an HDF5 file")
        elif not self.path.parent.is_dir():
            raise FileNotFoundError(f"{self.path.parent}: folder for the result store not found")

    # -- transactions
    def _commit(self, change) -> None:
        def apply(tmp: Path) -> None:
            if self.path.exists():
                shutil.copyfile(self.path, tmp)
                mode = "r+"
            else:
                mode = "w"
            with h5py.File(tmp, mode) as f:
                change(f)
                f.flush()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())

        atomic_save(self.path, apply)

    def write(self, name: str, array: Any, *, attrs: Mapping[str, Any] | None = None,
              overwrite: bool = False, compression: str | None = None) -> None:
        """Store ``array`` (numpy or torch) as ``name`` with ``attrs``.

        An existing name raises ``FileExistsError`` unless ``overwrite=True``.
        """
        self.write_many({name: array}, attrs={name: attrs} if attrs else None,
                        overwrite=overwrite, compression=compression)

    def write_many(self, arrays: Mapping[str, Any], *,
                   attrs: Mapping[str, Mapping[str, Any]] | None = None,
                   overwrite: bool = False, compression: str | None = None) -> None:
        """Store several arrays (and per-name attributes) in one atomic change."""
        items = {_check_name(n): _to_numpy(a, n) for n, a in arrays.items()}
        attrs = dict(attrs or {})
        unknown = set(attrs) - set(items)
        if unknown:
            raise ValueError(f"attrs given for names that are not written: {sorted(unknown)}")

        def change(f):
            for n in items:
                if n in f and not overwrite:
                    raise FileExistsError(f"{self.path}: result {n!r} exists; pass "
                                          f"overwrite=True to replace it")
            for n, arr in items.items():
                if n in f:
                    del f[n]
                kwargs = {"compression": compression} if compression and arr.ndim else {}
                ds = f.create_dataset(n, data=arr, **kwargs)
                _set_attrs(ds, attrs.get(n))

        self._commit(change)

    def set_attrs(self, name: str = "/", **attrs: Any) -> None:
        """Set attributes on a stored name, or on the file itself (``name="/"``)."""
        if name != "/":
            _check_name(name)

        def change(f):
            if name not in f:
                raise KeyError(f"{self.path}: no result {name!r}")
            _set_attrs(f[name], attrs)

        self._commit(change)

    def delete(self, name: str) -> None:
        """Remove a stored name (array or group)."""
        _check_name(name)

        def change(f):
            if name not in f:
                raise KeyError(f"{self.path}: no result {name!r}")
            del f[name]

        self._commit(change)

    # -- reading
    def _open(self):
        if not self.path.exists():
            raise FileNotFoundError(f"result store {self.path} does not exist yet")
        return h5py.File(self.path, "r")

    def read(self, name: str) -> np.ndarray:
        """The array stored as ``name``."""
        with self._open() as f:
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise KeyError(f"{self.path}: no array {name!r}; stored: {self._names(f)}")
            check_read_size(f[name].shape, f[name].dtype.itemsize, f"{self.path}:{name}")
            return f[name][()]

    def attrs(self, name: str = "/") -> dict[str, Any]:
        """The attributes of ``name`` (or of the file, ``"/"``)."""
        if name == "/" and not self.path.exists():
            return {}
        with self._open() as f:
            if name not in f:
                raise KeyError(f"{self.path}: no result {name!r}")
            return _get_attrs(f[name])

    @staticmethod
    def _names(f) -> list[str]:
        out = []
        f.visititems(lambda n, obj: out.append(n) if isinstance(obj, h5py.Dataset) else None)
        return sorted(out)

    def names(self) -> list[str]:
        """All stored array names, sorted."""
        if not self.path.exists():
            return []
        with self._open() as f:
            return self._names(f)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def __len__(self) -> int:
        return len(self.names())

    def __iter__(self) -> Iterable[str]:
        return iter(self.names())
