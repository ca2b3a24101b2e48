"""The randomness of the solvers: one seeded CPU generator per solve, noise drawn on the CPU
(so a run is reproducible on every device) and moved to the data's device."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["make_generator", "randn"]


def make_generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def randn(shape: Sequence[int], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn on the CPU from ``generator``, with ``like``'s
    dtype, moved to ``like``'s device."""
    return torch.randn(tuple(shape), generator=generator, dtype=like.dtype).to(like.device)
