"""UNet speed on this machine: a training step and whole-image inference, float32 vs bfloat16
autocast, 1 vs 2 threads (issue 19: choose the size-agnostic prior's architecture by training
*and* inference cost).

For each architecture: seconds per AdamW training step (flow-matching loss, batch 16 of 64²
patches, channels-last) and seconds per velocity call on one whole image of 256² and 512²,
in float32 and under bfloat16 autocast; the ratio float32 / bf16 is the bf16 speed-up. Each
number is the minimum over ``repeats`` timed runs after one warm-up, measured in this process
one after the other, so ratios within a run compare like with like.

    python -m benchmarks unet-speed [--quick]      # -> <out>/unet-speed.{json,md}

``--quick`` times one small architecture at 64² only (a smoke test).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List

import torch

from ctflow.data import atomic_write_json, atomic_write_text
from ctflow.flow import UNet

__all__ = ["ARCHITECTURES", "time_architecture", "run"]

#: name -> UNet keyword arguments (``image_size=None``: fully convolutional).
ARCHITECTURES: Dict[str, dict] = {
    "ct64 (base 16, 1-2-4-6, attention at level 2; 256² only)": dict(
        base=16, channel_mults=(1, 2, 4, 6), attention_levels=(2,)),
    "base 32, 1-2-2-4, no attention, channel norm (ctpatch)": dict(
        base=32, channel_mults=(1, 2, 2, 4), attention_levels=(), mid_attention=False,
        norm="channel"),
    "base 32, 1-2-2-4, no attention, group norm": dict(
        base=32, channel_mults=(1, 2, 2, 4), attention_levels=(), mid_attention=False),
    "base 48, 1-2-2-4, no attention, channel norm": dict(
        base=48, channel_mults=(1, 2, 2, 4), attention_levels=(), mid_attention=False,
        norm="channel"),
}


def _timed(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def time_architecture(config: dict, *, threads: int, sizes=(256, 512), repeats: int = 3,
                      batch: int = 16, patch: int = 64) -> List[dict]:
    """Rows ``{dtype, threads, what, seconds}`` for one architecture."""
    torch.set_num_threads(int(threads))
    torch.manual_seed(0)
    net = UNet(image_size=None, **config).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x1 = torch.rand(batch, 1, patch, patch, generator=g).contiguous(
        memory_format=torch.channels_last)
    x0 = torch.randn(x1.shape, generator=g).contiguous(memory_format=torch.channels_last)
    t = torch.rand(batch, generator=g)
    rows = []
    for dtype in ("float32", "bf16"):
        auto = dtype == "bf16"

        def step():
            xt = t[:, None, None, None] * x1 + (1 - t[:, None, None, None]) * x0
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=auto):
                loss = (net(xt, t).float() - (x1 - x0)).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rows.append({"dtype": dtype, "threads": threads, "what": f"train step {batch}x{patch}²",
                     "seconds": _timed(step, repeats)})
        for n in sizes:
            img = torch.randn(1, 1, n, n, generator=g).contiguous(
                memory_format=torch.channels_last)

            def infer():
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                     enabled=auto):
                    net(img, torch.tensor([0.5]))

            rows.append({"dtype": dtype, "threads": threads, "what": f"inference {n}²",
                         "seconds": _timed(infer, repeats)})
    params = sum(p.numel() for p in net.parameters())
    for r in rows:
        r["parameters"] = params
    return rows


def _table(results: Dict[str, List[dict]]) -> str:
    lines = ["| architecture | params | threads | what | float32 s | bf16 s | float32/bf16 |",
             "|---|---|---|---|---|---|---|"]
    for name, rows in results.items():
        keyed = {(r["threads"], r["what"], r["dtype"]): r for r in rows}
        for (threads, what, dtype), r in keyed.items():
            if dtype != "float32":
                continue
            b = keyed[(threads, what, "bf16")]["seconds"]
            lines.append(f"| {name} | {r['parameters'] / 1e6:.2f} M | {threads} | {what} | "
                         f"{r['seconds']:.3f} | {b:.3f} | {r['seconds'] / b:.2f}x |")
    return "\n".join(lines)


def run(quick: bool, out: Path, device: str = "cpu") -> Dict[str, List[dict]]:
    """Time every architecture (``quick``: one small one) at 1 and 2 threads; write
    ``unet-speed.json`` and ``unet-speed.md`` into ``out``."""
    if device not in ("cpu", "auto"):
        raise ValueError("unet-speed measures the CPU (bf16 autocast on the CPU); "
                         f"got device={device!r}")
    out = Path(out)
    archs = {"tiny": dict(base=8, channel_mults=(1, 2), attention_levels=(),
                          mid_attention=False, norm="channel")} if quick else ARCHITECTURES
    sizes = (64,) if quick else (256, 512)
    results: Dict[str, List[dict]] = {}
    before = torch.get_num_threads()
    try:
        for name, cfg in archs.items():
            rows = []
            # global attention at fine levels: 512² is out of reach (quadratic in pixels)
            arch_sizes = tuple(n for n in sizes if n <= 256) if cfg.get("attention_levels") \
                else sizes
            for threads in (1, 2):
                rows += time_architecture(cfg, threads=threads, sizes=arch_sizes,
                                          repeats=1 if quick else 3)
                last = rows[-2 * (1 + len(arch_sizes)):]
                print(f"  {name}, {threads} thread(s): " + ", ".join(
                    f"{r['what']} {r['dtype']} {r['seconds']:.3f} s" for r in last), flush=True)
            results[name] = rows
    finally:
        torch.set_num_threads(before)
    atomic_write_json(out / "unet-speed.json", results)
    atomic_write_text(out / "unet-speed.md", "# UNet speed: float32 vs bf16 autocast, 1 vs 2 "
                      "threads\n\n`python -m benchmarks unet-speed` (minimum of 3 runs after a "
                      "warm-up, one process).\n\n" + _table(results) + "\n")
    return results

