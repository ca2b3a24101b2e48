r"""The radial Gaussian prior of the noise state and its proximal map.

:math:`R(s) = \tfrac12\|s\|^2 - (n-1)\log\|s\|` is, up to a constant, the negative
log-density of the norm of an :math:`n`-dimensional standard normal (a :math:`\chi_n`
distribution); MS-Flow and D-Flow weight it by ``lam`` on the noise state :math:`s_0`.
"""
from __future__ import annotations

from typing import Union

import torch

from ctflow.solvers.linalg import broadcast_items, per_item_norm, per_item_sq

__all__ = ["radial_prior", "radial_prox"]


def radial_prior(s: torch.Tensor) -> torch.Tensor:
    r"""Radial Gaussian prior per batch item, :math:`R(s) = \tfrac12\|s\|^2 - (n-1)\log\|s\|`.

    :math:`n` is the dimension of one item. It keeps the noise state on the typical shell
    :math:`\|s\| \approx \sqrt{n-1}` without pulling it to zero. Returns shape ``(B,)``.
    """
    n = s[0].numel()
    sq = per_item_sq(s)
    return 0.5 * sq - 0.5 * (n - 1) * torch.log(sq.clamp_min(torch.finfo(s.dtype).tiny))


def radial_prox(z: torch.Tensor, lam: Union[float, torch.Tensor],
                rho: Union[float, torch.Tensor]) -> torch.Tensor:
    r"""Closed-form :math:`\arg\min_s \lambda R(s) + \tfrac\rho2\|s - z\|^2` per batch item.

    The minimiser points along :math:`z` (the cross term is the only one that sees the
    direction); its radius :math:`r > 0` is the positive root of
    :math:`(\lambda+\rho) r^2 - \rho\|z\| r - \lambda(n-1) = 0`:

    .. math:: r = \frac{\rho\|z\| + \sqrt{\rho^2\|z\|^2 + 4(\lambda+\rho)\lambda(n-1)}}
                        {2(\lambda+\rho)}.

    ``lam`` and ``rho`` are numbers or ``(B,)`` tensors. ``lam = 0`` returns ``z``.
    """
    n = z[0].numel()
    lam = torch.as_tensor(lam, dtype=z.dtype, device=z.device)
    rho = torch.as_tensor(rho, dtype=z.dtype, device=z.device)
    nz = per_item_norm(z)
    disc = (rho * nz) ** 2 + 4.0 * (lam + rho) * lam * (n - 1)
    r = (rho * nz + torch.sqrt(disc)) / (2.0 * (lam + rho))
    tiny = torch.finfo(z.dtype).tiny
    direction = z / broadcast_items(nz.clamp_min(tiny), z)
    # z == 0: every direction is optimal; keep a deterministic one (the first axis)
    if bool((nz <= tiny).any()):
        e = torch.zeros_like(z).reshape(z.shape[0], -1)
        e[:, 0] = 1.0
        direction = torch.where(broadcast_items(nz <= tiny, z), e.reshape(z.shape), direction)
    return broadcast_items(r, z) * direction
