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
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ctflow.data import atomic_write_bytes

from benchmarks.aggregate import (aggregate, expand_also, fixed, fmt, fmt_mean_std,
                                  label_keys, load_rows, sort_key)
from benchmarks.catalog import CASE_SUITES
from benchmarks.figures import PLOTS

__all__ = ["render", "render_suite", "aggregate", "load_rows", "expand_also", "fmt_mean_std"]


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
        cells = [fmt(r[k]) for k in keys]
        cells += [str(r["n"]), fmt_mean_std(r["psnr_mean"], r["psnr_std"]),
                  fmt_mean_std(r["ssim_mean"], r["ssim_std"], 3), fixed(r["seconds_mean"], 2),
                  fixed(r["nfe_mean"], 0), fixed(r["peak_mb_mean"], 1)]
        for _, e in extra:
            cells.append(fmt(r.get(e), 3))
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


def _tables(suite: str, rows: Sequence[dict]) -> str:
    keys = [k for k in label_keys(suite, rows) if k != "tuned"]
    if suite == "ct-sparse" and "views" in keys:
        parts = []
        for v in sorted({(r.get("labels") or {}).get("views") for r in rows}, key=sort_key):
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
    if plots and suite in PLOTS and not stem.startswith("tune-"):
        written += PLOTS[suite](rows, out, stem)
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
