r"""The ``latent`` suite: latent flow priors at 128×128 — peak memory against N, and quality.

**Memory** (the paper's Figure 1 for latent models). Latent MS-Flow (Jacobian-free and exact
block updates) and latent D-Flow reconstruct one 128×128 CT slice (the first VALIDATION slice,
a parallel-beam ray transform with ``views`` angles, 1 % relative noise) with the latent prior
(the bundled ``ct128latent`` where it exists, else the same architectures with random weights:
peak memory does not depend on the weights) for N in {8, 16, 32, 64, 128} Euler steps:

* MS-Flow: ``K = N / M`` segments of ``M = 4`` steps, one sweep (exact variant: one inner
  iteration); the data step takes ``cg_iters`` gradient steps through the decoder, so the
  autograd graph never holds more than one segment (exact update) or one decoder pass;
* D-Flow: one L-BFGS step (``max_iter = 1``), back-propagating through all N latent steps and
  the decoder.

Each configuration runs in a FRESH process (this module re-invoked with ``--single``); peak
memory is the solver's (``ctflow.solvers.SolveMeter``; CUDA: ``max_memory_allocated``; CPU: the
resident-set high-water mark with glibc's mmap threshold fixed and eager trimming, as
``benchmarks/memory.py``, but at 4 KiB instead of 64 KiB because a latent is only 16 KiB, see
:data:`MMAP_THRESHOLD`), relative to the memory in use when the solve starts; the
decoder's passes are inside the measured solve. Before the solve, one velocity and one decoder
forward/backward pass and one L-BFGS construction run outside the meter, so one-off library
initialisation (oneDNN workspaces, ``torch._dynamo`` import) is charged to neither method.
The blend initialisation is skipped (``alpha = 0``) as in ``benchmarks/memory.py``.

**Quality.** The first ``images`` TEST slices of ``ctflow.data.samples`` (never used for
training or tuning; 4 of the 10 by default, to fit a CPU budget) at 128×128, prepared as the
latent prior's training data, on two problems (``tasks`` in ``configs/latent.json``): sparse-
view parallel-beam CT and ×4 super-resolution (average pooling), both with 1 % relative noise
(:math:`\sigma = 0.01\,\|Ax\|/\sqrt m`). Methods:

* ``fbp`` (CT only) and ``tv`` (PDHG; its weight chosen per task on the VALIDATION slices from
  ``tv_weights`` by mean PSNR);
* ``latent-msflow`` and ``latent-dflow`` with the latent prior (options in the config, chosen
  on the validation slices);
* ``msflow-ct64`` / ``dflow-ct64``: the image-space methods with the bundled 64×64 prior
  ``ct64``, solving the same measurement through the 64×64 discretisation of the same
  operator (same detector layout in the same length units; ×2 average pooling for the ×4
  task, exact since 4×4 pooling is 2×2 pooling of the 2×2-pooled image), then bilinearly
  upsampled to 128×128.

Every row holds PSNR/SSIM against the 128×128 ground truth, wall time, NFE and the options.
Wall times on a shared machine depend on its load at the time; ``timing`` therefore also runs
latent MS-Flow and latent D-Flow alternately on the first test slice of each task in one
process (:func:`run_timing`), so the two see the same load.
Rows are appended to ``latent-quality.jsonl`` as they finish (a rerun skips finished rows).

Outputs in ``out`` (default :func:`benchmarks.settings.default_out`): ``latent.json`` (meta,
memory rows, quality rows, summary, acceptance checks), ``latent.md`` and
``latent-memory.png``.

Modules: :mod:`~benchmarks.suites.latent_problem` (config, prior, slices, operators),
:mod:`~benchmarks.suites.latent_memory`, :mod:`~benchmarks.suites.latent_quality`,
:mod:`~benchmarks.suites.latent_report`; this one runs them (``run``) and is the command line:

    python -m benchmarks.suites.latent [--quick] [--part memory|quality|all] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from benchmarks.settings import default_out
from benchmarks.suites.latent_memory import MEMORY_SOLVERS, MMAP_THRESHOLD, RESULT_TAG
from benchmarks.suites.latent_memory import measure_one, run_memory
from benchmarks.suites.latent_problem import CONFIG, SUITE, load_config
from benchmarks.suites.latent_quality import run_quality, run_timing
from benchmarks.suites.latent_report import write_outputs

__all__ = ["run", "main"]


def run(quick: bool = False, out: Optional[Path] = None, device: str = "cpu", *,
        part: str = "all", steps: Optional[Sequence[int]] = None,
        methods: Optional[Sequence[str]] = None, threads: int = 1,
        timeout: Optional[float] = None) -> Dict:
    """The suite entry point (``run(quick, out, device)`` as the runner's external suites).

    ``part``: ``"memory"``, ``"quality"``, ``"timing"`` (paired MS-Flow/D-Flow wall times,
    :func:`run_timing`) or ``"all"``; ``quick``: N in {8, 16} and the
    first ``quick_images`` test slices with the config's ``quick`` option overrides; ``out``:
    the result folder (default :func:`benchmarks.settings.default_out`).
    """
    out = Path(out) if out is not None else default_out(quick)
    if quick and out.name != "quick":
        out = out / "quick"
    cfg = load_config()
    if part not in ("memory", "quality", "timing", "all"):
        raise ValueError(f"part must be 'memory', 'quality', 'timing' or 'all', got {part!r}")
    if device == "cpu":
        torch.set_num_threads(threads)
    memory, quality = [], []
    if part in ("memory", "all"):
        ns = tuple(steps) if steps else tuple(cfg["memory"]["quick_steps" if quick else "steps"])
        memory = run_memory(ns, device, threads=threads, timeout=timeout)
    timing = []
    if part in ("quality", "all"):
        quality = run_quality(quick, out, device, methods=methods)
    if part in ("timing", "all") and not quick:
        timing = run_timing(device)
    meta = {"suite": SUITE, "device": device,
            "device_name": (torch.cuda.get_device_name() if device.startswith("cuda")
                            else platform.processor() or platform.machine()),
            "torch": torch.__version__, "python": platform.python_version(),
            "threads": threads, "quick": quick, "config": str(CONFIG.name),
            "memory_measure": ("torch.cuda.max_memory_allocated" if device.startswith("cuda")
                               else f"resident-set high-water mark (VmHWM), reset per solve; "
                                    f"MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}, "
                                    f"MALLOC_TRIM_THRESHOLD_=0"),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "timing": timing}
    return write_outputs(out, meta, memory, quality, quick)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--part", default="all", choices=["memory", "quality", "timing", "all"])
    p.add_argument("--out", type=Path, default=None,
                   help="result folder (default: as python -m benchmarks)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="*")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--single", choices=MEMORY_SOLVERS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.single:
        if not a.steps or len(a.steps) != 1:
            p.error("--single needs exactly one --steps value")
        torch.set_num_threads(a.threads)
        row = measure_one(a.single, a.steps[0], a.device)
        print(RESULT_TAG + json.dumps(row, default=float), flush=True)
        return 0
    res = run(a.quick, a.out, a.device, part=a.part, steps=a.steps, methods=a.methods,
              threads=a.threads, timeout=a.timeout)
    for k, v in {**res["memory_acceptance"], **res["quality_summary"]["acceptance"]}.items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
