"""The prior's velocity field as the flow solvers call it (:class:`SolverVelocity`)."""
from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch

from ctflow.flow.integrate import CountingVelocity

__all__ = ["SolverVelocity"]


class SolverVelocity:
    """The prior's velocity field as the solvers call it: counted, and cast to the module's
    dtype/device when the prior is a torch module of another dtype (the result is cast back).
    ``counter`` is the :class:`CountingVelocity` with ``forward_evals`` / ``backward_evals``.
    ``max_batch`` (``None``: no limit) runs a call on more items than that as consecutive
    chunks of at most ``max_batch`` items: the same values and the same count (one call), with
    the activations of one chunk at a time (MS-Flow's Jacobi sweep stacks all K segments).
    """

    def __init__(self, prior, device: torch.device, *, max_batch: Optional[int] = None):
        self.max_batch = max_batch
        v = prior.velocity
        self.module = v if isinstance(v, torch.nn.Module) else None
        self.param_dtype = None
        if self.module is not None:
            ps = [p for p in self.module.parameters()]
            if ps:
                if ps[0].device != device:
                    self.module.to(device)
                self.param_dtype = ps[0].dtype
        self.counter = CountingVelocity(self._call)
        self._v = v

    def _call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        mb = self.max_batch
        if mb is not None and x.shape[0] > mb:   # one logical call, run in chunks
            return torch.cat([self._call_one(x[i:i + mb], t[i:i + mb] if t.ndim else t)
                              for i in range(0, x.shape[0], mb)])
        return self._call_one(x, t)

    def _call_one(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.param_dtype is not None and x.dtype != self.param_dtype:
            return self._v(x.to(self.param_dtype), t.to(self.param_dtype)).to(x.dtype)
        return self._v(x, t)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.counter(x, t)

    def uncounted(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The same velocity, not counted (diagnostics that are not part of a method's
        cost)."""
        return self._call(x, t)

    @property
    def nfe(self) -> Dict[str, int]:
        return {"forward": int(self.counter.forward_evals),
                "backward": int(self.counter.backward_evals)}

    def nfe_per_image(self, images: int) -> Dict[str, float]:
        """Velocity evaluations per image of a solve of ``images`` measurements: the batch
        items of every call, divided by ``images`` (a batched call on ``b`` items counts
        ``b``; ``D`` draws of one image count ``D`` per step)."""
        n = max(int(images), 1)
        return {"forward": self.counter.forward_items / n,
                "backward": self.counter.backward_items / n}

    @contextlib.contextmanager
    def evaluation_mode(self):
        """Run a torch module in eval mode during the solve (restored afterwards)."""
        was = self.module.training if self.module is not None else False
        if was:
            self.module.eval()
        try:
            yield
        finally:
            if was:
                self.module.train()
