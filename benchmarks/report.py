r"""Tables and figures from the JSON lines alone.

:func:`render` reads ``<out>/<suite>.jsonl`` (and ``tune-<suite>.jsonl``) for the case suites,
keeps the rows with ``status == "ok"`` (first row per case id), groups them by their ``labels``
and writes

* ``<out>/<suite>.md`` -- markdown tables: for every setting and method the number of images
  ``n``, PSNR and SSIM as mean ± sample standard deviation (``ddof = 1``; 0 for ``n = 1``) over
  the images, mean wall time, mean NFE (forward + backward velocity evaluations) and mean peak
  memory (the solver's measure: CUDA ``max_memory_allocated``, CPU ``VmHWM`` increase), plus
  the provenance (commands, devices, versions, seeds, dates) of the rows;
* ``<out>/<suite>_*.png`` -- matplotlib figures (PSNR/SSIM vs N, memory and time vs N, the
  ablation factors, Jacobi vs Gauss-Seidel time per sweep, trajectory loss vs sweeps,
  restoration bars).

Nothing here runs a solver; a report can be rebuilt from the committed JSON lines anywhere.
"""
from __future__ import annotations

import math
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from ctflow.data.atomic import atomic_save, atomic_write_bytes

from .runner import CASE_SUITES, ResultStore

__all__ = ["render", "render_suite", "aggregate", "load_rows", "expand_also", "fmt_mean_std"]

#: Column order of the grouping labels per suite (other labels follow, sorted).
LABEL_ORDER = {
    "ct-sparse": ["views", "variant", "N"],
    "ablation": ["factor", "K", "value", "variant"],
    "restoration": ["task", "noise", "variant"],
}
#: Order of method variants in tables and legends.
VARIANT_ORDER = ["MS-Flow", "MS-Flow (exact)", "MS-Flow (Jacobi)", "D-Flow", "PnP-Flow",
                 "OT-ODE", "TV", "FBP", "CGLS"]


# ---------------------------------------------------------------------------------------------
def load_rows(path) -> List[dict]:
    """The finished rows of one JSON-lines file (``status == "ok"``, one per id), with rows
    that serve several groupings (``labels["also"]``, see the ablation suite) expanded into
    one copy per grouping."""
    return expand_also(ResultStore(path).ok_rows())


def expand_also(rows: Sequence[dict]) -> List[dict]:
    """One copy of a row per entry of ``labels["also"]`` (that entry's ``factor``, ``value``
    and ``K`` replacing the row's own), plus the row itself without ``also``."""
    out = []
    for r in rows:
        lab = dict(r.get("labels") or {})
        also = lab.pop("also", None) or []
        out.append(dict(r, labels=lab))
        keep = {k: v for k, v in lab.items() if k not in ("factor", "value", "K")}
        for entry in also:
            out.append(dict(r, labels=dict(keep, **entry)))
    return out


def _mean_std(vals: Sequence[float]) -> Tuple[float, float]:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    if not v:
        return float("nan"), float("nan")
    m = sum(v) / len(v)
    if len(v) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def fmt_mean_std(m: float, s: float, digits: int = 2) -> str:
    if not math.isfinite(m):
        return "–"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _fixed(v, digits: int) -> str:
    if v is None or not math.isfinite(float(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def _label_keys(suite: str, rows: Sequence[dict]) -> List[str]:
    keys = set()
    for r in rows:
        keys.update((r.get("labels") or {}).keys())
    order = [k for k in LABEL_ORDER.get(suite, []) if k in keys]
    return order + sorted(keys - set(order))


def _sort_key(value) -> tuple:
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool):
        return (1, int(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    if value in VARIANT_ORDER:
        return (2, VARIANT_ORDER.index(value), "")
    return (3, 0, str(value))


def _sec_per_iter(r: dict) -> Optional[float]:
    if r.get("seconds_per_iteration") is not None:
        return r["seconds_per_iteration"]
    return r["seconds"] / r["iterations"] if r.get("iterations") else None


def aggregate(rows: Sequence[dict], keys: Sequence[str]) -> List[dict]:
    """Group rows by the label ``keys``; per group the count and mean/std of the measures."""
    groups: "OrderedDict[tuple, List[dict]]" = OrderedDict()
    for r in rows:
        lab = r.get("labels") or {}
        groups.setdefault(tuple(lab.get(k) for k in keys), []).append(r)
    out = []
    for key in sorted(groups, key=lambda t: tuple(_sort_key(v) for v in t)):
        g = groups[key]
        rec = dict(zip(keys, key))
        rec["n"] = len(g)
        for name, get in (("psnr", lambda r: r["metrics"]["psnr"]),
                          ("ssim", lambda r: r["metrics"]["ssim"]),
                          ("seconds", lambda r: r.get("seconds")),
                          ("nfe", lambda r: (r.get("nfe") or {}).get("total")),
                          ("nfe_forward", lambda r: (r.get("nfe") or {}).get("forward")),
                          ("nfe_backward", lambda r: (r.get("nfe") or {}).get("backward")),
                          ("iterations", lambda r: r.get("iterations")),
                          ("peak_mb", lambda r: None if r.get("peak_memory_bytes") is None
                           else r["peak_memory_bytes"] / 2 ** 20),
                          ("sec_per_iter", _sec_per_iter)):
            vals = []
            for r in g:
                try:
                    vals.append(get(r))
                except (KeyError, TypeError):
                    vals.append(None)
            rec[name + "_mean"], rec[name + "_std"] = _mean_std(vals)
        out.append(rec)
    return out


def _sweep_ratios(recs: Sequence[dict]) -> str:
    """Gauss-Seidel over Jacobi time per sweep and the PSNR difference, per K."""
    lines = []
    for k in sorted({r.get("K") for r in recs if r.get("K") is not None}):
        gs = next((r for r in recs if r.get("K") == k and r.get("value") == "gauss-seidel"), None)
        ja = next((r for r in recs if r.get("K") == k and r.get("value") == "jacobi"), None)
        if gs and ja and ja["sec_per_iter_mean"] and math.isfinite(ja["sec_per_iter_mean"]):
            lines.append(f"- K = {k}: Gauss-Seidel / Jacobi time per sweep = "
                         f"{gs['sec_per_iter_mean'] / ja['sec_per_iter_mean']:.2f}x; "
                         f"PSNR(Jacobi) - PSNR(Gauss-Seidel) = "
                         f"{ja['psnr_mean'] - gs['psnr_mean']:+.2f} dB")
    return "\n".join(lines)


def _md_table(recs: Sequence[dict], keys: Sequence[str], *, extra: Sequence = ()) -> str:
    """``extra``: further columns, each a record key or a ``(title, key)`` pair."""
    extra = [(e, e) if isinstance(e, str) else tuple(e) for e in extra]
    head = list(keys) + ["n", "PSNR (dB)", "SSIM", "time (s)", "NFE (fwd+bwd)",
                         "peak mem (MB)"] + [t for t, _ in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in recs:
        cells = [_fmt(r[k]) for k in keys]
        cells += [str(r["n"]), fmt_mean_std(r["psnr_mean"], r["psnr_std"]),
                  fmt_mean_std(r["ssim_mean"], r["ssim_std"], 3), _fixed(r["seconds_mean"], 2),
                  _fixed(r["nfe_mean"], 0), _fixed(r["peak_mb_mean"], 1)]
        for _, e in extra:
            cells.append(_fmt(r.get(e), 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _provenance(rows: Sequence[dict]) -> str:
    def distinct(get) -> List[str]:
        seen = []
        for r in rows:
            try:
                v = get(r)
            except (KeyError, TypeError):
                continue
            if v is not None and v not in seen:
                seen.append(v)
        return seen

    rows = list({r.get("id"): r for r in rows}.values())      # expanded copies count once
    stamps = sorted(r.get("timestamp", "") for r in rows if r.get("timestamp"))
    parts = [f"- rows: {len(rows)}; images: {len(distinct(lambda r: r['image']))}; "
             f"seeds: {', '.join(map(str, distinct(lambda r: r['seed'])))}; "
             f"quick: {', '.join(map(str, distinct(lambda r: r.get('quick'))))}"]
    for what, get in (("command", lambda r: r["command"]),
                      ("device", lambda r: r["device_name"]),
                      ("prior", lambda r: r["prior"]),
                      ("config", lambda r: r["config"]),
                      ("versions", lambda r: ", ".join(f"{k} {v}" for k, v in
                                                       sorted(r["versions"].items())))):
        vals = distinct(get)
        if vals:
            parts.append(f"- {what}: " + "; ".join(f"`{v}`" for v in vals))
    if stamps:
        parts.append(f"- finished between {stamps[0]} and {stamps[-1]}")
    total = sum(float(r.get("seconds") or 0) for r in rows)
    parts.append(f"- total solver time: {total:.0f} s")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# figures
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
    return sorted({r["variant"] for r in recs if r.get("variant") is not None}, key=_sort_key)


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


_PLOTS = {"ct-sparse": _plot_ct_sparse, "ablation": _plot_ablation,
          "restoration": _plot_restoration}


# ---------------------------------------------------------------------------------------------
def _tables(suite: str, rows: Sequence[dict]) -> str:
    keys = [k for k in _label_keys(suite, rows) if k != "tuned"]
    if suite == "ct-sparse" and "views" in keys:
        parts = []
        for v in sorted({(r.get("labels") or {}).get("views") for r in rows}, key=_sort_key):
            sub = [r for r in rows if (r.get("labels") or {}).get("views") == v]
            parts.append(f"### {v} views\n\n" + _md_table(
                aggregate(sub, [k for k in keys if k != "views"]),
                [k for k in keys if k != "views"]))
        return "\n\n".join(parts)
    if suite == "ablation":
        parts = []
        for f in sorted({(r.get("labels") or {}).get("factor") for r in rows}, key=str):
            sub = [r for r in rows if (r.get("labels") or {}).get("factor") == f]
            k2 = [k for k in keys if k != "factor" and any(k in r["labels"] for r in sub)]
            const = {k: sub[0]["labels"].get(k) for k in k2
                     if len({str(r["labels"].get(k)) for r in sub}) == 1
                     and k not in ("value", "K")}
            k2 = [k for k in k2 if k not in const]
            head = ", ".join(f"{k} = {v}" for k, v in const.items())
            recs = aggregate(sub, k2)
            text = f"### factor: {f}" + (f" ({head})" if head else "") + "\n\n"
            if f == "sweep":
                text += _md_table(recs, k2, extra=[("s / sweep", "sec_per_iter_mean")])
                text += "\n\n" + _sweep_ratios(recs)
            else:
                text += _md_table(recs, k2)
            parts.append(text)
        return "\n\n".join(parts)
    return _md_table(aggregate(rows, keys), keys)


def render_suite(suite: str, rows: Sequence[dict], out: Path, *, stem: Optional[str] = None,
                 plots: bool = True) -> List[Path]:
    """Write ``<stem>.md`` (and the figures) for one suite's rows; returns the paths."""
    stem = stem or suite
    out = Path(out)
    written: List[Path] = []
    if plots and suite in _PLOTS and not stem.startswith("tune-"):
        written += _PLOTS[suite](rows, out, stem)
    title = f"# {stem}: results\n\n"
    body = _tables(suite, rows)
    figs = "".join(f"\n![{p.stem}]({p.name})\n" for p in written)
    text = (title + "Generated by `python -m benchmarks report` from `" + stem + ".jsonl` "
            "(mean ± sample std over images; time = solver wall time; NFE = velocity "
            "evaluations, forward + backward; peak memory as measured by the solver).\n\n"
            + body + "\n\n## Provenance\n\n" + _provenance(rows) + "\n" + figs)
    md = out / f"{stem}.md"
    atomic_write_bytes(md, text.encode("utf-8"))
    return [md] + written


def render(out, suites: Optional[Iterable[str]] = None) -> List[Path]:
    """Render every case suite (and tuning run) found in ``out``; returns the written paths."""
    out = Path(out)
    written: List[Path] = []
    names = list(suites) if suites is not None else list(CASE_SUITES)
    for suite in names:
        for stem in (suite, f"tune-{suite}"):
            path = out / f"{stem}.jsonl"
            if not path.exists():
                continue
            rows = load_rows(path)
            if rows:
                written += render_suite(suite, rows, out, stem=stem)
    return written
