"""The ``latent`` suite's quality part: latent MS-Flow and D-Flow against FBP, TV and the
64×64 image-space methods on the TEST slices at 128×128, and paired wall times.

Rows go to ``<out>/latent-quality.jsonl`` as they finish (:class:`benchmarks.store.ResultStore`;
a rerun skips finished rows). The suite is described in :mod:`benchmarks.suites.latent`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ctflow.metrics import psnr, ssim
from ctflow.priors import load_prior
from ctflow.solvers import reconstruct

from benchmarks.store import ResultStore
from benchmarks.suites.latent_problem import (IMAGE_PRIOR, IMAGE_SIZE, latent_prior,
                                              load_config, slice_image, task_measurement,
                                              task_operator)
from benchmarks.suites.problems import image_ids

__all__ = ["solve_method", "run_timing", "timing_summary", "choose_tv_weight", "run_quality",
           "quality_summary"]


def _psnr_ssim(x, ref):
    return float(psnr(x.clamp(0, 1), ref)), float(ssim(x.clamp(0, 1), ref))


def _upsample(x64, size: int):
    return F.interpolate(x64, size=(size, size), mode="bilinear", align_corners=False)


def solve_method(method: str, opts: dict, task: dict, A, y, sigma, priors: dict, device: str):
    """``(image at 128², seconds, nfe, options)`` of one method on one measurement."""
    t0 = time.perf_counter()
    if method in ("fbp", "tv"):
        res = reconstruct(y, A, None, method=method, sigma=sigma, **opts)
        return res.image, time.perf_counter() - t0, res.nfe_total, opts
    if method.startswith("latent-"):
        res = reconstruct(y, A, priors["latent"], method=method[len("latent-"):],
                          sigma=sigma, **opts)
        return res.image, time.perf_counter() - t0, res.nfe_total, opts
    if method.endswith("-ct64"):
        A64 = task_operator(task, 64)
        res = reconstruct(y, A64, priors["image"], method=method[:-len("-ct64")],
                          sigma=sigma, **opts)
        with torch.no_grad():
            img = _upsample(res.image, IMAGE_SIZE).clamp(0, 1)
        return img, time.perf_counter() - t0, res.nfe_total, opts
    raise ValueError(f"latent suite: unknown method {method!r}")


def run_timing(device: str, *, repeats: int = 2, verbose: bool = True) -> List[Dict]:
    """Paired wall times on a shared machine: on the first TEST slice of every task, latent
    MS-Flow and latent D-Flow (the quality options) run alternately ``repeats`` times each in
    this one process, so both see the same machine load; returns one row per solve."""
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
    cfg = load_config()
    q = cfg["quality"]
    prior_lat, lat_label = latent_prior(device)
    priors = {"latent": prior_lat, "image": load_prior(IMAGE_PRIOR, device=device)}
    hu = prior_lat.hu_window
    ids = image_ids("test", q["quick_images"] if quick else q.get("images"))
    val_ids = image_ids("validation", 1 if quick else None)
    store = ResultStore(out / ("latent-quality-quick.jsonl" if quick else
                               "latent-quality.jsonl"))
    done = {r["key"] for r in store.rows() if r.get("status") == "ok"}
    wanted = set()      # the keys of this configuration (older rows in the store are ignored)
    rows: List[Dict] = []
    for task_name, task in q["tasks"].items():
        weights = q["quick_tv_weights"] if quick else q["tv_weights"]
        tv_base = dict(q["methods"]["tv"])
        if quick:
            tv_base.update(q.get("quick", {}).get("tv", {}))
        # (quick runs keep their own store, so the key need not hold the quick overrides)
        tv_key = _row_key(task_name, "tv-weight", ",".join(val_ids), weights)
        prev = [r for r in store.rows() if r.get("key") == tv_key]
        if prev:
            tv_choice = prev[-1]["tv_choice"]
        else:
            tv_choice = choose_tv_weight(task, weights, val_ids, hu, tv_base, device,
                                         q["seed"])
            store.append({"key": tv_key, "status": "ok", "task": task_name,
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
                store.append(row)
                rows.append(row)
                if verbose:
                    print(f"{task_name:12s} {method:15s} {image_id:28s} {p:6.2f} dB "
                          f"ssim {s:.3f} {secs:6.1f} s nfe {nfe}", flush=True)
    latest = {r["key"]: r for r in store.rows() if r.get("status") == "ok"}
    return [r for k, r in latest.items() if k in wanted]


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
