r"""Jacobi against Gauss–Seidel sweeps of MS-Flow: quality and time per sweep.

A Gauss–Seidel sweep updates the states :math:`s_0, \dots, s_{K-1}` one after another, each
seeing its neighbours' newest values: :math:`K` segment evaluations of :math:`M` steps, one
after the other. A Jacobi sweep updates every block from the previous sweep's states, so the
:math:`K` segments go through the velocity field as one batch (:math:`M` batched calls per
sweep instead of :math:`KM` calls). Whether that is faster depends on how well the hardware
uses the larger batch; Jacobi also needs damping (relaxation 0.5, see
:mod:`ctflow.solvers.msflow`), so it may need more sweeps for the same quality.

The problem is the ``ct-sparse`` one: the held-out TEST slices at 64×64, parallel beam with
60 views and 1 % noise (seeded per slice), the bundled ``ct64`` prior and the tuned MS-Flow
options of ``benchmarks/configs/ct-sparse.json`` with :math:`M = 1`, for :math:`K \in
\{4, 8, 16\}`; both sweeps run the same number of sweeps (the config's), one after the other
on each slice, so both see the same machine load. Time per sweep is
:math:`(\text{seconds after the last sweep} - \text{seconds after the initialisation}) /
\text{sweeps}` from the solver's history; the ratio GS / Jacobi > 1 means Jacobi is faster.

Outputs in ``--out``: ``jacobi.json`` (per solve), ``jacobi.md`` (table) and ``jacobi.png``.

    python -m benchmarks jacobi [--quick] [--device cpu|cuda]
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

KS = (4, 8, 16)
VIEWS = 60
NOISE = 0.01
CONFIG = Path(__file__).resolve().parent / "configs" / "ct-sparse.json"


def _options(quick: bool) -> Dict[str, Any]:
    opts = dict(json.loads(CONFIG.read_text())["methods"]["msflow"])
    opts["M"] = 1
    if quick:
        opts.update(draws=2, sweeps=2)
    return opts


def _problems(quick: bool, device: str, prior):
    from ctflow.data import heldout_files, read_dicom_slices
    from ctflow.dicom_recon import (make_ct_operator, simulate_measurement, slice_seed,
                                    to_working_size)
    files = heldout_files("test")[: 1 if quick else 10]
    size = int(prior.image_size)
    A = make_ct_operator(size, VIEWS, device=device)
    for f in files:
        (sl,) = read_dicom_slices([f], clip=(-1024.0, 3071.0))
        x = to_working_size(sl.hu, size, hu_window=tuple(prior.hu_window)).to(device)
        x = x.reshape(1, 1, size, size)
        gen = torch.Generator().manual_seed(slice_seed(0, f"ct-sparse:{f.name}"))
        y, sigma = simulate_measurement(A, x, NOISE, generator=gen)
        yield f.name, A, x, y, float(sigma[0])


def run(quick: bool = False, out: Path = Path("benchmarks/results"), device: str = "cpu", *,
        prior: str = "ct64", verbose: bool = True) -> Dict[str, Any]:
    """Run the comparison and write ``jacobi.{json,md,png}`` to ``out``."""
    from ctflow import load_prior, psnr
    from ctflow.dicom_recon import atomic_write_bytes, atomic_write_json, run_solver

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pr = load_prior(prior, device=device)
    base = _options(quick)
    ks = KS[:1] if quick else KS
    rows: List[Dict[str, Any]] = []
    for name, A, x, y, sigma in _problems(quick, device, pr):
        for K in ks:
            for sweep in ("gauss-seidel", "jacobi"):
                opts = dict(base, K=K, sweep=sweep)
                res = run_solver(y, A, pr, method="msflow", noise_level=sigma, seed=0,
                                 progress=False, **opts)
                h = res.history
                per_sweep = (h[-1]["seconds"] - h[0]["seconds"]) / max(len(h) - 1, 1)
                row = {"image": name, "K": K, "sweep": sweep,
                       "psnr": float(psnr(res.image.clamp(0, 1), x)),
                       "seconds_per_sweep": per_sweep, "seconds": res.seconds,
                       "nfe": dict(res.nfe)}
                rows.append(row)
                if verbose:
                    print(f"{name} K={K:2d} {sweep:12s} {row['psnr']:.2f} dB "
                          f"{per_sweep:.3f} s/sweep", flush=True)
    payload = {"rows": rows, "summary": summarise(rows), "options": base,
               "problem": {"views": VIEWS, "noise": NOISE, "prior": prior, "split": "test"},
               "torch_threads": torch.get_num_threads(), "device": device,
               "command": "python -m benchmarks jacobi" + (" --quick" if quick else ""),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(out / "jacobi.json", payload)
    atomic_write_bytes(out / "jacobi.md", table(payload).encode())
    atomic_write_bytes(out / "jacobi.png", _plot(payload["summary"]))
    return payload


def summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per K: mean PSNR of both sweeps, their difference, mean time per sweep and the ratio."""
    out = []
    for K in sorted({r["K"] for r in rows}):
        gs = [r for r in rows if r["K"] == K and r["sweep"] == "gauss-seidel"]
        ja = [r for r in rows if r["K"] == K and r["sweep"] == "jacobi"]
        if not gs or not ja:
            continue
        p_gs, p_ja = np.mean([r["psnr"] for r in gs]), np.mean([r["psnr"] for r in ja])
        t_gs = np.mean([r["seconds_per_sweep"] for r in gs])
        t_ja = np.mean([r["seconds_per_sweep"] for r in ja])
        out.append({"K": K, "images": len(gs), "psnr_gs": float(p_gs), "psnr_jacobi": float(p_ja),
                    "psnr_gap": float(p_gs - p_ja), "sweep_s_gs": float(t_gs),
                    "sweep_s_jacobi": float(t_ja), "speedup": float(t_gs / t_ja)})
    return out


def table(payload: Dict[str, Any]) -> str:
    lines = ["# MS-Flow: Jacobi vs Gauss-Seidel sweeps", "",
             f"`{payload['command']}`; {payload['device']}, {payload['torch_threads']} torch "
             f"thread(s); TEST slices, 64x64, {VIEWS} views, {100 * NOISE:g} % noise; options "
             f"`{json.dumps(payload['options'])}` (K varies, M = 1).", "",
             "| K | images | PSNR GS [dB] | PSNR Jacobi [dB] | GS - Jacobi [dB] | s/sweep GS "
             "| s/sweep Jacobi | speed-up (GS/Jacobi) |",
             "|---|---|---|---|---|---|---|---|"]
    for s in payload["summary"]:
        lines.append(f"| {s['K']} | {s['images']} | {s['psnr_gs']:.2f} | {s['psnr_jacobi']:.2f} "
                     f"| {s['psnr_gap']:+.2f} | {s['sweep_s_gs']:.3f} | {s['sweep_s_jacobi']:.3f} "
                     f"| {s['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def _plot(summary: List[Dict[str, Any]]) -> bytes:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3.2))
    K = [s["K"] for s in summary]
    a.plot(K, [s["sweep_s_gs"] for s in summary], "o-", label="Gauss-Seidel")
    a.plot(K, [s["sweep_s_jacobi"] for s in summary], "s-", label="Jacobi")
    a.set_xlabel("segments K")
    a.set_ylabel("seconds per sweep")
    a.set_xscale("log", base=2)
    a.legend()
    b.plot(K, [s["psnr_gs"] for s in summary], "o-", label="Gauss-Seidel")
    b.plot(K, [s["psnr_jacobi"] for s in summary], "s-", label="Jacobi")
    b.set_xlabel("segments K")
    b.set_ylabel("mean PSNR [dB]")
    b.set_xscale("log", base=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def main(argv: Optional[list] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    a = p.parse_args(argv)
    run(a.quick, Path(a.out), a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
