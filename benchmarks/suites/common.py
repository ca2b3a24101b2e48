r"""The context a case suite runs in: prior, data and problem caches, and the case executor.

:class:`SuiteContext` loads the prior (``ctflow.tasks.resolve_prior``), prepares the held-out
slices and the problems (:mod:`benchmarks.suites.problems`), and solves one case
(:meth:`SuiteContext.execute`, ``ctflow.reconstruct`` with ``sigma=``) into the measured part
of its row: PSNR/SSIM, NFE, wall time, time per iteration, peak memory, the noise ``sigma``.
The solver's own randomness (initial latents, re-noising) is seeded by (base seed, image id,
problem), the same for every method.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ctflow.metrics import psnr, ssim
from ctflow.solvers import reconstruct
from ctflow.tasks import resolve_prior

from benchmarks.cases import Case, canonical, derived_seed
from benchmarks.settings import CONFIG_DIR, load_config
from benchmarks.suites.options import accepts_seed
from benchmarks.suites.problems import build_operator, heldout_hu, measure, prepare_slice

__all__ = ["SuiteContext", "Problem", "DEFAULT_PRIOR", "iteration_timing", "history_trace",
           "CONFIG_DIR"]

#: The prior the suites use unless told otherwise.
DEFAULT_PRIOR = "ct64"


@dataclass
class Problem:
    """A prepared problem instance: ground truth, operator, data and noise level."""

    x: torch.Tensor
    A: Any
    y: torch.Tensor
    sigma: float
    solver_seed: int


# ---------------------------------------------------------------------------------------------
# the context a suite runs in
class SuiteContext:
    """Prior, device, data and problem caches of one suite run, and the case executor."""

    def __init__(self, *, suite: str, quick: bool = False, device: str = "cpu", seed: int = 0,
                 prior=None, progress: bool = False, load_prior: bool = True):
        self.suite = suite
        self.quick = bool(quick)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.progress = bool(progress)
        self._prior_arg = prior if prior is not None else DEFAULT_PRIOR
        self._prior = None
        self._slices: Dict[str, Any] = {}
        self._images: Dict[Tuple[str, int], torch.Tensor] = {}
        self._problems: Dict[str, Problem] = {}
        self._config: Optional[dict] = None
        if load_prior:
            _ = self.prior

    # prior -----------------------------------------------------------------------------------
    @property
    def prior(self):
        if self._prior is None:
            p = self._prior_arg
            p = resolve_prior(str(p) if isinstance(p, Path) else p, device=self.device)
            if getattr(p, "hu_window", None) is None:
                raise ValueError(f"the benchmark prior {getattr(p, 'name', p)!r} declares no "
                                 f"hu_window; the CT suites need a CT prior")
            if hasattr(p, "eval"):
                p.eval()
            self._prior = p
        return self._prior

    @property
    def prior_name(self) -> str:
        p = self._prior_arg
        return str(p) if isinstance(p, (str, Path)) else str(getattr(p, "name", "prior"))

    @property
    def image_size(self) -> int:
        return int(self.prior.image_size)

    # config ----------------------------------------------------------------------------------
    def config(self, suite: Optional[str] = None) -> dict:
        if suite is not None and suite != self.suite:
            return load_config(suite)
        if self._config is None:
            self._config = load_config(self.suite)
        return self._config

    def config_label(self) -> str:
        """Short hash of the config file(s) in force (recorded in every row); the ablation
        suite also depends on ``ct-sparse.json`` (its MS-Flow base options)."""
        parts = [self.config()]
        if self.suite == "ablation":
            parts.append(self.config("ct-sparse"))
        return hashlib.sha1(canonical(parts).encode()).hexdigest()[:10]

    # data ------------------------------------------------------------------------------------
    def image(self, image_id: str) -> torch.Tensor:
        """The prepared ``(1, 1, S, S)`` image ``<split>/<stem>`` on the context's device."""
        split, _, stem = image_id.partition("/")
        if split not in self._slices:
            self._slices[split] = heldout_hu(split)
        if stem not in self._slices[split]:
            raise ValueError(f"unknown image id {image_id!r}; {split} slices: "
                             f"{sorted(self._slices[split])}")
        key = (image_id, self.image_size)
        if key not in self._images:
            x = prepare_slice(self._slices[split][stem], image_size=self.image_size,
                              hu_window=self.prior.hu_window)
            self._images[key] = x.to(self.device)
        return self._images[key]

    def problem(self, image_id: str, problem: Dict[str, Any]) -> Problem:
        """The (cached) problem instance of ``problem`` on ``image_id``."""
        key = canonical([image_id, problem])
        if key not in self._problems:
            x = self.image(image_id)
            A = build_operator(problem, self.image_size)
            y, sigma = measure(A, x, problem["noise"],
                               derived_seed("noise", self.seed, image_id, problem))
            self._problems[key] = Problem(x=x, A=A, y=y, sigma=sigma,
                                          solver_seed=derived_seed("solver", self.seed,
                                                                   image_id, problem))
            if len(self._problems) > 64:          # keep the cache small
                self._problems.pop(next(iter(self._problems)))
        return self._problems[key]

    # execution -------------------------------------------------------------------------------
    def warm_up(self, case: Optional[Case] = None) -> None:
        """One-time costs outside every timed solve, once per process: the first velocity
        call (kernel selection) and, before the first solver that builds a ``torch.optim``
        optimiser (D-Flow; MS-Flow ``update="joint"``), the lazy ``torch._dynamo`` import
        that the first optimiser triggers (seconds on a CPU)."""
        if not getattr(self, "_warm", False):
            prior = self.prior
            with torch.no_grad():
                z = torch.zeros((1, *prior.shape), device=self.device)
                prior.velocity(z, torch.full((1,), 0.5, device=self.device))
            self._warm = True
        uses_optim = case is not None and (
            case.method == "dflow"
            or (case.method == "msflow" and case.options.get("update") == "joint"))
        if uses_optim and not getattr(self, "_warm_optim", False):
            p = torch.zeros(1, requires_grad=True)
            torch.optim.LBFGS([p], line_search_fn="strong_wolfe")
            torch.optim.Adam([p])
            self._warm_optim = True

    def execute(self, case: Case) -> dict:
        """Solve one case and measure it: the row's result fields."""
        prob = self.problem(case.image, case.problem)
        self.warm_up(case)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        extra = {"seed": prob.solver_seed} if accepts_seed(case.method) else {}
        res = reconstruct(prob.y, prob.A, self.prior, method=case.method, sigma=prob.sigma,
                          **extra, **case.options)
        img = res.image.detach().to(prob.x.device, prob.x.dtype)
        if not torch.isfinite(img).all():
            raise FloatingPointError(f"{case.method} returned a non-finite image")
        img = img.clamp(0.0, 1.0)
        history = list(res.history or [])
        iterations, per_iter = iteration_timing(case.method, history, float(res.seconds))
        nfe = {"forward": int(res.nfe.get("forward", 0)),
               "backward": int(res.nfe.get("backward", 0))}
        nfe["total"] = nfe["forward"] + nfe["backward"]
        per_image = getattr(res, "nfe_per_image", None) or {}
        nfe["per_image"] = float(per_image.get("forward", 0.0) + per_image.get("backward", 0.0))
        row = {
            "metrics": {"psnr": float(psnr(img, prob.x, data_range=1.0)[0]),
                        "ssim": float(ssim(img, prob.x, data_range=1.0)[0])},
            "nfe": nfe,
            "seconds": float(res.seconds),
            "peak_memory_bytes": (None if res.peak_memory_bytes is None
                                  else int(res.peak_memory_bytes)),
            "iterations": iterations,
            "seconds_per_iteration": per_iter,
            "noise_sigma": prob.sigma,
            "solver_seed": prob.solver_seed,
            "image_size": self.image_size,
            "isolated": False,
        }
        if case.trace:
            row["trace"] = history_trace(history)
        return row


#: Methods whose history starts with an entry for the initial state (then one per iteration).
HISTORY_HAS_START = ("msflow", "dflow")


def iteration_timing(method: str, history: Sequence[dict], seconds: float
                     ) -> Tuple[int, Optional[float]]:
    """``(iterations, seconds per iteration)``. Where the history carries cumulative
    ``seconds`` and a start entry (MS-Flow sweeps, D-Flow steps), the time per iteration
    excludes the initialisation: :math:`(t_\text{last} - t_0)/(\text{len} - 1)`."""
    if method in HISTORY_HAS_START and history:
        n = len(history) - 1
        t = [h.get("seconds") for h in history]
        if n > 0 and isinstance(t[0], (int, float)) and isinstance(t[-1], (int, float)):
            return n, (float(t[-1]) - float(t[0])) / n
        return n, (seconds / n if n > 0 else None)
    n = len(history)
    return n, (seconds / n if n > 0 else None)


def history_trace(history: Sequence[dict]) -> Dict[str, List[float]]:
    """Per-iteration scalars of a solver history: objective, data, prior, residual and the
    trajectory loss ``gap`` (the sum of the per-segment stitching gaps)."""
    out: Dict[str, List[float]] = {}
    for key in ("objective", "data", "prior", "residual", "trajectory_loss", "seconds"):
        vals = [h.get(key) for h in history]
        if vals and all(isinstance(v, (int, float)) for v in vals):
            out[key] = [float(v) for v in vals]
    gaps = [h.get("gaps") for h in history]
    if gaps and all(isinstance(g, (list, tuple)) for g in gaps):
        out["gap"] = [float(sum(float(v) for v in g)) for g in gaps]
    return out
