r"""Training datasets for flow-matching priors.

Every dataset here returns images in the public range :math:`[0, 1]` with shape
``(C, S, S)`` and offers ``sample(batch_size, generator)``, which draws a random,
augmented batch ``(B, C, S, S)`` using only the given ``torch.Generator`` — so a training run
is reproducible and resumes exactly from a saved generator state. ``describe()`` returns a
JSON-serialisable description recorded in checkpoints.

* :class:`CTSliceDataset` — 2-D CT slices in HU: padding below the window is clipped, the
  HU window :math:`[l, h]` is mapped to :math:`[0, 1]` by :math:`(\mathrm{HU} - l)/(h - l)`
  (clipped), the slice is padded to a square with the window minimum and preloaded at a
  moderate resolution. Augmentation: a random square crop of side :math:`s \cdot P`,
  :math:`s \sim U(\text{scale\_range})`, resized to the output size with antialiasing, and a
  horizontal flip with probability 1/2 (no vertical flips: anterior stays up).
* :class:`DicomSliceDataset` — the same, read from DICOM files or folders (and optionally
  axial slices of NIfTI volumes), excluding whole patients.
* :class:`ImageTensorDataset` — a tensor of images already in ``[0, 1]`` (MedMNIST arrays,
  phantoms) with optional horizontal flips; :func:`medmnist_dataset` and
  :func:`ellipses_dataset` build one from ``ctflow.data``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["CTSliceDataset", "DicomSliceDataset", "ImageTensorDataset", "medmnist_dataset",
           "ellipses_dataset", "nifti_axial_slices", "hu_to_unit"]

PathLike = Union[str, os.PathLike]


def hu_to_unit(hu, hu_window: Tuple[float, float]):
    """Map HU to ``[0, 1]``: :math:`\\mathrm{clip}((\\mathrm{HU} - l)/(h - l), 0, 1)`."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    if not hi > lo:
        raise ValueError(f"hu_window must be (lo, hi) with lo < hi, got {hu_window}")
    if isinstance(hu, torch.Tensor):
        return ((hu - lo) / (hi - lo)).clamp(0.0, 1.0)
    return np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of ``(B, C, h, w)`` to ``size²`` with antialiasing when shrinking."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True)


def _square(img: np.ndarray, fill: float) -> np.ndarray:
    h, w = img.shape
    n = max(h, w)
    out = np.full((n, n), fill, dtype=np.float32)
    out[(n - h) // 2:(n - h) // 2 + h, (n - w) // 2:(n - w) // 2 + w] = img
    return out


class _SamplerMixin:
    """``sample`` by uniform indices and per-item augmentation."""

    images: torch.Tensor  # (N, C, P, P) preloaded

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A random augmented batch ``(B, C, S, S)`` in ``[0, 1]`` (uses only ``generator``)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        if not self.augment:
            return self._plain[idx].clone()
        out = []
        p = self.images.shape[-1]
        u = torch.rand((batch_size, 4), generator=generator, dtype=torch.float64)
        lo, hi = self.scale_range
        for k in range(batch_size):
            img = self.images[idx[k]]
            side = int(round((lo + (hi - lo) * float(u[k, 0])) * p))
            side = min(max(side, 1), p)
            top = int(float(u[k, 1]) * (p - side + 1)) if side < p else 0
            left = int(float(u[k, 2]) * (p - side + 1)) if side < p else 0
            crop = img[:, top:top + side, left:left + side]
            crop = _resize(crop[None], self.image_size)[0]
            if self.flip and float(u[k, 3]) < 0.5:
                crop = crop.flip(-1)
            out.append(crop)
        return torch.stack(out).clamp_(0.0, 1.0)

    def __getitem__(self, i: int) -> torch.Tensor:
        """Item ``i`` without augmentation, ``(C, S, S)``."""
        return self._plain[i]


class CTSliceDataset(_SamplerMixin):
    """2-D CT slices given in HU → training images in ``[0, 1]``.

    Args:
        slices: 2-D HU arrays (any size; non-square ones are padded with air).
        image_size: output side ``S``.
        hu_window: ``(lo, hi)`` HU mapped to ``[0, 1]``; values below ``lo`` (air, and the
            −2048/−3024 padding outside the scan circle) become 0.
        augment: random crops/rescales and flips in :meth:`sample`.
        scale_range: crop side as a fraction of the preloaded side.
        flip: horizontal flips.
        preload_size: side of the preloaded images (default ``2 * image_size``).
        sources: JSON description of where the slices came from (recorded in checkpoints).
    """

    def __init__(self, slices: Sequence[np.ndarray], *, image_size: int = 64,
                 hu_window: Tuple[float, float] = (-1024.0, 1024.0), augment: bool = True,
                 scale_range: Tuple[float, float] = (0.85, 1.0), flip: bool = True,
                 preload_size: Optional[int] = None, sources: Optional[list] = None):
        if len(slices) == 0:
            raise ValueError("CTSliceDataset: no slices given")
        if not 0 < scale_range[0] <= scale_range[1] <= 1:
            raise ValueError(f"scale_range must satisfy 0 < lo <= hi <= 1, got {scale_range}")
        self.image_size = int(image_size)
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.augment = bool(augment)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.flip = bool(flip)
        self.preload_size = int(preload_size or 2 * image_size)
        self.sources = list(sources or [])
        imgs = []
        for k, s in enumerate(slices):
            s = np.asarray(s, dtype=np.float32)
            if s.ndim != 2:
                raise ValueError(f"slice {k} must be 2-D, got shape {s.shape}")
            unit = _square(hu_to_unit(s, self.hu_window), 0.0)
            t = torch.from_numpy(unit)[None, None]
            imgs.append(_resize(t, self.preload_size)[0])
        self.images = torch.stack(imgs).clamp_(0.0, 1.0)
        self._plain = _resize(self.images, self.image_size).clamp_(0.0, 1.0)

    def describe(self) -> dict:
        return {"type": type(self).__name__, "slices": len(self), "image_size": self.image_size,
                "hu_window": list(self.hu_window), "augment": self.augment,
                "scale_range": list(self.scale_range), "flip": self.flip,
                "preload_size": self.preload_size, "sources": self.sources}


def nifti_axial_slices(path: PathLike, *, step: int = 1) -> List[np.ndarray]:
    """Axial slices (HU) of a NIfTI volume, oriented like DICOM axial images (rows run
    anterior → posterior, columns patient right → left), every ``step``-th slice."""
    import nibabel as nib

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"NIfTI file not found: {p}")
    img = nib.as_closest_canonical(nib.load(str(p)))  # RAS+
    vol = np.asarray(img.dataobj, dtype=np.float32) * 1.0
    if vol.ndim != 3:
        raise ValueError(f"{p}: expected a 3-D volume, got shape {vol.shape}")
    # RAS index (i: toward R, j: toward A). DICOM display: row index toward P, column toward L.
    return [np.ascontiguousarray(vol[::-1, ::-1, k].T) for k in range(0, vol.shape[2], step)]


def _patient_of(meta) -> str:
    pid = (getattr(meta, "patient_id", "") or "").strip()
    return pid


class DicomSliceDataset(CTSliceDataset):
    """CT slices read from DICOM files or folders (recursive), whole patients excluded.

    Args:
        paths: a folder, a file, or a list of folders/files.
        image_size, hu_window, augment, scale_range, flip, preload_size: as
            :class:`CTSliceDataset`.
        exclude_patients: patient IDs never to use (held-out and validation patients). A
            slice is excluded when its PatientID header *or* its file name starts with one of
            them.
        nifti_paths: NIfTI volumes whose axial slices are added (every ``nifti_step``-th).
        seed: unused by loading (kept for API symmetry; sampling uses the generator passed
            to :meth:`sample`).
    """

    def __init__(self, paths: Union[PathLike, Iterable[PathLike]], *, image_size: int = 64,
                 hu_window: Tuple[float, float] = (-1024.0, 1024.0),
                 exclude_patients: Sequence[str] = (), augment: bool = True,
                 scale_range: Tuple[float, float] = (0.85, 1.0), flip: bool = True,
                 preload_size: Optional[int] = None, nifti_paths: Sequence[PathLike] = (),
                 nifti_step: int = 2, seed: int = 0):
        from ctflow.data.dicom import read_dicom_slices

        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        paths = [Path(p) for p in paths]
        exclude = tuple(str(p) for p in exclude_patients)
        slices, sources = [], []
        for p in paths:
            if not p.exists():
                raise FileNotFoundError(f"DICOM input not found: {p}")
            n_kept, patients, excluded = 0, set(), set()
            for item in read_dicom_slices(p):
                pid = _patient_of(item.meta)
                fname = Path(item.meta.path).name
                hit = [e for e in exclude if pid == e or fname.startswith(e)]
                if hit:
                    excluded.add(hit[0])
                    continue
                slices.append(item.hu)
                n_kept += 1
                pfile = fname.split("_")[0] if "_" in fname else ""
                patients.add(pid or pfile or "(no PatientID)")
            sources.append({"path": str(p), "slices": n_kept, "patients": sorted(patients),
                            "excluded_patients": sorted(excluded)})
        for p in nifti_paths:
            ax = nifti_axial_slices(p, step=nifti_step)
            slices.extend(ax)
            sources.append({"path": str(p), "slices": len(ax), "nifti_step": int(nifti_step)})
        self.exclude_patients = list(exclude)
        super().__init__(slices, image_size=image_size, hu_window=hu_window, augment=augment,
                         scale_range=scale_range, flip=flip, preload_size=preload_size,
                         sources=sources)

    def describe(self) -> dict:
        d = super().describe()
        d["exclude_patients"] = self.exclude_patients
        return d


class ImageTensorDataset(_SamplerMixin):
    """Images already in ``[0, 1]`` as a tensor ``(N, C, H, W)`` (square), with optional
    horizontal flips in :meth:`sample`; resized to ``image_size`` if given."""

    def __init__(self, images: torch.Tensor, *, image_size: Optional[int] = None,
                 flip: bool = False, description: Optional[dict] = None):
        images = torch.as_tensor(images, dtype=torch.float32)
        if images.ndim == 3:
            images = images[:, None]
        if images.ndim != 4 or images.shape[-1] != images.shape[-2] or images.shape[0] == 0:
            raise ValueError(f"images must have shape (N, C, S, S) with N > 0, "
                             f"got {tuple(images.shape)}")
        self.image_size = int(image_size or images.shape[-1])
        self.images = _resize(images, self.image_size)
        self._plain = self.images
        self.flip = bool(flip)
        self.augment = self.flip
        self.scale_range = (1.0, 1.0)
        self.description = dict(description or {})

    def describe(self) -> dict:
        return {"type": type(self).__name__, "images": len(self), "image_size": self.image_size,
                "flip": self.flip, **self.description}


def medmnist_dataset(*args, flip: bool = False, image_size: Optional[int] = None,
                     **kwargs) -> ImageTensorDataset:
    """Wrap ``ctflow.data.MedMNIST(*args, **kwargs)`` (e.g. a local ``.npz``) as a training set.

    The MedMNIST images (``uint8`` 0–255 or floats in ``[0, 1]``) become a float tensor in
    ``[0, 1]``.
    """
    from ctflow.data import MedMNIST

    ds = MedMNIST(*args, **kwargs)
    imgs = _stack_images(ds)
    return ImageTensorDataset(imgs, image_size=image_size, flip=flip,
                              description={"source": "MedMNIST", "args": [str(a) for a in args],
                                           "kwargs": {k: str(v) for k, v in kwargs.items()}})


def ellipses_dataset(n: int, *, image_size: int = 64, seed: int = 0, flip: bool = False,
                     **kwargs) -> ImageTensorDataset:
    """``n`` random-ellipse phantoms from ``ctflow.data.EllipsesDataset`` (seeded)."""
    from ctflow.data import EllipsesDataset

    ds = EllipsesDataset(image_size=image_size, seed=seed, **kwargs)
    imgs = _stack_images(ds, n)
    return ImageTensorDataset(imgs, flip=flip,
                              description={"source": "EllipsesDataset", "n": int(n),
                                           "seed": int(seed)})


def _stack_images(ds, n: Optional[int] = None) -> torch.Tensor:
    count = len(ds) if n is None else int(n)
    out = []
    for i in range(count):
        item = ds[i]
        if isinstance(item, (tuple, list)):
            item = item[0]
        x = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        x = x.float()
        if x.ndim == 2:
            x = x[None]
        elif x.ndim == 3 and x.shape[-1] in (1, 3) and x.shape[0] not in (1, 3):
            x = x.permute(2, 0, 1)
        out.append(x)
    return torch.stack(out)
