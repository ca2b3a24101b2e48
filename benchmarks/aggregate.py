"""Rows to records: the finished rows of a store, grouped by their labels, with mean and
sample standard deviation of every measure (what the tables and figures of the report show).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

from benchmarks.store import ResultStore

__all__ = ["LABEL_ORDER", "VARIANT_ORDER", "load_rows", "expand_also", "mean_std",
           "fmt_mean_std", "fmt", "fixed", "label_keys", "sort_key", "sec_per_iter",
           "aggregate"]

#: Column order of the grouping labels per suite (other labels follow, sorted).
LABEL_ORDER = {
    "ct-sparse": ["views", "variant", "N"],
    "ablation": ["factor", "K", "value", "variant"],
    "restoration": ["task", "noise", "variant"],
}
#: Order of method variants in tables and legends.
VARIANT_ORDER = ["MS-Flow", "MS-Flow (exact)", "MS-Flow (Jacobi)", "D-Flow", "PnP-Flow",
                 "OT-ODE", "TV", "FBP", "CGLS"]


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


def mean_std(vals: Sequence[float]) -> Tuple[float, float]:
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


def fmt(v, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-2):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def fixed(v, digits: int) -> str:
    if v is None or not math.isfinite(float(v)):
        return "–"
    return f"{float(v):.{digits}f}"


def label_keys(suite: str, rows: Sequence[dict]) -> List[str]:
    keys = set()
    for r in rows:
        keys.update((r.get("labels") or {}).keys())
    order = [k for k in LABEL_ORDER.get(suite, []) if k in keys]
    return order + sorted(keys - set(order))


def sort_key(value) -> tuple:
    if value is None:
        return (0, 0, "")
    if isinstance(value, bool):
        return (1, int(value), "")
    if isinstance(value, (int, float)):
        return (1, float(value), "")
    if value in VARIANT_ORDER:
        return (2, VARIANT_ORDER.index(value), "")
    return (3, 0, str(value))


def sec_per_iter(r: dict) -> Optional[float]:
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
    for key in sorted(groups, key=lambda t: tuple(sort_key(v) for v in t)):
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
                          ("sec_per_iter", sec_per_iter)):
            vals = []
            for r in g:
                try:
                    vals.append(get(r))
                except (KeyError, TypeError):
                    vals.append(None)
            rec[name + "_mean"], rec[name + "_std"] = mean_std(vals)
        out.append(rec)
    return out
