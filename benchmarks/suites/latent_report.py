"""The ``latent`` suite's outputs: ``latent.json`` (meta, memory rows, quality rows,
summaries, acceptance checks), ``latent.md`` and ``latent-memory.png``, written atomically.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from ctflow.data import atomic_save, atomic_write_bytes, atomic_write_json

from benchmarks.suites.latent_memory import MEMORY_SOLVERS, memory_acceptance
from benchmarks.suites.latent_quality import quality_summary, timing_summary

__all__ = ["write_outputs"]


def write_outputs(out: Path, meta: Dict, memory: List[Dict], quality: List[Dict],
                  quick: bool) -> Dict:
    name = "latent-quick" if quick else "latent"
    old = {}
    if (out / f"{name}.json").is_file():
        old = json.loads((out / f"{name}.json").read_text())
    memory = memory or old.get("memory", [])
    quality = quality or old.get("quality", [])
    timing = meta.pop("timing", None) or old.get("timing", [])
    mem_acc = memory_acceptance(memory)
    qs = quality_summary(quality)
    payload = {"meta": {**old.get("meta", {}), **meta}, "memory": memory,
               "memory_acceptance": mem_acc, "quality": quality, "quality_summary": qs,
               "timing": timing, "timing_summary": timing_summary(timing)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / f"{name}.json", payload, default=float)
    lines = ["# Latent flow priors at 128×128 (`latent` suite)", "",
             f"device: {payload['meta'].get('device')}; torch {payload['meta'].get('torch')}; "
             f"date {payload['meta'].get('date')}", ""]
    if memory:
        Ns = sorted({r["N"] for r in memory})
        label = next((r["prior"] for r in memory if r.get("prior")), "n/a")
        shape = next((r["latent_shape"] for r in memory if r.get("latent_shape")), "")
        lines += ["## Peak memory against ODE steps N", "",
                  f"prior: {label}; latent {shape}"
                  f", 128×128 image, batch 1, parallel beam; fresh process per configuration; "
                  f"MiB above the memory in use at the start of the solve (decoder included).",
                  "", "| solver | " + " | ".join(f"N={N}" for N in Ns) + " |",
                  "|---|" + "---|" * len(Ns)]
        for s in MEMORY_SOLVERS:
            cells = []
            for N in Ns:
                r = next((r for r in memory if r["solver"] == s and r["N"] == N), None)
                b = None if r is None else r.get("peak_memory_bytes")
                cells.append("—" if b is None else f"{b / 2 ** 20:.1f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "Seconds per solve:", "", "| solver | " + " | ".join(
            f"N={N}" for N in Ns) + " |", "|---|" + "---|" * len(Ns)]
        for s in MEMORY_SOLVERS:
            cells = []
            for N in Ns:
                r = next((r for r in memory if r["solver"] == s and r["N"] == N), None)
                cells.append("—" if r is None or r.get("seconds") is None
                             else f"{r['seconds']:.1f}")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines += ["", "Checks:", ""] + [f"- {k}: {v}" for k, v in mem_acc.items()] + [""]
    if quality:
        lines += ["## Quality on the held-out TEST slices (128×128)", "",
                  "Mean over slices; `*-ct64`: image-space method with the 64×64 prior, "
                  "upsampled bilinearly.", "",
                  "| task | method | slices | PSNR (dB) | SSIM | seconds | NFE |",
                  "|---|---|---|---|---|---|---|"]
        for task, t in qs["means"].items():
            for m, d in sorted(t.items(), key=lambda kv: -kv[1]["psnr"]):
                lines.append(f"| {task} | {m} | {d['n']} | {d['psnr']:.2f} | {d['ssim']:.3f} | "
                             f"{d['seconds']:.1f} | {d['nfe']:.0f} |")
        lines += ["", "Checks:", ""] + [f"- {k}: {v}" for k, v in qs["acceptance"].items()]
    if timing:
        lines += ["", "## Paired wall times (first test slice, alternating runs in one process)",
                  "", "| task | latent-msflow (s) | latent-dflow (s) | D-Flow / MS-Flow |",
                  "|---|---|---|---|"]
        for task, d in payload["timing_summary"].items():
            lines.append(f"| {task} | {d.get('latent-msflow', float('nan')):.1f} | "
                         f"{d.get('latent-dflow', float('nan')):.1f} | "
                         f"{d.get('dflow_over_msflow', float('nan')):.2f} |")
    atomic_write_bytes(out / f"{name}.md", ("\n".join(lines) + "\n").encode("utf-8"))
    if memory:
        _plot(memory, out / f"{name}-memory.png")
    return payload


def _plot(rows, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for s in MEMORY_SOLVERS:
        pts = sorted((r["N"], r["peak_memory_bytes"] / 2 ** 20) for r in rows
                     if r["solver"] == s and r.get("peak_memory_bytes"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=s)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("ODE steps N")
    ax.set_ylabel("peak memory (MiB)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title("Latent prior, 128×128, batch 1")
    fig.tight_layout()
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=120), suffix=path.suffix)
    plt.close(fig)
