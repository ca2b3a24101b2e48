r"""``ablation`` (the paper's Figure 2, left): what each part of MS-Flow contributes.

On 30-view parallel-beam CT with 1 % relative noise and the 10 TEST slices, starting from the
tuned MS-Flow options of ``configs/ct-sparse.json`` at ``N = steps`` ODE steps (16 in the
committed config), one
factor changes at a time (``configs/ablation.json``):

* ``lambda``: the radial prior on :math:`s_0` on (the tuned :math:`\lambda`) or off
  (:math:`\lambda = 0`);
* ``rho``: the stitching penalty :math:`\rho` over a grid (constant schedule);
* ``K``: the number of segments (``M = N/K`` steps each);
* ``schedule``: constant, continuation (:math:`\rho` grows by ``rho_growth`` per sweep) and
  adaptive (gap equidistribution); these rows store the trajectory loss per sweep;
* ``sweep`` (when the config lists it; the committed one does not, the ``jacobi`` suite
  measures it across K): Jacobi (all K segments in one batched velocity call) against
  Gauss-Seidel for :math:`K \ge 4`; the report shows the time per sweep (excluding
  initialisation) and PSNR.

Cases that coincide (e.g. the base configuration appears under several factors) run once;
the row lists the other factors under ``labels["also"]`` and the report counts it in each.
``--quick``: one slice, N = 8, two values per numeric factor, K = 4 for the sweep comparison.
"""
from __future__ import annotations

from typing import Any, Dict, List

from benchmarks.cases import Case
from benchmarks.suites.options import label, method_options
from benchmarks.suites.problems import ct_problem, image_ids

SUITE = "ablation"
NOISE_LEVEL = 0.01
N_TEST_IMAGES = 10
QUICK_IMAGES = 1
QUICK_STEPS = 8


def _factor_cases(ctx, base: Dict[str, Any], factors: Dict[str, Any], n: int
                  ) -> List[tuple]:
    """``(labels, options)`` for every factor value."""
    out = []
    lam = float(base.get("lam", 1.0))
    for value in factors.get("lambda", []):
        if value not in ("on", "off"):
            raise ValueError(f"ablation: lambda values must be 'on' or 'off', got {value!r}")
        o = dict(base, lam=(lam if lam > 0 else 1.0) if value == "on" else 0.0)
        out.append(({"factor": "lambda", "value": value}, o))
    for value in factors.get("rho", []):
        out.append(({"factor": "rho", "value": float(value)},
                    dict(base, rho=float(value), schedule="constant")))
    for value in factors.get("K", []):
        k = int(value)
        if k > n or n % k:
            continue
        out.append(({"factor": "K", "value": k}, dict(base, K=k, M=n // k)))
    for value in factors.get("schedule", []):
        out.append(({"factor": "schedule", "value": str(value)}, dict(base, schedule=value)))
    sw = factors.get("sweep", {})
    for k in sw.get("K", []):
        k = int(k)
        if k > n or n % k:
            continue
        for kind in sw.get("sweep", []):
            out.append(({"factor": "sweep", "value": str(kind), "K": k},
                        dict(base, K=k, M=n // k, sweep=kind)))
    return out


def _quick_factors(factors: Dict[str, Any]) -> Dict[str, Any]:
    q = dict(factors)
    q["rho"] = list(factors.get("rho", []))[1:3]
    q["K"] = [k for k in factors.get("K", []) if k in (2, 4)]
    sw = factors.get("sweep", {})
    q["sweep"] = {"K": [4], "sweep": list(sw.get("sweep", []))}
    return q


def cases(ctx) -> List[Case]:
    cfg = ctx.config()
    base_cfg = ctx.config("ct-sparse")["methods"]["msflow"]
    n = QUICK_STEPS if ctx.quick else int(cfg.get("steps", 32))
    base = method_options("msflow", base_cfg, quick=ctx.quick, steps=n)
    factors = _quick_factors(cfg["factors"]) if ctx.quick else cfg["factors"]
    problem = ct_problem(int(cfg.get("views", 30)), NOISE_LEVEL)
    images = image_ids("test", QUICK_IMAGES if ctx.quick else N_TEST_IMAGES)
    by_id: Dict[str, Case] = {}
    for labels, opts in _factor_cases(ctx, base, factors, n):
        labels = dict(labels, variant=label("msflow"), N=n)
        for img in images:
            c = Case(SUITE, "msflow", opts, problem, img, ctx.seed, ctx.prior_name,
                     labels=labels, trace=labels["factor"] == "schedule")
            if c.id in by_id:
                first = by_id[c.id]
                also = list(first.labels.get("also", [])) + [
                    {k: v for k, v in labels.items() if k in ("factor", "value", "K")}]
                by_id[c.id] = Case(first.suite, first.method, first.options, first.problem,
                                   first.image, first.seed, first.prior,
                                   labels=dict(first.labels, also=also),
                                   trace=first.trace or c.trace)
            else:
                by_id[c.id] = c
    return list(by_id.values())


def tuning_spec(ctx) -> Dict[str, Any]:
    raise ValueError("ablation has nothing to tune: it varies MS-Flow around the options tuned "
                     "for ct-sparse (python -m benchmarks tune ct-sparse)")
