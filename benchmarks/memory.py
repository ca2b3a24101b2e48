r"""Peak memory against the number of ODE steps (the paper's Figure 1).

MS-Flow (Jacobian-free and exact block updates) and D-Flow reconstruct the same small CT
problem (64×64 image, batch 1, a parallel-beam ray transform with 30 angles, or a Gaussian
blur if the ray transform is unavailable) with a real U-Net velocity field: the bundled
``ct64`` prior where it exists, else a U-Net of the default configuration with random weights
(peak memory does not depend on the weights). For every N in {8, 16, 32, 64, 128, 256}
Euler steps:

* MS-Flow: ``K = N / M`` segments of fixed length ``M`` (default 4), one sweep (the exact
  variant with one inner iteration): each update integrates one segment, so the autograd
  graph of the exact update holds M velocity evaluations whatever N is;
* D-Flow: one L-BFGS step (``max_iter=1``); every function evaluation back-propagates
  through all N steps, so its graph grows linearly in N.

Each configuration runs in a FRESH process (this script re-invoked with ``--single``), so the
allocator state of one run never leaks into the next; peak memory is measured by
:class:`ctflow.solvers.SolveMeter` (CUDA: ``max_memory_allocated``; CPU: the resident
set high-water mark), both relative to the memory in use when the solve starts (the prior's
weights excluded). The blend initialisation is skipped (``alpha=0``, pure-noise start): it
runs without gradients and does not change the peak, only the run time.

On a CPU, D-Flow configurations whose memory, extrapolated linearly from the largest measured
N, would exceed ``--dflow-max-gib`` (default 5 GiB) are skipped and reported as such, each
child runs torch with one intra-op thread (``--threads``), and glibc's allocator gets a fixed
mmap threshold (64 KiB) and eager trimming (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``) so that the resident set follows live memory rather than heap
fragmentation (with the default allocator settings the Jacobian-free N = 256 / N = 8 ratio
read 1.11 instead of 1.07 in one measurement).

What does grow with N in MS-Flow is the trajectory itself: K + 1 states and K cached segment
flows, (2K + 1)·n floats — 2.1 MB for K = 64 at 64×64 in float32 — against the O(N) autograd
graph of D-Flow (about 30 MB per Euler step for the ``ct64`` U-Net on a CPU).

The problem is :mod:`benchmarks.ct64_problem` (shared with ``benchmarks/convergence.py``).

Outputs (in ``--out``, default :func:`benchmarks.settings.default_out`): ``memory.json`` (rows
+ metadata + acceptance checks), ``memory.md`` (table) and ``memory.png`` (memory against N,
log-x).

    python -m benchmarks.memory            # full
    python -m benchmarks.memory --quick    # N in {8, 16}
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ctflow.data import atomic_save, atomic_write_bytes, atomic_write_json
from ctflow.solvers import DFlow, MSFlow

from benchmarks.ct64_problem import IMAGE_SIZE, SEED, build_problem, load_velocity_prior
from benchmarks.settings import REPO_ROOT, default_out

STEPS = (8, 16, 32, 64, 128, 256)
QUICK_STEPS = (8, 16)
SOLVERS = ("msflow-jf", "msflow-exact", "dflow")
SEGMENT_STEPS = 4
RESULT_TAG = "MEMORY-RESULT "


def solver_options(solver: str, N: int, *, M: int = SEGMENT_STEPS) -> Dict:
    if solver == "dflow":
        return dict(N=N, iterations=1, max_iter=1, alpha=0.0, init="adjoint", seed=SEED)
    if N % M:
        raise ValueError(f"N={N} is not a multiple of the segment length M={M}")
    update = "exact" if solver == "msflow-exact" else "jacobian-free"
    return dict(K=N // M, M=M, sweeps=1, update=update, inner_iters=1, alpha=0.0,
                init="adjoint", seed=SEED, cg_iters=5)


# ---------------------------------------------------------------------------------------------
# one configuration (in a fresh process)
# ---------------------------------------------------------------------------------------------
def measure_one(solver: str, N: int, device: str, *, M: int = SEGMENT_STEPS) -> Dict:
    prior, prior_label = load_velocity_prior(device)
    A, y, x, sigma, op_label = build_problem(device)
    opts = solver_options(solver, N, M=M)
    cls = DFlow if solver == "dflow" else MSFlow
    res = cls(**opts).solve(A, y, prior, sigma)
    peak = res.peak_memory_bytes
    return {"solver": solver, "N": N, "K": opts.get("K"), "M": opts.get("M"),
            "peak_memory_bytes": peak,
            "peak_memory_mib": None if peak is None else peak / 2 ** 20,
            "seconds": res.seconds, "nfe_forward": res.nfe["forward"],
            "nfe_backward": res.nfe["backward"], "device": device,
            "residual": res.history[-1]["residual"], "prior": prior_label,
            "operator": op_label, "seed": SEED, "status": "ok",
            "torch": torch.__version__, "options": {k: v for k, v in opts.items()}}


def _child(solver: str, N: int, device: str, M: int, timeout: Optional[float],
           threads: Optional[int]) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--single", solver, "--steps", str(N),
           "--device", device, "--segment-steps", str(M)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ)
    if device == "cpu":
        # a fixed mmap threshold (which also switches off glibc's dynamic one) and eager heap
        # trimming make the resident set follow live memory rather than heap fragmentation
        env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(REPO_ROOT))
    except subprocess.TimeoutExpired:
        return {"solver": solver, "N": N, "status": f"timeout after {timeout:.0f} s",
                "peak_memory_bytes": None, "peak_memory_mib": None, "device": device}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"solver": solver, "N": N, "status": f"failed (exit {proc.returncode}): {tail}",
            "peak_memory_bytes": None, "peak_memory_mib": None, "device": device}


# ---------------------------------------------------------------------------------------------
# acceptance checks, table, plot
# ---------------------------------------------------------------------------------------------
def _peak(rows, solver, N) -> Optional[float]:
    for r in rows:
        if r["solver"] == solver and r["N"] == N and r.get("peak_memory_bytes") is not None:
            return float(r["peak_memory_bytes"])
    return None


def acceptance(rows: List[Dict]) -> Dict:
    """The issue's memory criteria, evaluated on the measured rows (``None`` if unmeasured)."""
    out: Dict = {}
    Ns = sorted({r["N"] for r in rows})
    lo, hi = (Ns[0], Ns[-1]) if Ns else (None, None)
    for s in ("msflow-jf", "msflow-exact"):
        a, b = _peak(rows, s, lo), _peak(rows, s, hi)
        out[f"{s}_ratio_N{hi}_over_N{lo}"] = None if not (a and b) else b / a
        out[f"{s}_constant_within_10pct"] = None if not (a and b) else b <= 1.1 * a
    d = [(N, _peak(rows, "dflow", N)) for N in Ns if _peak(rows, "dflow", N)]
    if len(d) >= 3:
        n_, m_ = np.array([p[0] for p in d], float), np.array([p[1] for p in d], float)
        slope, icpt = np.polyfit(n_, m_, 1)
        r2 = 1 - np.sum((m_ - (slope * n_ + icpt)) ** 2) / np.sum((m_ - m_.mean()) ** 2)
        out["dflow_linear_fit"] = {"bytes_per_step": float(slope),
                                   "intercept_bytes": float(icpt), "r2": float(r2),
                                   "points": len(d)}
        out["dflow_roughly_linear"] = bool(r2 > 0.98 and slope > 0)
    d16 = _peak(rows, "dflow", 16)
    for s in ("msflow-jf", "msflow-exact"):
        b = _peak(rows, s, hi)
        out[f"{s}_N{hi}_below_dflow_N16"] = None if not (b and d16) else b < d16
    return out


def _fmt_mib(b) -> str:
    return "—" if b is None else f"{b / 2 ** 20:.1f}"


def _solver_table(rows: List[Dict], Ns: List[int], cell) -> List[str]:
    """A markdown table, one row per solver and one column per N; ``cell(row)`` writes the
    measured row (``None`` when that configuration has no row)."""
    lines = ["| solver | " + " | ".join(f"N={N}" for N in Ns) + " |",
             "|---|" + "---|" * len(Ns)]
    for s in SOLVERS:
        cells = [cell(next((r for r in rows if r["solver"] == s and r["N"] == N), None))
                 for N in Ns]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _memory_cell(r: Optional[Dict]) -> str:
    if r is None:
        return "—"
    if r.get("peak_memory_bytes") is None:
        return f"({r.get('status', 'n/a').split(':')[0]})"
    return _fmt_mib(r["peak_memory_bytes"])


def _seconds_cell(r: Optional[Dict]) -> str:
    return "—" if r is None or r.get("seconds") is None else f"{r['seconds']:.1f}"


def write_outputs(rows: List[Dict], meta: Dict, out: Path) -> Dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    checks = acceptance(rows)
    payload = {"meta": meta, "rows": rows, "acceptance": checks}
    paths = {"json": out / "memory.json", "md": out / "memory.md", "png": out / "memory.png"}
    atomic_write_json(paths["json"], payload, default=float)
    Ns = sorted({r["N"] for r in rows})
    lines = ["# Peak memory against ODE steps (Figure 1)", "",
             f"device: {meta['device']}; prior: {meta['prior']}; operator: {meta['operator']}; "
             f"image {IMAGE_SIZE}×{IMAGE_SIZE}, batch 1, Euler steps, MS-Flow segment length "
             f"M = {meta['segment_steps']}; each configuration in a fresh process; peak memory "
             f"in MiB above the memory in use at the start of the solve ({meta['measure']}).", ""]
    lines += _solver_table(rows, Ns, _memory_cell)
    lines += ["", "Seconds per solve:", ""]
    lines += _solver_table(rows, Ns, _seconds_cell)
    lines += ["", "Acceptance checks:", ""]
    for k, v in checks.items():
        lines.append(f"- {k}: {v}")
    atomic_write_bytes(paths["md"], ("\n".join(lines) + "\n").encode("utf-8"))
    _plot(rows, meta, paths["png"])
    return paths


def _plot(rows, meta, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"msflow-jf": "MS-Flow (Jacobian-free)", "msflow-exact": "MS-Flow (exact, 1 VJP)",
              "dflow": "D-Flow"}
    for ax, logy in zip(axes, (False, True)):
        for s in SOLVERS:
            pts = sorted((r["N"], r["peak_memory_bytes"] / 2 ** 20) for r in rows
                         if r["solver"] == s and r.get("peak_memory_bytes") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=labels[s])
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xlabel("ODE steps N")
        ax.set_ylabel("peak memory (MiB)" + (", log scale" if logy else ""))
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"Peak memory vs N ({meta['device']}, {IMAGE_SIZE}×{IMAGE_SIZE}, batch 1)")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=path.suffix)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def run(quick: bool = False, out: Optional[Path] = None, device: str = "cpu", *,
        steps: Optional[Sequence[int]] = None, solvers: Sequence[str] = SOLVERS,
        segment_steps: int = SEGMENT_STEPS, dflow_max_gib: Optional[float] = None,
        timeout: Optional[float] = None, threads: Optional[int] = None,
        verbose: bool = True) -> Dict:
    """Measure every configuration in a fresh process and write table, JSON and plot.

    Args:
        quick: N in {8, 16} only.
        out: output folder (default :func:`benchmarks.settings.default_out`).
        device: ``"cpu"`` or ``"cuda"``.
        steps: override the list of N.
        dflow_max_gib: skip D-Flow runs whose linear extrapolation exceeds this (default: 5
            GiB on a CPU, no limit on CUDA).
        timeout: seconds per configuration (``None``: no limit).
        threads: torch intra-op threads in each child (default: 1 on a CPU, where several
            threads per process oversubscribe a busy machine badly; torch's default on CUDA).
            Peak memory does not depend on it.

    Returns the JSON payload (meta, rows, acceptance).
    """
    out = Path(out) if out is not None else default_out(quick)
    steps = tuple(steps) if steps else (QUICK_STEPS if quick else STEPS)
    if dflow_max_gib is None and device == "cpu":
        dflow_max_gib = 5.0
    if threads is None and device == "cpu":
        threads = 1
    rows: List[Dict] = []
    for solver in solvers:
        for N in steps:
            if solver == "dflow" and dflow_max_gib is not None:
                prev = [(r["N"], r["peak_memory_bytes"]) for r in rows
                        if r["solver"] == "dflow" and r.get("peak_memory_bytes")]
                if prev:
                    n0, b0 = max(prev)
                    projected = b0 * N / n0
                    if projected > dflow_max_gib * 2 ** 30:
                        rows.append({"solver": solver, "N": N, "status":
                                     f"skipped: projected {projected / 2 ** 30:.1f} GiB exceeds "
                                     f"the {dflow_max_gib} GiB budget on {device}",
                                     "peak_memory_bytes": None, "peak_memory_mib": None,
                                     "device": device})
                        if verbose:
                            print(f"{solver:13s} N={N:4d} {rows[-1]['status']}", flush=True)
                        continue
            t0 = time.perf_counter()
            row = _child(solver, N, device, segment_steps, timeout, threads)
            rows.append(row)
            if verbose:
                print(f"{solver:13s} N={N:4d} peak={_fmt_mib(row.get('peak_memory_bytes'))} MiB "
                      f"({time.perf_counter() - t0:.0f} s) {row.get('status', '')[:80]}",
                      flush=True)
    ok = next((r for r in rows if r.get("status") == "ok"), {})
    meta = {"benchmark": "memory", "device": device,
            "device_name": (torch.cuda.get_device_name() if device.startswith("cuda")
                            else platform.processor() or platform.machine()),
            "prior": ok.get("prior", "n/a"), "operator": ok.get("operator", "n/a"),
            "segment_steps": segment_steps, "steps": list(steps), "seed": SEED,
            "torch": torch.__version__, "python": platform.python_version(),
            "quick": quick, "dflow_max_gib": dflow_max_gib, "threads": threads,
            "measure": ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                        else "resident-set high-water mark (VmHWM), reset per solve; "
                             "MALLOC_MMAP_THRESHOLD_=65536, MALLOC_TRIM_THRESHOLD_=0"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_outputs(rows, meta, out)
    return {"meta": meta, "rows": rows, "acceptance": acceptance(rows)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="N in {8, 16} only")
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default: as python -m benchmarks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="*", help="override the N values")
    p.add_argument("--solvers", nargs="*", default=list(SOLVERS), choices=SOLVERS)
    p.add_argument("--segment-steps", type=int, default=SEGMENT_STEPS)
    p.add_argument("--dflow-max-gib", type=float, default=None)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per child process")
    p.add_argument("--single", choices=SOLVERS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.single:
        if not a.steps or len(a.steps) != 1:
            p.error("--single needs exactly one --steps value")
        if a.threads:
            torch.set_num_threads(a.threads)
        row = measure_one(a.single, a.steps[0], a.device, M=a.segment_steps)
        print(RESULT_TAG + json.dumps(row, default=float), flush=True)
        return 0
    res = run(a.quick, a.out, a.device, steps=a.steps, solvers=a.solvers,
              segment_steps=a.segment_steps, dflow_max_gib=a.dflow_max_gib, timeout=a.timeout,
              threads=a.threads)
    for k, v in res["acceptance"].items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
