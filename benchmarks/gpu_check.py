r"""GPU check of the ray-transform backends: the backend contract and forward/adjoint timings.

On a CUDA machine, for each GPU backend that is usable here, ``torch`` (CUDA),
``odl/astra_cuda`` and ``tomosipo``:

* **contract** (float32 unless stated, parallel beam 64² × 48 angles and fan beam 64² × 60
  angles with ``R_s = 3``, ``R_d = 1.5``): output shapes, dtype and device (float32 and
  float64 in, same out, on CUDA); the dot test — the signed-noise
  :meth:`~ctflow.operators.LinearOperator.dot_test` for the exactly matched torch backend
  (≤ 1e-4 in float32, ≤ 1e-6 in float64) and, for the ASTRA-based backends, whose GPU
  back-projector is an approximate transpose, the mismatch on non-negative random inputs
  (≤ 1e-2; the signed-noise value is recorded without a limit); autograd (the gradient of
  :math:`\langle Ax, w\rangle` equals :math:`A^T w`, ≤ 1e-5); and agreement with the torch
  backend on the Shepp–Logan phantom at 128² (sinograms and Hann FBP reconstructions within
  2 % relative L2, the FBP of ASTRA data without the detector-aperture correction, as in
  ``tests/test_ct_backends.py``);
* **timings**: parallel beam at 256² × 180 angles and 512² × 360 angles (``--quick``: 128² ×
  90 and 256² × 180), batches of 1 and 16 images, forward and adjoint through
  :class:`~ctflow.operators.ct.RayTransform` on CUDA float32 tensors (ODL copies through the
  host; tomosipo and torch stay on the GPU). The first call (system-matrix build or ASTRA
  set-up) is timed separately; the steady-state figure is the minimum over repeats, each
  bracketed by ``torch.cuda.synchronize``.

It prints a table and writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default
``benchmarks/results``). On a machine without CUDA it prints which backends are unavailable and
why, writes nothing (so earlier GPU results are kept) and exits 0.

    python benchmarks/gpu_check.py [--quick] [--device cuda] [--out DIR]
    python -m benchmarks.gpu_check  (same options)

Exit status: 0 when every contract check passes (or when there is no GPU), 1 otherwise.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/gpu_check.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.settings import default_out  # noqa: E402
from ctflow.data import atomic_write_bytes, atomic_write_json  # noqa: E402
from ctflow.data import shepp_logan  # noqa: E402
from ctflow.operators.ct import (FBP, FanBeam2D, ParallelBeam2D, RayTransform,  # noqa: E402
                                 available_backends)

SEED = 0

#: (name in available_backends, backend, options)
GPU_BACKENDS = [("torch-cuda", "torch", {}),
                ("odl/astra_cuda", "odl", {"impl": "astra_cuda"}),
                ("tomosipo", "tomosipo", {})]

CONTRACT_GEOMETRIES = {
    "parallel": lambda: ParallelBeam2D(64, 48),
    "fan": lambda: FanBeam2D(64, 60, source_origin=3.0, origin_detector=1.5),
}
AGREEMENT_GEOMETRIES = {
    "parallel": lambda: ParallelBeam2D(128, 90),
    "fan": lambda: FanBeam2D(128, 120, source_origin=3.0, origin_detector=1.5),
}
TIMING_CASES = {False: [(256, 180), (512, 360)], True: [(128, 90), (256, 180)]}
BATCHES = (1, 16)


def _check(rows: List[dict], backend: str, geometry: str, check: str, value,
           limit: Optional[float], passed: Optional[bool] = None) -> None:
    if passed is None:
        passed = True if limit is None else bool(value <= limit)
    rows.append({"backend": backend, "geometry": geometry, "check": check,
                 "value": None if value is None else float(value), "limit": limit,
                 "passed": bool(passed)})


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _nonneg_dot_test(op, device, seed: int = SEED) -> float:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2, 1, *op.domain_shape, generator=gen).to(device)
    y = torch.rand(2, 1, *op.range_shape, generator=gen).to(device)
    with torch.no_grad():
        lhs = float((op(x).double() * y.double()).sum())
        rhs = float((x.double() * op.adjoint(y).double()).sum())
    return abs(lhs - rhs) / abs(lhs)


def contract(name: str, backend: str, options: dict, device: str, *,
             geometries: Optional[dict] = None, agreement: Optional[dict] = None) -> List[dict]:
    """The backend contract for one backend on ``device``; one row per check.

    ``geometries``/``agreement`` (name -> factory) replace :data:`CONTRACT_GEOMETRIES` and
    :data:`AGREEMENT_GEOMETRIES` (the tests use tiny ones on the CPU).
    """
    rows: List[dict] = []
    exact = backend == "torch"
    geometries = CONTRACT_GEOMETRIES if geometries is None else geometries
    agreement = AGREEMENT_GEOMETRIES if agreement is None else agreement
    for gname, make in geometries.items():
        g = make()
        try:
            op = RayTransform(g, backend=backend, **options)
        except Exception as exc:  # a backend that fails to build fails its contract
            _check(rows, name, gname, f"construct ({type(exc).__name__}: {exc})", None, None,
                   passed=False)
            continue
        ok = True
        for dtype in (torch.float32, torch.float64):
            x = torch.rand(2, 3, *g.image_shape, dtype=dtype,
                           generator=torch.Generator().manual_seed(SEED)).to(device)
            with torch.no_grad():
                y = op(x)
                back = op.adjoint(y)
            ok &= (tuple(y.shape) == (2, 3, *g.sinogram_shape) and y.dtype == dtype
                   and y.device == x.device and tuple(back.shape) == tuple(x.shape)
                   and back.dtype == dtype and back.device == x.device)
        _check(rows, name, gname, "shapes/dtype/device", None, None, passed=ok)
        if exact:
            _check(rows, name, gname, "dot test float32 (signed noise)",
                   op.dot_test(dtype=torch.float32, device=device), 1e-4)
            _check(rows, name, gname, "dot test float64 (signed noise)",
                   op.dot_test(dtype=torch.float64, device=device), 1e-6)
        else:
            _check(rows, name, gname, "dot test float32 (non-negative inputs)",
                   _nonneg_dot_test(op, device), 1e-2)
            _check(rows, name, gname, "dot test float32 (signed noise, recorded)",
                   op.dot_test(dtype=torch.float32, device=device), None)
        gen = torch.Generator().manual_seed(SEED + 1)
        x = torch.rand(1, 1, *g.image_shape, generator=gen).to(device).requires_grad_(True)
        w = torch.rand(1, 1, *g.sinogram_shape, generator=gen).to(device)
        (op(x) * w).sum().backward()
        with torch.no_grad():
            _check(rows, name, gname, "autograd = adjoint", _rel(x.grad, op.adjoint(w)), 1e-5)
    for gname, make in agreement.items():
        g = make()
        label = f"{gname} {g.image_size}²"
        x = shepp_logan(g.image_size, dtype=torch.float32, device=device)[None, None]
        try:
            op = RayTransform(g, backend=backend, **options)
        except Exception as exc:
            _check(rows, name, label, f"construct ({type(exc).__name__}: {exc})", None, None,
                   passed=False)
            continue
        ref = RayTransform(g)
        with torch.no_grad():
            y_ref, y = ref(x), op(x)
            _check(rows, name, label, "sinogram vs torch (Shepp-Logan)",
                   _rel(y, y_ref), 0.02)
            rec_ref = FBP(g, "hann", frequency_scaling=0.8)(y_ref)
            rec = FBP(g, "hann", frequency_scaling=0.8, aperture_correction=exact)(y)
            _check(rows, name, label, "Hann FBP vs torch (Shepp-Logan)",
                   _rel(rec, rec_ref), 0.02)
    return rows


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], repeats: int, device: str) -> Dict[str, float]:
    """First-call and steady-state (min, median over ``repeats``) wall seconds of ``fn()``."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    walls = []
    for _ in range(max(1, repeats)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        walls.append(time.perf_counter() - t0)
    return {"first": first, "min": min(walls), "median": float(np.median(walls))}


def timings(name: str, backend: str, options: dict, device: str, quick: bool,
            repeats: int, *, cases=None, batches=BATCHES) -> List[dict]:
    """Forward/adjoint timings of one backend, parallel beam, per size and batch (``cases``:
    ``(image size, angles)`` pairs, default :data:`TIMING_CASES`)."""
    rows = []
    for n, angles in (TIMING_CASES[bool(quick)] if cases is None else cases):
        g = ParallelBeam2D(n, angles)
        t0 = time.perf_counter()
        op = RayTransform(g, backend=backend, **options)
        setup = time.perf_counter() - t0
        for batch in batches:
            x = torch.rand(batch, 1, n, n, generator=torch.Generator().manual_seed(SEED)).to(device)
            with torch.no_grad():
                fwd = _time(lambda: op(x), repeats, device)
                y = op(x)
                adj = _time(lambda: op.adjoint(y), repeats, device)
            rows.append({"backend": name, "image_size": n, "angles": angles,
                         "detectors": g.detectors, "batch": batch, "dtype": "float32",
                         "device": device, "setup_s": setup, "forward_first_s": fwd["first"],
                         "forward_s": fwd["min"], "forward_median_s": fwd["median"],
                         "adjoint_first_s": adj["first"], "adjoint_s": adj["min"],
                         "adjoint_median_s": adj["median"], "repeats": repeats, "seed": SEED})
            print(f"  {name:<15} {n}² x {angles} batch {batch:>2}: fwd "
                  f"{1e3 * fwd['min']:8.2f} ms  adj {1e3 * adj['min']:8.2f} ms", flush=True)
        del op
        if str(device).startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("odl", "astra", "tomosipo"):
        try:
            out[mod] = str(__import__(mod).__version__)
        except Exception as exc:
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def _backend_table(infos) -> str:
    width = max(len(i["name"]) for i in infos)
    lines = []
    for i in infos:
        state = "available" if i["available"] else "unavailable"
        lines.append(f"  {i['name']:<{width}}  {state:<11}  {i['reason']}".rstrip())
    return "\n".join(lines)


def _md(report: dict) -> str:
    meta = report["meta"]
    lines = ["# GPU check: ray-transform backends on CUDA", "",
             f"- device: {meta['gpu']} (`{meta['device']}`), date {meta['date']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
             f"- seed {SEED}; float32 tensors on the GPU; timings are the minimum over "
             f"{meta['repeats']} repeats (CUDA-synchronised); ODL copies through the host", "",
             "## Backends", "", "| backend | usable | note |", "|---|---|---|"]
    for b in report["backends"]:
        lines.append(f"| {b['name']} | {'yes' if b['available'] else 'no'} | {b['reason']} |")
    lines += ["", "## Contract", "", "| backend | geometry | check | value | limit | ok |",
              "|---|---|---|---|---|---|"]
    for r in report["contract"]:
        value = "" if r["value"] is None else f"{r['value']:.3g}"
        limit = "" if r["limit"] is None else f"≤ {r['limit']:g}"
        lines.append(f"| {r['backend']} | {r['geometry']} | {r['check']} | {value} | {limit} | "
                     f"{'yes' if r['passed'] else 'NO'} |")
    lines += ["", "## Timings (parallel beam, default detectors)", "",
              "| backend | image | angles | det | batch | fwd ms | adj ms | first fwd ms | "
              "first adj ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["timings"]:
        lines.append(f"| {r['backend']} | {r['image_size']}² | {r['angles']} | {r['detectors']} "
                     f"| {r['batch']} | {1e3 * r['forward_s']:.2f} | {1e3 * r['adjoint_s']:.2f} "
                     f"| {1e3 * r['forward_first_s']:.1f} | {1e3 * r['adjoint_first_s']:.1f} |")
    failed = [r for r in report["contract"] if not r["passed"]]
    lines += ["", f"Contract: {len(report['contract']) - len(failed)}/{len(report['contract'])} "
                  f"checks passed."]
    return "\n".join(lines) + "\n"


def run(quick: bool = False, out: Optional[Path] = None, device: str = "cuda", *,
        repeats: Optional[int] = None) -> dict:
    """Run the GPU check and return the report (``status``, ``backends``, ``contract``,
    ``timings``, ``meta``).

    Without CUDA (or with ``device="cpu"``) nothing is measured or written: the report has
    ``status == "skipped"``, the reason, and every backend's availability with its reason.
    """
    out = Path(out) if out is not None else default_out(quick)
    infos = [{"name": i.name, "backend": i.backend, "impl": i.impl,
              "available": bool(i.available), "reason": i.reason}
             for i in available_backends()]
    by_name = {i["name"]: i for i in infos}
    gpu_infos = [by_name[n] for n, _, _ in GPU_BACKENDS if n in by_name]
    dev = str(device or "cuda").lower()
    reason = ""
    if not dev.startswith("cuda"):
        reason = f"device={device!r}: the GPU check runs on CUDA only"
    elif not torch.cuda.is_available():
        reason = ("no CUDA here (torch.cuda.is_available() is False); the GPU backends are "
                  "unavailable")
    if reason:
        print(f"gpu_check skipped: {reason}\n{_backend_table(gpu_infos)}", flush=True)
        return {"status": "skipped", "reason": reason, "backends": gpu_infos, "contract": [],
                "timings": []}
    repeats = repeats or (5 if quick else 20)
    torch.manual_seed(SEED)
    print(f"GPU backends:\n{_backend_table(gpu_infos)}", flush=True)
    contract_rows: List[dict] = []
    timing_rows: List[dict] = []
    for name, backend, options in GPU_BACKENDS:
        info = by_name.get(name)
        if info is None or not info["available"]:
            continue
        print(f"contract: {name}", flush=True)
        rows = contract(name, backend, options, dev)
        contract_rows.extend(rows)
        for r in rows:
            mark = "ok" if r["passed"] else "FAILED"
            value = "" if r["value"] is None else f" {r['value']:.3g}"
            print(f"  {r['geometry']:<13} {r['check']:<42}{value:>10}  {mark}", flush=True)
        if any(r["check"].startswith("construct") for r in rows):
            continue
        print(f"timings: {name}", flush=True)
        timing_rows.extend(timings(name, backend, options, dev, quick, repeats))
    meta = {"device": dev, "gpu": torch.cuda.get_device_name(torch.device(dev)),
            "versions": _versions(), "seed": SEED, "repeats": repeats, "quick": bool(quick),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    report = {"status": "ok" if all(r["passed"] for r in contract_rows) else "failed",
              "reason": "", "backends": gpu_infos, "contract": contract_rows,
              "timings": timing_rows, "meta": meta}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "gpu_check.json", report, default=None)
    atomic_write_bytes(out / "gpu_check.md", _md(report).encode("utf-8"))
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    p.add_argument("--device", default="cuda", help="cuda or cuda:N (default cuda)")
    p.add_argument("--out", default=None,
                   help="result folder (default: as python -m benchmarks)")
    p.add_argument("--repeats", type=int, default=None, help="timing repeats")
    args = p.parse_args(argv)
    out = Path(args.out) if args.out else default_out(args.quick)
    report = run(quick=args.quick, out=out, device=args.device, repeats=args.repeats)
    if report["status"] == "skipped":
        return 0
    print((out / "gpu_check.md").read_text())
    return 0 if report["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
