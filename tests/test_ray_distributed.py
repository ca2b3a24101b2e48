"""Ray scale-out (optional extra ``ctflow[ray]``): ``reconstruct-dicom --ray``, the benchmark
runner's ``--ray`` fan-out and the Ray Tune search, on one local Ray instance (2 CPUs, bound to
the loopback interface) shared by every test of this module.

What is checked: the Ray paths give the same reconstructions and rows as in-process (same
seeds); a worker killed on its task's first attempt is retried and every slice is written
exactly once; ``--resume`` works with ``--ray``; ``tune`` writes a settings file that the suite
then runs with.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

# Ray reads this when imported: the local node takes 127.0.0.1 and binds its servers there.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray", reason="the optional extra ctflow[ray] is not installed "
                                        "(pip install 'ctflow[ray]')")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.runner import ResultStore, run_suite  # noqa: E402
from benchmarks.suites import ct_sparse  # noqa: E402
from benchmarks.suites.common import SuiteContext  # noqa: E402
from benchmarks.suites.tuning import load_search, ray_tune_suite  # noqa: E402
from ctflow.distributed import RayOptions, ray_slice_mapper  # noqa: E402
from ctflow.flow.gaussian import GaussianVelocity  # noqa: E402
from ctflow.priors.base import FlowPrior, gaussian_prior  # noqa: E402

CHEST = REPO / "ctflow" / "data" / "samples" / "chest-subset"
N = 16          # working size of every solve here
#: Tiny MS-Flow settings (the same code path as the real ones).
MSFLOW = {"K": 2, "M": 1, "sweeps": 2, "init": "fbp"}
#: Fields that measure time or memory of one run (they differ between any two runs).
TIMING = {"seconds", "seconds_per_iteration", "peak_memory_bytes", "timestamp",
          "seconds_total", "started", "finished", "seconds_per_slice"}


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance (2 CPUs, loopback only) for the whole module."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    assert ray.is_initialized()
    node = ray.nodes()[0]["NodeManagerAddress"]
    assert node == "127.0.0.1", f"the test instance is bound to {node}, not the loopback"
    yield ray
    ray.shutdown()


@pytest.fixture()
def series(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for f in sorted(CHEST.glob("*.dcm"))[:3]:
        shutil.copy2(f, src / f.name)
    return src


def tiny_prior():
    torch.manual_seed(0)
    return gaussian_prior(torch.full((1, N, N), 0.4), torch.full((1, N, N), 0.25),
                          name="gauss16")


def gaussian_ct_prior(size=N):
    """A closed-form Gaussian prior posing as a CT prior (the suites need a ``hu_window``)."""
    return FlowPrior(GaussianVelocity(torch.full((1, size, size), 0.3),
                                      torch.full((1, size, size), 0.2)),
                     image_size=size, scale=1.0, shift=0.0, hu_window=(-1024.0, 1024.0),
                     name="gaussian-test")


def dicom_pixels(folder: Path):
    import pydicom
    return {p.name: pydicom.dcmread(p).pixel_array for p in sorted(folder.glob("*.dcm"))}


def strip(obj):
    """``obj`` without the timing fields (recursively)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------
# reconstruct-dicom
def test_reconstruct_dicom_on_ray_equals_in_process(local_ray, series, tmp_path):
    from ctflow.tasks import reconstruct_dicom

    kw = dict(views=12, method="msflow", prior=tiny_prior(), size=N, seed=3, progress=False,
              stable_uids=True, **MSFLOW)         # the same derived UIDs (and file names)
    a = reconstruct_dicom(series, tmp_path / "here", **kw)
    b = reconstruct_dicom(series, tmp_path / "ray", map_slices=ray_slice_mapper(True), **kw)
    assert a["executor"] == "in-process" and b["executor"]["ray"] == "local"
    assert b["slices_reconstructed"] == 3 and b["status"] == "complete"
    pa, pb = dicom_pixels(tmp_path / "here"), dicom_pixels(tmp_path / "ray")
    assert list(pa) == list(pb) and len(pa) == 3
    for name in pa:                                 # the same stored pixels, bit for bit
        np.testing.assert_array_equal(pa[name], pb[name])
    for s in (a, b):
        s.pop("executor")
        s["settings"].pop("out_dir")
    assert strip(a) == strip(b)                     # the same summary apart from timings
    assert [r["psnr"] for r in a["slices"]] == [r["psnr"] for r in b["slices"]]


def test_killed_worker_is_retried_and_every_slice_written_once(local_ray, series, tmp_path):
    from ctflow.data import derived_output_name, read_dicom_series
    from ctflow.tasks import reconstruct_dicom

    vol = read_dicom_series(series)
    victim = vol.slices[1].sop_instance_uid
    log = tmp_path / "attempts"
    log.mkdir()

    def die_on_first_attempt(key):
        # runs inside the Ray worker: one file per attempt; the victim's first attempt kills
        # its worker process outright (no exception, no cleanup), as a crash or OOM kill would
        n = len(list(log.glob(f"{key}.*")))
        (log / f"{key}.{n}").touch()
        if key == victim and n == 0:
            os._exit(1)

    out = tmp_path / "out"
    s = reconstruct_dicom(series, out, views=12, method="fbp", prior=None, size=N,
                          progress=False,
                          map_slices=ray_slice_mapper(
                              RayOptions(max_retries=2, task_hook=die_on_first_attempt)))
    attempts = {}
    for f in log.iterdir():
        key = f.name.rsplit(".", 1)[0]
        attempts[key] = attempts.get(key, 0) + 1
    assert attempts[victim] == 2                     # killed once, then retried
    assert all(attempts[sl.sop_instance_uid] >= 1 for sl in vol.slices)
    sops = sorted(sl.sop_instance_uid for sl in vol.slices)
    uid = s["derived_series_uid"]
    assert sorted(p.name for p in out.glob("*.dcm")) == sorted(
        derived_output_name(vol, k, uid) for k in range(len(vol.slices)))
    assert sorted(r["sop_instance_uid"] for r in s["slices"]) == sops     # each exactly once
    assert s["slices_reconstructed"] == 3 and not list(out.glob(".*.tmp"))
    # the retried slice equals an in-process reconstruction of it
    ref = reconstruct_dicom(series, tmp_path / "ref", views=12, method="fbp", prior=None,
                            size=N, progress=False, slices=(1, 2))
    assert ref["slices"][0]["psnr"] == [r for r in s["slices"] if r["index"] == 1][0]["psnr"]


def test_a_failing_slice_stops_the_run_and_resume_finishes_it(local_ray, series, tmp_path):
    from ctflow.data import read_dicom_series
    from ctflow.tasks import reconstruct_dicom

    victim = read_dicom_series(series).slices[0].sop_instance_uid

    def fail(key):
        if key == victim:
            raise ValueError(f"cannot solve {key}")

    out = tmp_path / "out"
    kw = dict(views=12, method="fbp", prior=None, size=N, progress=False)
    with pytest.raises(ValueError, match="cannot solve"):     # the task's own error, not Ray's
        reconstruct_dicom(series, out, map_slices=ray_slice_mapper(RayOptions(task_hook=fail)),
                          **kw)
    assert not (out / f"{victim}.dcm").exists()
    summary = json.loads((out / "summary.json").read_text()) \
        if (out / "summary.json").exists() else {"status": "running", "slices": []}
    assert summary["status"] == "running"                     # not marked complete
    s = reconstruct_dicom(series, out, map_slices=ray_slice_mapper("local"), resume=True, **kw)
    assert s["status"] == "complete" and len(list(out.glob("*.dcm"))) == 3
    assert s["slices_reconstructed"] + s["slices_skipped"] == 3
    assert s["slices_reconstructed"] >= 1


def test_cli_ray_resume(local_ray, series, tmp_path, capsys):
    from ctflow.cli import main

    fast = ["--method", "fbp", "--prior", "none", "--size", str(N), "--views", "12", "--quiet"]
    out = tmp_path / "out"
    assert main(["reconstruct-dicom", str(series), str(out), *fast, "--slices", "0:2",
                 "--ray"]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.dcm")}
    assert len(first) == 2
    assert main(["reconstruct-dicom", str(series), str(out), *fast, "--ray", "--resume"]) == 0
    assert "1 slice(s) reconstructed, 2 skipped" in capsys.readouterr().out
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.dcm")}
    assert len(files) == 3 and all(files[k] == v for k, v in first.items())   # untouched
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and len(summary["slices"]) == 3
    # a rerun without --resume is refused as in-process
    assert main(["reconstruct-dicom", str(series), str(out), *fast, "--ray"]) == 2


# ---------------------------------------------------------------------------------------------
# the benchmark runner
def test_benchmark_cases_on_ray_equal_in_process(local_ray, tmp_path):
    prior = gaussian_ct_prior()
    a = run_suite("ct-sparse", quick=True, out=tmp_path / "here", prior=prior)
    b = run_suite("ct-sparse", quick=True, out=tmp_path / "ray", prior=prior, ray=True)
    assert a.failed == b.failed == [] and a.ran == b.ran == a.total > 0
    ra = {r["id"]: r for r in ResultStore(tmp_path / "here" / "ct-sparse.jsonl").rows()}
    rb = {r["id"]: r for r in ResultStore(tmp_path / "ray" / "ct-sparse.jsonl").rows()}
    assert len(ra) == len(rb) == a.total                # each case written once
    assert set(ra) == set(rb)
    for i in ra:
        x, y = strip(ra[i]), strip(rb[i])
        assert x["metrics"]["psnr"] == pytest.approx(y["metrics"]["psnr"], abs=1e-6)
        assert x == y, i                                 # every other field equal
    # a rerun on Ray finds every case stored
    c = run_suite("ct-sparse", quick=True, out=tmp_path / "ray", prior=prior, ray=True)
    assert (c.skipped, c.ran) == (a.total, 0)
    with pytest.raises(ValueError, match="exclude each other"):
        run_suite("ct-sparse", quick=True, out=tmp_path, prior="ct64", ray=True, isolate=True)


def test_tune_writes_settings_the_suite_runs_with(local_ray, tmp_path):
    search = {"suite": "ct-sparse", "method": "msflow", "metric": "psnr", "num_samples": 2,
              "seed": 1, "space": {"rho": {"loguniform": [10.0, 10000.0]},
                                   "lam": {"choice": [0.5, 1.0]}},
              "fixed": {"sweeps": 1}}
    path = tmp_path / "search.json"
    path.write_text(json.dumps(search))
    prior = gaussian_ct_prior()
    ctx = SuiteContext(suite="ct-sparse", quick=True, prior=prior, load_prior=False)
    out = tmp_path / "out"
    res = ray_tune_suite(ct_sparse, ctx, search=load_search(path), out=out,
                         options=RayOptions(quiet=True))
    trials = res["trials"]
    assert len(trials) == 2 and all(t["error"] is None for t in trials)
    assert all(10.0 <= t["config"]["rho"] <= 10000.0 for t in trials)
    best = max(trials, key=lambda t: t["psnr"])
    settings = out / "tune-ct-sparse.chosen.json"
    assert res["path"] == settings
    chosen = json.loads(settings.read_text())["msflow"]
    assert chosen["chosen"] == best["config"] and chosen["search"] == "ray-tune"
    assert chosen["psnr"] == pytest.approx(best["psnr"])
    rows = ResultStore(out / "tune-ct-sparse.jsonl").ok_rows()
    assert len(rows) == res["stored"] == len({_key(t["config"]) for t in trials})
    assert all(r["image"].startswith("validation/") for r in rows)    # never the TEST split
    assert all(r["options"]["sweeps"] == 1 for r in rows)

    # the suite runs with the tuned values (in-process here; quick ct-sparse runs the four
    # baselines first, then MS-Flow at N = 8)
    run = run_suite("ct-sparse", quick=True, out=tmp_path / "bench", prior=prior,
                    settings=settings, limit=5)
    assert run.failed == [] and run.ran == 5
    ms = [r for r in ResultStore(tmp_path / "bench" / "ct-sparse.jsonl").ok_rows()
          if r["method"] == "msflow"]
    assert ms and all(r["options"]["rho"] == chosen["chosen"]["rho"] and
                      r["options"]["lam"] == chosen["chosen"]["lam"] for r in ms)
    assert all(math.isfinite(r["metrics"]["psnr"]) for r in ms)
    # the rows record the config in force: the tuned one, not the file's
    plain = SuiteContext(suite="ct-sparse", quick=True, load_prior=False)
    assert ms[0]["config"] != plain.config_label()


def _key(config):
    return json.dumps(config, sort_keys=True)

