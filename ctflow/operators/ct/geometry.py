r"""2D CT acquisition geometries: :class:`ParallelBeam2D` and :class:`FanBeam2D`.

One geometry object feeds every backend (``torch``, ``odl``, ``tomosipo``) and the filtered
back-projection. Geometries are immutable value objects: equal geometries compare equal and hash
equal, so they serve as cache keys (the torch backend caches its system matrix per geometry).

Coordinates and orientation
---------------------------
The image of ``N × N`` pixels covers the square :math:`[-e, e]^2` (``e = extent``, 1 by
default), so a pixel is :math:`h = 2e/N` wide. An image tensor ``img[..., r, c]`` is displayed
as usual: **row 0 is the top (+y), column 0 is the left (−x)**, i.e. the centre of pixel
``(r, c)`` is

.. math::  x_c = -e + (c + \tfrac12)h, \qquad y_r = e - (r + \tfrac12)h .

Detector positions are in the same length unit, centred on the detector reference point:
detector ``j`` of ``n`` with spacing :math:`\Delta` sits at :math:`s_j = (j - \tfrac{n-1}{2})\Delta`
(:meth:`detector_positions`), and detector bin ``j`` is :math:`[s_j - \Delta/2, s_j + \Delta/2]`.
A sinogram has shape ``(B, C, angles, detectors)``; its values are line integrals in these
length units averaged over each detector bin (a disk of radius :math:`r` and value 1 gives
:math:`2\sqrt{r^2 - s^2}` at position :math:`s`).

Angle convention (both geometries, identical to ODL's defaults)
---------------------------------------------------------------
At angle :math:`\theta` the detector axis is :math:`u(\theta) = (\cos\theta, \sin\theta)` and
the central ray runs along :math:`e(\theta) = (-\sin\theta, \cos\theta)` (from source to
detector); the angle increases counter-clockwise in the (x, y) plane.

* Parallel beam: :math:`p(\theta, s) = \int f(s\,u(\theta) + t\,e(\theta))\,dt`, i.e. the line
  :math:`x\cos\theta + y\sin\theta = s`. An integer ``angles=n`` means
  :math:`\theta_k = k\pi/n`, ``k = 0..n-1`` (uniform over :math:`[0, \pi)`).
* Fan beam, flat detector: the source sits at :math:`S(\theta) = -R_s\,e(\theta)`
  (``R_s = source_origin``), the detector line passes through :math:`R_d\,e(\theta)`
  (``R_d = origin_detector``) along :math:`u(\theta)`; the value at detector position ``s``
  is the integral of ``f`` along the line from :math:`S(\theta)` to
  :math:`R_d\,e(\theta) + s\,u(\theta)`. An integer ``angles=n`` means
  :math:`\theta_k = 2k\pi/n` (uniform over :math:`[0, 2\pi)`). The magnification at the origin
  is :math:`M = (R_s + R_d)/R_s`.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["ParallelBeam2D", "FanBeam2D", "Geometry2D"]

AnglesLike = Union[int, Sequence[float], np.ndarray, torch.Tensor]


def _check_int(value, name: str, owner: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{owner}: `{name}` must be an int >= {minimum}, got {value}")
    return value


def _check_positive(value, name: str, owner: str, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"{owner}: `{name}` must be a real number, got {value!r}")
    value = float(value)
    ok = value >= 0.0 if allow_zero else value > 0.0
    if not math.isfinite(value) or not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: `{name}` must be finite and {bound}, got {value}")
    return value


def _normalise_angles(angles: AnglesLike, full_turn: float, owner: str) -> Tuple[float, ...]:
    if isinstance(angles, bool):
        raise ValueError(f"{owner}: `angles` must be an int or a 1D sequence of floats, "
                         f"got {angles!r}")
    if isinstance(angles, (numbers.Integral, np.integer)):
        n = _check_int(angles, "angles", owner)
        return tuple(float(k) * full_turn / n for k in range(n))
    if isinstance(angles, torch.Tensor):
        arr = angles.detach().to("cpu", torch.float64).numpy()
    else:
        try:
            arr = np.asarray(angles, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{owner}: `angles` must be an int or a 1D sequence of floats, "
                             f"got {angles!r}") from exc
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{owner}: `angles` must be a non-empty 1D sequence, got shape "
                         f"{tuple(arr.shape)}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{owner}: `angles` must be finite, got {arr.tolist()}")
    return tuple(float(a) for a in arr)


class Geometry2D:
    """Common base of the 2D geometries (immutable; equality and hash by value)."""

    _fields: Tuple[str, ...] = ()
    _owner = "Geometry2D"

    def __setattr__(self, key, value):
        raise AttributeError(f"{type(self).__name__} is immutable; use .replace(...) instead")

    def __delattr__(self, key):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def _set(self, **values):
        for k, v in values.items():
            object.__setattr__(self, k, v)

    # -- value semantics -------------------------------------------------------------------
    def _key(self):
        return (type(self).__name__,) + tuple(getattr(self, "_" + f if f == "angles" else f)
                                              for f in self._fields)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def replace(self, **changes) -> "Geometry2D":
        """A copy with some constructor arguments changed (detector defaults are recomputed
        only when neither ``detectors`` nor ``detector_spacing`` is kept)."""
        kwargs = {f: (self.angles if f == "angles" else getattr(self, f)) for f in self._fields}
        if "image_size" in changes or "extent" in changes:
            if "detectors" not in changes and "detector_spacing" not in changes:
                kwargs["detectors"] = None
                kwargs["detector_spacing"] = None
        kwargs.update(changes)
        image_size = kwargs.pop("image_size")
        angles = kwargs.pop("angles")
        return type(self)(image_size, angles, **kwargs)

    # -- derived quantities ----------------------------------------------------------------
    @property
    def angles(self) -> torch.Tensor:
        """Projection angles in radians, a fresh float64 tensor of shape ``(num_angles,)``."""
        return torch.tensor(self._angles, dtype=torch.float64)

    @property
    def num_angles(self) -> int:
        return len(self._angles)

    @property
    def pixel_size(self) -> float:
        """Pixel width :math:`h = 2e/N`."""
        return 2.0 * self.extent / self.image_size

    @property
    def image_shape(self) -> Tuple[int, int]:
        """Per-item image shape ``(N, N)`` (the ray transform's domain)."""
        return (self.image_size, self.image_size)

    @property
    def sinogram_shape(self) -> Tuple[int, int]:
        """Per-item sinogram shape ``(angles, detectors)`` (the ray transform's range)."""
        return (self.num_angles, self.detectors)

    def detector_positions(self) -> torch.Tensor:
        r"""Detector bin centres :math:`s_j = (j - (n-1)/2)\Delta` (float64, length units)."""
        n = self.detectors
        return (torch.arange(n, dtype=torch.float64) - (n - 1) / 2.0) * self.detector_spacing

    def pixel_centres(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the pixel centres as float64 ``(N, N)`` tensors (row 0 = top = +y)."""
        n, e, h = self.image_size, self.extent, self.pixel_size
        c = -e + (torch.arange(n, dtype=torch.float64) + 0.5) * h
        x = c.view(1, n).expand(n, n)
        y = (-c).view(n, 1).expand(n, n)
        return x, y

    def __repr__(self) -> str:
        parts = []
        for f in self._fields:
            if f == "angles":
                a = self._angles
                parts.append(f"angles=<{len(a)} in [{min(a):.4g}, {max(a):.4g}]>")
            else:
                parts.append(f"{f}={getattr(self, f)!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


class ParallelBeam2D(Geometry2D):
    r"""2D parallel-beam geometry.

    Parameters
    ----------
    image_size:
        ``N``: the image has ``N × N`` pixels covering :math:`[-e, e]^2`.
    angles:
        An int ``n`` (uniform :math:`\theta_k = k\pi/n` over :math:`[0,\pi)`, default 180) or a
        1D sequence/tensor of angles in radians (any order, any range).
    extent:
        Half-width :math:`e` of the image square (default 1).
    detectors, detector_spacing:
        Detector count ``n`` and spacing :math:`\Delta`. Defaults: :math:`\Delta = h` (the pixel
        width) and :math:`n = \lceil 2\sqrt2\,e/\Delta \rceil` so that the detector covers the
        image diagonal; if only ``detectors`` is given, :math:`\Delta = 2\sqrt2\,e/n`.

    The line integral at angle :math:`\theta` and detector position ``s`` is taken over the line
    :math:`x\cos\theta + y\sin\theta = s` (see the module docstring for the orientation).
    """

    _fields = ("image_size", "angles", "extent", "detectors", "detector_spacing")
    _owner = "ParallelBeam2D"

    def __init__(self, image_size: int, angles: AnglesLike = 180, *, extent: float = 1.0,
                 detectors: Optional[int] = None, detector_spacing: Optional[float] = None):
        owner = self._owner
        n = _check_int(image_size, "image_size", owner)
        e = _check_positive(extent, "extent", owner)
        ang = _normalise_angles(angles, math.pi, owner)
        h = 2.0 * e / n
        diag = 2.0 * math.sqrt(2.0) * e
        nd, ds = _detector_defaults(detectors, detector_spacing, default_spacing=h,
                                    cover=diag, owner=owner)
        self._set(image_size=n, _angles=ang, extent=e, detectors=nd, detector_spacing=ds)


class FanBeam2D(Geometry2D):
    r"""2D fan-beam geometry with a flat detector.

    Parameters
    ----------
    image_size:
        ``N``: the image has ``N × N`` pixels covering :math:`[-e, e]^2`.
    angles:
        An int ``n`` (uniform :math:`\theta_k = 2k\pi/n` over :math:`[0, 2\pi)`, default 360) or a
        1D sequence/tensor of source angles in radians.
    source_origin:
        :math:`R_s`, distance from the source to the rotation centre (the image centre). Must
        exceed :math:`\sqrt2\,e` so that the source stays outside the image's circumscribed circle.
    origin_detector:
        :math:`R_d \ge 0`, distance from the rotation centre to the detector line.
    extent:
        Half-width :math:`e` of the image square (default 1).
    detectors, detector_spacing:
        Detector count ``n`` and spacing :math:`\Delta` on the (physical) detector. Defaults: the
        detector covers the shadow of the image's circumscribed circle (radius
        :math:`\rho = \sqrt2 e`), i.e. the half-width
        :math:`W = (R_s + R_d)\,\rho / \sqrt{R_s^2 - \rho^2}`, with spacing :math:`\Delta = M h`
        (the pixel width magnified to the detector, :math:`M = (R_s + R_d)/R_s`) and
        :math:`n = \lceil 2W/\Delta\rceil`; if only ``detectors`` is given, :math:`\Delta = 2W/n`.

    The value at angle :math:`\theta`, detector position ``s`` is the integral along the line from
    :math:`S(\theta) = R_s(\sin\theta, -\cos\theta)` to
    :math:`R_d(-\sin\theta, \cos\theta) + s(\cos\theta, \sin\theta)`.
    """

    _fields = ("image_size", "angles", "source_origin", "origin_detector", "extent",
               "detectors", "detector_spacing")
    _owner = "FanBeam2D"

    def __init__(self, image_size: int, angles: AnglesLike = 360, *, source_origin: float,
                 origin_detector: float, extent: float = 1.0, detectors: Optional[int] = None,
                 detector_spacing: Optional[float] = None):
        owner = self._owner
        n = _check_int(image_size, "image_size", owner)
        e = _check_positive(extent, "extent", owner)
        rs = _check_positive(source_origin, "source_origin", owner)
        rd = _check_positive(origin_detector, "origin_detector", owner, allow_zero=True)
        rho = math.sqrt(2.0) * e
        if rs <= rho * (1.0 + 1e-9):
            raise ValueError(f"{owner}: `source_origin` must exceed sqrt(2)*extent = {rho:.6g} "
                             f"(the source must stay outside the image's circumscribed circle), "
                             f"got {rs}")
        ang = _normalise_angles(angles, 2.0 * math.pi, owner)
        h = 2.0 * e / n
        mag = (rs + rd) / rs
        half = (rs + rd) * rho / math.sqrt(rs * rs - rho * rho)
        nd, ds = _detector_defaults(detectors, detector_spacing, default_spacing=mag * h,
                                    cover=2.0 * half, owner=owner)
        self._set(image_size=n, _angles=ang, source_origin=rs, origin_detector=rd, extent=e,
                  detectors=nd, detector_spacing=ds)

    @property
    def magnification(self) -> float:
        """:math:`M = (R_s + R_d)/R_s`, the magnification at the rotation centre."""
        return (self.source_origin + self.origin_detector) / self.source_origin


def _detector_defaults(detectors, detector_spacing, *, default_spacing: float, cover: float,
                       owner: str) -> Tuple[int, float]:
    if detector_spacing is not None:
        ds = _check_positive(detector_spacing, "detector_spacing", owner)
    if detectors is not None:
        nd = _check_int(detectors, "detectors", owner)
        if detector_spacing is None:
            ds = cover / nd
    else:
        if detector_spacing is None:
            ds = default_spacing
        # tiny tolerance so that an exact multiple does not round up by one
        nd = max(1, int(math.ceil(cover / ds - 1e-9)))
    return nd, ds
