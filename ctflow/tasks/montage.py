"""``montage.png`` of ``reconstruct-dicom``: input and reconstruction of each slice, side by side."""
from __future__ import annotations

import io
import math
import os
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np

from ctflow.data.atomic import atomic_write_bytes

__all__ = ["write_montage", "montage_items", "MONTAGE_MAX"]

PathLike = Union[str, os.PathLike]

#: Most slices drawn in ``montage.png`` (a longer range shows this many, evenly spaced).
MONTAGE_MAX = 16


def montage_items(items: Sequence[Dict[str, Any]], limit: int = MONTAGE_MAX
                  ) -> Tuple[List[Dict[str, Any]], str]:
    """``items`` sorted by ``index`` and, when there are more than ``limit``, ``limit`` of them
    evenly spaced; with a note for the title (``""`` when all are shown)."""
    items = sorted(items, key=lambda it: it["index"])
    if len(items) <= limit:
        return items, ""
    picks = sorted({int(round(v)) for v in np.linspace(0, len(items) - 1, limit)})
    return [items[i] for i in picks], f"  {len(picks)} of {len(items)} slices"


def write_montage(path: PathLike, items: Sequence[Dict[str, Any]], *, title: str = "") -> None:
    """Write a PNG grid atomically: for each item (``index``, ``input``, ``recon`` 2-D arrays
    in [0, 1], ``psnr``, ``ssim``) the input and the reconstruction side by side, four pairs a
    row. Nothing is written for no items."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(items)
    if n == 0:
        return
    pairs_per_row = min(4, n)
    rows = int(math.ceil(n / pairs_per_row))
    fig, axes = plt.subplots(rows, 2 * pairs_per_row, squeeze=False,
                             figsize=(2 * pairs_per_row * 1.7, rows * 1.9 + 0.4))
    for ax in axes.flat:
        ax.axis("off")
    for i, it in enumerate(items):
        r, c = divmod(i, pairs_per_row)
        a, b = axes[r, 2 * c], axes[r, 2 * c + 1]
        a.imshow(it["input"], cmap="gray", vmin=0, vmax=1)
        a.set_title(f"slice {it['index']} input", fontsize=7)
        b.imshow(it["recon"], cmap="gray", vmin=0, vmax=1)
        p = it.get("psnr")
        s = it.get("ssim")
        label = "recon" if p is None else f"{p:.1f} dB / {s:.3f}"
        b.set_title(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
