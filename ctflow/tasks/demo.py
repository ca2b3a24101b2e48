r"""The offline demo (``ctflow demo``, ``make demo``).

Sparse-view CT on one real, held-out CT slice: the bundled prior ``ct64``, a TEST-split slice of
the bundled COVID-19-NY-SBU sample (``ctflow/data/samples/ct-heldout``, never used in training
or tuning), prepared exactly as the prior's training data (its HU window to [0, 1], 64 × 64);
parallel beam with 60 views; 1 % noise in the benchmarks' convention,

.. math:: y = A x + \sigma\varepsilon,\qquad \sigma = 0.01\,\|Ax\|_2/\sqrt m,\qquad
          \varepsilon \sim N(0, I)\ \text{(seeded)};

reconstructed by FBP, TV, D-Flow and MS-Flow with the settings in :data:`DEMO_SETTINGS` (the one
place they live). Prints a table (PSNR, SSIM, seconds, NFE, peak memory) and writes a figure:
the ground truth, the sinogram and each reconstruction with its error map and metrics.

Everything runs offline; on a machine with CUDA the default device is CUDA. A method whose
pieces are missing (the prior, a solver module) is skipped with a one-line note unless it was
asked for explicitly.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ctflow.data import heldout_files, read_dicom_slices
from ctflow.data.atomic import atomic_write_bytes
from ctflow.metrics import psnr, ssim
from ctflow.operators.noise import GaussianNoise
from ctflow.solvers import registry
from ctflow.tasks.info import resolve_device
from ctflow.tasks.problem import (make_ct_operator, resolve_prior, run_solver,
                                  simulate_measurement, slice_seed, to_working_size)

__all = ["run_demo", "DEMO_METHODS", "DEMO_SETTINGS", "QUICK_SETTINGS", "DEMO_PROBLEM",
           "DEMO_SLICE", "DATA_CITATION", "format_table"]

#: The methods of the demo, in the order of the table and the figure.
DEMO_METHODS = ("fbp", "tv", "dflow", "msflow")

#: The problem: prior, working size (= the prior's), geometry, views, noise (1 % of the RMS of
#: the clean data), seed.
DEMO_PROBLEM: Dict[str, Any] = {
    "prior": "ct64", "size": 64, "geometry": "parallel", "views": 60,
    "noise": GaussianNoise(relative=0.01), "seed": 0,
}

#: Solver options of each method (passed to ``ctflow.reconstruct``). The one place they live.
#: Chosen on the four VALIDATION slices (60 views, 1 % noise; mean PSNR): FBP ramp 33.1 dB >
#: Shepp-Logan 32.9 > cosine 31.3 > Hann 29.5; TV weight 0.07: 36.6 dB >= 0.1: 36.5 > 0.05: 36.4
#: > 0.3: 34.3; MS-Flow (N = 8 one-step segments on the power grid, interpolated initial
#: trajectory from the CGLS image, the mean of 8 independent draws, 3 sweeps): 36.6 dB (1 draw:
#: 35.9, 4 draws: 36.5; the uniform grid with a rolled-out trajectory: 35.3); D-Flow (N = 8)
#: gets 10 L-BFGS iterations, about MS-Flow's wall time (25.9 dB; 80 iterations, 12x the time:
#: 32.2 dB). The whole search is in ``benchmarks/configs/ct-sparse.json`` (tuning.result).
DEMO_SETTINGS: Dict[str, Dict[str, Any]] = {
    "fbp": {"filter": "ramp"},
    "tv": {"weight": 0.07, "iterations": 300},
    "dflow": {"N": 8, "iterations": 2, "max_iter": 5, "init": "fbp"},
    "msflow": {"K": 8, "M": 1, "sweeps": 3, "init": "cgls", "alpha": 0.0,
               "trajectory": "interpolate", "nodes": "power", "node_power": 2.0, "draws": 8},
}

#: ``--quick``: overrides that cut the iterations (a smoke test, not representative numbers).
QUICK_SETTINGS: Dict[str, Dict[str, Any]] = {
    "fbp": {},
    "tv": {"iterations": 30},
    "dflow": {"N": 2, "iterations": 1, "max_iter": 1},
    "msflow": {"K": 2, "M": 1, "sweeps": 1, "draws": 2},
}

#: The held-out slice (TEST split) shown by the demo, from ``ctflow/data/samples/ct-heldout``.
DEMO_SLICE = "A098752_19001231-32.dcm"

#: Citation of the demo slice's data set (licence CC BY 4.0).
DATA_CITATION = ("Saltz J, Saltz M, Prasanna P, Moffitt R, Hajagos J, Bremer E, Balsamo J, Kurc T "
                 "(2021). Stony Brook University COVID-19 Positive Cases [Data set]. The Cancer "
                 "Imaging Archive. https://doi.org/10.7937/TCIA.BBAG-2923 (CC BY 4.0)")


def _say(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


def _load_slice(name: str):
    """The demo slice (HU, clipped to [-1024, 3071]) and its metadata; it must be TEST split."""
    files = {f.name: f for f in heldout_files("test")}
    if name not in files:
        raise FileNotFoundError(f"demo slice {name} is not among the bundled TEST-split slices "
                                f"({', '.join(sorted(files))})")
    (sl,) = read_dicom_slices([files[name]], clip=(-1024.0, 3071.0))
    return sl


def format_table(rows: Sequence[Dict[str, Any]]) -> str:
    """The demo's result table as aligned text."""
    head = f"{'method':<9}{'PSNR [dB]':>10}{'SSIM':>8}{'seconds':>9}{'NFE (fwd+bwd)':>16}" \
           f"{'peak memory':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        nfe = r.get("nfe") or {}
        nfe_s = f"{nfe.get('forward', 0)}+{nfe.get('backward', 0)}" if nfe else "-"
        mem = r.get("peak_memory_bytes")
        mem_s = "-" if mem is None else f"{mem / 2**20:.1f} MiB"
        lines.append(f"{r['label']:<9}{r['psnr']:>10.2f}{r['ssim']:>8.3f}{r['seconds']:>9.2f}"
                     f"{nfe_s:>16}{mem_s:>13}")
    return "\n".join(lines)


def _figure(path: Path, truth: np.ndarray, sino: np.ndarray, rows: List[Dict[str, Any]],
            info_text: str) -> None:
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    m = len(rows)
    cols = 2 + m
    fig, axes = plt.subplots(2, cols, figsize=(2.35 * cols, 5.4), squeeze=False)
    fig.subplots_adjust(hspace=0.45)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].imshow(truth, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    axes[0, 0].set_title("ground truth", fontsize=9)
    axes[0, 1].imshow(sino, cmap="gray", aspect="auto")
    axes[0, 1].set_title(f"sinogram ({sino.shape[0]} views)", fontsize=9)
    axes[0, 1].set_xlabel("detector", fontsize=7)
    axes[0, 1].set_ylabel("angle", fontsize=7)
    errs = [np.abs(r["image"] - truth) for r in rows]
    # one colour scale for every error map: the median over methods of their 99.5th
    # percentiles, so that one poor method saturates instead of hiding the others' errors
    emax = max(0.02, float(np.median([np.percentile(e, 99.5) for e in errs]))) if errs else 1.0
    im = None
    for j, r in enumerate(rows):
        a = axes[0, 2 + j]
        a.imshow(r["image"], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        a.set_title(f"{r['label']}\n{r['psnr']:.2f} dB, SSIM {r['ssim']:.3f}", fontsize=9)
        b = axes[1, 2 + j]
        im = b.imshow(errs[j], cmap="inferno", vmin=0, vmax=emax)
        b.set_title(f"|error| {r['label']}", fontsize=8)
    axes[1, 0].axis("off")
    spread = next((r for r in rows if r.get("uncertainty") is not None), None)
    if spread is None:
        axes[1, 1].axis("off")
    else:   # the pixel-wise spread of the averaged draws, on the error maps' scale
        axes[1, 1].imshow(spread["uncertainty"], cmap="inferno", vmin=0, vmax=emax)
        axes[1, 1].set_title(f"{spread['label']} spread\n(std of "
                             f"{spread['options'].get('draws', '')} draws)", fontsize=8)
    axes[1, 0].text(0.0, 1.0, info_text, va="top", ha="left", fontsize=7, wrap=True,
                    transform=axes[1, 0].transAxes)
    if im is not None:  # a colour bar beside the last error map, without shrinking panels
        cax = axes[1, -1].inset_axes([1.05, 0.0, 0.06, 1.0])
        fig.colorbar(im, cax=cax)
        cax.tick_params(labelsize=7)
    fig.suptitle("ctflow demo: sparse-view CT with a flow-matching prior", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_demo(out: Any = "ctflow-demo.png", device: Any = None, quick: bool = False,
             progress: bool = True, *, seed: Optional[int] = None,
             methods: Optional[Sequence[str]] = None, verbose: bool = True) -> Dict[str, Any]:
    """Run the demo and write the figure to ``out``.

    Args:
        out: the figure (PNG) path.
        device: ``None``/``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``.
        quick: cut the iterations (:data:`QUICK_SETTINGS`; a smoke test).
        progress: tqdm bars on the iterative solvers.
        seed: noise and solver seed (default ``DEMO_PROBLEM["seed"]``).
        methods: a subset of :data:`DEMO_METHODS` (default: all; flow methods whose prior or
            solver is missing are then skipped with a note).
        verbose: print the citation, notes and the table.

    Returns:
        ``{"rows": [...], "figure": path, "slice": file name, "citation": ..., "device": ...,
        "skipped": {method: reason}, "seconds_total": ...}``; each row holds ``method``,
        ``psnr``, ``ssim``, ``seconds``, ``nfe``, ``peak_memory_bytes`` (and ``image``).
    """
    t_start = time.perf_counter()
    explicit = methods is not None
    methods = list(DEMO_METHODS if methods is None else methods)
    bad = [m for m in methods if m not in DEMO_METHODS]
    if bad:
        raise ValueError(f"unknown demo method(s) {bad}; choose from {', '.join(DEMO_METHODS)}")
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"the demo figure must be a .png file, got {out}")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    seed = DEMO_PROBLEM["seed"] if seed is None else int(seed)
    problem = dict(DEMO_PROBLEM, seed=seed)

    # The prior (needed by the flow methods; its window prepares the data for all methods).
    skipped: Dict[str, str] = {}
    prior = None
    try:
        prior = resolve_prior(problem["prior"], device=dev)
    except (ImportError, FileNotFoundError, ValueError) as exc:
        flow = [m for m in methods if registry.method(m).needs_prior]
        if explicit and flow:
            raise
        for m in flow:
            skipped[m] = f"prior {problem['prior']!r} unavailable ({exc})"
        methods = [m for m in methods if m not in flow]
    window = tuple(getattr(prior, "hu_window", None) or (-1024.0, 1024.0))
    size = int(getattr(prior, "image_size", problem["size"]))

    sl = _load_slice(DEMO_SLICE)
    noise_text = f"{100 * problem['noise'].relative:g}% noise"
    _say(verbose, f"ctflow demo on {dev}: held-out TEST slice {DEMO_SLICE} "
                  f"(patient {sl.meta.patient_id or DEMO_SLICE.split('_')[0]}), {size}x{size}, "
                  f"{problem['geometry']} beam, {problem['views']} views, {noise_text}")
    _say(verbose, f"data: {DATA_CITATION}")

    x = to_working_size(sl.hu, size, hu_window=window).to(dev).reshape(1, 1, size, size)
    A = make_ct_operator(size, problem["views"], geometry=problem["geometry"], device=dev)
    gen = torch.Generator().manual_seed(slice_seed(seed, f"demo:{DEMO_SLICE}"))
    y, sigma = simulate_measurement(A, x, problem["noise"], generator=gen)
    truth = x.reshape(size, size).cpu()

    rows: List[Dict[str, Any]] = []
    for m in methods:
        opts = dict(DEMO_SETTINGS.get(m, {}))
        if quick:
            opts.update(QUICK_SETTINGS.get(m, {}))
        try:
            res = run_solver(y, A, prior, method=m, sigma=float(sigma[0]), seed=seed,
                             progress=progress, **opts)
        except (ImportError, ModuleNotFoundError) as exc:
            if explicit:
                raise
            skipped[m] = f"solver unavailable ({exc})"
            continue
        except ValueError as exc:
            if explicit or "unavailable" not in str(exc):
                raise
            skipped[m] = str(exc)
            continue
        img = res.image.detach().to("cpu", torch.float32).reshape(size, size).clamp(0, 1)
        row = {"method": m, "label": registry.method(m).label, "psnr": float(psnr(img, truth)),
               "ssim": float(ssim(img, truth)), "seconds": float(res.seconds),
               "nfe": dict(res.nfe), "peak_memory_bytes": res.peak_memory_bytes,
               "options": opts, "image": img.numpy(),
               "uncertainty": None if res.uncertainty is None else
               res.uncertainty.detach().to("cpu", torch.float32).reshape(size, size).numpy()}
        rows.append(row)
    for m, why in skipped.items():
        _say(verbose, f"note: {registry.method(m).label} skipped: {why}")
    if not rows:
        raise RuntimeError("the demo ran no method")

    _say(verbose, "")
    _say(verbose, format_table(rows))
    info_text = (f"slice {DEMO_SLICE}\n(TEST split, never seen in training)\n"
                 f"{size}x{size}, {problem['geometry']} beam\n{problem['views']} views, "
                 f"{noise_text}\nprior {problem['prior']}, "
                 f"device {dev}\n{'QUICK settings' if quick else ''}\n\n"
                 "data: Saltz et al. 2021,\nCOVID-19-NY-SBU, TCIA\n(CC BY 4.0)")
    _figure(out, truth.numpy(), y.reshape(*y.shape[-2:]).cpu().numpy(), rows, info_text)
    total = time.perf_counter() - t_start
    _say(verbose, f"\nwrote {out} ({total:.1f} s in all)")
    return {"rows": rows, "figure": str(out), "slice": DEMO_SLICE, "citation": DATA_CITATION,
            "device": str(dev), "skipped": skipped, "seconds_total": total,
            "problem": dict(problem, noise=problem["noise"].describe()), "quick": bool(quick)}
