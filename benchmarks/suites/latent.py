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
memory is :class:`ctflow.solvers.result.SolveMeter`'s (CUDA: ``max_memory_allocated``; CPU: the
resident-set high-water mark with glibc's mmap threshold fixed and eager trimming, as
``benchmarks/memory.py``, but at 4 KiB instead of 64 KiB because a latent is only 16 KiB, see
:data:`MMAP_THRESHOLD`), relative to the memory in use when the solve starts; the
decoder's passes are inside the measured solve. Before the solve, one velocity and one decoder
forward/backward pass and one L-BFGS construction run outside the meter, so one-off library
initialisation (oneDNN workspaces, ``torch._dynamo`` import) is charged to neither method.
The blend initialisation is skipped (``alpha = 0``) as in ``benchmarks/memory.py``.

**Quality.** The first ``images`` TEST slices of ``ctflow.data.samples`` (never used for
training or tuning; 4 of the 10 by default, to fit a CPU budget) at 128×128, prepared as the latent prior's training data, on two problems (``tasks`` in
``configs/latent.json``): sparse-view parallel-beam CT and ×4 super-resolution (average
pooling), both with 1 % relative noise (:math:`\sigma = 0.01\,\|Ax\|/\sqrt m`). Methods:

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

Outputs in ``out`` (default ``benchmarks/results``): ``latent.json`` (meta, memory rows, quality
rows, summary, acceptance checks), ``latent.md`` and ``latent-memory.png``.

    python -m benchmarks.suites.latent [--quick] [--part memory|quality|all] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

SUITE = "latent"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "latent.json"
RESULT_TAG = "LATENT-MEMORY "
MEMORY_SOLVERS = ("latent-msflow-jf", "latent-msflow-exact", "latent-dflow")
LATENT_PRIOR = "ct128latent"
#: glibc mmap threshold of the CPU children: one 4×32×32 float32 latent is 16 KiB, below the
#: 64 KiB of benchmarks/memory.py, so latents would live on the heap, whose fragmentation grows
#: with the number of block updates (measured: exact MS-Flow N=128/N=8 read 1.31 at 64 KiB,
#: 1.05 at 4 KiB); at 4 KiB every tensor of a page or more is its own mapping and the
#: resident set follows live memory.
MMAP_THRESHOLD = 4096
IMAGE_PRIOR = "ct64"
IMAGE_SIZE = 128


def load_config() -> dict:
    return json.loads(CONFIG.read_text())


# ---------------------------------------------------------------------------------------------
# priors, images, problems
# ---------------------------------------------------------------------------------------------
def latent_prior(device: str = "cpu"):
    """``(prior, label)``: the bundled latent prior, or the default architectures with random
    (seeded) weights when it is not bundled."""
    import torch

    from ctflow.priors import list_priors, load_prior
    if LATENT_PRIOR in list_priors():
        return load_prior(LATENT_PRIOR, device=device), f"bundled {LATENT_PRIOR} (trained)"
    from ctflow.flow.autoencoder import AutoEncoder, LatentCodec
    from ctflow.flow.unet import UNet
    from ctflow.priors import LatentFlowPrior
    cfg = load_config()["random_fallback"]
    torch.manual_seed(0)
    codec = LatentCodec(AutoEncoder(**cfg["autoencoder"]))
    lat = codec.autoencoder.latent_shape(IMAGE_SIZE)
    net = UNet(**cfg["flow"])
    prior = LatentFlowPrior(net, decoder=codec.decode, encoder=codec.encode,
                            image_size=IMAGE_SIZE, latent_shape=lat, hu_window=(-1024.0, 1024.0),
                            name="latent-random")
    prior.codec = codec
    return prior.to(device=device).eval(), "default architectures, random weights"


def slice_image(image_id: str, image_size: int, hu_window) -> "object":
    """A held-out slice (``"test/<stem>"`` / ``"validation/<stem>"``) at ``image_size``."""
    from ctflow.data import samples

    from .common import prepare_slice
    split, stem = image_id.split("/", 1)
    files = samples.heldout_files(split)
    slices = samples.heldout_slices(split)
    for f, s in zip(files, slices):
        if Path(f).stem == stem:
            return prepare_slice(s.hu, image_size=image_size, hu_window=hu_window)
    raise ValueError(f"no held-out slice {image_id!r}")


def task_operator(task: dict, image_size: int):
    """The operator of ``task`` at ``image_size`` (CT: the 128×128 geometry's detector
    layout at every size, so one sinogram serves both discretisations)."""
    from ctflow.operators import ParallelBeam2D, RayTransform, SuperResolution
    if task["operator"] == "parallel-beam":
        ref = ParallelBeam2D(IMAGE_SIZE, angles=int(task["views"]))
        geom = ParallelBeam2D(image_size, angles=int(task["views"]), detectors=ref.detectors,
                              detector_spacing=ref.detector_spacing)
        return RayTransform(geom)
    if task["operator"] == "superres":
        k = int(task["factor"]) * image_size // IMAGE_SIZE
        return SuperResolution(image_size, factor=k, mode="average")
    raise ValueError(f"latent suite: unknown task operator {task['operator']!r}")


def task_measurement(task: dict, x, seed: int):
    from .common import measure
    A = task_operator(task, IMAGE_SIZE)
    y, sigma = measure(A, x, {"model": "relative", "level": float(task["noise"])}, seed)
    return A, y, sigma


# ---------------------------------------------------------------------------------------------
# memory: one configuration per fresh process
# ---------------------------------------------------------------------------------------------
def memory_options(solver: str, N: int, M: int, cg_iters: int) -> Dict:
    if solver == "latent-dflow":
        return dict(N=N, iterations=1, max_iter=1, alpha=0.0, init="adjoint", seed=0)
    if N % M:
        raise ValueError(f"N={N} is not a multiple of M={M}")
    return dict(K=N // M, M=M, sweeps=1, alpha=0.0, init="adjoint", seed=0, cg_iters=cg_iters,
                inner_iters=1,
                update="exact" if solver == "latent-msflow-exact" else "jacobian-free")


def _warm_up(prior, device) -> None:
    """One velocity and one decoder forward/backward pass and one L-BFGS construction outside
    the measured solve (library initialisation is charged to neither method)."""
    import torch
    z = torch.randn(1, *prior.latent_shape, device=device, requires_grad=True)
    t = torch.full((1,), 0.5, device=device)
    with torch.enable_grad():
        (prior.velocity(z, t).sum() + prior.decode(z).sum()).backward()
    torch.optim.LBFGS([torch.zeros(1, requires_grad=True)])


def measure_one(solver: str, N: int, device: str) -> Dict:
    import torch

    from ctflow.solvers import DFlow, MSFlow
    cfg = load_config()["memory"]
    prior, label = latent_prior(device)
    task = {"operator": "parallel-beam", "views": cfg["views"], "noise": 0.01}
    x = slice_image(cfg["image"], IMAGE_SIZE, prior.hu_window).to(device)
    A, y, sigma = task_measurement(task, x, 0)
    opts = memory_options(solver, N, cfg["segment_steps"], cfg["cg_iters"])
    _warm_up(prior, device)
    cls = DFlow if solver == "latent-dflow" else MSFlow
    res = cls(**opts).solve(A, y, prior, sigma)
    peak = res.peak_memory_bytes
    return {"solver": solver, "N": N, "K": opts.get("K"), "M": opts.get("M"),
            "peak_memory_bytes": peak, "peak_memory_mib": None if peak is None else peak / 2 ** 20,
            "seconds": res.seconds, "nfe_forward": res.nfe["forward"],
            "nfe_backward": res.nfe["backward"], "device": device, "prior": label,
            "latent_shape": list(prior.latent_shape), "image_size": IMAGE_SIZE,
            "views": cfg["views"], "status": "ok", "torch": torch.__version__,
            "options": opts}


def _child(solver: str, N: int, device: str, timeout: Optional[float], threads: int) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.suites.latent", "--single", solver, "--steps",
           str(N), "--device", device, "--threads", str(threads)]
    env = dict(os.environ)
    if device == "cpu":
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=root)
    except subprocess.TimeoutExpired:
        return {"solver": solver, "N": N, "status": f"timeout after {timeout:.0f} s",
                "peak_memory_bytes": None, "device": device}
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (proc.stderr or proc.stdout)[-2000:]
    return {"solver": solver, "N": N, "status": f"failed (exit {proc.returncode}): {tail}",
            "peak_memory_bytes": None, "device": device}


def run_memory(steps: Sequence[int], device: str, *, threads: int = 1,
               timeout: Optional[float] = None, verbose: bool = True) -> List[Dict]:
    rows = []
    for solver in MEMORY_SOLVERS:
        for N in steps:
            t0 = time.perf_counter()
            row = _child(solver, N, device, timeout, threads)
            rows.append(row)
            if verbose:
                mib = row.get("peak_memory_bytes")
                print(f"{solver:20s} N={N:4d} peak="
                      f"{'—' if mib is None else f'{mib / 2 ** 20:.1f}'} MiB "
                      f"({time.perf_counter() - t0:.0f} s) {row.get('status', '')[:80]}",
                      flush=True)
    return rows


def memory_acceptance(rows: List[Dict]) -> Dict:
    """Latent MS-Flow peak at the largest N at most 1.1× its peak at the smallest N; latent
    D-Flow's peak grows with N (strictly increasing over the measured N)."""
    out: Dict = {}
    Ns = sorted({r["N"] for r in rows})
    if not Ns:
        return out

    def peak(s, N):
        return next((float(r["peak_memory_bytes"]) for r in rows if r["solver"] == s
                     and r["N"] == N and r.get("peak_memory_bytes")), None)

    lo, hi = Ns[0], Ns[-1]
    for s in ("latent-msflow-jf", "latent-msflow-exact"):
        a, b = peak(s, lo), peak(s, hi)
        out[f"{s}_ratio_N{hi}_over_N{lo}"] = None if not (a and b) else b / a
        out[f"{s}_within_1.1x"] = None if not (a and b) else b <= 1.1 * a
    d = [peak("latent-dflow", N) for N in Ns]
    if all(v is not None for v in d) and len(d) >= 2:
        out["latent-dflow_grows_with_N"] = all(b > a for a, b in zip(d, d[1:]))
        out[f"latent-dflow_ratio_N{hi}_over_N{lo}"] = d[-1] / d[0]
    return out


# ---------------------------------------------------------------------------------------------
# quality
# ---------------------------------------------------------------------------------------------
def _psnr_ssim(x, ref):
    from ctflow.metrics import psnr, ssim
    return float(psnr(x.clamp(0, 1), ref)), float(ssim(x.clamp(0, 1), ref))


def _upsample(x64, size: int):
    import torch.nn.functional as F
    return F.interpolate(x64, size=(size, size), mode="bilinear", align_corners=False)


def solve_method(method: str, opts: dict, task: dict, A, y, sigma, priors: dict, device: str):
    """``(image at 128², seconds, nfe, options)`` of one method on one measurement."""
    import torch

    from ctflow.solvers import reconstruct
    t0 = time.perf_counter()
    if method in ("fbp", "tv"):
        res = reconstruct(y, A, None, method=method, noise_level=sigma, **opts)
        return res.image, time.perf_counter() - t0, res.nfe_total, opts
    if method.startswith("latent-"):
        res = reconstruct(y, A, priors["latent"], method=method[len("latent-"):],
                          noise_level=sigma, **opts)
        return res.image, time.perf_counter() - t0, res.nfe_total, opts
    if method.endswith("-ct64"):
        A64 = task_operator(task, 64)
        res = reconstruct(y, A64, priors["image"], method=method[:-len("-ct64")],
                          noise_level=sigma, **opts)
        with torch.no_grad():
            img = _upsample(res.image, IMAGE_SIZE).clamp(0, 1)
        return img, time.perf_counter() - t0, res.nfe_total, opts
    raise ValueError(f"latent suite: unknown method {method!r}")


def run_timing(device: str, *, repeats: int = 2, verbose: bool = True) -> List[Dict]:
    """Paired wall times on a shared machine: on the first TEST slice of every task, latent
    MS-Flow and latent D-Flow (the quality options) run alternately ``repeats`` times each in
    this one process, so both see the same machine load; returns one row per solve."""
    import torch

    from .common import image_ids
    q = load_config()["quality"]
    prior, _ = latent_prior(device)
    image_id = image_ids("test", 1)[0]
    rows = []
    for task_name, task in q["tasks"].items():
        x = slice_image(image_id, IMAGE_SIZE, prior.hu_window).to(device)
        A, y, sigma = task_measurement(task, x, q["seed"])
        for rep in range(repeats):
            for method in ("latent-msflow", "latent-dflow"):
                torch.manual_seed(0)
                img, secs, nfe, _ = solve_method(method, dict(q["methods"][method]), task, A,
                                                 y, sigma, {"latent": prior}, device)
                rows.append({"task": task_name, "method": method, "image": image_id,
                             "repeat": rep, "seconds": secs, "nfe": nfe,
                             "psnr": _psnr_ssim(img, x)[0]})
                if verbose:
                    print(f"timing {task_name:12s} {method:14s} {secs:6.1f} s", flush=True)
    return rows


def timing_summary(rows: List[Dict]) -> Dict:
    """Median paired wall time per (task, method) and their ratio."""
    import statistics
    out: Dict = {}
    for task in sorted({r["task"] for r in rows}):
        med = {m: statistics.median(r["seconds"] for r in rows
                                    if r["task"] == task and r["method"] == m)
               for m in ("latent-msflow", "latent-dflow")
               if any(r["task"] == task and r["method"] == m for r in rows)}
        if len(med) == 2:
            med["dflow_over_msflow"] = med["latent-dflow"] / med["latent-msflow"]
        out[task] = med
    return out


def _row_key(task_name, method, image_id, opts) -> str:
    return json.dumps([task_name, method, image_id, opts], sort_keys=True, default=str)


def _read_rows(path: Path) -> List[Dict]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def choose_tv_weight(task: dict, weights: Sequence[float], ids: Sequence[str], hu_window,
                     base: dict, device: str, seed: int) -> Dict:
    """The TV weight with the best mean PSNR on the VALIDATION slices ``ids``."""
    scores = {}
    for w in weights:
        vals = []
        for image_id in ids:
            x = slice_image(image_id, IMAGE_SIZE, hu_window).to(device)
            A, y, sigma = task_measurement(task, x, seed)
            img, *_ = solve_method("tv", {**base, "weight": w}, task, A, y, sigma, {}, device)
            vals.append(_psnr_ssim(img, x)[0])
        scores[w] = sum(vals) / len(vals)
    best = max(scores, key=scores.get)
    return {"chosen": best, "validation_psnr": {str(k): v for k, v in scores.items()}}


def run_quality(quick: bool, out: Path, device: str, *, methods: Optional[Sequence[str]] = None,
                verbose: bool = True) -> List[Dict]:
    import torch

    from ctflow.priors import load_prior

    from .common import image_ids
    cfg = load_config()
    q = cfg["quality"]
    prior_lat, lat_label = latent_prior(device)
    priors = {"latent": prior_lat, "image": load_prior(IMAGE_PRIOR, device=device)}
    hu = prior_lat.hu_window
    ids = image_ids("test", q["quick_images"] if quick else q.get("images"))
    val_ids = image_ids("validation", 1 if quick else None)
    store = out / ("latent-quality-quick.jsonl" if quick else "latent-quality.jsonl")
    done = {r["key"] for r in _read_rows(store) if r.get("status") == "ok"}
    wanted = set()      # the keys of this configuration (older rows in the store are ignored)
    rows: List[Dict] = []
    for task_name, task in q["tasks"].items():
        weights = q["quick_tv_weights"] if quick else q["tv_weights"]
        tv_base = dict(q["methods"]["tv"])
        if quick:
            tv_base.update(q.get("quick", {}).get("tv", {}))
        # (quick runs keep their own store, so the key need not hold the quick overrides)
        tv_key = _row_key(task_name, "tv-weight", ",".join(val_ids), weights)
        prev = [r for r in _read_rows(store) if r.get("key") == tv_key]
        if prev:
            tv_choice = prev[-1]["tv_choice"]
        else:
            tv_choice = choose_tv_weight(task, weights, val_ids, hu, tv_base, device,
                                         q["seed"])
            _append(store, {"key": tv_key, "status": "ok", "task": task_name,
                            "method": "tv-weight", "tv_choice": tv_choice})
        for image_id in ids:
            x = slice_image(image_id, IMAGE_SIZE, hu).to(device)
            A, y, sigma = task_measurement(task, x, q["seed"])
            for method in (methods or q["methods_order"]):
                if method == "fbp" and task["operator"] != "parallel-beam":
                    continue
                opts = dict(q["methods"][method])
                if method == "tv":
                    opts["weight"] = tv_choice["chosen"]
                if quick and "quick" in q and method in q["quick"]:
                    opts.update(q["quick"][method])
                key = _row_key(task_name, method, image_id, opts)
                wanted.add(key)
                if key in done:
                    continue
                torch.manual_seed(0)
                img, secs, nfe, used = solve_method(method, opts, task, A, y, sigma, priors,
                                                    device)
                p, s = _psnr_ssim(img, x)
                row = {"key": key, "status": "ok", "task": task_name, "method": method,
                       "image": image_id, "psnr": p, "ssim": s, "seconds": secs, "nfe": nfe,
                       "sigma": sigma, "options": used, "device": device,
                       "prior": lat_label if method.startswith("latent") else
                       (IMAGE_PRIOR if method.endswith("ct64") else None)}
                _append(store, row)
                rows.append(row)
                if verbose:
                    print(f"{task_name:12s} {method:15s} {image_id:28s} {p:6.2f} dB "
                          f"ssim {s:.3f} {secs:6.1f} s nfe {nfe}", flush=True)
    latest = {r["key"]: r for r in _read_rows(store) if r.get("status") == "ok"}
    return [r for k, r in latest.items() if k in wanted]


def _append(path: Path, row: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
        f.flush()
        os.fsync(f.fileno())


def quality_summary(rows: List[Dict]) -> Dict:
    """Mean PSNR/SSIM/seconds/NFE per (task, method) and the acceptance comparisons."""
    out: Dict = {}
    for r in rows:
        d = out.setdefault(r["task"], {}).setdefault(r["method"], {"n": 0, "psnr": 0.0,
                                                                    "ssim": 0.0, "seconds": 0.0,
                                                                    "nfe": 0.0})
        d["n"] += 1
        for k in ("psnr", "ssim", "seconds", "nfe"):
            d[k] += float(r[k])
    for task in out.values():
        for d in task.values():
            for k in ("psnr", "ssim", "seconds", "nfe"):
                d[k] /= d["n"]
    checks = {}
    for task_name, t in out.items():
        ms = t.get("latent-msflow")
        if not ms:
            continue
        for other in ("fbp", "tv"):
            if other in t:
                checks[f"{task_name}: latent-msflow beats {other}"] = ms["psnr"] > t[other]["psnr"]
        if "latent-dflow" in t:
            checks[f"{task_name}: latent-msflow >= latent-dflow (PSNR)"] = \
                ms["psnr"] >= t["latent-dflow"]["psnr"]
            checks[f"{task_name}: latent-msflow wall time <= latent-dflow"] = \
                ms["seconds"] <= t["latent-dflow"]["seconds"]
    return {"means": out, "acceptance": checks}


# ---------------------------------------------------------------------------------------------
# outputs
# ---------------------------------------------------------------------------------------------
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as tmp:
        tmp.write(text)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


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
    _atomic_write(out / f"{name}.json", json.dumps(payload, indent=2, default=float) + "\n")
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
    _atomic_write(out / f"{name}.md", "\n".join(lines) + "\n")
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
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as tmp:
        fig.savefig(tmp.name, dpi=120)
    plt.close(fig)
    os.chmod(tmp.name, 0o644)
    os.replace(tmp.name, path)


def run(quick: bool = False, out: Path = Path("benchmarks/results"), device: str = "cpu", *,
        part: str = "all", steps: Optional[Sequence[int]] = None,
        methods: Optional[Sequence[str]] = None, threads: int = 1,
        timeout: Optional[float] = None) -> Dict:
    """The suite entry point (``run(quick, out, device)`` as the runner's external suites).

    ``part``: ``"memory"``, ``"quality"``, ``"timing"`` (paired MS-Flow/D-Flow wall times,
    :func:`run_timing`) or ``"all"``; ``quick``: N in {8, 16} and the
    first ``quick_images`` test slices with the config's ``quick`` option overrides.
    """
    import torch
    out = Path(out)
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
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, nargs="*")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=None)
    p.add_argument("--single", choices=MEMORY_SOLVERS, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.single:
        import torch
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
