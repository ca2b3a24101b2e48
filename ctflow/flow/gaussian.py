r"""Closed-form rectified flow of a Gaussian data distribution (for tests and checks).

Data :math:`x_1 \sim N(\mu, \operatorname{diag}(\sigma^2))`, noise :math:`x_0 \sim N(0, I)`,
interpolant :math:`x_t = t x_1 + (1-t) x_0`. The marginal velocity
:math:`v(x,t) = E[x_1 - x_0 \mid x_t = x]` is, per component,

.. math::

    v(x, t) = \mu + \frac{t\sigma^2 - (1-t)}{t^2\sigma^2 + (1-t)^2}\,(x - t\mu),

and the flow map from time :math:`a` to :math:`b` is affine:

.. math::

    \Phi_{a\to b}(x) = b\mu + \frac{s(b)}{s(a)}(x - a\mu), \qquad s(t) = \sqrt{t^2\sigma^2 + (1-t)^2}.

So the ODE carries :math:`N(0, I)` exactly to :math:`N(\mu, \sigma^2)`, and every answer of a
solver built on this prior is checkable in closed form.
"""
from __future__ import annotations

import torch

__all__ = ["GaussianVelocity"]


class GaussianVelocity:
    """Exact velocity field of the Gaussian flow with per-pixel mean ``mu`` and std ``sigma``.

    ``mu`` and ``sigma`` have the per-item shape ``(C, H, W)`` (or broadcast to it).
    """

    def __init__(self, mu: torch.Tensor, sigma: torch.Tensor):
        self.mu = torch.as_tensor(mu)
        self.sigma = torch.as_tensor(sigma).expand_as(self.mu).clone()
        if bool((self.sigma <= 0).any()):
            raise ValueError("sigma must be positive")

    def _p(self, x: torch.Tensor):
        return self.mu.to(x), self.sigma.to(x)

    def _t(self, t, x):
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t

    def scale(self, t, x: torch.Tensor) -> torch.Tensor:
        """:math:`s(t) = \\sqrt{t^2\\sigma^2 + (1-t)^2}`."""
        _, sig = self._p(x)
        t = self._t(t, x)
        return torch.sqrt(t * t * sig * sig + (1 - t) ** 2)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mu, sig = self._p(x)
        t = self._t(t, x)
        num = t * sig * sig - (1 - t)
        den = t * t * sig * sig + (1 - t) ** 2
        return mu + num / den * (x - t * mu)

    def flow_map(self, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
        """The exact flow map :math:`\\Phi_{a\\to b}(x)`."""
        mu, _ = self._p(x)
        return b * mu + self.scale(b, x) / self.scale(a, x) * (x - a * mu)

    def sample(self, n: int, *, generator=None, dtype=torch.float64) -> torch.Tensor:
        """``n`` exact samples of the data distribution."""
        z = torch.randn((n, *self.mu.shape), generator=generator, dtype=dtype)
        return self.mu.to(z) + self.sigma.to(z) * z
