r"""Convergence of the trajectory loss (the paper's Figure 3).

One MS-Flow problem, one initial trajectory (same seed; by default the states start on the
straight line from the noise state to the initial image, so the gaps start non-zero), and
several ways of minimising the stitched objective

.. math:: J(s) = \tfrac1{2\sigma^2}\|A x(s_K) - y\|^2 + \lambda R(s_0)
                + \sum_k \tfrac{\rho_k}2\|s_{k+1} - \Phi_k(s_k)\|^2 :

* ``cd-jacobian-free``: block coordinate descent (Gauss–Seidel) with the Jacobian-free update;
* ``cd-exact``: block coordinate descent with exact one-segment VJPs (proximal gradient);
* ``joint-gd``: gradient descent on all states at once (exact VJPs through every segment,
  Armijo backtracking);
* ``jacobi-jacobian-free``: the parallel-in-time sweep (all segments in one batched call);

plus, for the question whether adaptive penalties help, Jacobian-free coordinate descent under
the ``continuation`` and ``adaptive`` schedules (their trajectory losses are not comparable
with the constant-ρ runs, so the table reports them with the final PSNR and data residual).

The trajectory loss is :math:`\sum_k \tfrac12\|s_{k+1} - \Phi_k(s_k)\|^2` (without
:math:`\rho`). Outputs in ``--out`` (default :func:`benchmarks.settings.default_out`):
``convergence.json`` (per-sweep histories, metadata), ``convergence.md`` (table) and
``convergence.png`` (trajectory loss and :math:`J - J_\text{best}` against sweeps, log-y).

The prior is the bundled ``ct64`` U-Net where present (``--prior bundled``), else — or with
``--prior gaussian`` — the closed-form Gaussian flow whose mean is a smoothed phantom (fast,
every flow map affine). The problem is 64×64 parallel-beam CT with 30 angles and 1 % noise,
on the first held-out validation slice (with a trained prior) or Shepp–Logan (Gaussian prior).

    python -m benchmarks.convergence [--quick] [--device cpu] [--prior bundled|gaussian]
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

from ctflow.data import atomic_save, atomic_write_bytes, atomic_write_json

from benchmarks.ct64_problem import IMAGE_SIZE, SEED, build_problem, load_velocity_prior
from benchmarks.settings import default_out

#: variant -> MS-Flow options (added to the shared ones)
VARIANTS: Dict[str, Dict] = {
    "cd-jacobian-free": dict(update="jacobian-free"),
    "cd-exact": dict(update="exact", inner_iters=2),
    "joint-gd": dict(update="joint", joint_optimizer="gd"),
    "jacobi-jacobian-free": dict(update="jacobian-free", sweep="jacobi"),
    "cd-jf-continuation": dict(update="jacobian-free", schedule="continuation", rho_growth=1.3),
    "cd-jf-adaptive": dict(update="jacobian-free", schedule="adaptive", rho_growth=1.3,
                           adapt_factor=2.0),
}
#: the variants that share the constant-rho objective (plotted together)
CONSTANT_RHO = ("cd-jacobian-free", "cd-exact", "joint-gd", "jacobi-jacobian-free")


def gaussian_ct_prior(x, device: str):
    """A closed-form Gaussian flow prior around a smoothed version of the phantom ``x``."""
    import torch
    import torch.nn.functional as F

    from ctflow.flow import GaussianVelocity
    from ctflow.priors import FlowPrior
    k = torch.ones(1, 1, 5, 5, device=x.device) / 25.0
    smooth = F.conv2d(F.pad(x.float(), (2, 2, 2, 2), mode="replicate"), k)[0]
    mu = 2.0 * smooth - 1.0                                   # model space [-1, 1]
    sigma = torch.full_like(mu, 0.3)
    prior = FlowPrior(GaussianVelocity(mu, sigma), image_size=IMAGE_SIZE, scale=2.0,
                      shift=-1.0, name="gaussian-phantom")
    return prior, "closed-form Gaussian flow (mean: smoothed phantom, std 0.3 in model space)"


def _psnr(a, b) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * math.log10(1.0 / mse)


def run(quick: bool = False, out: Optional[Path] = None, device: str = "cpu", *,
        prior: str = "auto", K: Optional[int] = None, M: Optional[int] = None,
        sweeps: Optional[int] = None,
        rho: float = 1000.0, trajectory: str = "interpolate",
        variants: Sequence[str] = tuple(VARIANTS), threads: Optional[int] = None,
        verbose: bool = True) -> Dict:
    """Run every variant on the same problem and write JSON, table and plot.

    Args:
        quick: K = 4, M = 2 and 4 sweeps instead of K = 8, M = 4 (the solver defaults) and 15.
        out: output folder (default :func:`benchmarks.settings.default_out`).
        device: ``"cpu"`` or ``"cuda"``.
        prior: ``"bundled"`` (ct64), ``"gaussian"`` or ``"auto"`` (bundled if present).
        K, M: segments and steps per segment (Euler); ``None``: see ``quick``.
        rho: the (initial) penalty.
        trajectory: the initial states, ``"interpolate"`` (straight line from the noise state to
            the initial image: the gaps start non-zero, so the plot shows them converge) or
            ``"rollout"`` (rolled forward: the gaps start at zero and first grow as the data
            step pulls the image away).
        threads: torch intra-op threads during the run (default 1 on a CPU, restored after).

    Returns the JSON payload.
    """
    import torch
    if threads is None and device == "cpu":
        threads = 1
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        out = Path(out) if out is not None else default_out(quick)
        return _run(quick, out, device, prior=prior, K=K, M=M, sweeps=sweeps, rho=rho,
                    trajectory=trajectory, variants=variants, verbose=verbose)
    finally:
        torch.set_num_threads(before)


def _run(quick, out, device, *, prior, K, M, sweeps, rho, trajectory, variants, verbose):
    import torch

    from ctflow.solvers import MSFlow
    sweeps = sweeps if sweeps is not None else (4 if quick else 15)
    K = K if K is not None else (4 if quick else 8)
    M = M if M is not None else (2 if quick else 4)
    if prior == "gaussian":
        A, y, x, sigma, op_label = build_problem(device)
        pr, prior_label = gaussian_ct_prior(x, device)
    else:
        pr, prior_label = load_velocity_prior(device)
        if prior == "bundled" and not prior_label.startswith("bundled"):
            raise ValueError("benchmarks/convergence.py: --prior bundled but no bundled ct64 "
                             "prior is installed; use --prior gaussian")
        A, y, x, sigma, op_label = build_problem(
            device, image="validation", hu_window=pr.hu_window or (-1024.0, 1024.0))
    shared = dict(K=K, M=M, rho=rho, lam=1.0, sweeps=sweeps, alpha=1.0, init="auto",
                  seed=SEED, cg_iters=10, trajectory=trajectory)
    results: Dict[str, Dict] = {}
    for name in variants:
        t0 = time.perf_counter()
        res = MSFlow(**shared, **VARIANTS[name]).solve(A, y, pr, sigma)
        results[name] = {
            "options": {k: v for k, v in {**shared, **VARIANTS[name]}.items()},
            "history": [{k: h[k] for k in ("sweep", "trajectory_loss", "objective", "data",
                                            "prior", "residual", "rho", "gaps", "nfe_forward",
                                            "nfe_backward", "seconds")}
                        for h in res.history],
            "psnr": _psnr(res.image, x), "seconds": res.seconds, "nfe": res.nfe,
            "peak_memory_bytes": res.peak_memory_bytes,
        }
        if verbose:
            h = res.history[-1]
            print(f"{name:22s} traj={h['trajectory_loss']:.3e} J={h['objective']:.4e} "
                  f"res={h['residual']:.4f} psnr={results[name]['psnr']:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    meta = {"benchmark": "convergence", "device": device,
            "device_name": (torch.cuda.get_device_name() if device.startswith("cuda")
                            else platform.processor() or platform.machine()),
            "prior": prior_label, "operator": op_label, "noise_level": sigma, "K": K, "M": M,
            "N": K * M, "rho": rho, "sweeps": sweeps, "trajectory": trajectory, "seed": SEED,
            "quick": quick,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    payload = {"meta": meta, "variants": results, "summary": summary(results)}
    write_outputs(payload, out)
    return payload


def summary(results: Dict[str, Dict]) -> Dict:
    """Final numbers per variant, and how far each constant-rho run is from the best J."""
    best = min((r["history"][-1]["objective"] for n, r in results.items()
                if n in CONSTANT_RHO), default=None)
    out = {}
    for n, r in results.items():
        h0, h = r["history"][0], r["history"][-1]
        peak_traj = max(e["trajectory_loss"] for e in r["history"])
        out[n] = {"final_trajectory_loss": h["trajectory_loss"],
                  "max_trajectory_loss": peak_traj,
                  "final_objective": h["objective"],
                  "objective_gap_to_best": (None if best is None or n not in CONSTANT_RHO
                                            else h["objective"] - best),
                  "initial_residual": h0["residual"], "final_residual": h["residual"],
                  "psnr": r["psnr"], "seconds": r["seconds"], "nfe": r["nfe"]}
    return out


def write_outputs(payload: Dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "convergence.json", payload, default=float)
    meta, summ = payload["meta"], payload["summary"]
    lines = ["# Trajectory-loss convergence (Figure 3)", "",
             f"device: {meta['device']}; prior: {meta['prior']}; operator: {meta['operator']}; "
             f"K = {meta['K']} segments × M = {meta['M']} Euler steps, ρ = {meta['rho']} "
             f"(initial ρ for the schedules), {meta['sweeps']} sweeps, seed {meta['seed']}, "
             f"initial trajectory: {meta['trajectory']}. "
             "Trajectory loss = Σ_k ½‖s_{k+1} − Φ_k(s_k)‖².", "",
             "| variant | final trajectory loss | max trajectory loss | final J | J − J_best "
             "| residual ‖Ax−y‖/‖y‖ | PSNR (dB) | NFE fwd/bwd | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for n, s in summ.items():
        gap = "—" if s["objective_gap_to_best"] is None else f"{s['objective_gap_to_best']:.3e}"
        lines.append(f"| {n} | {s['final_trajectory_loss']:.3e} | {s['max_trajectory_loss']:.3e}"
                     f" | {s['final_objective']:.5e} | {gap} | {s['final_residual']:.4f} | "
                     f"{s['psnr']:.2f} | {s['nfe']['forward']}/{s['nfe']['backward']} | "
                     f"{s['seconds']:.1f} |")
    lines += ["", "Per-sweep trajectory loss:", "",
              "| sweep | " + " | ".join(summ) + " |", "|---|" + "---|" * len(summ)]
    hist = {n: r["history"] for n, r in payload["variants"].items()}
    for j in range(meta["sweeps"] + 1):
        cells = [f"{hist[n][j]['trajectory_loss']:.3e}" if j < len(hist[n]) else "—"
                 for n in summ]
        lines.append(f"| {j} | " + " | ".join(cells) + " |")
    atomic_write_bytes(out / "convergence.md", ("\n".join(lines) + "\n").encode("utf-8"))
    _plot(payload, out / "convergence.png")


def _plot(payload: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    variants = payload["variants"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    best = min(r["history"][-1]["objective"] for n, r in variants.items() if n in CONSTANT_RHO)
    for n, r in variants.items():
        sw = [h["sweep"] for h in r["history"]]
        tl = [max(h["trajectory_loss"], 1e-300) for h in r["history"]]
        style = "-" if n in CONSTANT_RHO else "--"
        axes[0].plot(sw[1:], tl[1:], style, marker="o", ms=3, label=n)
        if n in CONSTANT_RHO:   # points at or below the best final J have no log value
            pts = [(j, (h["objective"] - best) / abs(best)) for j, h in zip(sw, r["history"])
                   if j > 0 and h["objective"] - best > 0]
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3,
                         label=n)
    axes[0].set_ylabel("trajectory loss Σ ½‖s_{k+1} − Φ_k(s_k)‖²")
    axes[1].set_ylabel("(J − J_best) / |J_best|  (constant ρ)")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("sweep (outer iteration)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    m = payload["meta"]
    fig.suptitle(f"MS-Flow convergence (K={m['K']}, M={m['M']}, ρ={m['rho']}, {m['device']})")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=path.suffix)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default: as python -m benchmarks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--prior", choices=("auto", "bundled", "gaussian"), default="auto")
    p.add_argument("--K", type=int, default=None)
    p.add_argument("--M", type=int, default=None)
    p.add_argument("--rho", type=float, default=1000.0)
    p.add_argument("--sweeps", type=int, default=None)
    p.add_argument("--trajectory", choices=("interpolate", "rollout"), default="interpolate")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    run(a.quick, a.out, a.device, prior=a.prior, K=a.K, M=a.M, sweeps=a.sweeps, rho=a.rho,
        trajectory=a.trajectory, variants=a.variants, threads=a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
