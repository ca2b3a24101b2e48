r"""``restoration`` (the paper's Figures 4 and 5): image restoration on held-out CT slices.

Tasks on the prior's 64 x 64 images in ``[0, 1]``, each with absolute Gaussian noise
:math:`\sigma \in \{0.01, 0.05\}` on the ``[0, 1]`` scale:

==================  =====================================================================
task                operator
==================  =====================================================================
``deblur``          Gaussian blur, :math:`\sigma_\text{blur} = 1.5` px, circular boundary
``inpaint-box``     a centred 24 x 24 missing box
``inpaint-random``  70 % of the pixels missing, uniformly at random (mask seed 0)
``sr-x2``           2 x 2 average pooling (64 -> 32)
``sr-x4``           4 x 4 average pooling (64 -> 16)
==================  =====================================================================

MS-Flow, D-Flow (both at ``N = steps`` of the config), PnP-Flow and TV (the start image of
both flow methods, ``init="tv"``) on the 10 TEST slices.
Options from ``benchmarks/configs/restoration.json`` (tuned on VALIDATION by
``python -m benchmarks tune restoration``). ``--quick``: one slice, deblur and box
inpainting at :math:`\sigma = 0.05`, N = 8, tiny iteration counts.
"""
from __future__ import annotations

from typing import Any, Dict, List

from benchmarks.cases import Case
from benchmarks.suites.options import label, method_options, run_order, takes_steps
from benchmarks.suites.problems import image_ids

SUITE = "restoration"
TASKS: Dict[str, Dict[str, Any]] = {
    "deblur": {"operator": "blur", "sigma": 1.5},
    "inpaint-box": {"operator": "inpaint", "kind": "box", "box_size": 24},
    "inpaint-random": {"operator": "inpaint", "kind": "random", "fraction": 0.7,
                       "mask_seed": 0},
    "sr-x2": {"operator": "superres", "factor": 2, "mode": "average"},
    "sr-x4": {"operator": "superres", "factor": 4, "mode": "average"},
}
NOISE_LEVELS = (0.01, 0.05)
N_TEST_IMAGES = 10

QUICK_TASKS = ("deblur", "inpaint-box")
QUICK_NOISE = (0.05,)
QUICK_IMAGES = 1
QUICK_STEPS = 8


def problem(task: str, noise: float) -> Dict[str, Any]:
    """The problem dict of ``task`` with absolute noise ``noise``."""
    if task not in TASKS:
        raise ValueError(f"unknown restoration task {task!r}; tasks: {', '.join(TASKS)}")
    return dict(TASKS[task], noise={"model": "absolute", "level": float(noise)})


def _steps(ctx) -> int:
    return QUICK_STEPS if ctx.quick else int(ctx.config().get("steps", 32))


def cases(ctx) -> List[Case]:
    cfg = ctx.config()["methods"]
    tasks = QUICK_TASKS if ctx.quick else tuple(TASKS)
    noises = QUICK_NOISE if ctx.quick else NOISE_LEVELS
    images = image_ids("test", QUICK_IMAGES if ctx.quick else N_TEST_IMAGES)
    n = _steps(ctx)
    out: List[Case] = []
    for nz in noises:
        for task in tasks:
            prob = problem(task, nz)
            for method in run_order(cfg):
                opts = method_options(method, cfg[method], quick=ctx.quick,
                                      steps=n if takes_steps(method) else None)
                for img in images:
                    out.append(Case(SUITE, method, opts, prob, img, ctx.seed, ctx.prior_name,
                                    labels={"task": task, "noise": nz,
                                            "variant": label(method)}))
    return out


def tuning_spec(ctx) -> Dict[str, Any]:
    cfg = ctx.config()
    tcfg = cfg["tuning"]
    n = _steps(ctx)
    methods = {m: {"method": m,
                   "base": method_options(m, cfg["methods"][m], quick=ctx.quick,
                                          steps=n if takes_steps(m) else None),
                   "grid": grid}
               for m, grid in tcfg["grid"].items()}
    problems = [problem(p["task"], p["noise"]) for p in tcfg["problems"]]

    def labels(p):
        for q, t in zip(problems, tcfg["problems"]):
            if q == p:
                return {"task": t["task"], "noise": t["noise"]}
        return {}

    return {"methods": methods, "problems": problems, "labels": labels}
