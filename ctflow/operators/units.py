r"""Physical units: Hounsfield units ↔ linear attenuation :math:`\mu` (mm⁻¹) ↔ the prior's window.

The one conversion chain of ctflow
----------------------------------
::

    x in [0, 1]  --(HU window lo, hi)-->  HU  --(mu_water, mu_air)-->  mu [mm^-1]
                 --(RayTransform of a geometry in mm)-->  line integrals p = A mu  (dimensionless)

1. **Window → HU**: :math:`\mathrm{HU} = lo + x\,(hi - lo)` (the prior's ``hu_window``; the
   inverse of :func:`ctflow.data.volume.window_hu` before its clipping).
2. **HU → μ**: the definition of the Hounsfield scale,
   :math:`\mathrm{HU} = 1000\,(\mu - \mu_w)/(\mu_w - \mu_a)`, i.e.
   :math:`\mu = \mu_w + \mathrm{HU}\,(\mu_w - \mu_a)/1000`.
3. **Together** the map is affine, :math:`\mu = a\,x + b` with
   :math:`a = (hi - lo)(\mu_w - \mu_a)/1000` and :math:`b = \mu_w + lo\,(\mu_w - \mu_a)/1000`
   (:class:`WindowMap`).
4. **Line integrals**: a geometry whose image covers :math:`[-e, e]^2` with
   ``e = N * pixel_mm / 2`` (:func:`ctflow.operators.ct.presets.preset`) measures lengths in mm, so
   :math:`p = A\mu` is in mm · mm⁻¹ — dimensionless, the exponent of Beer–Lambert's law
   :math:`I = I_0 e^{-p}` (:class:`ctflow.operators.noise.PoissonNoise`).

Because :math:`A` is linear, :math:`A\mu = a\,Ax + b\,A\mathbf 1`: the solvers keep seeing the
linear operator :math:`A` on :math:`x` once the post-log data are shifted and scaled,
:math:`y_x = (y - b\,A\mathbf 1)/a` (:meth:`WindowMap.data_for_window`); the statistical
weights then scale by :math:`a^2` (the data term
:math:`\sum_i w_i (a(Ax)_i + b(A\mathbf 1)_i - y_i)^2 = \sum_i a^2 w_i ((Ax)_i - y_{x,i})^2`).
The offset :math:`b` is slightly negative for windows starting below air (``lo = -1024`` gives
:math:`\mu(-1024\,\mathrm{HU}) \approx -4.6\cdot10^{-4}` mm⁻¹): the *simulated truth* is
clipped at :math:`\mu \ge 0` (:meth:`WindowMap.to_mu` with ``physical=True``), so the linear
model differs from it only in pixels darker than :math:`\mu = 0` (:math:`\approx -1001` HU),
i.e. in air, by at most :math:`|b|`.

Reference values
----------------
:data:`MU_WATER` = 0.02 mm⁻¹ and :data:`MU_AIR` = 2·10⁻⁵ mm⁻¹ are the constants of LoDoPaB-CT
(Leuschner, Schmidt, Otero Baguer & Maass, *LoDoPaB-CT, a benchmark dataset for low-dose
computed tomography reconstruction*, Scientific Data 8, 109 (2021); ``dival.util.constants``:
``MU_WATER = 20`` m⁻¹, ``MU_AIR = 0.02`` m⁻¹, ``MU_MAX = 3071 (MU_WATER - MU_AIR)/1000 +
MU_WATER = 81.35858`` m⁻¹). 0.02 mm⁻¹ is water at an effective energy of about 60 keV: NIST
XCOM / the NIST X-ray mass attenuation tables (Hubbell & Seltzer) give
:math:`\mu/\rho = 0.2059` cm²/g for water at 60 keV, i.e. 0.0206 mm⁻¹ (0.01948 mm⁻¹ at 70
keV). :data:`MU_MAX` (3071 HU, the top of the 12-bit range) is LoDoPaB's normalisation.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Tuple, Union

import torch

__all__ = ["MU_WATER", "MU_AIR", "MU_MAX", "EFFECTIVE_ENERGY_KEV", "hu_to_mu", "mu_to_hu",
           "WindowMap"]

#: Linear attenuation of water in mm⁻¹ (LoDoPaB-CT / dival: 20 m⁻¹; ≈ water at 60 keV).
MU_WATER = 0.02
#: Linear attenuation of air in mm⁻¹ (LoDoPaB-CT / dival: 0.02 m⁻¹).
MU_AIR = 2e-5
#: μ at 3071 HU in mm⁻¹ (LoDoPaB-CT's normalisation, 81.35858 m⁻¹).
MU_MAX = 3071.0 * (MU_WATER - MU_AIR) / 1000.0 + MU_WATER
#: The effective energy (keV) at which :data:`MU_WATER` is water's attenuation (NIST XCOM).
EFFECTIVE_ENERGY_KEV = 60.0

Array = Union[torch.Tensor, float]


def _check_mu(mu_water: float, mu_air: float) -> Tuple[float, float]:
    for name, v in (("mu_water", mu_water), ("mu_air", mu_air)):
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) \
                or v < 0:
            raise ValueError(f"{name} must be a finite number >= 0 (mm^-1), got {v!r}")
    if not mu_water > mu_air:
        raise ValueError(f"mu_water must exceed mu_air, got mu_water={mu_water!r}, "
                         f"mu_air={mu_air!r}")
    return float(mu_water), float(mu_air)


def hu_to_mu(hu: Array, *, mu_water: float = MU_WATER, mu_air: float = MU_AIR) -> Array:
    r""":math:`\mu = \mu_w + \mathrm{HU}\,(\mu_w - \mu_a)/1000` in mm⁻¹ (tensor or float)."""
    mw, ma = _check_mu(mu_water, mu_air)
    return mw + hu * ((mw - ma) / 1000.0)


def mu_to_hu(mu: Array, *, mu_water: float = MU_WATER, mu_air: float = MU_AIR) -> Array:
    r""":math:`\mathrm{HU} = 1000\,(\mu - \mu_w)/(\mu_w - \mu_a)` (inverse of :func:`hu_to_mu`)."""
    mw, ma = _check_mu(mu_water, mu_air)
    return (mu - mw) * (1000.0 / (mw - ma))


@dataclass(frozen=True)
class WindowMap:
    r"""The affine map :math:`\mu = a x + b` from the prior's ``[0, 1]`` window to mm⁻¹.

    ``hu_window=(lo, hi)``: ``x = 0`` is ``lo`` HU and ``x = 1`` is ``hi`` HU (the prior's
    ``hu_window``); ``mu_water``/``mu_air`` in mm⁻¹ (defaults: LoDoPaB's, see the module
    docstring).
    """

    hu_window: Tuple[float, float] = (-1024.0, 3071.0)
    mu_water: float = MU_WATER
    mu_air: float = MU_AIR

    def __post_init__(self) -> None:
        try:
            lo, hi = (float(v) for v in self.hu_window)
        except (TypeError, ValueError):
            raise ValueError(f"hu_window must be (lo, hi) in HU, got {self.hu_window!r}") \
                from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"hu_window must be (lo, hi) with lo < hi, got {self.hu_window!r}")
        mw, ma = _check_mu(self.mu_water, self.mu_air)
        object.__setattr__(self, "hu_window", (lo, hi))
        object.__setattr__(self, "mu_water", mw)
        object.__setattr__(self, "mu_air", ma)

    @property
    def scale(self) -> float:
        """:math:`a = (hi - lo)(\\mu_w - \\mu_a)/1000` (mm⁻¹ per unit of ``x``)."""
        lo, hi = self.hu_window
        return (hi - lo) * (self.mu_water - self.mu_air) / 1000.0

    @property
    def offset(self) -> float:
        """:math:`b = \\mu_w + lo\\,(\\mu_w - \\mu_a)/1000` (mm⁻¹, μ at ``x = 0``)."""
        return self.mu_water + self.hu_window[0] * (self.mu_water - self.mu_air) / 1000.0

    def to_hu(self, x: Array) -> Array:
        """``[0, 1]`` window → HU: ``lo + x (hi - lo)``."""
        lo, hi = self.hu_window
        return lo + x * (hi - lo)

    def from_hu(self, hu: Array) -> Array:
        """HU → the ``[0, 1]`` window (not clipped): ``(HU - lo)/(hi - lo)``."""
        lo, hi = self.hu_window
        return (hu - lo) / (hi - lo)

    def to_mu(self, x: Array, *, physical: bool = False) -> Array:
        """``[0, 1]`` window → μ (mm⁻¹) ``a x + b``; ``physical=True`` clips at μ >= 0 (the
        simulated truth: nothing attenuates less than vacuum)."""
        mu = self.scale * x + self.offset
        if physical:
            return mu.clamp(min=0.0) if isinstance(mu, torch.Tensor) else max(mu, 0.0)
        return mu

    def from_mu(self, mu: Array) -> Array:
        """μ (mm⁻¹) → the ``[0, 1]`` window (not clipped): ``(mu - b)/a``."""
        return (mu - self.offset) / self.scale

    def data_for_window(self, y: torch.Tensor, operator, weights=None):
        r"""Post-log data of μ → data of the window image for the linear operator ``A``.

        Returns ``(y_x, w_x)``: :math:`y_x = (y - b\,A\mathbf 1)/a` and :math:`w_x = a^2 w`
        (``weights=None``: ``w_x = a^2``), so that
        :math:`\sum_i w_x (Ax - y_x)^2 = \sum_i w\,(A(ax + b) - y)^2`.
        """
        ones = torch.ones((1, 1) + tuple(operator.domain_shape), dtype=y.dtype,
                          device=y.device)
        with torch.no_grad():
            a1 = operator(ones)
        y_x = (y - self.offset * a1) / self.scale
        a2 = self.scale ** 2
        if weights is None:
            return y_x, torch.full_like(y_x, a2)
        return y_x, weights * a2

    def describe(self) -> dict:
        """JSON description (summaries, DICOM headers)."""
        return {"hu_window": list(self.hu_window), "mu_water_per_mm": self.mu_water,
                "mu_air_per_mm": self.mu_air, "scale_per_mm": self.scale,
                "offset_per_mm": self.offset}
