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
on each slice, so both see the same machine load. Jacobi runs undamped (``relaxation`` 1),
chosen on the 4 VALIDATION slices from {0.5, 0.7, 1} by the worst gap to Gauss–Seidel over K
(mean PSNR GS / Jacobi 0.5 / Jacobi 1 at K = 4: 35.18 / 36.22 / 35.55, K = 8: 36.69 / 36.63 /
36.81, K = 16: 36.25 / 35.62 / 35.81; 0.7 at K = 16: 35.71): at 3 sweeps the alternating
mode that damping guards against has no time to grow (see :mod:`ctflow.solvers.msflow`).
``max_batch`` is the solver default (``"auto"``: chunks of
:data:`ctflow.solvers.msflow.CPU_MAX_BATCH` images on a CPU, one call on a GPU); the run
also times one velocity call per image at batch 8 ... 128, the hardware fact behind both.
Time per sweep is
:math:`(\text{seconds after the last sweep} - \text{seconds after the initialisation}) /
\text{sweeps}` from the solver's history; the ratio GS / Jacobi > 1 means Jacobi is faster.

Outputs in ``--out`` (default :func:`benchmarks.settings.default_out`): ``jacobi.json`` (per
solve), ``jacobi.md`` (table) and ``jacobi.png``.

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

from ctflow.data import atomic_write_bytes, atomic_write_json, heldout_files, read_dicom_slices
from ctflow.metrics import psnr
from ctflow.operators.noise import GaussianNoise
from ctflow.priors import load_prior
from ctflow.solvers import reconstruct
from ctflow.tasks import make_ct_operator, simulate_measurement, slice_seed, to_working_size

from benchmarks.settings import default_out, load_config

KS = (4, 8, 16)
BATCHES = (8, 16, 32, 64, 128)
DRAWS = (8, 1)          # the tuned setting, and the solver default (one trajectory)
JACOBI_RELAXATION = 1.0
VIEWS = 60
NOISE = 0.01           # relative: sigma = NOISE * RMS(A x)


def _options(quick: bool) -> Dict[str, Any]:
    opts = dict(load_config("ct-sparse")["methods"]["msflow"])
    opts["M"] = 1
    if quick:
        opts.update(sweeps=2)
    return opts


def _problems(quick: bool, device: str, prior):
    files = heldout_files("test")[: 1 if quick else 10]
    size = int(prior.image_size)
    A = make_ct_operator(size, VIEWS, device=device)
    for f in files:
        (sl,) = read_dicom_slices([f], clip=(-1024.0, 3071.0))
        x = to_working_size(sl.hu, size, hu_window=tuple(prior.hu_window)).to(device)
        x = x.reshape(1, 1, size, size)
        gen = torch.Generator().manual_seed(slice_seed(0, f"ct-sparse:{f.name}"))
        y, sigma = simulate_measurement(A, x, GaussianNoise(relative=NOISE), generator=gen)
        yield f.name, A, x, y, float(sigma[0])


def run(quick: bool = False, out: Optional[Path] = None, device: str = "cpu", *,
        prior: str = "ct64", verbose: bool = True) -> Dict[str, Any]:
    """Run the comparison and write ``jacobi.{json,md,png}`` to ``out`` (default
    :func:`benchmarks.settings.default_out`)."""
    out = Path(out) if out is not None else default_out(quick)
    out.mkdir(parents=True, exist_ok=True)
    pr = load_prior(prior, device=device)
    base = _options(quick)
    ks = KS[:1] if quick else KS
    rows: List[Dict[str, Any]] = []
    for name, A, x, y, sigma in _problems(quick, device, pr):
        for draws, K in [(d, K) for d in ((2,) if quick else DRAWS) for K in ks]:
            for sweep in ("gauss-seidel", "jacobi"):
                opts = dict(base, K=K, sweep=sweep, draws=draws)
                if sweep == "jacobi":
                    opts["relaxation"] = JACOBI_RELAXATION
                res = reconstruct(y, A, pr, method="msflow", sigma=sigma, seed=0,
                                  progress=False, **opts)
                h = res.history
                per_sweep = (h[-1]["seconds"] - h[0]["seconds"]) / max(len(h) - 1, 1)
                row = {"image": name, "K": K, "draws": draws, "sweep": sweep,
                       "psnr": float(psnr(res.image.clamp(0, 1), x)),
                       "seconds_per_sweep": per_sweep, "seconds": res.seconds,
                       "nfe": dict(res.nfe)}
                rows.append(row)
                if verbose:
                    print(f"{name} draws={draws} K={K:2d} {sweep:12s} {row['psnr']:.2f} dB "
                          f"{per_sweep:.3f} s/sweep", flush=True)
    payload = {"rows": rows, "summary": summarise(rows), "options": base,
               "jacobi_relaxation": JACOBI_RELAXATION,
               "batch_cost": batch_cost(pr, device, BATCHES[:2] if quick else BATCHES),
               "problem": {"views": VIEWS, "noise": NOISE, "prior": prior, "split": "test"},
               "torch_threads": torch.get_num_threads(), "device": device,
               "command": "python -m benchmarks jacobi" + (" --quick" if quick else ""),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    atomic_write_json(out / "jacobi.json", payload)
    atomic_write_bytes(out / "jacobi.md", table(payload).encode())
    atomic_write_bytes(out / "jacobi.png", _plot(payload["summary"]))
    return payload


def batch_cost(prior, device: str, batches) -> List[Dict[str, Any]]:
    """Milliseconds per image of one velocity call at each batch size (best of 3 repeats of
    about 128 images each, random inputs, after a warm-up call)."""
    v = prior.velocity
    gen = torch.Generator().manual_seed(0)
    out = []
    with torch.no_grad():
        for b in batches:
            x = torch.randn(b, *prior.shape, generator=gen).to(device)
            t = torch.rand(b, generator=gen).to(device)
            v(x, t)
            reps = max(1, 128 // b)
            best = float("inf")
            for _ in range(3):
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                for _ in range(reps):
                    v(x, t)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                best = min(best, (time.perf_counter() - t0) / (reps * b))
            out.append({"batch": b, "ms_per_image": 1e3 * best})
    return out


def summarise(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (draws, K): mean PSNR of both sweeps, their difference, mean time per sweep and the
    ratio."""
    out = []
    for d, K in sorted({(r["draws"], r["K"]) for r in rows}, key=lambda dk: (-dk[0], dk[1])):
        sel = [r for r in rows if r["K"] == K and r["draws"] == d]
        gs = [r for r in sel if r["sweep"] == "gauss-seidel"]
        ja = [r for r in sel if r["sweep"] == "jacobi"]
        if not gs or not ja:
            continue
        p_gs, p_ja = np.mean([r["psnr"] for r in gs]), np.mean([r["psnr"] for r in ja])
        t_gs = np.mean([r["seconds_per_sweep"] for r in gs])
        t_ja = np.mean([r["seconds_per_sweep"] for r in ja])
        out.append({"draws": d, "K": K, "images": len(gs), "psnr_gs": float(p_gs),
                    "psnr_jacobi": float(p_ja), "psnr_gap": float(p_gs - p_ja),
                    "sweep_s_gs": float(t_gs), "sweep_s_jacobi": float(t_ja),
                    "speedup": float(t_gs / t_ja)})
    return out


def table(payload: Dict[str, Any]) -> str:
    lines = ["# MS-Flow: Jacobi vs Gauss-Seidel sweeps", "",
             f"`{payload['command']}`; {payload['device']}, {payload['torch_threads']} torch "
             f"thread(s); TEST slices, 64x64, {VIEWS} views, {100 * NOISE:g} % noise; options "
             f"`{json.dumps(payload['options'])}` (K and draws vary, M = 1; Jacobi relaxation "
             f"{payload['jacobi_relaxation']:g}, max_batch auto).", "",
             "| draws | K | images | PSNR GS [dB] | PSNR Jacobi [dB] | GS - Jacobi [dB] "
             "| s/sweep GS | s/sweep Jacobi | speed-up (GS/Jacobi) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in payload["summary"]:
        lines.append(f"| {s['draws']} | {s['K']} | {s['images']} | {s['psnr_gs']:.2f} "
                     f"| {s['psnr_jacobi']:.2f} | {s['psnr_gap']:+.2f} | {s['sweep_s_gs']:.3f} "
                     f"| {s['sweep_s_jacobi']:.3f} | {s['speedup']:.2f}x |")
    if payload.get("batch_cost"):
        lines += ["", "One velocity call, milliseconds per image (best of 3):", "",
                  "| batch | " + " | ".join(str(c["batch"]) for c in payload["batch_cost"]) + " |",
                  "|---|" + "---|" * len(payload["batch_cost"]),
                  "| ms/image | " + " | ".join(f"{c['ms_per_image']:.1f}"
                                               for c in payload["batch_cost"]) + " |"]
    return "\n".join(lines) + "\n"


def _plot(summary: List[Dict[str, Any]]) -> bytes:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8.5, 3.4))
    all_draws = sorted({s["draws"] for s in summary}, reverse=True)
    for draws in all_draws:
        sel = [s for s in summary if s["draws"] == draws]
        K = [s["K"] for s in sel]
        line = "-" if draws == all_draws[0] else "--"
        for ax, key, unit in ((axes[0], "sweep_s", "seconds per sweep"),
                              (axes[1], "psnr", "mean PSNR [dB]")):
            ax.plot(K, [s[f"{key}_gs"] for s in sel], "o" + line, color="C0",
                    label=f"Gauss-Seidel, {draws} draw(s)")
            ax.plot(K, [s[f"{key}_jacobi"] for s in sel], "s" + line, color="C1",
                    label=f"Jacobi, {draws} draw(s)")
            ax.set_xlabel("segments K")
            ax.set_ylabel(unit)
            ax.set_xscale("log", base=2)
    axes[0].legend(fontsize=7)
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
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default: as python -m benchmarks)")
    a = p.parse_args(argv)
    run(a.quick, a.out, a.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
