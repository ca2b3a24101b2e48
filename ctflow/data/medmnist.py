"""MedMNIST (e.g. OrganAMNIST, OrganCMNIST, OrganSMNIST) from local ``.npz`` files.

The files have the layout of the official MedMNIST v2/v3 releases: ``<flag>.npz`` (28×28) or
``<flag>_<size>.npz`` (64, 128, 224), holding ``train_images``, ``val_images``,
``test_images`` (uint8, ``(N, H, W)`` or ``(N, H, W, 3)``) and the matching ``*_labels``.
They are read with numpy alone, so no torchvision is needed. ``download=True`` fetches a
missing file with the optional ``medmnist`` package (``pip install 'ctflow[medmnist]'``).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["MedMNIST", "MEDMNIST_SIZES", "medmnist_file"]

MEDMNIST_SIZES = (28, 64, 128, 224)
_SPLITS = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_INSTALL = ("pip install 'ctflow[medmnist]'  (or: pip install medmnist)")


def _default_root() -> Path:
    return Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist"))


def medmnist_file(flag: str, size: int, root: str | os.PathLike | None = None) -> Path | None:
    """The existing local file for ``flag`` at ``size`` under ``root``, or ``None``.

    Looks for ``<flag>_<size>.npz``, then (for size 28) ``<flag>.npz``.
    """
    root = Path(root) if root is not None else _default_root()
    names = [f"{flag}_{size}.npz"] + ([f"{flag}.npz"] if size == 28 else [])
    for name in names:
        if (root / name).is_file():
            return root / name
    return None


class MedMNIST(Dataset):
    """One split of a MedMNIST dataset; items are ``(C, H, W)`` float tensors in ``[0, 1]``.

    Parameters
    ----------
    flag : dataset name as MedMNIST spells it, e.g. ``"organamnist"``, ``"organcmnist"``,
        ``"organsmnist"`` (case-insensitive).
    split : ``"train"``, ``"val"`` (or ``"validation"``) or ``"test"``.
    size : 28, 64, 128 or 224.
    root : folder holding the ``.npz`` files (default ``$MEDMNIST_ROOT`` or ``~/.medmnist``).
    download : fetch a missing file with the ``medmnist`` package (network access).
    return_label : items are ``(image, label)`` with ``label`` an int64 tensor, not just image.

    Pixel values are ``uint8 / 255``; greyscale sets give ``C = 1``, colour sets ``C = 3``.
    The whole split is loaded into memory as uint8 and converted per item.
    """

    def __init__(self, flag: str, split: str = "train", size: int = 64,
                 root: str | os.PathLike | None = None, *, download: bool = False,
                 return_label: bool = False, dtype: torch.dtype = torch.float32) -> None:
        flag = str(flag).lower()
        if not re.fullmatch(r"[a-z0-9]+", flag):
            raise ValueError(f"MedMNIST flag must be a name like 'organamnist'; got {flag!r}")
        if split not in _SPLITS:
            raise ValueError(f"MedMNIST split must be one of {sorted(_SPLITS)}; got {split!r}")
        if size not in MEDMNIST_SIZES:
            raise ValueError(f"MedMNIST size must be one of {MEDMNIST_SIZES}; got {size!r}")
        self.flag, self.split, self.size = flag, _SPLITS[split], int(size)
        self.root = Path(root) if root is not None else _default_root()
        self.return_label, self.dtype = bool(return_label), dtype

        path = medmnist_file(flag, self.size, self.root)
        if path is None and download:
            path = self._download()
        if path is None:
            want = f"{flag}_{self.size}.npz" + (f" or {flag}.npz" if self.size == 28 else "")
            raise FileNotFoundError(
                f"MedMNIST file {want} not found in {self.root}; place it there or pass "
                f"download=True (needs the optional medmnist package: {_INSTALL})")
        self.path = path
        key = f"{self.split}_images"
        with np.load(path, allow_pickle=False) as z:
            if key not in z.files:
                raise ValueError(f"{path}: no array {key!r} (found {sorted(z.files)}); not a "
                                 f"MedMNIST file?")
            images = np.asarray(z[key])
            lkey = f"{self.split}_labels"
            labels = np.asarray(z[lkey]) if lkey in z.files else None
        if images.ndim == 3:
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3):
            images = np.moveaxis(images, -1, 1)
        else:
            raise ValueError(f"{path}: {key} has shape {images.shape}; expected (N, H, W) or "
                             f"(N, H, W, C)")
        if images.shape[2:] != (self.size, self.size):
            raise ValueError(f"{path}: images are {images.shape[2]}x{images.shape[3]}, but "
                             f"size={self.size} was asked for")
        if images.dtype != np.uint8:
            raise ValueError(f"{path}: {key} has dtype {images.dtype}; MedMNIST images are uint8")
        if self.return_label and labels is None:
            raise ValueError(f"{path}: no {self.split}_labels array, but return_label=True")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{path}: {len(images)} images but {len(labels)} labels in the "
                             f"{self.split} split")
        self.images = np.ascontiguousarray(images)
        self.labels = labels

    def _download(self) -> Path:
        try:
            import medmnist  # optional dependency
        except ImportError as exc:
            raise ImportError(f"MedMNIST download=True needs the optional medmnist package: "
                              f"{_INSTALL}; or place {self.flag}_{self.size}.npz in "
                              f"{self.root} yourself") from exc
        if self.flag not in medmnist.INFO:
            raise ValueError(f"unknown MedMNIST flag {self.flag!r}; known: {sorted(medmnist.INFO)}")
        cls = getattr(medmnist, medmnist.INFO[self.flag]["python_class"])
        self.root.mkdir(parents=True, exist_ok=True)
        cls(split=self.split, download=True, size=self.size, root=str(self.root))
        path = medmnist_file(self.flag, self.size, self.root)
        if path is None:
            raise FileNotFoundError(f"medmnist download finished but no {self.flag} file of "
                                    f"size {self.size} is in {self.root}")
        return path

    @property
    def channels(self) -> int:
        """Number of image channels (1 for the organ sets)."""
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        img = torch.from_numpy(self.images[index].astype(np.float32) / 255.0).to(self.dtype)
        if not self.return_label:
            return img
        label = torch.as_tensor(np.asarray(self.labels[index]).reshape(-1), dtype=torch.int64)
        return img, label
