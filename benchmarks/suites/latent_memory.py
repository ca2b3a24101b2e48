"""The ``latent`` suite's memory part: peak memory of latent MS-Flow and latent D-Flow against
N, one configuration per fresh process (``python -m benchmarks.suites.latent --single``).

The suite and the measurement are described in :mod:`benchmarks.suites.latent`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

from ctflow.solvers import DFlow, MSFlow

from benchmarks.settings import REPO_ROOT
from benchmarks.suites.latent_problem import (IMAGE_SIZE, latent_prior, load_config,
                                              slice_image, task_measurement)

__all__ = ["RESULT_TAG", "MEMORY_SOLVERS", "MMAP_THRESHOLD", "memory_options", "measure_one",
           "run_memory", "memory_acceptance"]

RESULT_TAG = "LATENT-MEMORY "
MEMORY_SOLVERS = ("latent-msflow-jf", "latent-msflow-exact", "latent-dflow")
#: glibc mmap threshold of the CPU children: one 4×32×32 float32 latent is 16 KiB, below the
#: 64 KiB of benchmarks/memory.py, so latents would live on the heap, whose fragmentation grows
#: with the number of block updates (measured: exact MS-Flow N=128/N=8 read 1.31 at 64 KiB,
#: 1.05 at 4 KiB); at 4 KiB every tensor of a page or more is its own mapping and the
#: resident set follows live memory.
MMAP_THRESHOLD = 4096


def memory_options(solver: str, N: int, M: int, cg_iters: int) -> Dict:
    if solver == "latent-dflow":
        return dict(N=N, iterations=1, max_iter=1, alpha=0.0, init="adjoint", seed=0)
    if N % M:
        raise ValueError(f"N={N} is not a multiple of M={M}")
    return dict(K=N // M, M=M, sweeps=1, alpha=0.0, init="adjoint", seed=0, cg_iters=cg_iters,
                inner_iters=1,
                update="exact" if solver == "latent-msflow-exact" else "jacobian-free")


def _warm_up(prior, device) -> None:
    """One velocity and one decoder forward/backward pass and one L-BFGS construction outside
    the measured solve (library initialisation is charged to neither method)."""
    z = torch.randn(1, *prior.latent_shape, device=device, requires_grad=True)
    t = torch.full((1,), 0.5, device=device)
    with torch.enable_grad():
        (prior.velocity(z, t).sum() + prior.decode(z).sum()).backward()
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])


def measure_one(solver: str, N: int, device: str) -> Dict:
    cfg = load_config()["memory"]
    prior, label = latent_prior(device)
    task = {"operator": "parallel-beam", "views": cfg["views"], "noise": 0.01}
    x = slice_image(cfg["image"], IMAGE_SIZE, prior.hu_window).to(device)
    A, y, sigma = task_measurement(task, x, 0)
    opts = memory_options(solver, N, cfg["segment_steps"], cfg["cg_iters"])
    _warm_up(prior, device)
    cls = DFlow if solver == "latent-dflow" else MSFlow
    res = cls(**opts).solve(A, y, prior, sigma)
    peak = res.peak_memory_bytes
    return {"solver": solver, "N": N, "K": opts.get("K"), "M": opts.get("M"),
            "peak_memory_bytes": peak, "peak_memory_mib": None if peak is None else peak / 2 ** 20,
            "seconds": res.seconds, "nfe_forward": res.nfe["forward"],
            "nfe_backward": res.nfe["backward"], "device": device, "prior": label,
            "latent_shape": list(prior.latent_shape), "image_size": IMAGE_SIZE,
            "views": cfg["views"], "status": "ok", "torch": torch.__version__,
            "options": opts}


def _child(solver: str, N: int, device: str, timeout: Optional[float], threads: int) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.suites.latent", "--single", solver, "--steps",
           str(N), "--device", device, "--threads", str(threads)]
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    root = str(REPO_ROOT)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=root)
    except subprocess.TimeoutExpired:
        return {"solver": solver, "N": N, "status": f"timeout after {timeout:.0f} s",
                "peak_memory_bytes": None, "device": device}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"solver": solver, "N": N, "status": f"failed (exit {proc.returncode}): {tail}",
            "peak_memory_bytes": None, "device": device}


def run_memory(steps: Sequence[int], device: str, *, threads: int = 1,
               timeout: Optional[float] = None, verbose: bool = True) -> List[Dict]:
    rows = []
    for solver in MEMORY_SOLVERS:
        for N in steps:
            t0 = time.perf_counter()
            row = _child(solver, N, device, timeout, threads)
            rows.append(row)
            if verbose:
                mib = row.get("peak_memory_bytes")
                print(f"{solver:20s} N={N:4d} peak="
                      f"{'—' if mib is None else f'{mib / 2 ** 20:.1f}'} MiB "
                      f"({time.perf_counter() - t0:.0f} s) {row.get('status', '')[:80]}",
                      flush=True)
    return rows


def memory_acceptance(rows: List[Dict]) -> Dict:
    """Latent MS-Flow peak at the largest N at most 1.1× its peak at the smallest N; latent
    D-Flow's peak grows with N (strictly increasing over the measured N)."""
    out: Dict = {}
    Ns = sorted({r["N"] for r in rows})
    if not Ns:
        return out

    def peak(s, N):
        return next((float(r["peak_memory_bytes"]) for r in rows if r["solver"] == s
                     and r["N"] == N and r.get("peak_memory_bytes")), None)

    lo, hi = Ns[0], Ns[-1]
    for s in ("latent-msflow-jf", "latent-msflow-exact"):
        a, b = peak(s, lo), peak(s, hi)
        out[f"{s}_ratio_N{hi}_over_N{lo}"] = None if not (a and b) else b / a
        out[f"{s}_within_1.1x"] = None if not (a and b) else b <= 1.1 * a
    d = [peak("latent-dflow", N) for N in Ns]
    if all(v is not None for v in d) and len(d) >= 2:
        out["latent-dflow_grows_with_N"] = all(b > a for a, b in zip(d, d[1:]))
        out[f"latent-dflow_ratio_N{hi}_over_N{lo}"] = d[-1] / d[0]
    return out
