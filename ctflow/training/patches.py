r"""Patches of full-resolution CT slices at a range of physical pixel sizes.

The training set of a size-agnostic prior: a velocity network trained on small patches is
applied to whole images of any size (PaDIS, Hu et al., NeurIPS 2024, train on patches for the
same reason: little data and little compute). Each sampled patch is

1. taken from a slice chosen uniformly among the training slices,
2. at a physical pixel size :math:`p` drawn log-uniformly from ``pixel_mm_range`` (so one
   prior serves 512² slices at native resolution, :math:`\approx 0.7` mm, and 256² working
   images of the same field of view, :math:`\approx 1.4` mm),
3. rotated by :math:`\theta \sim U(-\text{rotate\_deg}, \text{rotate\_deg})`, flipped left–right
   with probability 1/2, centred uniformly in the bounding box of the pixels above −500 HU
   widened by half a patch (so patches of pure air outside the body are rare but the body
   outline and the air around it are learnt),

and sampled bilinearly from the level of an antialiased pyramid (factors
:math:`1, \sqrt 2, 2, 2\sqrt 2, 4`) whose pixel is the largest not coarser than :math:`p`, so a
patch is never decimated by more than :math:`\sqrt 2` without low-pass filtering. HU become
``[0, 1]`` by the window ``hu_window`` (clipped; the −2048/−3024 padding outside the scan
circle becomes 0, which is also the value outside the slice).

``sample(batch_size, generator)`` uses only the generator, so a training run resumes exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["PatchDataset", "TrainingSlice", "PYRAMID_FACTORS"]

#: Downsampling factors of the pyramid levels.
PYRAMID_FACTORS: tuple[float, ...] = (1.0, math.sqrt(2.0), 2.0, 2.0 * math.sqrt(2.0), 4.0)


@dataclass(frozen=True)
class TrainingSlice:
    """One 2-D slice in HU and its pixel size in mm (row spacing, column spacing)."""

    hu: np.ndarray
    pixel_mm: tuple[float, float]
    source: str = ""


def _window(hu: np.ndarray, hu_window: tuple[float, float]) -> torch.Tensor:
    lo, hi = hu_window
    unit = np.clip((np.asarray(hu, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(unit))[None, None]


def _pyramid(img: torch.Tensor) -> list[torch.Tensor]:
    h, w = img.shape[-2:]
    out = [img]
    for f in PYRAMID_FACTORS[1:]:
        size = (max(8, int(round(h / f))), max(8, int(round(w / f))))
        out.append(F.interpolate(img, size=size, mode="bilinear", align_corners=False,
                                 antialias=True))
    return out


def _body_box(hu: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """Bounding box ``(y0, y1, x0, x1)`` of the pixels above −500 HU (body and table),
    widened by ``margin`` pixels and kept inside the slice; the whole slice if none."""
    h, w = hu.shape
    ys, xs = np.nonzero(hu > -500.0)
    if ys.size == 0:
        return 0, h - 1, 0, w - 1
    return (max(0, int(ys.min()) - margin), min(h - 1, int(ys.max()) + margin),
            max(0, int(xs.min()) - margin), min(w - 1, int(xs.max()) + margin))


class PatchDataset:
    """Random augmented patches ``(B, 1, P, P)`` in ``[0, 1]`` from full-resolution slices.

    Args:
        slices: :class:`TrainingSlice` items (any size; pixel sizes from their headers).
        patch_size: side ``P`` of a patch in pixels (``image_size`` for the trainer).
        hu_window: ``(lo, hi)`` HU mapped to ``[0, 1]``.
        pixel_mm_range: ``(p_min, p_max)`` physical pixel sizes of the patches in mm; slices
            whose own pixels are coarser than ``p_max`` are left out (they would only be
            up-sampled blur) and counted in :meth:`describe`.
        rotate_deg: maximal rotation in degrees (0: none).
        flip: left–right flips.
    """

    #: A velocity trained on these patches models whole images of any size.
    size_agnostic = True

    def __init__(self, slices: Sequence[TrainingSlice], *, patch_size: int = 64,
                 hu_window: tuple[float, float] = (-1024.0, 2000.0),
                 pixel_mm_range: tuple[float, float] = (0.6, 2.0), rotate_deg: float = 10.0,
                 flip: bool = True):
        if len(slices) == 0:
            raise ValueError("PatchDataset: no slices given")
        if not all(isinstance(s, TrainingSlice) for s in slices):
            raise TypeError("PatchDataset takes TrainingSlice items")
        lo, hi = float(hu_window[0]), float(hu_window[1])
        if not hi > lo:
            raise ValueError(f"hu_window must be (lo, hi) with lo < hi, got {hu_window}")
        pmin, pmax = float(pixel_mm_range[0]), float(pixel_mm_range[1])
        if not 0 < pmin <= pmax:
            raise ValueError(f"pixel_mm_range must be 0 < min <= max, got {pixel_mm_range}")
        if patch_size < 8:
            raise ValueError(f"patch_size must be >= 8, got {patch_size}")
        self.image_size = int(patch_size)
        self.hu_window = (lo, hi)
        self.pixel_mm_range = (pmin, pmax)
        self.rotate_deg = float(rotate_deg)
        self.flip = bool(flip)
        self.levels: list[list[torch.Tensor]] = []
        self.pixel_mm: list[float] = []
        self.sources: dict[str, int] = {}
        self.skipped_coarse = 0
        self.boxes: list[tuple[int, int, int, int]] = []
        for k, s in enumerate(slices):
            if np.asarray(s.hu).ndim != 2:
                raise ValueError(f"slice {k} ({s.source}) must be 2-D, got {np.shape(s.hu)}")
            dy, dx = (float(v) for v in s.pixel_mm)
            if not (dy > 0 and dx > 0 and abs(dy - dx) <= 0.01 * dx):
                raise ValueError(f"slice {k} ({s.source}): square pixels > 0 mm required, "
                                 f"got {s.pixel_mm}")
            if dx > pmax * 1.001:  # would only be up-sampled blur
                self.skipped_coarse += 1
                continue
            self.levels.append(_pyramid(_window(s.hu, self.hu_window)))
            self.boxes.append(_body_box(np.asarray(s.hu), self.image_size // 2))
            self.pixel_mm.append(dx)
            self.sources[s.source] = self.sources.get(s.source, 0) + 1
        if not self.levels:
            raise ValueError(f"PatchDataset: every slice is coarser than {pmax} mm")

    def __len__(self) -> int:
        return len(self.levels)

    def _patch(self, i: int, p_mm: float, theta: float, flip: bool, cy: float,
               cx: float) -> torch.Tensor:
        native = self.pixel_mm[i]
        ratio = p_mm / native  # patch pixel in native pixels
        lvl = max(j for j, f in enumerate(PYRAMID_FACTORS) if f <= max(ratio, 1.0) + 1e-9)
        img = self.levels[i][lvl]
        h, w = img.shape[-2:]
        fy, fx = self.levels[i][0].shape[-2] / h, self.levels[i][0].shape[-1] / w
        n = self.image_size
        off = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * ratio  # native pixels
        vv, uu = torch.meshgrid(off, off, indexing="ij")
        if flip:
            uu = -uu
        c, s = math.cos(theta), math.sin(theta)
        xs = cx + c * uu - s * vv
        ys = cy + s * uu + c * vv
        # native pixel centres -> level pixel coordinates -> normalised (align_corners=False)
        gx = (xs + 0.5) / fx / w * 2 - 1
        gy = (ys + 0.5) / fy / h * 2 - 1
        grid = torch.stack([gx, gy], dim=-1)[None]
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A random augmented batch ``(B, 1, P, P)`` in ``[0, 1]`` (uses only ``generator``)."""
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        u = torch.rand((batch_size, 5), generator=generator, dtype=torch.float64)
        lo, hi = (math.log(v) for v in self.pixel_mm_range)
        out = []
        for k in range(batch_size):
            i = int(idx[k])
            p_mm = math.exp(lo + (hi - lo) * float(u[k, 0]))
            theta = math.radians(self.rotate_deg) * (2 * float(u[k, 1]) - 1)
            flip = self.flip and float(u[k, 2]) < 0.5
            y0, y1, x0, x1 = self.boxes[i]
            cy, cx = y0 + float(u[k, 3]) * (y1 - y0), x0 + float(u[k, 4]) * (x1 - x0)
            out.append(self._patch(i, p_mm, theta, flip, cy, cx))
        return torch.stack(out).clamp_(0.0, 1.0)

    def describe(self) -> dict:
        """JSON description recorded in checkpoints and the bundled prior."""
        return {"type": type(self).__name__, "slices": len(self),
                "patch_size": self.image_size, "hu_window": list(self.hu_window),
                "pixel_mm_range": list(self.pixel_mm_range), "rotate_deg": self.rotate_deg,
                "flip": self.flip, "sources": dict(self.sources),
                "skipped_coarser_than_range": self.skipped_coarse,
                "native_pixel_mm": [round(min(self.pixel_mm), 4), round(max(self.pixel_mm), 4)]}


def split_slices(root, split: str = "train", *, nifti_step: int = 2,
                 progress: bool = False) -> list[TrainingSlice]:
    """Every 2-D slice of ``split`` (:mod:`ctflow.data.splits`) under a local copy ``root`` of
    the CT source folders, in HU at native resolution with its pixel size (DICOM
    PixelSpacing, NIfTI voxel size); every ``nifti_step``-th axial slice of a NIfTI volume."""
    from ctflow.data import read_dicom_slices, read_nifti, split_files

    out: list[TrainingSlice] = []
    parts = split_files(split, root)
    try:
        from tqdm.auto import tqdm
        parts = tqdm(parts, desc=f"read {split}", disable=not progress)
    except ImportError:  # pragma: no cover
        pass
    for part, files in parts:
        if part.kind != "nifti":  # slices are independent samples: no series geometry needed
            for item in read_dicom_slices(files):
                ps = item.meta.pixel_spacing
                if ps is None:
                    raise ValueError(f"{item.meta.path}: no PixelSpacing")
                out.append(TrainingSlice(item.hu, (float(ps[0]), float(ps[1])), part.patient))
            continue
        vol = read_nifti(files[0])
        _, dy, dx = vol.spacing
        hu = np.asarray(vol.hu, dtype=np.float32)
        for k in range(0, hu.shape[0], nifti_step):
            out.append(TrainingSlice(hu[k], (dy, dx), part.patient))
    return out
