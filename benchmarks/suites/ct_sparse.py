r"""``ct-sparse`` (the paper's Figure 2, right): sparse-view CT on held-out slices.

Parallel beam with 30 and 60 views over :math:`[0, \pi)`, 1 % relative Gaussian noise
(:math:`\sigma = 0.01\,\|Ax\|_2/\sqrt m`), the 10 TEST slices at the prior's 64 x 64:

* MS-Flow (Jacobian-free, Gauss-Seidel) and D-Flow at every temporal resolution
  :math:`N \in \{8, 16, 32, 64, 128\}` (MS-Flow: :math:`K = \min(K, N)` segments of
  :math:`M = N/K` steps);
* FBP, TV, PnP-Flow and OT-ODE once per view count.

Options come from ``benchmarks/configs/ct-sparse.json`` (tuned on the VALIDATION split by
``python -m benchmarks tune ct-sparse``). ``--quick``: one slice, 30 views, N in {8, 16},
tiny iteration counts.
"""
from __future__ import annotations

from typing import Any, Dict, List

from benchmarks.cases import Case
from benchmarks.suites.options import label, method_options, run_order, takes_steps
from benchmarks.suites.problems import ct_problem, image_ids

SUITE = "ct-sparse"
VIEWS = (30, 60)
STEPS = (8, 16, 32, 64, 128)
NOISE_LEVEL = 0.01
N_TEST_IMAGES = 10

QUICK_VIEWS = (30,)
QUICK_STEPS = (8, 16)
QUICK_IMAGES = 1


def cases(ctx) -> List[Case]:
    """Every case of the suite (quick or full), in run order (cheap methods first): the
    methods of the config (``methods``), those that take a step count ``N``
    (:func:`~benchmarks.suites.options.takes_steps`) at every N, the others once."""
    cfg = ctx.config()["methods"]
    methods = run_order(cfg)
    baselines = [m for m in methods if not takes_steps(m)]
    flows = [m for m in methods if takes_steps(m)]
    views = QUICK_VIEWS if ctx.quick else VIEWS
    steps = QUICK_STEPS if ctx.quick else STEPS
    images = image_ids("test", QUICK_IMAGES if ctx.quick else N_TEST_IMAGES)
    out: List[Case] = []
    problems = {v: ct_problem(v, NOISE_LEVEL) for v in views}
    for v in views:                       # the baselines first (cheap), both view counts
        for method in baselines:
            opts = method_options(method, cfg[method], quick=ctx.quick)
            for img in images:
                out.append(Case(SUITE, method, opts, problems[v], img, ctx.seed,
                                ctx.prior_name,
                                labels={"views": v, "variant": label(method), "N": None}))
    for n in steps:                       # then the flow methods by growing N
        for v in views:
            for method in flows:
                opts = method_options(method, cfg[method], quick=ctx.quick, steps=n)
                for img in images:
                    out.append(Case(SUITE, method, opts, problems[v], img, ctx.seed,
                                    ctx.prior_name,
                                    labels={"views": v, "variant": label(method), "N": n},
                                    trace=(method == "msflow")))
    return out


def tuning_spec(ctx) -> Dict[str, Any]:
    """What ``tune`` searches: per method the base options and the grid, on the validation
    problems of the config (flow methods at the reference N)."""
    cfg = ctx.config()
    tcfg = cfg["tuning"]
    ref = int(tcfg.get("reference_steps", 32))
    methods = {}
    for m, grid in tcfg["grid"].items():
        steps = ref if takes_steps(m) else None
        if ctx.quick and steps is not None:
            steps = QUICK_STEPS[0]
        methods[m] = {"method": m, "base": method_options(m, cfg["methods"][m], quick=ctx.quick,
                                                          steps=steps),
                      "grid": grid}
    problems = [dict(p) for p in tcfg["problems"]]
    return {"methods": methods, "problems": problems,
            "labels": lambda p: {"views": p["views"]}}
