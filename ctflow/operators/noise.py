r"""Measurement noise models: one convention for simulation and reconstruction.

Two quantities that must not be confused have two names:

* ``sigma`` — the **absolute** standard deviation :math:`\sigma` of additive Gaussian noise,
  in the units of the data (what :func:`ctflow.reconstruct` takes);
* ``relative`` — a **relative level** :math:`\eta`: :math:`\sigma = \eta\,\|v\|_2/\sqrt m`,
  the fraction :math:`\eta` of the RMS of a reference :math:`v` of :math:`m` values (the clean
  data :math:`Ax` when simulating, the measured :math:`y` otherwise). "1 % noise" is
  ``GaussianNoise(relative=0.01)``.

:class:`GaussianNoise` holds exactly one of them and turns it into :math:`\sigma` per item of
a batch (:meth:`GaussianNoise.std`) and into a simulated measurement
(:meth:`GaussianNoise.simulate`).

:class:`PoissonNoise` is the transmission (low-dose) model: photon counts
:math:`N \sim \mathrm{Poisson}(I_0 f e^{-p})` (+ electronic noise), a safe log and the
statistical weights :math:`w \approx 1/\mathrm{Var}(y)`; it returns a :class:`LowDoseData`
``(y, weights, counts, sigma=1)``. The weights convention shared with the solvers:
``ctflow.reconstruct(y, A, prior, method, sigma=1.0, weights=w)`` minimises the data term
:math:`\frac{1}{2\sigma^2}\sum_i w_i (Ax - y)_i^2` (``weights=None``: all ones, the Gaussian
case; ``ctflow.solvers.inputs.check_weights`` checks their shape and values). Physical
units (HU, μ in mm⁻¹, the prior's window) are in :mod:`ctflow.operators.units`.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["GaussianNoise", "PoissonNoise", "LowDoseData", "COUNT_FLOOR"]


@dataclass(frozen=True)
class GaussianNoise:
    """Additive white Gaussian noise given by an absolute ``sigma`` or a ``relative`` level.

    Exactly one of the two is given; both must be finite and ``>= 0`` (``0``: no noise).
    """

    sigma: Optional[float] = None
    relative: Optional[float] = None

    def __post_init__(self) -> None:
        given = [n for n in ("sigma", "relative") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("GaussianNoise takes exactly one of sigma= (absolute standard "
                             "deviation) and relative= (fraction of the data RMS), got "
                             f"sigma={self.sigma!r}, relative={self.relative!r}")
        name = given[0]
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) \
                or not math.isfinite(value) or value < 0:
            raise ValueError(f"GaussianNoise: {name} must be a finite number >= 0, "
                             f"got {value!r}")
        object.__setattr__(self, name, float(value))

    def std(self, reference: torch.Tensor) -> torch.Tensor:
        r"""Per-item :math:`\sigma`, shape ``(B,)``, for a batch ``reference`` ``(B, ...)``:
        ``sigma`` itself, or :math:`\eta\,\|v_b\|_2/\sqrt m` of each item."""
        b = reference.shape[0] if reference.ndim > 0 else 1
        if self.sigma is not None:
            return torch.full((b,), self.sigma, dtype=torch.float64)
        flat = reference.detach().reshape(b, -1).double()
        return self.relative * flat.norm(dim=1) / math.sqrt(flat.shape[1])

    def simulate(self, clean: torch.Tensor, *, generator: Optional[torch.Generator] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""``(y, sigma)``: :math:`y = v + \sigma\varepsilon`, :math:`\varepsilon\sim N(0, I)`
        drawn in float64 on the CPU from ``generator`` (a CPU generator: the same draw on
        every device), and the per-item :math:`\sigma` ``(B,)`` in float64
        (relative levels refer to ``clean``)."""
        with torch.no_grad():
            sigma = self.std(clean)
            eps = torch.randn(tuple(clean.shape), generator=generator, dtype=torch.float64)
            shape = (-1,) + (1,) * (clean.ndim - 1)
            noise = sigma.cpu().reshape(shape) * eps
            y = clean + noise.to(device=clean.device, dtype=clean.dtype)
        return y, sigma.to(clean.device)

    def describe(self) -> dict:
        """JSON description (recorded in summaries and DICOM headers)."""
        if self.sigma is not None:
            return {"model": "gaussian", "sigma": self.sigma}
        return {"model": "gaussian", "relative": self.relative}


# ---------------------------------------------------------------------- transmission (Poisson)
#: Default floor of the counts before the log, in photons (see :class:`PoissonNoise`).
COUNT_FLOOR = 0.5


def _positive(value, name: str, owner: str, *, allow_zero: bool = False) -> float:
    ok_type = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok_type:
        value = float(value)
    if not ok_type or not math.isfinite(value) or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{owner}: {name} must be a finite number {bound}, got {value!r}")
    return value


@dataclass(frozen=True)
class LowDoseData:
    r"""A simulated (or measured) transmission scan, ready for :func:`ctflow.reconstruct`.

    ``y``: post-log data :math:`-\log(\max(N, c)/(I_0 f))` (line integrals, dimensionless);
    ``weights``: the statistical weights :math:`w \approx 1/\mathrm{Var}(y)`; ``counts``: the
    detector counts :math:`N` (``None`` when not kept); ``sigma`` is 1: the data term is
    :math:`\frac{1}{2\sigma^2}\sum_i w_i (Ax - y)_i^2` with :math:`\sigma = 1`.
    """

    y: torch.Tensor
    weights: torch.Tensor
    counts: Optional[torch.Tensor] = None
    sigma: float = 1.0

    def for_reconstruct(self) -> tuple:
        """``(y, weights, sigma)``: ``ctflow.reconstruct(y, A, prior, method,
        sigma=sigma, weights=weights)``."""
        return self.y, self.weights, self.sigma


@dataclass(frozen=True, eq=False)
class PoissonNoise:
    r"""Transmission noise: photon counts :math:`N_i \sim \mathrm{Poisson}(I_0 f_i e^{-p_i})`
    (plus electronic noise :math:`N(0, \sigma_e^2)`) for line integrals :math:`p_i`.

    Parameters
    ----------
    I0:
        Incident photons per detector bin (unattenuated, ``> 0``); LoDoPaB-CT uses 4096.
    flat_field:
        Optional per-bin gain :math:`f_i > 0` (bowtie filter, detector response), a tensor
        broadcastable to the sinogram ``(..., angles, detectors)`` (e.g. shape
        ``(detectors,)``); ``None``: 1.
    electronic_sigma:
        Standard deviation :math:`\sigma_e \ge 0` (in photons) of additive Gaussian
        electronic noise.
    count_floor:
        The safe log's floor :math:`c > 0` (photons, default :data:`COUNT_FLOOR` = 0.5).

    Safe log
    --------
    Zero (and, with electronic noise, negative) counts have no logarithm. The post-log data
    are :math:`y_i = -\log(\max(N_i, c)/(I_0 f_i))` with :math:`c = 0.5`: half a photon lies
    between the impossible 0 and the smallest positive count 1, so a ray that saw nothing
    gets a line integral :math:`\log(2 I_0 f_i)`, larger (by :math:`\log 2`) than one that saw
    one photon and finite; it is also the continuity correction that makes
    :math:`\log(N + \tfrac12)` the nearly unbiased estimate of :math:`\log\lambda` for Poisson
    counts (Anscombe 1948). LoDoPaB-CT replaces zeros by 0.1 photons instead
    (``count_floor=0.1`` reproduces it). Only rays with :math:`I_0 f e^{-p} \lesssim 3` hit the
    floor with a noticeable probability.

    Weights
    -------
    To first order :math:`\mathrm{Var}(y_i) \approx \mathrm{Var}(N_i)/\lambda_i^2
    = (\lambda_i + \sigma_e^2)/\lambda_i^2`, so the penalized weighted least-squares (PWLS)
    weights are :math:`w_i = \hat N_i^2/(\hat N_i + \sigma_e^2)` with
    :math:`\hat N_i = \max(N_i, c)`, i.e. :math:`w_i = \hat N_i` without electronic noise
    (Sauer & Bouman 1993; Fessler 1994). The data term shared by every solver is
    :math:`\frac1{2\sigma^2}\sum_i w_i (Ax - y)_i^2` with ``sigma=1``.
    """

    I0: float
    flat_field: Optional[torch.Tensor] = None
    electronic_sigma: float = 0.0
    count_floor: float = COUNT_FLOOR

    def __post_init__(self) -> None:
        owner = "PoissonNoise"
        object.__setattr__(self, "I0", _positive(self.I0, "I0 (photons per detector bin)",
                                                 owner))
        object.__setattr__(self, "electronic_sigma",
                           _positive(self.electronic_sigma, "electronic_sigma", owner,
                                     allow_zero=True))
        object.__setattr__(self, "count_floor", _positive(self.count_floor, "count_floor",
                                                          owner))
        if self.flat_field is not None:
            f = torch.as_tensor(self.flat_field, dtype=torch.float64).detach().cpu()
            if f.numel() == 0 or not bool(torch.isfinite(f).all()) or bool((f <= 0).any()):
                raise ValueError(f"{owner}: flat_field must hold finite values > 0, got "
                                 f"{f.flatten()[:8].tolist()}{'...' if f.numel() > 8 else ''}")
            object.__setattr__(self, "flat_field", f)

    # -- helpers ---------------------------------------------------------------------------
    def _flux(self, shape) -> torch.Tensor:
        """:math:`I_0 f` broadcast to ``shape`` (float64, CPU)."""
        if self.flat_field is None:
            return torch.full(tuple(shape), self.I0, dtype=torch.float64)
        try:
            return (self.I0 * self.flat_field).expand(tuple(shape))
        except RuntimeError:
            raise ValueError(f"PoissonNoise: flat_field of shape {tuple(self.flat_field.shape)} "
                             f"does not broadcast to the sinogram shape {tuple(shape)}") from None

    def expected_counts(self, line_integrals: torch.Tensor) -> torch.Tensor:
        r""":math:`\lambda = I_0 f e^{-p}` (float64, CPU) for non-negative finite ``p``."""
        p = line_integrals.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"PoissonNoise: line integrals must be finite, got "
                             f"{int((~torch.isfinite(p)).sum())} non-finite value(s)")
        if p.numel() and float(p.min()) < -1e-6:
            raise ValueError(f"PoissonNoise: line integrals must be >= 0 (attenuation "
                             f"mu >= 0), got a minimum of {float(p.min())!r}")
        return self._flux(p.shape) * torch.exp(-p.clamp(min=0.0))

    def weights(self, counts: torch.Tensor) -> torch.Tensor:
        r"""Statistical weights :math:`\hat N^2/(\hat N + \sigma_e^2)`,
        :math:`\hat N = \max(N, c)` (float64)."""
        n = counts.to(torch.float64).clamp(min=self.count_floor)
        if self.electronic_sigma == 0.0:
            return n
        return n * n / (n + self.electronic_sigma ** 2)

    def post_log(self, counts: torch.Tensor) -> LowDoseData:
        r"""Measured ``counts`` (any real values, e.g. a scanner's) → :class:`LowDoseData`:
        :math:`y = -\log(\max(N, c)/(I_0 f))` and the weights, float64 on the counts'
        device. ``ValueError`` for NaN or infinite counts."""
        if not isinstance(counts, torch.Tensor):
            raise TypeError(f"PoissonNoise.post_log: counts must be a torch.Tensor, got "
                            f"{type(counts).__name__}")
        c = counts.detach().to("cpu", torch.float64)
        bad = ~torch.isfinite(c)
        if bool(bad.any()):
            raise ValueError(f"PoissonNoise.post_log: counts must be finite, got "
                             f"{int(torch.isnan(c).sum())} NaN and "
                             f"{int(torch.isinf(c).sum())} infinite value(s)")
        flux = self._flux(c.shape)
        y = -torch.log(c.clamp(min=self.count_floor) / flux)
        dev = counts.device
        return LowDoseData(y=y.to(dev), weights=self.weights(c).to(dev), counts=counts)

    # -- simulation ------------------------------------------------------------------------
    def simulate(self, line_integrals: torch.Tensor, *,
                 generator: Optional[torch.Generator] = None) -> LowDoseData:
        r"""Counts :math:`N \sim \mathrm{Poisson}(I_0 f e^{-p}) + \sigma_e\varepsilon` for the
        line integrals ``p`` (dimensionless: μ in mm⁻¹ integrated over mm), drawn in float64 on
        the CPU from ``generator`` (the same draw on every device), and their post-log data
        and weights (:meth:`post_log`), as float64 tensors on ``p``'s device."""
        with torch.no_grad():
            lam = self.expected_counts(line_integrals)
            counts = torch.poisson(lam, generator=generator)
            if self.electronic_sigma > 0:
                counts = counts + self.electronic_sigma * torch.randn(
                    tuple(lam.shape), generator=generator, dtype=torch.float64)
            return self.post_log(counts.to(line_integrals.device))

    def describe(self) -> dict:
        """JSON description (recorded in summaries and DICOM headers)."""
        flat = None if self.flat_field is None else \
            {"shape": list(self.flat_field.shape), "min": float(self.flat_field.min()),
             "max": float(self.flat_field.max())}
        return {"model": "poisson", "I0": self.I0, "flat_field": flat,
                "electronic_sigma": self.electronic_sigma, "count_floor": self.count_floor,
                "weights": "max(N, floor)" if self.electronic_sigma == 0 else
                           "N^2/(N + electronic_sigma^2)", "sigma": 1.0}
