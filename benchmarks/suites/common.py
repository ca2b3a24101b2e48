r"""What every case suite shares: data preparation, forward problems, noise, execution.

Data (the same for every method):

1. the held-out COVID-19-NY-SBU slices of ``ctflow.data.samples.heldout_slices`` (TEST: 10 slices
   of 5 patients; VALIDATION: 4 slices of 2 patients, used only for tuning), read in HU with the
   scanner padding (-3024/-2048) clipped to -1024 HU;
2. prepared exactly as the prior's training data (``ctflow.training.datasets.CTSliceDataset`` without
   augmentation): the prior's ``hu_window`` :math:`[l, h]` mapped to :math:`[0, 1]` by
   :math:`\mathrm{clip}((\mathrm{HU} - l)/(h - l), 0, 1)`, padded to a square with 0, resized
   with antialiasing (bilinear) to ``prior.image_size`` (64).

Noise convention (documented in ``benchmarks/README.md``): ``y = A x + \sigma\,\varepsilon``,
:math:`\varepsilon \sim N(0, I)`, with

* ``model="relative"`` (CT suites): :math:`\sigma = \eta\,\|Ax\|_2/\sqrt{m}`, i.e. the noise
  standard deviation is the fraction :math:`\eta` of the RMS of the clean data (``m`` = number
  of measurements), so :math:`\mathbb E\|\sigma\varepsilon\|_2 \approx \eta\,\|Ax\|_2`; "1 %
  noise" is :math:`\eta = 0.01`;
* ``model="absolute"`` (restoration suite): :math:`\sigma = \eta` on the ``[0, 1]`` image scale.

:math:`\sigma` is passed to every solver as ``noise_level``. The draw :math:`\varepsilon` is
seeded by (base seed, image id, problem) -- never by the method -- so every method sees the same
``y``; the solver's own randomness (initial latents, re-noising) is seeded the same way.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..runner import Case, _canonical

__all__ = ["SuiteContext", "Problem", "CONFIG_DIR", "load_config", "save_config",
           "image_ids", "derived_seed", "build_operator", "measure", "prepare_slice",
           "require"]

#: Tuned hyper-parameters, one JSON file per suite.
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
#: The prior the suites use unless told otherwise.
DEFAULT_PRIOR = "ct64"


def require(module: str, what: str):
    """Import ``module`` or raise an ImportError that says which piece of ctflow is missing."""
    import importlib
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        raise ImportError(f"the benchmarks need {what} ({module}), which is not importable: "
                          f"{exc}") from exc


def derived_seed(*parts: Any) -> int:
    """A 31-bit seed from the canonical JSON of ``parts`` (stable across processes)."""
    digest = hashlib.sha1(_canonical(list(parts)).encode("utf-8")).hexdigest()
    return int(digest[:8], 16) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------
# configs
def load_config(suite: str) -> dict:
    """``benchmarks/configs/<suite>.json`` (the methods' options and the tuning record)."""
    path = CONFIG_DIR / f"{suite}.json"
    if not path.exists():
        raise FileNotFoundError(f"benchmark config missing: {path}")
    with open(path) as f:
        cfg = json.load(f)
    if not isinstance(cfg.get("methods"), dict):
        raise ValueError(f"{path}: expected a 'methods' object mapping method -> options")
    return cfg


def save_config(suite: str, cfg: dict) -> Path:
    """Write a config atomically (temporary file, then rename)."""
    path = CONFIG_DIR / f"{suite}.json"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=False)
        f.write("\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# data
def image_ids(split: str, n: Optional[int] = None) -> List[str]:
    """Ids ``<split>/<file stem>`` of the held-out slices (sorted by file name), first ``n``."""
    samples = require("ctflow.data.samples", "the bundled held-out CT slices")
    files = samples.heldout_files(split)
    ids = [f"{split}/{Path(f).stem}" for f in files]
    return ids if n is None else ids[:int(n)]


def prepare_slice(hu, *, image_size: int, hu_window: Tuple[float, float]) -> torch.Tensor:
    """One HU slice -> ``(1, 1, S, S)`` float32 in ``[0, 1]``, exactly as the prior was trained
    (HU below the window -> 0, window to ``[0, 1]``, square pad, antialiased resize)."""
    datasets = require("ctflow.training.datasets", "the prior's CT data pipeline")
    ds = datasets.CTSliceDataset([hu], image_size=int(image_size), hu_window=tuple(hu_window),
                                 augment=False)
    return ds[0][None].to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------
# problems
def build_operator(problem: Dict[str, Any], image_size: int):
    """The forward operator a problem describes.

    ``operator``: ``"parallel-beam"`` (``views``, optional ``backend``), ``"blur"`` (``sigma``),
    ``"inpaint"`` (``kind`` random|box|freeform, ``fraction``/``box_size``, ``mask_seed``),
    ``"superres"`` (``factor``, ``mode``), ``"denoise"``.
    """
    ops = require("ctflow.operators", "the forward operators")
    kind = problem.get("operator")
    if kind == "parallel-beam":
        for name in ("ParallelBeam2D", "RayTransform"):
            if not hasattr(ops, name):
                raise ImportError(f"ctflow.operators has no {name} (the CT operators)")
        geom = ops.ParallelBeam2D(image_size, angles=int(problem["views"]))
        return ops.RayTransform(geom, backend=problem.get("backend", "torch"))
    if kind == "blur":
        return ops.GaussianBlur(image_size, sigma=float(problem["sigma"]))
    if kind == "inpaint":
        kw = {"kind": problem["kind"], "seed": int(problem.get("mask_seed", 0))}
        for key in ("fraction", "box_size"):
            if problem.get(key) is not None:
                kw[key] = problem[key]
        return ops.Inpainting(image_size, **kw)
    if kind == "superres":
        return ops.SuperResolution(image_size, factor=int(problem["factor"]),
                                   mode=problem.get("mode", "average"))
    if kind == "denoise":
        return ops.Denoising(image_size)
    raise ValueError(f"unknown problem operator {kind!r}; expected parallel-beam, blur, "
                     f"inpaint, superres or denoise")


def noise_sigma(clean: torch.Tensor, noise: Dict[str, Any]) -> float:
    r""":math:`\sigma` of the noise convention: ``relative`` -> :math:`\eta\|Ax\|_2/\sqrt m`,
    ``absolute`` -> :math:`\eta`."""
    level = float(noise["level"])
    if not (math.isfinite(level) and level >= 0):
        raise ValueError(f"noise level must be a finite number >= 0, got {noise['level']!r}")
    model = noise.get("model")
    if model == "relative":
        m = clean[0].numel()
        return level * float(clean[0].double().norm()) / math.sqrt(m)
    if model == "absolute":
        return level
    raise ValueError(f"noise model must be 'relative' or 'absolute', got {model!r}")


def measure(A, x: torch.Tensor, noise: Dict[str, Any], seed: int) -> Tuple[torch.Tensor, float]:
    """``y = A x + sigma * eps`` with ``eps`` drawn on the CPU from ``seed`` (device-independent);
    returns ``(y, sigma)``."""
    with torch.no_grad():
        clean = A(x)
    sigma = noise_sigma(clean, noise)
    g = torch.Generator().manual_seed(int(seed))
    eps = torch.randn(tuple(clean.shape), generator=g, dtype=torch.float64)
    y = clean + (sigma * eps).to(device=clean.device, dtype=clean.dtype)
    return y, sigma


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
            if isinstance(p, (str, Path)):
                registry = require("ctflow.priors.registry", "the bundled-prior registry")
                p = registry.load_prior(str(p))
            if getattr(p, "hu_window", None) is None:
                raise ValueError(f"the benchmark prior {getattr(p, 'name', p)!r} declares no "
                                 f"hu_window; the CT suites need a CT prior")
            if hasattr(p, "to"):
                p.to(self.device)
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
        return hashlib.sha1(_canonical(parts).encode()).hexdigest()[:10]

    # data ------------------------------------------------------------------------------------
    def image(self, image_id: str) -> torch.Tensor:
        """The prepared ``(1, 1, S, S)`` image ``<split>/<stem>`` on the context's device."""
        split, _, stem = image_id.partition("/")
        if split not in self._slices:
            samples = require("ctflow.data.samples", "the bundled held-out CT slices")
            self._slices[split] = {Path(s.meta.file_name).stem: s.hu
                                   for s in samples.heldout_slices(split)}
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
        key = _canonical([image_id, problem])
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
        api = require("ctflow.solvers.api", "the solvers (ctflow.reconstruct)")
        metrics = require("ctflow.metrics", "the image metrics")
        prob = self.problem(case.image, case.problem)
        self.warm_up(case)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        extra = {"seed": prob.solver_seed} if accepts_seed(case.method) else {}
        res = api.reconstruct(prob.y, prob.A, self.prior, method=case.method,
                              noise_level=prob.sigma, **extra, **case.options)
        img = res.image.detach().to(prob.x.device, prob.x.dtype)
        if not torch.isfinite(img).all():
            raise FloatingPointError(f"{case.method} returned a non-finite image")
        img = img.clamp(0.0, 1.0)
        history = list(res.history or [])
        iterations, per_iter = iteration_timing(case.method, history, float(res.seconds))
        nfe = {"forward": int(res.nfe.get("forward", 0)),
               "backward": int(res.nfe.get("backward", 0))}
        nfe["total"] = nfe["forward"] + nfe["backward"]
        row = {
            "metrics": {"psnr": float(metrics.psnr(img, prob.x, data_range=1.0)[0]),
                        "ssim": float(metrics.ssim(img, prob.x, data_range=1.0)[0])},
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


# ---------------------------------------------------------------------------------------------
# case construction helpers shared by the suites
#: Display names of the methods (the report's "variant" label).
VARIANTS = {"msflow": "MS-Flow", "dflow": "D-Flow", "pnpflow": "PnP-Flow", "otode": "OT-ODE",
            "tv": "TV", "fbp": "FBP", "cgls": "CGLS"}

#: ``--quick`` overrides: tiny iteration counts, the same code path.
QUICK_OPTIONS = {
    "msflow": {"sweeps": 2},
    "dflow": {"iterations": 1, "max_iter": 2},
    "pnpflow": {"steps": 3, "draws": 1},
    "otode": {"steps": 3},
    "tv": {"iterations": 10},
    "cgls": {"iterations": 5},
}


def method_options(method: str, base: Dict[str, Any], *, quick: bool,
                   steps: Optional[int] = None) -> Dict[str, Any]:
    """The solver options of one case: ``base`` (from the config), the quick overrides, and
    the step count ``N`` for the flow-ODE methods (D-Flow ``N``; MS-Flow ``K = min(K, N)``
    segments of ``M = N/K`` steps; ``N`` must be divisible by ``K``)."""
    opts = dict(base)
    if quick:
        opts.update(QUICK_OPTIONS.get(method, {}))
    if steps is not None:
        n = int(steps)
        if method == "msflow":
            K = min(int(opts.get("K", 8)), n)
            if n % K:
                raise ValueError(f"MS-Flow: N = {n} steps is not divisible by K = {K} segments")
            opts["K"], opts["M"] = K, n // K
        elif method == "dflow":
            opts["N"] = n
        else:
            raise ValueError(f"method {method!r} takes no ODE step count N")
    return opts


def ct_problem(views: int, level: float = 0.01) -> Dict[str, Any]:
    """A parallel-beam problem with relative Gaussian noise (the CT noise convention)."""
    return {"operator": "parallel-beam", "views": int(views),
            "noise": {"model": "relative", "level": float(level)}}


def accepts_seed(method: str) -> bool:
    """Whether the solver behind ``method`` takes a ``seed`` option."""
    api = require("ctflow.solvers.api", "the solvers (ctflow.reconstruct)")
    cls = api.solver_class(method)
    defaults = getattr(cls, "DEFAULTS", None)
    if isinstance(defaults, dict):
        return "seed" in defaults
    import inspect
    return "seed" in inspect.signature(cls.__init__).parameters
