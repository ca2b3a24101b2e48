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
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["GaussianNoise"]


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
