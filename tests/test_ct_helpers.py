"""Phantoms and analytic sinograms shared by the CT tests (plus checks of the helpers)."""
import math

import torch

# modified Shepp-Logan (Toft): value, semi-axes a (x), b (y), centre (x0, y0), rotation (deg)
_MODIFIED_SHEPP_LOGAN = [
    (1.0, 0.69, 0.92, 0.0, 0.0, 0.0),
    (-0.8, 0.6624, 0.8740, 0.0, -0.0184, 0.0),
    (-0.2, 0.1100, 0.3100, 0.22, 0.0, -18.0),
    (-0.2, 0.1600, 0.4100, -0.22, 0.0, 18.0),
    (0.1, 0.2100, 0.2500, 0.0, 0.35, 0.0),
    (0.1, 0.0460, 0.0460, 0.0, 0.1, 0.0),
    (0.1, 0.0460, 0.0460, 0.0, -0.1, 0.0),
    (0.1, 0.0460, 0.0230, -0.08, -0.605, 0.0),
    (0.1, 0.0230, 0.0230, 0.0, -0.606, 0.0),
    (0.1, 0.0230, 0.0460, 0.06, -0.605, 0.0),
]


def _supersampled(geom, inside_fn, ss):
    xg, yg = geom.pixel_centres()
    h = geom.pixel_size
    off = (torch.arange(ss, dtype=torch.float64) + 0.5) / ss - 0.5
    img = torch.zeros(geom.image_shape, dtype=torch.float64)
    for a in off:
        for b in off:
            img += inside_fn(xg + a * h, yg + b * h)
    return img / ss ** 2


def disk(geom, radius=0.5, ss=8):
    """Centred disk of value 1, pixelised by ``ss × ss`` supersampling, shape (1, 1, N, N)."""
    return _supersampled(geom, lambda x, y: (x * x + y * y <= radius ** 2).double(), ss)[None, None]


def shepp_logan(geom, ss=4):
    """Modified Shepp-Logan phantom on the geometry's image grid (row 0 = +y), (1, 1, N, N)."""
    e = geom.extent

    def fn(x, y):
        out = torch.zeros_like(x)
        for v, a, b, x0, y0, phi in _MODIFIED_SHEPP_LOGAN:
            c, s = math.cos(math.radians(phi)), math.sin(math.radians(phi))
            xr = (x / e - x0) * c + (y / e - y0) * s
            yr = -(x / e - x0) * s + (y / e - y0) * c
            out += v * ((xr / a) ** 2 + (yr / b) ** 2 <= 1.0).double()
        return out

    return _supersampled(geom, fn, ss)[None, None]


def parallel_disk_sinogram(geom, radius=0.5):
    """Exact bin averages of 2 sqrt(r² - s²) (same for every angle), shape (detectors,)."""
    s = geom.detector_positions()
    ds = geom.detector_spacing

    def antiderivative(t):
        t = torch.clamp(t, -radius, radius)
        return t * torch.sqrt(radius ** 2 - t * t) + radius ** 2 * torch.asin(t / radius)

    return (antiderivative(s + ds / 2) - antiderivative(s - ds / 2)) / ds


def fan_disk_sinogram(geom, radius=0.5, sub=400):
    """Bin averages (midpoint rule, ``sub`` points per bin) of the fan-beam chord of a centred
    disk: the ray to detector position s passes at distance R_s s / sqrt(s² + (R_s+R_d)²)."""
    s = geom.detector_positions()
    ds = geom.detector_spacing
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5
    ss = s[:, None] + off[None, :] * ds
    rs, rd = geom.source_origin, geom.origin_detector
    d = rs * ss / torch.sqrt(ss ** 2 + (rs + rd) ** 2)
    return (2 * torch.sqrt(torch.clamp(radius ** 2 - d * d, min=0))).mean(1)


def test_disk_area():
    from ctflow.operators.ct import ParallelBeam2D

    g = ParallelBeam2D(64, 4)
    area = float(disk(g).sum()) * g.pixel_size ** 2
    assert abs(area - math.pi * 0.25) < 2e-3


def test_shepp_logan_orientation():
    from ctflow.operators.ct import ParallelBeam2D

    g = ParallelBeam2D(64, 4)
    p = shepp_logan(g, ss=1)[0, 0]
    # pixel rows: y = 1 - (r + 0.5) h  ->  y = 0.35 at row 20, y = -0.35 at row 43
    assert abs(float(p[32, 32]) - 0.2) < 1e-12        # centre: 1.0 - 0.8
    assert abs(float(p[20, 32]) - 0.3) < 1e-12        # ellipse 5 at (0, +0.35): the top half
    assert abs(float(p[43, 32]) - 0.2) < 1e-12
    assert abs(float(p[32, 22]) - 0.0) < 1e-12        # ellipse 4 at x = -0.22 (left, -0.2)


def _ellipse_line_integrals(theta, s, extent=1.0):
    """Line integrals of the modified Shepp-Logan phantom over the lines
    x cos(theta) + y sin(theta) = s (broadcasting tensors, physical units)."""
    out = torch.zeros(torch.broadcast_shapes(theta.shape, s.shape), dtype=torch.float64)
    for v, a, b, x0, y0, phi in _MODIFIED_SHEPP_LOGAN:
        a, b, x0, y0 = a * extent, b * extent, x0 * extent, y0 * extent
        tp = theta - math.radians(phi)
        r2 = (a * torch.cos(tp)) ** 2 + (b * torch.sin(tp)) ** 2
        sp = s - (x0 * torch.cos(theta) + y0 * torch.sin(theta))
        out += v * 2 * a * b * torch.sqrt(torch.clamp(r2 - sp * sp, min=0)) / r2
    return out


def analytic_shepp_logan_sinogram(geom, sub=32):
    """Bin-averaged exact line integrals of the (continuous) modified Shepp-Logan phantom for
    ``geom`` (midpoint rule with ``sub`` rays per detector bin), shape (1, 1, angles, detectors)."""
    from ctflow.operators.ct import ParallelBeam2D

    th = geom.angles[:, None, None]
    off = (torch.arange(sub, dtype=torch.float64) + 0.5) / sub - 0.5
    s = (geom.detector_positions()[:, None] + off[None, :] * geom.detector_spacing)[None]
    if isinstance(geom, ParallelBeam2D):
        vals = _ellipse_line_integrals(th, s, geom.extent)
    else:
        rs, rd = geom.source_origin, geom.origin_detector
        # ray from S = rs (sin, -cos) to D = rd (-sin, cos) + s (cos, sin): unit normal n and
        # offset n·S give the parallel-beam coordinates of the line
        dx = -(rs + rd) * torch.sin(th) + s * torch.cos(th)
        dy = (rs + rd) * torch.cos(th) + s * torch.sin(th)
        norm = torch.sqrt(dx * dx + dy * dy)
        nx, ny = dy / norm, -dx / norm
        tp = torch.atan2(ny, nx)
        sp = nx * rs * torch.sin(th) - ny * rs * torch.cos(th)
        vals = _ellipse_line_integrals(tp, sp, geom.extent)
    return vals.mean(-1)[None, None]


def test_analytic_sinogram_matches_pixelised_phantom():
    from ctflow.operators.ct import FanBeam2D, ParallelBeam2D, RayTransform

    for g in (ParallelBeam2D(128, 12), FanBeam2D(128, 12, source_origin=3, origin_detector=1)):
        y = RayTransform(g)(shepp_logan(g))
        ref = analytic_shepp_logan_sinogram(g)
        assert float((y - ref).norm() / ref.norm()) < 0.02
