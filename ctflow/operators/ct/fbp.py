r"""Filtered back-projection (FBP) in torch for parallel- and fan-beam (flat detector) geometries.

Parallel beam
-------------
With the Fourier-slice theorem, :math:`f(x) = \int_0^\pi (p_\theta * k)(x\cdot u(\theta))\,d\theta`
where :math:`\hat k(\nu) = |\nu|` (ν in cycles per length unit). Discretely,

.. math::  \mathrm{FBP}\,y = \frac{\Delta}{h^2}\, A^T\big(w \odot F y\big),

where :math:`F` is the ramp filter along the detector (the band-limited spatial kernel of Kak &
Slaney, :math:`k_0 = 1/(4\Delta^2)`, :math:`k_n = -1/(\pi^2 n^2 \Delta^2)` for odd ``n``, 0 for
even ``n``, applied as :math:`q = \Delta\,(k * p)` with zero-padding to at least twice the
detector count so the FFT convolution is linear, optionally multiplied by a window and divided
by :math:`\mathrm{sinc}(\nu\Delta)`, the transfer function of the detector-bin averaging),
:math:`w_i` are angle weights (:math:`\pi/n` for uniform angles), and
:math:`\frac{\Delta}{h^2}A^T` is the back-projection :math:`\sum_i q_i(x\cdot u(\theta_i))`
because a column of :math:`A` sums to :math:`h^2/\Delta` over each projection.

Fan beam, flat detector
-----------------------
With the virtual detector :math:`u = s R_s/(R_s+R_d)` through the origin, the source-to-point
depth :math:`L(x, \theta) = R_s + x\cdot e(\theta)` and the projection :math:`u'(x,\theta) =
R_s\,(x\cdot u(\theta))/L`, the full-scan (:math:`[0, 2\pi)`) inversion is

.. math::  f(x) = \int_0^{2\pi} \frac{R_s^2}{L^2}\,\tfrac12\Big(\big(\tfrac{R_s}{\sqrt{R_s^2+u^2}}
           \,p_\theta\big) * k\Big)(u')\,d\theta ,

i.e. cosine pre-weighting, ramp filtering along ``u`` (half ramp for the double coverage) and a
distance-weighted back-projection. The back-projection uses the matrix
:math:`\tilde A = A \odot R_s/L` (same footprints, each entry weighted by :math:`R_s/L` at the
pixel centre); since a column of :math:`A` integrates to :math:`h^2 (R_s+R_d)/(L\cos\gamma)`
over ``s``, the remaining factors :math:`\cos\gamma\,\Delta R_s/(h^2 (R_s+R_d))` are per-detector
and applied before back-projecting. Short scans (Parker weights) are not supported: the angle
weights assume the angles cover the full turn.

Both are linear operators from sinograms ``(angles, detectors)`` to images ``(N, N)``; the filter
is symmetric, so the adjoint is :math:`D\,F\,W\,A` (dot-testable, autograd works).
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch

from ctflow.operators.base import AdjointFunction, LinearOperator
from ctflow.operators.ct.geometry import FanBeam2D, Geometry2D, ParallelBeam2D
from ctflow.operators.ct.ray_transform import check_float
from ctflow.operators.ct.torch_backend import TorchRayBackend

__all__ = ["FBP", "ramp_filter_response", "angle_weights", "FILTERS"]

#: Accepted filter names (aliases map to the same window).
FILTERS = ("ramp", "ram-lak", "shepp-logan", "cosine", "hann", "hamming")


def angle_weights(angles: torch.Tensor, period: float) -> torch.Tensor:
    r"""Quadrature weights :math:`w_i` for :math:`\int_0^{\text{period}} g(\theta)\,d\theta`.

    Each angle gets half the gap to each neighbour (in sorted order). When the angles cover the
    period (the wrap-around gap is at most twice the median gap) the gaps are periodic, so
    uniform angles get :math:`\text{period}/n`; otherwise (limited angle) the outermost angles
    take their inner half-gap twice.
    """
    a = torch.remainder(angles.to(torch.float64), period)
    n = a.numel()
    if n == 1:
        return torch.full((1,), float(period), dtype=torch.float64)
    order = torch.argsort(a)
    s = a[order]
    gaps = s[1:] - s[:-1]
    wrap = s[0] + period - s[-1]
    positive = gaps[gaps > 0]
    median = float(positive.median()) if positive.numel() else float(period) / n
    w_sorted = torch.empty(n, dtype=torch.float64)
    if float(wrap) <= 2.0 * median + 1e-12:
        left = torch.cat([wrap.view(1), gaps])
        right = torch.cat([gaps, wrap.view(1)])
    else:
        left = torch.cat([gaps[:1], gaps])
        right = torch.cat([gaps, gaps[-1:]])
    w_sorted[:] = 0.5 * (left + right)
    w = torch.empty(n, dtype=torch.float64)
    w[order] = w_sorted
    return w


def ramp_filter_response(num_detectors: int, spacing: float, filter: str = "ramp",
                         frequency_scaling: float = 1.0,
                         aperture_correction: bool = True) -> Tuple[torch.Tensor, int]:
    r"""Real frequency response (``rfft`` layout) of the windowed ramp filter and the padded
    length ``L`` (a power of two, at least twice ``num_detectors``).

    The response is :math:`\Delta\,\widehat{k}` of the Kak–Slaney kernel (band-limited
    :math:`|\nu|` with the right DC value) times the window evaluated at the normalised
    frequency :math:`\nu/\nu_{\mathrm{Nyquist}} \in [0, 1]`, zero above ``frequency_scaling``:
    ramp 1, Shepp–Logan :math:`\mathrm{sinc}(\nu/(2f))`, cosine :math:`\cos(\pi\nu/(2f))`,
    Hann :math:`\cos^2(\pi\nu/(2f))`, Hamming :math:`0.54 + 0.46\cos(\pi\nu/f)` (``f`` the
    frequency scaling; the same windows as ODL's ``fbp_op``). With ``aperture_correction`` the
    response is divided by :math:`\mathrm{sinc}(\nu\Delta)` (:math:`\ge 2/\pi` below Nyquist),
    the transfer function of the detector-bin averaging in the data, which sharpens the
    reconstruction of bin-averaged sinograms (those of the torch backend, and of real detectors).
    """
    name = _check_filter(filter)
    fs = _check_scaling(frequency_scaling)
    length = 1 << int(math.ceil(math.log2(max(2 * num_detectors, 2))))
    idx = torch.arange(length, dtype=torch.float64)
    n = torch.where(idx <= length // 2, idx, idx - length)  # circular offsets
    kernel = torch.zeros(length, dtype=torch.float64)
    kernel[0] = 0.25 / spacing ** 2
    odd = (n.abs() % 2) == 1
    kernel[odd] = -1.0 / (math.pi ** 2 * n[odd] ** 2 * spacing ** 2)
    response = spacing * torch.fft.rfft(kernel).real
    nf = torch.arange(length // 2 + 1, dtype=torch.float64) / (length // 2)
    if name in ("ramp", "ram-lak"):
        window = torch.ones_like(nf)
    elif name == "shepp-logan":
        window = torch.sinc(nf / (2 * fs))
    elif name == "cosine":
        window = torch.cos(nf * math.pi / (2 * fs))
    elif name == "hann":
        window = torch.cos(nf * math.pi / (2 * fs)) ** 2
    else:  # hamming
        window = 0.54 + 0.46 * torch.cos(nf * math.pi / fs)
    window = torch.where(nf <= fs + 1e-12, window, torch.zeros_like(window))
    if aperture_correction:
        window = window / torch.sinc(0.5 * nf)
    return response * window, length


def _check_filter(filter) -> str:
    if not isinstance(filter, str) or filter.lower() not in FILTERS:
        raise ValueError(f"FBP: `filter` must be one of {', '.join(FILTERS)}, got {filter!r}")
    return filter.lower()


def _check_scaling(frequency_scaling) -> float:
    try:
        fs = float(frequency_scaling)
    except (TypeError, ValueError):
        fs = float("nan")
    if not (0.0 < fs <= 1.0):
        raise ValueError(f"FBP: `frequency_scaling` must be in (0, 1], got {frequency_scaling!r}")
    return fs


class FBP(LinearOperator):
    r"""Filtered back-projection from sinograms ``(B, C, angles, detectors)`` to images.

    Parameters
    ----------
    geometry:
        :class:`ParallelBeam2D` or :class:`FanBeam2D` (flat detector, full scan).
    filter:
        ``"ramp"`` (Ram-Lak), ``"shepp-logan"``, ``"cosine"``, ``"hann"`` (or ``"hamming"``).
    frequency_scaling:
        Relative cut-off in ``(0, 1]``: frequencies above ``frequency_scaling`` × Nyquist are
        removed and the window is stretched to the cut-off.
    aperture_correction:
        Divide the filter by :math:`\mathrm{sinc}(\nu\Delta)` to undo the detector-bin
        averaging of the data (default ``True``; ``False`` gives the textbook filter).

    Scaling: the result is in the units of the image (FBP of the sinogram of a disk of value 1
    is ≈ 1 inside). Runs on the input's device and dtype with the torch backend's matrices.
    ``FBP(geom)(y)`` reconstructs; ``.adjoint`` is its exact transpose.
    """

    name = "FBP"

    def __init__(self, geometry: Geometry2D, filter: str = "ramp", *,
                 frequency_scaling: float = 1.0, aperture_correction: bool = True):
        if not isinstance(geometry, (ParallelBeam2D, FanBeam2D)):
            raise ValueError(f"FBP: `geometry` must be a ParallelBeam2D or FanBeam2D, "
                             f"got {type(geometry).__name__}")
        super().__init__(geometry.sinogram_shape, geometry.image_shape)
        self.geometry = geometry
        self.filter = _check_filter(filter)
        self.frequency_scaling = _check_scaling(frequency_scaling)
        self.aperture_correction = bool(aperture_correction)
        g = geometry
        h2 = g.pixel_size ** 2
        ds = g.detector_spacing
        if isinstance(g, ParallelBeam2D):
            self._bp = TorchRayBackend(g, kind="ray")
            w = angle_weights(g.angles, math.pi)
            pre = torch.ones(g.detectors, dtype=torch.float64)
            post = (ds / h2) * w.view(-1, 1) * torch.ones(1, g.detectors, dtype=torch.float64)
            spacing = ds
        else:
            self._bp = TorchRayBackend(g, kind="fan_fbp")
            rs, rd = g.source_origin, g.origin_detector
            s = g.detector_positions()
            cos_gamma = (rs + rd) / torch.sqrt((rs + rd) ** 2 + s * s)
            w = angle_weights(g.angles, 2 * math.pi)
            pre = cos_gamma
            post = (0.5 * w.view(-1, 1)) * (rs * ds / (h2 * (rs + rd))) * cos_gamma.view(1, -1)
            spacing = ds * rs / (rs + rd)
        self._response, self._length = ramp_filter_response(
            g.detectors, spacing, self.filter, self.frequency_scaling, self.aperture_correction)
        self._pre64 = pre
        self._post64 = post
        self._consts: Dict[tuple, tuple] = {}

    def _constants(self, t: torch.Tensor):
        key = (str(t.device), t.dtype)
        if key not in self._consts:
            self._consts[key] = (self._response.to(t.device, t.dtype),
                                 self._pre64.to(t.device, t.dtype),
                                 self._post64.to(t.device, t.dtype))
        return self._consts[key]

    def filter_sinogram(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the (windowed, zero-padded) ramp filter along the last axis of ``y``."""
        response, _, _ = self._constants(y)
        nd = y.shape[-1]
        spec = torch.fft.rfft(y, n=self._length, dim=-1) * response
        return torch.fft.irfft(spec, n=self._length, dim=-1)[..., :nd]

    def _forward(self, y: torch.Tensor) -> torch.Tensor:
        check_float(y, self._label(), "input")
        _, pre, post = self._constants(y)
        b, c = y.shape[:2]
        z = self.filter_sinogram(y * pre) * post
        z = z.reshape(b * c, *self.domain_shape).contiguous()
        x = AdjointFunction.apply(z, self._bp.adjoint, self._bp.forward)
        return x.reshape(b, c, *self.range_shape)

    def _adjoint(self, x: torch.Tensor) -> torch.Tensor:
        check_float(x, self._label(), "adjoint input")
        _, pre, post = self._constants(x)
        b, c = x.shape[:2]
        flat = x.reshape(b * c, *self.range_shape).contiguous()
        z = AdjointFunction.apply(flat, self._bp.forward, self._bp.adjoint)
        z = z.reshape(b, c, *self.domain_shape)
        return self.filter_sinogram(z * post) * pre

    def __repr__(self) -> str:
        return (f"FBP({self.geometry!r}, filter={self.filter!r}, "
                f"frequency_scaling={self.frequency_scaling:g}, "
                f"aperture_correction={self.aperture_correction})")
