r"""Geometry presets in millimetres: a clinical fan beam and LoDoPaB-CT's parallel beam.

:func:`preset` returns a :class:`~ctflow.operators.ct.FanBeam2D` or
:class:`~ctflow.operators.ct.ParallelBeam2D` whose lengths are in mm: the image of
``image_size`` pixels of ``pixel_mm`` covers :math:`[-e, e]^2` with
``e = image_size * pixel_mm / 2``, so the line integrals of an attenuation image in mm⁻¹ are
dimensionless (:mod:`ctflow.operators.units`).

``clinical-fan``
    The Siemens SOMATOM Definition AS(+)/Flash geometry of the Mayo Clinic / AAPM Low Dose
    CT Grand Challenge data (McCollough et al., *Low-dose CT for the detection and
    classification of metastatic liver lesions: results of the 2016 Low Dose CT Grand
    Challenge*, Med. Phys. 44 (2017) e339; the projection data and their DICOM-CT-PD header:
    Moen et al., *Low-dose CT image and projection dataset*, Med. Phys. 48 (2021) 902, TCIA
    doi:10.7937/9NPB-2637), as rebinned to a fan beam by helix2fan (Wagner, Thies et al.,
    *On the benefit of dual-domain denoising in a self-supervised low-dose CT setting*, ISBI
    2023, github.com/faebstn96/helix2fan): source–isocentre 595 mm, source–detector
    1085.6 mm, 736 channels of 1.2858 mm (arc length on the curved detector, i.e. an angular
    pitch of 1.2858/1085.6 rad and a fan of 49.95°, a scan field of view of 50 cm), 1152
    views per rotation (2304 with the flying focal spot). ctflow's fan beam has a **flat**
    detector, so the preset uses the flat detector with the same 736 channels and the same
    fan angle: it sits 490.6 mm behind the isocentre and its channels are
    :math:`2\cdot 1085.6\,\tan(24.97°)/736 = 1.374` mm wide (uniform on the flat detector,
    0.753 mm at the isocentre, against 0.705 mm of the curved detector at its centre).
    Default image: 512² pixels of 0.7 mm (358.4 mm, as in the Grand Challenge reconstructions).
``lodopab-parallel``
    LoDoPaB-CT (Leuschner, Schmidt, Otero Baguer & Maass, *LoDoPaB-CT, a benchmark dataset for
    low-dose computed tomography reconstruction*, Sci. Data 8, 109 (2021)): parallel beam,
    1000 angles at the midpoints :math:`(k + \tfrac12)\pi/1000` of :math:`[0, \pi)` (ODL's
    ``parallel_beam_geometry``), 513 detector bins spanning the diagonal of the 26 cm × 26 cm
    domain (spacing :math:`2\sqrt2\cdot130/513 = 0.7167` mm), 362² images (0.7182 mm). (Its
    data were simulated from 1000² images to avoid the inverse crime; here the operator acts
    on the working grid.)

Field of view: the disc inscribed in the image (radius ``e``, the DICOM reconstruction
diameter ``image_size * pixel_mm``) must lie inside the detector's scan field of view
(:func:`check_field_of_view`); anything outside that disc is assumed to be air, as on a
scanner.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D

__all__ = ["GeometryPreset", "PRESETS", "preset", "preset_names", "scan_fov_radius",
           "check_field_of_view"]


@dataclass(frozen=True)
class GeometryPreset:
    """A named acquisition geometry in mm (see the module docstring for the sources)."""

    name: str
    kind: str                      # "fan" or "parallel"
    views: int                     # full view count (fan: per rotation; parallel: over pi)
    detectors: int
    detector_spacing_mm: float     # flat detector (fan) / detector line (parallel)
    image_size: int                # native image
    pixel_mm: float
    source_origin_mm: float = 0.0  # fan only
    origin_detector_mm: float = 0.0
    midpoint_angles: bool = False  # angles at (k + 1/2) * range / views (ODL's partitions)
    summary: str = ""

    @property
    def fov_mm(self) -> float:
        """The native reconstruction diameter ``image_size * pixel_mm``."""
        return self.image_size * self.pixel_mm


def _clinical() -> GeometryPreset:
    sod, sdd, channels, arc = 595.0, 1085.6, 736, 1.2858
    half_fan = 0.5 * channels * arc / sdd                # edge of the curved detector (rad)
    flat = 2.0 * sdd * math.tan(half_fan) / channels     # same fan on a flat detector
    return GeometryPreset(
        name="clinical-fan", kind="fan", views=1152, detectors=channels,
        detector_spacing_mm=flat, image_size=512, pixel_mm=0.7, source_origin_mm=sod,
        origin_detector_mm=490.6,  # SDD - SOD
        summary="Siemens SOMATOM Definition AS (AAPM LDCT Grand Challenge): SOD 595 mm, "
                "SDD 1085.6 mm, 736 channels (flat-detector equivalent of 1.2858 mm arcs), "
                "1152 views/rotation")


PRESETS: Dict[str, GeometryPreset] = {
    "clinical-fan": _clinical(),
    "lodopab-parallel": GeometryPreset(
        name="lodopab-parallel", kind="parallel", views=1000, detectors=513,
        detector_spacing_mm=2.0 * math.sqrt(2.0) * 130.0 / 513, image_size=362,
        pixel_mm=260.0 / 362, midpoint_angles=True,
        summary="LoDoPaB-CT (Leuschner et al. 2021): parallel beam, 1000 angles, 513 "
                "detectors, 362x362 images over 26 cm"),
}


def preset_names() -> Tuple[str, ...]:
    """The names of :data:`PRESETS`."""
    return tuple(PRESETS)


def scan_fov_radius(geometry: Geometry2D) -> float:
    r"""Radius of the disc every view sees whole (the scan field of view): parallel beam
    :math:`\min(|s_0|, |s_{n-1}|) + \Delta/2`; flat fan beam
    :math:`R_s\sin\gamma` with :math:`\tan\gamma = W/(R_s + R_d)`, ``W`` the smaller detector
    half-width (edge of the outer bin)."""
    s = geometry.detector_positions()
    half = min(abs(float(s[0])), abs(float(s[-1]))) + 0.5 * geometry.detector_spacing
    if isinstance(geometry, ParallelBeam2D):
        return half
    rs, rd = geometry.source_origin, geometry.origin_detector
    return rs * math.sin(math.atan2(half, rs + rd))


def check_field_of_view(geometry: Geometry2D, *, what: str = "geometry") -> Geometry2D:
    """``geometry`` if its scan field of view (:func:`scan_fov_radius`) covers the disc
    inscribed in the image (radius ``extent``); ``ValueError`` naming both diameters
    otherwise."""
    r = scan_fov_radius(geometry)
    e = geometry.extent
    if r < e * (1.0 - 1e-9):
        raise ValueError(
            f"{what}: the detector ({geometry.detectors} bins of {geometry.detector_spacing:.4g})"
            f" covers a field of view of diameter {2 * r:.4g}, smaller than the image's "
            f"{2 * e:.4g} (image_size {geometry.image_size} x pixel {geometry.pixel_size:.4g});"
            f" use a smaller pixel size or image")
    return geometry


def _check_pixel(pixel_mm, name: str) -> float:
    if isinstance(pixel_mm, bool) or not isinstance(pixel_mm, numbers.Real) \
            or not math.isfinite(pixel_mm) or pixel_mm <= 0:
        raise ValueError(f"preset {name!r}: pixel_mm must be a finite number > 0, "
                         f"got {pixel_mm!r}")
    return float(pixel_mm)


def preset(name: str, image_size: int, pixel_mm: Optional[float] = None,
           views: Optional[int] = None) -> Geometry2D:
    """The geometry of preset ``name`` (:data:`PRESETS`) in mm for ``image_size²`` pixels of
    ``pixel_mm`` (default: the preset's native field of view divided by ``image_size``) and
    ``views`` angles (default: the preset's full count, uniform over the preset's range).

    ``ValueError`` for an unknown name, a bad size, or an image whose inscribed disc the
    detector does not cover (:func:`check_field_of_view`).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown geometry preset {name!r}; choose one of "
                         f"{', '.join(PRESETS)}")
    p = PRESETS[name]
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) \
            or image_size < 1:
        raise ValueError(f"preset {name!r}: image_size must be an int >= 1, got {image_size!r}")
    n = int(image_size)
    px = p.fov_mm / n if pixel_mm is None else _check_pixel(pixel_mm, name)
    nv = p.views if views is None else views
    if isinstance(nv, bool) or not isinstance(nv, numbers.Integral) or nv < 1:
        raise ValueError(f"preset {name!r}: views must be an int >= 1, got {views!r}")
    nv = int(nv)
    full = 2.0 * math.pi if p.kind == "fan" else math.pi
    angles = [(k + 0.5) * full / nv for k in range(nv)] if p.midpoint_angles else nv
    extent = 0.5 * n * px
    if p.kind == "fan":
        geom = FanBeam2D(n, angles, source_origin=p.source_origin_mm,
                         origin_detector=p.origin_detector_mm, extent=extent,
                         detectors=p.detectors, detector_spacing=p.detector_spacing_mm)
    else:
        geom = ParallelBeam2D(n, angles, extent=extent, detectors=p.detectors,
                              detector_spacing=p.detector_spacing_mm)
    return check_field_of_view(geom, what=f"preset {name!r}")
