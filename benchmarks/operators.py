r"""Ray-transform speed: the torch backend against ODL's ``astra_cpu`` ``RayTransform``.

For parallel-beam geometries of 64², 128², 256² pixels with 60 and 180 angles (default
detectors: the image diagonal at pixel spacing) and batches of 1 and 16 images, it times the
forward projection and the adjoint (back-projection) of

* ``torch``: :class:`ctflow.operators.ct.RayTransform` (sparse system matrix, float32), the
  whole batch in one call;
* ``odl``: ``odl.applications.tomo.RayTransform(impl="astra_cpu")`` called directly on NumPy
  float32 arrays, looping over the batch (ODL applies to one image at a time). This is ODL's
  own cost, without ctflow's conversion overhead.

Timings are the minimum over repeats (wall clock, ``time.perf_counter``; the process CPU time
of the same calls is recorded too). The one-off system-matrix build is timed separately (cache
cleared first). A 512² × 720-angle case runs in a fresh subprocess and reports its peak
resident memory (build + one forward and adjoint), which must stay within 4 GB. The
clinical fan-beam case (:func:`clinical_fan_case`: the ``clinical-fan`` preset of
:mod:`ctflow.operators.ct.presets`, 512² pixels of 0.7 mm, 1152 views, 736 channels) runs the
same way, must stay within 8 GB, and is timed against ODL ``astra_cpu`` on the same fan
geometry (``python -m benchmarks.operators --case clinical-fan`` runs only it).

Acceptance targets: ratio torch/ODL ≤ 0.2 at batch 16 and ≤ 0.5 at batch 1, for 128² and 256²
with 60 and 180 angles.

    python -m benchmarks.operators [--quick] [--device cpu|cuda] [--threads T] [--out DIR]
    python benchmarks/operators.py  (same options)

Writes ``operators.json`` (rows + metadata) and ``operators.md`` to ``--out``
(default :func:`benchmarks.settings.default_out`).

The module is longer than 400 lines because it is one benchmark: the timing table, the two
fresh-process memory cases (whose child scripts are inline strings) and their one report.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # allow `python benchmarks/operators.py`
    sys.path.insert(0, str(ROOT))

from benchmarks.settings import default_out  # noqa: E402
from ctflow.data import atomic_write_bytes, atomic_write_json  # noqa: E402
from ctflow.operators.ct import (ParallelBeam2D, RayTransform, clear_matrix_cache,  # noqa: E402
                                 matrix_cache_info, preset)

SEED = 0
FOUR_GB = 4 * 1024 ** 3
EIGHT_GB = 8 * 1024 ** 3
NOTE = ("Measured on a shared 2-core machine while a background training job and other "
        "processes used the CPU; timings are the minimum over repeats and are noisy. ASTRA's CPU "
        "projector is single-threaded, so torch runs with the thread count shown.")


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, repeats: int, device: str) -> Dict[str, float]:
    """Minimum wall and process-CPU seconds of ``fn()`` over ``repeats`` calls (after one
    warm-up call)."""
    fn()
    _sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        _sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"wall": min(wall), "cpu": min(cpu)}


def _odl_operator(geom, device: str):
    import odl
    from odl.applications import tomo

    impl = "astra_cpu"
    if device.startswith("cuda"):
        import astra

        impl = "astra_cuda" if astra.use_cuda() else "astra_cpu"
    n, e = geom.image_size, geom.extent
    space = odl.uniform_discr([-e, -e], [e, e], (n, n), dtype="float32")
    nd, ds = geom.detectors, geom.detector_spacing
    ogeom = tomo.Parallel2dGeometry(odl.nonuniform_partition(geom.angles.numpy()),
                                    odl.uniform_partition(-nd * ds / 2, nd * ds / 2, nd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return tomo.RayTransform(space, ogeom, impl=impl), impl


def _versions() -> Dict[str, str]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "numpy": np.__version__}
    for mod in ("odl", "astra"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # pragma: no cover - optional
            out[mod] = f"unavailable ({type(exc).__name__})"
    return out


def _load() -> List[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return []


def build_matrix(op, n: int, device: str) -> dict:
    """Build the torch backend's system matrix of ``op`` from an empty cache (one forward of
    a zero image) and return its cache record: ``nnz``, ``bytes``, ``build_seconds`` (the
    backend's own timing of the build) and ``symmetry``."""
    clear_matrix_cache()
    with torch.no_grad():
        op(torch.zeros(1, 1, n, n, device=device))
    (info,) = [i for i in matrix_cache_info() if i["kind"] == "ray"]
    return info


def bench_case(n: int, angles: int, batches, repeats: int, device: str,
               threads: int) -> List[dict]:
    """Rows for one geometry: build time, then forward/adjoint timings per batch size."""
    geom = ParallelBeam2D(n, angles)
    op = RayTransform(geom)
    mat = build_matrix(op, n, device)
    odl_op, impl = _odl_operator(geom, device)
    gen = torch.Generator().manual_seed(SEED)
    rows = []
    for batch in batches:
        x = torch.rand(batch, 1, n, n, generator=gen).to(device)
        with torch.no_grad():
            y = op(x)
            t_fwd = _time(lambda: op(x), repeats, device)
            t_adj = _time(lambda: op.adjoint(y), repeats, device)
        xs = [odl_op.domain.element(np.ascontiguousarray(np.rot90(a[0], -1)))
              for a in x.cpu().numpy()]
        ys = [odl_op.range.element(np.ascontiguousarray(b[0])) for b in y.cpu().numpy()]
        o_fwd = _time(lambda: [odl_op(v) for v in xs], repeats, "cpu")
        o_adj = _time(lambda: [odl_op.adjoint(v) for v in ys], repeats, "cpu")
        y_odl = np.stack([odl_op(v).asarray() for v in xs[:1]])
        diff = float(np.linalg.norm(y[:1, 0].cpu().numpy() - y_odl) / np.linalg.norm(y_odl))
        target = 0.2 if batch >= 16 else 0.5
        checked = n in (128, 256) and angles in (60, 180) and batch in (1, 16)
        ratio_f = t_fwd["wall"] / o_fwd["wall"]
        ratio_a = t_adj["wall"] / o_adj["wall"]
        rows.append({
            "geometry": "parallel", "image_size": n, "angles": angles,
            "detectors": geom.detectors, "batch": batch, "dtype": "float32",
            "device": device, "threads": threads, "seed": SEED, "odl_impl": impl,
            "torch_forward_s": t_fwd["wall"], "torch_adjoint_s": t_adj["wall"],
            "odl_forward_s": o_fwd["wall"], "odl_adjoint_s": o_adj["wall"],
            "torch_forward_cpu_s": t_fwd["cpu"], "torch_adjoint_cpu_s": t_adj["cpu"],
            "odl_forward_cpu_s": o_fwd["cpu"], "odl_adjoint_cpu_s": o_adj["cpu"],
            "ratio_forward": ratio_f, "ratio_adjoint": ratio_a,
            "target_ratio": target if checked else None,
            "meets_target": (max(ratio_f, ratio_a) <= target) if checked else None,
            "build_s": mat["build_seconds"], "nnz": mat["nnz"],
            "matrix_mb": mat["bytes"] / 2 ** 20, "symmetry": mat["symmetry"],
            "sinogram_rel_diff_vs_odl": diff, "repeats": repeats,
        })
    return rows


_CHILD = r"""
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks.operators import build_matrix
from ctflow.operators.ct import ParallelBeam2D, RayTransform
dev = {device!r}
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
g = ParallelBeam2D({n}, {angles})
op = RayTransform(g)
m = build_matrix(op, {n}, dev)
x = torch.rand(1, 1, {n}, {n}, generator=torch.Generator().manual_seed({seed})).to(dev)
with torch.no_grad():
    t0 = time.perf_counter(); y = op(x); t_f = time.perf_counter() - t0
    t0 = time.perf_counter(); op.adjoint(y); t_a = time.perf_counter() - t0
    t0 = time.perf_counter(); y = op(x); t_f = min(t_f, time.perf_counter() - t0)
    t0 = time.perf_counter(); op.adjoint(y); t_a = min(t_a, time.perf_counter() - t0)
out = dict(image_size={n}, angles={angles}, detectors=g.detectors, device=dev,
           build_s=m["build_seconds"], nnz=m["nnz"], matrix_bytes=m["bytes"],
           symmetry=m["symmetry"], forward_s=t_f, adjoint_s=t_a,
           baseline_rss_bytes=base, peak_rss_bytes=rss())
if dev.startswith("cuda"):
    out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
print("RESULT" + json.dumps(out))
"""


def _run_child(code: str, what: str) -> dict:
    """Run ``code`` in a fresh Python process; its ``RESULT{json}`` line as a dict."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=3600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(line[0][len("RESULT"):])


def big_case(n: int, angles: int, device: str, threads: int) -> dict:
    """Build + one forward/adjoint in a fresh process; returns its timings and peak memory."""
    res = _run_child(_CHILD.format(root=str(ROOT), threads=threads, device=device, n=n,
                                   angles=angles, seed=SEED), f"big case {n}x{angles}")
    peak = res.get("peak_cuda_bytes", res["peak_rss_bytes"])
    res["peak_bytes"] = peak
    res["within_4gb"] = peak <= FOUR_GB
    res["threads"] = threads
    return res


_FAN_CHILD = r"""
import json, resource, sys, time, numpy as np, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from benchmarks.operators import build_matrix
from ctflow.operators.ct import RayTransform, preset
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
base = rss()
g = preset("clinical-fan", {n}, views={views})
op = RayTransform(g)
m = build_matrix(op, {n}, "cpu")
x = torch.rand(1, 1, {n}, {n}, generator=torch.Generator().manual_seed({seed}))
def best(fn, k=2):
    t = []
    for _ in range(k):
        t0 = time.perf_counter(); r = fn(); t.append(time.perf_counter() - t0)
    return min(t), r
with torch.no_grad():
    t_f, y = best(lambda: op(x))
    t_a, _ = best(lambda: op.adjoint(y))
out = dict(preset="clinical-fan", image_size={n}, views=g.num_angles, detectors=g.detectors,
           pixel_mm=g.pixel_size, build_s=m["build_seconds"], nnz=m["nnz"],
           matrix_bytes=m["bytes"], symmetry=m["symmetry"], forward_s=t_f, adjoint_s=t_a,
           baseline_rss_bytes=base, peak_rss_bytes=rss())
try:
    odl_op = RayTransform(g, backend="odl", impl="astra_cpu").backend.odl_operator()[0]
    v = odl_op.domain.element(np.ascontiguousarray(np.rot90(x[0, 0].numpy(), -1)))
    t_of, yo = best(lambda: odl_op(v))
    t_oa, _ = best(lambda: odl_op.adjoint(yo))
    yo = yo.asarray()
    out.update(odl_forward_s=t_of, odl_adjoint_s=t_oa, odl_impl="astra_cpu",
               sinogram_rel_diff_vs_odl=float(np.linalg.norm(y[0, 0].numpy() - yo)
                                              / np.linalg.norm(yo)))
except Exception as exc:
    out.update(odl_error=f"{{type(exc).__name__}}: {{exc}}")
out["peak_rss_with_odl_bytes"] = rss()
print("RESULT" + json.dumps(out))
"""


def clinical_fan_case(threads: int, *, n: int = 512, views: int = 1152) -> dict:
    """The ``clinical-fan`` preset at ``n²`` and ``views`` views in a fresh process: build,
    forward and adjoint (torch, float32, CPU; best of 2), the peak RSS of the torch part
    (must stay within 8 GB), then ODL ``astra_cpu`` on the same geometry (best of 2)."""
    res = _run_child(_FAN_CHILD.format(root=str(ROOT), threads=threads, n=n, views=views,
                                       seed=SEED), "clinical fan case")
    res["within_8gb"] = res["peak_rss_bytes"] <= EIGHT_GB
    res["threads"] = threads
    return res


def _fan_md(fan: dict) -> List[str]:
    lines = ["", f"## Clinical fan beam: preset `clinical-fan`, {fan['image_size']}² × "
                 f"{fan['views']} views × {fan['detectors']} channels "
                 f"({fan['pixel_mm']:.2f} mm pixels), fresh process", "",
             f"- build: {fan['build_s']:.1f} s, nnz {fan['nnz']}, both CSR matrices "
             f"{fan['matrix_bytes'] / 2 ** 30:.2f} GiB ({fan['symmetry']} symmetry)",
             f"- torch forward {fan['forward_s']:.2f} s, adjoint {fan['adjoint_s']:.2f} s "
             f"(batch 1, {fan['threads']} thread(s))",
             f"- peak memory (torch): {fan['peak_rss_bytes'] / 2 ** 30:.2f} GiB — within "
             f"8 GB: {'yes' if fan['within_8gb'] else 'NO'}"]
    if "odl_forward_s" in fan:
        lines.append(f"- ODL astra_cpu forward {fan['odl_forward_s']:.2f} s, adjoint "
                     f"{fan['odl_adjoint_s']:.2f} s; sinogram rel. difference "
                     f"{fan['sinogram_rel_diff_vs_odl']:.4f} (ASTRA line_fanflat vs bin-"
                     f"averaged footprints)")
    else:
        lines.append(f"- ODL: {fan.get('odl_error', 'not run')}")
    return lines


def _md(rows: List[dict], big: dict, meta: dict, fan: Optional[dict] = None) -> str:
    lines = ["# Ray transform: torch backend vs ODL astra_cpu", "",
             f"{NOTE}", "",
             f"- device: `{meta['device']}`, torch threads: {meta['threads']}, CPU cores: "
             f"{meta['cpu_count']}, load average before/after: {meta['load_before']} / "
             f"{meta['load_after']}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}",
             f"- float32, parallel beam, default detectors, seed {SEED}; "
             f"ratio = torch / ODL wall time (min of {meta['repeats']} repeats); ODL loops over "
             f"the batch; target ratio ≤ 0.2 (batch 16) and ≤ 0.5 (batch 1) at 128²/256² "
             f"with 60/180 angles", "",
             "| image | angles | det | batch | torch fwd ms | ODL fwd ms | ratio fwd | "
             "torch adj ms | ODL adj ms | ratio adj | target | ok |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tgt = "" if r["target_ratio"] is None else f"≤ {r['target_ratio']}"
        ok = "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")
        lines.append(
            f"| {r['image_size']}² | {r['angles']} | {r['detectors']} | {r['batch']} | "
            f"{1e3 * r['torch_forward_s']:.2f} | {1e3 * r['odl_forward_s']:.2f} | "
            f"{r['ratio_forward']:.3f} | {1e3 * r['torch_adjoint_s']:.2f} | "
            f"{1e3 * r['odl_adjoint_s']:.2f} | {r['ratio_adjoint']:.3f} | {tgt} | {ok} |")
    lines += ["", "## One-off system-matrix build (float32, cache cleared)", "",
              "| image | angles | symmetry | nnz | matrix MB | build s | "
              "sinogram rel. diff vs ODL |", "|---|---|---|---|---|---|---|"]
    seen = set()
    for r in rows:
        key = (r["image_size"], r["angles"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {r['image_size']}² | {r['angles']} | {r['symmetry']} | "
                     f"{r['nnz']} | {r['matrix_mb']:.1f} | "
                     f"{r['build_s']:.2f} | {r['sinogram_rel_diff_vs_odl']:.4f} |")
    if big:
        lines += ["", f"## Large case: {big['image_size']}² × {big['angles']} angles "
                      f"({big['detectors']} detectors), fresh process", "",
                  f"- build: {big['build_s']:.1f} s, nnz {big['nnz']}, both CSR matrices "
                  f"{big['matrix_bytes'] / 2 ** 30:.2f} GiB ({big['symmetry']} symmetry)",
                  f"- forward {1e3 * big['forward_s']:.1f} ms, adjoint "
                  f"{1e3 * big['adjoint_s']:.1f} ms (batch 1)",
                  f"- peak memory: {big['peak_bytes'] / 2 ** 30:.2f} GiB "
                  f"(process peak RSS; {big['baseline_rss_bytes'] / 2 ** 30:.2f} GiB after "
                  f"imports) — within 4 GB: {'yes' if big['within_4gb'] else 'NO'}"]
    if fan:
        lines += _fan_md(fan)
    checked = [r for r in rows if r["meets_target"] is not None]
    if checked:
        n_ok = sum(r["meets_target"] for r in checked)
        lines += ["", f"Acceptance: {n_ok}/{len(checked)} checked rows meet the target."]
    return "\n".join(lines) + "\n"


def run(quick: bool = False, out: Optional[Path] = None, device: str = "cpu", *,
        threads: int = 1, big: bool = True) -> List[dict]:
    """Run the benchmark, write ``operators.json``/``operators.md`` into ``out`` and return the
    rows (one per geometry × batch).

    ``threads`` sets ``torch.set_num_threads`` (default 1, like ASTRA's single-threaded CPU
    projector); ``quick`` runs 64²/128² with 60 angles and a 256² × 360 large case.
    """
    out = Path(out) if out is not None else default_out(quick)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' requested but torch.cuda.is_available() is False")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        load_before = _load()
        sizes = (64, 128) if quick else (64, 128, 256)
        angle_set = (60,) if quick else (60, 180)
        batches = (1, 16)
        repeats = 3 if quick else 7
        rows: List[dict] = []
        for n in sizes:
            for angles in angle_set:
                rows.extend(bench_case(n, angles, batches, repeats, device, threads))
                r = rows[-1]
                print(f"{n}² x {angles}: build {r['build_s']:.2f}s; " + "; ".join(
                    f"batch {q['batch']}: fwd {q['ratio_forward']:.3f} adj "
                    f"{q['ratio_adjoint']:.3f}" for q in rows[-len(batches):]), flush=True)
        clear_matrix_cache()
        big_res, fan_res = {}, {}
        if big:
            n_big, a_big = (256, 360) if quick else (512, 720)
            big_res = big_case(n_big, a_big, device, threads)
            print(f"{n_big}² x {a_big}: peak {big_res['peak_bytes'] / 2 ** 30:.2f} GiB, build "
                  f"{big_res['build_s']:.1f}s", flush=True)
            if not quick:
                fan_res = clinical_fan_case(threads)
        meta = {"device": device, "threads": threads, "cpu_count": os.cpu_count(),
                "versions": _versions(), "seed": SEED, "repeats": repeats, "quick": quick,
                "load_before": load_before, "load_after": _load(), "note": NOTE,
                "platform": platform.platform(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "operators.json",
                          {"meta": meta, "rows": rows, "large_case": big_res,
                           "clinical_fan": fan_res}, default=None)
        atomic_write_bytes(out / "operators.md",
                           _md(rows, big_res, meta, fan_res).encode("utf-8"))
        return rows
    finally:
        torch.set_num_threads(previous)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only")
    p.add_argument("--device", default="cpu", help="cpu or cuda (torch side)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--out", default=None,
                   help="result folder (default: as python -m benchmarks)")
    p.add_argument("--no-big", action="store_true", help="skip the large memory cases")
    p.add_argument("--case", choices=("all", "clinical-fan"), default="all",
                   help="clinical-fan: only the clinical fan-beam case (prints its JSON)")
    args = p.parse_args(argv)
    if args.case == "clinical-fan":
        fan = clinical_fan_case(args.threads)
        print(json.dumps(fan, indent=1))
        print("\n".join(_fan_md(fan)))
        return 0 if fan["within_8gb"] else 1
    out = Path(args.out) if args.out else default_out(args.quick)
    rows = run(quick=args.quick, out=out, device=args.device, threads=args.threads,
               big=not args.no_big)
    print((out / "operators.md").read_text())
    return 0 if all(r["meets_target"] in (None, True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
