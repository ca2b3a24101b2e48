"""The report's figures (matplotlib, written atomically): PSNR/SSIM and cost against N
(``ct-sparse``), the ablation factors and sweeps, and the restoration bars."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Sequence

from ctflow.data import atomic_save

from benchmarks.aggregate import aggregate, sort_key

__all__ = ["PLOTS"]

def _plt():
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:                      # plain tick labels, no "+1.09e1" offsets
        try:
            ax.ticklabel_format(axis="y", style="plain", useOffset=False)
        except AttributeError:               # log axes have no scalar formatter
            pass
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=path.suffix)
    _plt().close(fig)
    return path


def _variants(recs: Iterable[dict]) -> List[str]:
    return sorted({r["variant"] for r in recs if r.get("variant") is not None}, key=sort_key)


_COLOURS = {"MS-Flow": "C0", "D-Flow": "C3", "PnP-Flow": "C2", "OT-ODE": "C4", "TV": "C1",
            "FBP": "C7", "CGLS": "C5", "MS-Flow (exact)": "C9", "MS-Flow (Jacobi)": "C6"}


def _plot_ct_sparse(rows: Sequence[dict], out: Path, stem: str) -> List[Path]:
    plt = _plt()
    recs = aggregate(rows, ["views", "variant", "N"])
    views = sorted({r["views"] for r in recs if r["views"] is not None})
    if not views:
        return []
    written = []
    for measures, name in (((("psnr", "PSNR (dB)"), ("ssim", "SSIM")), "quality"),
                           ((("peak_mb", "peak memory (MB)"), ("seconds", "wall time (s)")),
                            "cost")):
        fig, axes = plt.subplots(len(measures), len(views), figsize=(5 * len(views), 7),
                                 squeeze=False)
        for j, v in enumerate(views):
            sub = [r for r in recs if r["views"] == v]
            for i, (m, ylabel) in enumerate(measures):
                ax = axes[i][j]
                for var in _variants(sub):
                    pts = sorted((r for r in sub if r["variant"] == var and r["N"] is not None),
                                 key=lambda r: r["N"])
                    c = _COLOURS.get(var)
                    if pts:
                        ax.errorbar([r["N"] for r in pts], [r[m + "_mean"] for r in pts],
                                    yerr=[r[m + "_std"] for r in pts], marker="o", capsize=3,
                                    label=var, color=c)
                    else:
                        flat = [r for r in sub if r["variant"] == var]
                        if flat and math.isfinite(flat[0][m + "_mean"]) and m in ("psnr", "ssim"):
                            ax.axhline(flat[0][m + "_mean"], ls="--", lw=1, color=c, label=var)
                ax.set_xscale("log", base=2)
                ns = sorted({r["N"] for r in sub if r["N"] is not None})
                if ns:
                    ax.set_xticks(ns)
                    ax.get_xaxis().set_major_formatter(_int_formatter())
                ax.set_xlabel("ODE steps N")
                ax.set_ylabel(ylabel)
                ax.set_title(f"{v} views: {ylabel.split(' (')[0]}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=8)
        written.append(_save(fig, out / f"{stem}_{name}.png"))
    return written


def _plot_ablation(rows: Sequence[dict], out: Path, stem: str) -> List[Path]:
    plt = _plt()
    written = []
    factors = sorted({(r.get("labels") or {}).get("factor") for r in rows} - {None, "sweep"})
    if factors:
        fig, axes = plt.subplots(1, len(factors), figsize=(4.2 * len(factors), 3.8),
                                 squeeze=False)
        for ax, f in zip(axes[0], factors):
            recs = aggregate([r for r in rows if r["labels"].get("factor") == f], ["value"])
            vals = [r["value"] for r in recs]
            numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)
            y = [r["psnr_mean"] for r in recs]
            e = [r["psnr_std"] for r in recs]
            if numeric:
                ax.errorbar(vals, y, yerr=e, marker="o", capsize=3)
                if f == "rho" and min(vals) > 0:
                    ax.set_xscale("log")
                if f == "K":
                    ax.set_xscale("log", base=2)
                    ax.set_xticks(vals)
                    ax.get_xaxis().set_major_formatter(_int_formatter())
            else:
                ax.bar([str(v) for v in vals], y, yerr=e, capsize=3, color="C0")
                lo = min(v - s for v, s in zip(y, e)) if y else 0
                ax.set_ylim(bottom=max(0.0, lo - 1.0))
            ax.set_title(f"MS-Flow: {f}")
            ax.set_xlabel(f)
            ax.set_ylabel("PSNR (dB)")
            ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"{stem}_factors.png"))

    sweep = [r for r in rows if (r.get("labels") or {}).get("factor") == "sweep"]
    traced = [r for r in rows if (r.get("labels") or {}).get("factor") == "schedule"
              and _trajectory_loss(r)]
    if sweep or traced:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
        ax = axes[0][0]
        if sweep:
            recs = aggregate(sweep, ["value", "K"])
            for var in sorted({r["value"] for r in recs}, key=str):
                pts = sorted((r for r in recs if r["value"] == var), key=lambda r: r["K"])
                ax.errorbar([r["K"] for r in pts], [r["sec_per_iter_mean"] for r in pts],
                            yerr=[r["sec_per_iter_std"] for r in pts], marker="o", capsize=3,
                            label=str(var))
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({r["K"] for r in recs}))
            ax.get_xaxis().set_major_formatter(_int_formatter())
            ax.set_xlabel("segments K")
            ax.set_ylabel("seconds per sweep")
            ax.set_title("Jacobi vs Gauss-Seidel")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        ax = axes[0][1]
        if traced:
            by: Dict[str, List[List[float]]] = defaultdict(list)
            for r in traced:
                by[str(r["labels"].get("value"))].append(_trajectory_loss(r))
            for name in sorted(by):
                curves = by[name]
                n = min(len(c) for c in curves)
                if n < 2:
                    continue
                # entry 0 is the initial (gap-free) trajectory: plot sweeps 1 .. n-1
                mean = [sum(c[i] for c in curves) / len(curves) for i in range(1, n)]
                ax.plot(range(1, n), mean, marker=".", label=f"{name} (n={len(curves)})")
            if any(v > 0 for line in ax.get_lines() for v in line.get_ydata()):
                ax.set_yscale("log")
            from matplotlib.ticker import MaxNLocator
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("sweep")
            ax.set_ylabel("trajectory loss  Σₖ ½‖sₖ₊₁ − Φₖ(sₖ)‖²")
            ax.set_title("MS-Flow trajectory loss vs sweeps, by ρ schedule")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        written.append(_save(fig, out / f"{stem}_sweeps.png"))
    return written


def _trajectory_loss(r: dict) -> List[float]:
    t = r.get("trace") or {}
    return list(t.get("trajectory_loss") or t.get("gap") or [])


def _int_formatter():
    from matplotlib.ticker import FuncFormatter
    return FuncFormatter(lambda v, _: f"{int(round(v))}")


def _plot_restoration(rows: Sequence[dict], out: Path, stem: str) -> List[Path]:
    plt = _plt()
    recs = aggregate(rows, ["noise", "task", "variant"])
    noises = sorted({r["noise"] for r in recs if r["noise"] is not None})
    if not noises:
        return []
    fig, axes = plt.subplots(1, len(noises), figsize=(6.5 * len(noises), 4), squeeze=False)
    for ax, nz in zip(axes[0], noises):
        sub = [r for r in recs if r["noise"] == nz]
        tasks = sorted({r["task"] for r in sub}, key=str)
        variants = _variants(sub)
        width = 0.8 / max(1, len(variants))
        for i, var in enumerate(variants):
            xs, ys, es = [], [], []
            for t, task in enumerate(tasks):
                hit = [r for r in sub if r["task"] == task and r["variant"] == var]
                if hit:
                    xs.append(t + (i - (len(variants) - 1) / 2) * width)
                    ys.append(hit[0]["psnr_mean"])
                    es.append(hit[0]["psnr_std"])
            ax.bar(xs, ys, width, yerr=es, capsize=2, label=var, color=_COLOURS.get(var))
        ax.set_xticks(range(len(tasks)))
        ax.set_xticklabels(tasks, rotation=20)
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"restoration, noise σ = {nz}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return [_save(fig, out / f"{stem}.png")]


#: The figures of each case suite: ``suite -> plot(rows, out, stem) -> [paths]``.
PLOTS = {"ct-sparse": _plot_ct_sparse, "ablation": _plot_ablation,
          "restoration": _plot_restoration}
