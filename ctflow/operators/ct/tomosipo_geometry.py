r"""The ``tomosipo`` geometry of a ctflow geometry (pure NumPy; tomosipo is needed only by
:func:`tomosipo_geometries`), for :mod:`ctflow.operators.ct.tomosipo_backend`.

Coordinates (ctflow → tomosipo)
-------------------------------
tomosipo points are ``(z, y', x)``; voxel ``(k, r, c)`` of a volume centred on the origin has
its centre at ``z_k = (k + ½ - K/2) h_z``, ``y'_r = -e + (r + ½) h``, ``x_c = -e + (c + ½) h``
(indices increase with the coordinate). ctflow's pixel ``(r, c)`` sits at
``(x_c, y_r = e - (r + ½) h)`` (row 0 on top), so with the reflection :math:`y' = -y` ctflow's
image tensor is tomosipo's volume slice as it is, without a flip. A reflection is an isometry,
so line integrals are unchanged when the rays are mapped the same way. With
:math:`u(\theta) = (\cos\theta, \sin\theta)` and :math:`e(\theta) = (-\sin\theta, \cos\theta)`
in ctflow's ``(x, y)`` plane (see :mod:`ctflow.operators.ct.geometry`), in ``(z, y', x)``:

* parallel beam (``ts.parallel_vec``, one detector row per slice):
  ``ray_dir = (0, -cos θ, -sin θ)``, ``det_pos = 0``, ``det_u = Δ (0, -sin θ, cos θ)``,
  ``det_v = (h_z, 0, 0)``; row ``k`` lies in slice ``k``'s mid-plane, so each row integrates
  its own slice only (the sampling height is the slice centre, where ASTRA's interpolation in z
  has weight one);
* fan beam (``ts.cone_vec``, one slice and one row; a batch loops over its images):
  ``src_pos = R_s (0, cos θ, sin θ)`` (:math:`S = -R_s e(\theta)`),
  ``det_pos = R_d (0, -cos θ, -sin θ)`` (:math:`R_d e(\theta)`), ``det_u`` as above,
  ``det_v = (Δ, 0, 0)``.

Detector pixel ``j`` of ``n`` lies at ``det_pos + (j - (n-1)/2) det_u``, i.e. at ctflow's
:math:`s_j`. The volume is ``ts.volume(shape=(K, N, N), size=(K h, 2e, 2e))`` (cubic voxels of
side :math:`h = 2e/N`). :func:`tomosipo_vectors` and :func:`volume_spec` return these numbers
without importing tomosipo (the tests check them against the geometry on any machine);
:func:`tomosipo_geometries` turns them into tomosipo objects.
"""
from __future__ import annotations

from typing import Dict

import numpy as np

from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D

__all__ = ["volume_spec", "tomosipo_vectors", "tomosipo_geometries"]


def volume_spec(geometry: Geometry2D, slices: int = 1) -> Dict[str, tuple]:
    """``shape``, ``size`` and ``pos`` of the tomosipo volume holding ``slices`` images, in
    tomosipo's ``(z, y, x)`` order: cubic voxels of side :math:`h = 2e/N`, centred on 0."""
    if not isinstance(geometry, (ParallelBeam2D, FanBeam2D)):
        raise ValueError(f"backend='tomosipo': unsupported geometry {type(geometry).__name__}")
    n, e, h = geometry.image_size, geometry.extent, geometry.pixel_size
    return {"shape": (int(slices), n, n), "size": (int(slices) * h, 2.0 * e, 2.0 * e),
            "pos": (0.0, 0.0, 0.0)}


def tomosipo_vectors(geometry: Geometry2D, slices: int = 1) -> Dict[str, np.ndarray]:
    """The tomosipo vector geometry of ``geometry`` in ``(z, y', x)`` coordinates (module
    docstring), as float64 arrays of shape ``(angles, 3)``.

    Returns ``kind`` (``"parallel_vec"`` or ``"cone_vec"``), ``shape`` (detector rows, columns)
    and ``ray_dir`` (parallel) or ``src_pos`` (fan), ``det_pos``, ``det_v``, ``det_u``.
    A fan beam takes one slice only (``slices=1``).
    """
    slices = int(slices)
    if slices < 1:
        raise ValueError(f"backend='tomosipo': `slices` must be >= 1, got {slices}")
    theta = geometry.angles.numpy()
    c, s = np.cos(theta), np.sin(theta)
    zero = np.zeros_like(theta)
    ds = geometry.detector_spacing
    det_u = np.stack([zero, -s * ds, c * ds], axis=1)
    if isinstance(geometry, ParallelBeam2D):
        hz = geometry.pixel_size
        return {"kind": "parallel_vec", "shape": (slices, geometry.detectors),
                "ray_dir": np.stack([zero, -c, -s], axis=1),
                "det_pos": np.zeros((len(theta), 3)),
                "det_v": np.stack([zero + hz, zero, zero], axis=1),
                "det_u": det_u}
    if isinstance(geometry, FanBeam2D):
        if slices != 1:
            raise ValueError("backend='tomosipo': a fan-beam geometry takes one slice per "
                             f"operator, got slices={slices}")
        rs, rd = geometry.source_origin, geometry.origin_detector
        return {"kind": "cone_vec", "shape": (1, geometry.detectors),
                "src_pos": np.stack([zero, rs * c, rs * s], axis=1),
                "det_pos": np.stack([zero, -rd * c, -rd * s], axis=1),
                "det_v": np.stack([zero + ds, zero, zero], axis=1),
                "det_u": det_u}
    raise ValueError(f"backend='tomosipo': unsupported geometry {type(geometry).__name__}")


def tomosipo_geometries(ts, geometry: Geometry2D, slices: int = 1):
    """``(volume geometry, projection geometry)`` as tomosipo objects (``ts`` the tomosipo
    module) for ``slices`` stacked images; pure geometry, no ASTRA call. The projection data
    shape is ``(slices, angles, detectors)`` (tomosipo's ``(v, angle, u)``)."""
    spec = volume_spec(geometry, slices)
    vg = ts.volume(shape=spec["shape"], size=spec["size"], pos=spec["pos"])
    vec = tomosipo_vectors(geometry, slices)
    if vec["kind"] == "parallel_vec":
        pg = ts.parallel_vec(shape=vec["shape"], ray_dir=vec["ray_dir"], det_pos=vec["det_pos"],
                             det_v=vec["det_v"], det_u=vec["det_u"])
    else:
        pg = ts.cone_vec(shape=vec["shape"], src_pos=vec["src_pos"], det_pos=vec["det_pos"],
                         det_v=vec["det_v"], det_u=vec["det_u"])
    return vg, pg
